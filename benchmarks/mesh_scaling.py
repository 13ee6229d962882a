"""Mesh scaling: one model shape and job on several (tensor x pipeline x data) meshes, dummy weights.

    PYTHONPATH=. python3 benchmarks/mesh_scaling.py --model benchmarks/configs/llama-3.2-1b   # on the GPU machine
    PYTHONPATH=. python3 benchmarks/mesh_scaling.py --smoke        # tiny shape on 8 fake CPU devices

For each mesh ``TxPxD`` (tensor x pipe x data) it builds D engine replicas (``sharding.ShardedEngine`` behind a
``DataParallelEngine``), compiles every bucket (untimed warm-up), then times the whole job submitted at once (greedy,
ignore_eos). The table gives output tokens/s, the largest per-device parameter and KV-cache bytes, the scaling
efficiency ``throughput / (devices x throughput on 1x1x1)`` (when 1x1x1 is in the sweep), the pipeline's theoretical
bubble ``(P-1)/(M+P-1)`` and a measured one: ``1 - sum of stage busy times / (P x pipelined wall time)`` for M
microbatches of the largest bucket, each stage timed alone with a device sync. On fake CPU devices all "devices"
share the host's cores, so only the GPU numbers mean anything. Prints one JSON record (device, jax, commit, rows).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before jax starts: the smoke sweep needs 8 (fake) CPU devices
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, print_record, random_prompts  # noqa: E402
from jaxllm.config import ResolvedConfig, power_of_two_buckets  # noqa: E402
from jaxllm.loading.model_loader import resolve_dtype  # noqa: E402
from jaxllm.models import ModelConfig, get_model_class  # noqa: E402
from jaxllm.sampling_params import SamplingParams  # noqa: E402
from sharding import DataParallelEngine, ShardedEngine, build_sharded_model, make_mesh  # noqa: E402
from sharding.engine import generate  # noqa: E402
from sharding.microbatch import bubble_fraction  # noqa: E402
from sharding.runner import padding_batch  # noqa: E402

SMOKE_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "max_position_embeddings": 256,
}
SMOKE_MESHES = "1x1x1,2x1x1,4x1x1,1x2x1,2x2x1,1x1x2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a directory with config.json (weights are random)")
    p.add_argument("--meshes", help="comma-separated TxPxD, e.g. 1x1x1,2x1x1,1x2x1 (default: all that fit)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-microbatches", type=int, help="per pipeline step (default: P)")
    p.add_argument("--smoke", action="store_true", help="tiny shape and job on 8 fake CPU devices")
    args = p.parse_args(argv)
    if args.smoke:
        args.meshes = args.meshes or SMOKE_MESHES
        args.num_prompts, args.input_len, args.output_len = 8, 24, 8
        args.dtype, args.max_num_seqs, args.max_num_batched_tokens, args.block_size = "float32", 8, 64, 4
    elif not args.model:
        p.error("give --model DIR (a config.json) or --smoke")
    return args


def parse_meshes(text: str | None) -> list[tuple[int, int, int]]:
    """``"2x1x1,1x2x1"`` -> [(2, 1, 1), (1, 2, 1)]; default: every power-of-two shape using all devices, plus 1x1x1."""
    if text:
        meshes = []
        for item in text.split(","):
            parts = item.strip().split("x")
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"mesh {item!r} is not TxPxD with three positive ints")
            meshes.append(tuple(int(p) for p in parts))
        return meshes
    count = jax.device_count()
    sizes = [2**i for i in range(int(math.log2(count)) + 1)]
    shapes = [(t, p, count // (t * p)) for t in sizes for p in sizes if count % (t * p) == 0 and t * p <= count]
    return [(1, 1, 1)] + [s for s in shapes if s != (1, 1, 1)]


def resolved_config(args, model_config: ModelConfig, num_replicas: int) -> ResolvedConfig:
    max_model_len = args.input_len + args.output_len
    requests_per_replica = min(args.max_num_seqs, -(-args.num_prompts // num_replicas))
    num_blocks = requests_per_replica * -(-max_model_len // args.block_size) + 1  # the job never preempts
    budget = args.max_num_batched_tokens
    return ResolvedConfig(
        max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=budget,
        block_size=args.block_size,
        num_blocks=num_blocks,
        token_buckets=power_of_two_buckets(min(16, budget), budget),
    )


def build_replica(args, model_config, replica_mesh, config: ResolvedConfig, dtype) -> ShardedEngine:
    model_cls = get_model_class(model_config.architecture)
    tensors = random_tensors(model_config) if args.smoke else None  # CPU: skip compiling a jax RNG program
    model = build_sharded_model(model_cls, model_config, dtype, replica_mesh, tensors=tensors, seed=0)
    runner_kwargs = {"num_microbatches": args.num_microbatches}
    return ShardedEngine.from_model(model, replica_mesh, config, dtype, runner_kwargs=runner_kwargs)


def random_tensors(model_config: ModelConfig):
    from flax import nnx

    from jaxllm.loading.model_loader import abstract_model

    rng = np.random.default_rng(0)
    abstract = abstract_model(get_model_class(model_config.architecture), model_config, np.float32)
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        shape, leaf = variable.get_value().shape, path[-1]
        value = rng.normal(0.0, 0.05, shape[::-1] if leaf == "kernel" else shape).astype(np.float32)
        name = ".".join(map(str, path[:-1] + ("weight" if leaf in ("kernel", "embedding") else leaf,)))
        yield name, value + (1.0 if str(path[-2]).endswith("norm") else 0.0)


def bytes_per_device(arrays) -> int:
    """The largest number of bytes any one device holds of ``arrays``."""
    per_device: dict[int, int] = {}
    for array in jax.tree.leaves(arrays):
        for shard in array.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def measured_bubble(engine: ShardedEngine) -> float | None:
    """1 - (sum of stage busy times) / (P x wall time of the pipelined run), on padding microbatches."""
    pipeline, config = engine.runner.pipeline, engine.config
    if pipeline.num_stages == 1:
        return None
    bucket = config.token_buckets[-1]
    batch = padding_batch(bucket, config.request_rows_for(bucket), config.max_blocks_per_request)
    batches = [batch] * engine.runner.num_microbatches
    jax.block_until_ready(pipeline.run(batches))  # warm (compiled already; fills caches)
    start = time.perf_counter()
    jax.block_until_ready(pipeline.run(batches))
    wall = time.perf_counter() - start
    busy = 0.0
    for batch in batches:
        inputs = batch.input_ids
        for stage in pipeline.stages:
            start = time.perf_counter()
            inputs = jax.block_until_ready(pipeline._run_stage(stage, inputs, batch, None))
            busy += time.perf_counter() - start
    return max(0.0, 1.0 - busy / (pipeline.num_stages * wall))


def run_mesh(args, model_config, shape: tuple[int, int, int], prompts: list[dict]) -> dict:
    tensor, pipe, data = shape
    mesh = make_mesh(tensor, pipe, data)
    dtype = resolve_dtype(args.dtype, model_config.checkpoint_dtype)
    config = resolved_config(args, model_config, data)
    start = time.perf_counter()
    engine = DataParallelEngine.build(mesh, lambda m, i: build_replica(args, model_config, m, config, dtype))
    compile_s = sum(replica.runner.warm_up() for replica in engine.replicas)
    build_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = generate(engine, {f"p{i}": p["prompt_token_ids"] for i, p in enumerate(prompts)}, params)
    elapsed = time.perf_counter() - start
    first = engine.replicas[0]
    num_microbatches = first.runner.num_microbatches
    row = {
        "mesh": f"{tensor}x{pipe}x{data}",
        "num_devices": tensor * pipe * data,
        "elapsed_s": elapsed,
        "build_s": build_s,
        "compile_s": compile_s,
        "output_tokens_per_s": sum(len(t) for t in outputs.values()) / elapsed,
        "param_bytes_per_device": bytes_per_device(
            [s.state for r in engine.replicas for s in r.runner.pipeline.stages]
        ),
        "kv_bytes_per_device": bytes_per_device(
            [s.kv_caches for r in engine.replicas for s in r.runner.pipeline.stages]
        ),
        "num_microbatches": num_microbatches,
        "bubble_theoretical": bubble_fraction(pipe, num_microbatches),
        "bubble_measured": measured_bubble(first),
    }
    engine.close()
    return row


def add_efficiency(rows: list[dict]) -> None:
    base = next((r for r in rows if r["mesh"] == "1x1x1"), None)
    for row in rows:
        row["scaling_efficiency"] = (
            row["output_tokens_per_s"] / (row["num_devices"] * base["output_tokens_per_s"]) if base else None
        )


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        f"{'mesh TxPxD':>10} {'out tok/s':>10} {'params/dev MiB':>15} {'KV/dev MiB':>11} {'efficiency':>10} "
        f"{'M':>3} {'bubble th.':>10} {'bubble meas.':>12}"
    )
    for r in rows:
        print(
            f"{r['mesh']:>10} {r['output_tokens_per_s']:>10.1f} {r['param_bytes_per_device'] / 2**20:>15.2f} "
            f"{r['kv_bytes_per_device'] / 2**20:>11.2f} {fmt(r['scaling_efficiency'], '>10.2f')} "
            f"{r['num_microbatches']:>3} {r['bubble_theoretical']:>10.2f} {fmt(r['bubble_measured'], '>12.2f')}"
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        hf_config = SMOKE_HF_CONFIG
    else:
        hf_config = json.loads((pathlib.Path(args.model) / "config.json").read_text())
    model_config = ModelConfig.from_hf_config(hf_config)
    prompts = random_prompts(args.num_prompts, args.input_len, model_config.vocab_size)
    rows = [run_mesh(args, model_config, shape, prompts) for shape in parse_meshes(args.meshes)]
    add_efficiency(rows)
    print_table(rows)
    record = {
        "benchmark": "mesh_scaling",
        **environment(),
        "model": args.model or "smoke",
        "job": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len},
        "engine": {
            "dtype": args.dtype,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": args.block_size,
        },
        "rows": rows,
    }
    best = max(rows, key=lambda r: r["output_tokens_per_s"])
    print(f"mesh_scaling on {record['device']}: best {best['mesh']} at {best['output_tokens_per_s']:.1f} output tok/s")
    print_record(record)
    return record


if __name__ == "__main__":
    main()
