"""Mesh scaling: one model shape and job on several (tensor x pipeline x data) meshes, dummy weights.

    PYTHONPATH=. python3 benchmarks/mesh_scaling.py --model benchmarks/configs/llama-3.2-1b   # on the GPU machine
    PYTHONPATH=. python3 benchmarks/mesh_scaling.py --job J8 --meshes 1x1x1,2x1x1             # a reference job
    PYTHONPATH=. python3 benchmarks/mesh_scaling.py --smoke        # tiny shape on 8 fake CPU devices

For each mesh ``TxPxD`` (tensor x pipe x data) it builds ``LLM(tensor_parallel_size=T, pipeline_parallel_size=P,
data_parallel_size=D, load_format="dummy")`` with a KV cache that holds the whole job (no preemption; or, with
``--gpu-memory-utilization``, sized from device memory as a user's engine is), which
compiles every bucket (the untimed warm-up), then times ``LLM.generate`` on the whole job submitted at once (greedy,
ignore_eos), then a batch-1 latency run of ``--latency-output-len`` tokens (inter-token latency p50, as
``benchmarks/latency.py`` measures it; 0 skips it). The table gives output tokens/s, the largest per-device
parameter and KV-cache bytes (and, on GPUs, the allocator's bytes in use per device after the runs), the scaling
efficiency (throughput per device over the base mesh's: 1x1x1 when in the sweep, else the smallest mesh), the
pipeline's theoretical bubble ``(P-1)/(M+P-1)`` and a measured one: ``1 - sum of stage busy times / (P x pipelined
wall time)`` for M microbatches of the largest bucket, each stage timed alone with a device sync.
On fake CPU devices all "devices" share the host's cores, so only the GPU numbers mean anything. Prints one JSON
record (device, jax, commit, rows). ``--process-per-mesh`` runs each mesh in a fresh process (this script again, with
one mesh), so no engine inherits what an earlier one left on the devices: JAX's allocator peak, or under XLA's VMM
allocator the memory a destroyed engine still holds, which sizes the next engine's cache from less.
``--scaling-base-log PATH`` draws the efficiency against an earlier run's meshes too (its JSON record in PATH, e.g. a
sweep split over several calls of a time-limited machine): it must name the same device, model, job and engine
options, and must have run on the same machine, which the script cannot check."""

from __future__ import annotations

import os
import sys

USER_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")  # before jaxllm sets its default: for children
if "--smoke" in sys.argv:  # before jax starts: the smoke sweep needs 8 (fake) CPU devices
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ENVIRONMENT_KEYS,
    JOBS,
    RECORD_PREFIX,
    add_engine_variant_arguments,
    child_env,
    environment,
    jaxllm_switches,
    print_record,
    random_prompts,
    read_records,
    variant_engine_options,
    variant_label,
)
from benchmarks.latency import percentiles, run_batch  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.runner.device_memory import device_memory  # noqa: E402
from jaxllm.runner.step_batch import padding_step_batch  # noqa: E402
from sharding import DataParallelEngine  # noqa: E402
from sharding.microbatch import bubble_fraction  # noqa: E402
from sharding.runner import PipelineRunner  # noqa: E402

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
    p.add_argument("--job", choices=sorted(JOBS), help="a reference job: its model shape and lengths, 256 seqs a step")
    p.add_argument("--model", help="a directory with config.json (weights are random)")
    p.add_argument("--meshes", help="comma-separated TxPxD, e.g. 1x1x1,2x1x1,1x2x1 (default: all that fit)")
    p.add_argument("--num-prompts", type=int, help="default 64 (--smoke: 8)")
    p.add_argument("--input-len", type=int, help="default 512 (--smoke: 24)")
    p.add_argument("--output-len", type=int, help="default 128 (--smoke: 8)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, help="default 64 (--job: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, help="default 2048 (--job: 8192)")
    p.add_argument("--latency-output-len", type=int, help="batch-1 decode tokens per mesh, 0: none (default 64)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="size the KV cache from device memory at this share, as a user's engine does (default: the job's size)",
    )
    p.add_argument("--num-microbatches", type=int, help="per pipeline step (default: P)")
    p.add_argument("--smoke", action="store_true", help="tiny shape and job on 8 fake CPU devices")
    p.add_argument("--process-per-mesh", action="store_true", help="each mesh in a fresh process (needs --meshes)")
    p.add_argument(
        "--scaling-base-log",
        metavar="PATH",
        help="an earlier run's output on this machine (its JSON record): its meshes join the efficiency's base choice",
    )
    add_engine_variant_arguments(p)
    args = p.parse_args(argv)
    if args.process_per_mesh and not args.meshes:
        p.error("--process-per-mesh needs --meshes (this process must not start the devices to count them)")
    engine_defaults = (64, 2048)
    if args.smoke:
        args.meshes = args.meshes or SMOKE_MESHES
        args.dtype, args.block_size = "float32", 4
        engine_defaults, job = (8, 64), (8, 24, 8)
    elif args.job:
        reference = JOBS[args.job]
        args.model = args.model or reference.model_config
        engine_defaults, job = (256, 8192), (reference.num_prompts, reference.input_len, reference.output_len)
    elif not args.model:
        p.error("give --job, --model DIR (a config.json) or --smoke")
    else:
        job = (64, 512, 128)
    args.max_num_seqs = args.max_num_seqs or engine_defaults[0]
    args.max_num_batched_tokens = args.max_num_batched_tokens or engine_defaults[1]
    if args.latency_output_len is None:
        args.latency_output_len = 4 if args.smoke else 64
    args.num_prompts = args.num_prompts or job[0]
    args.input_len = args.input_len or job[1]
    args.output_len = args.output_len or job[2]
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


def num_kv_blocks(args, num_replicas: int) -> int:
    """Blocks per replica for its share of the job at full length (the job never preempts)."""
    requests_per_replica = min(args.max_num_seqs, -(-args.num_prompts // num_replicas))
    return requests_per_replica * -(-(args.input_len + args.output_len) // args.block_size)


def kv_cache_size(args, num_replicas: int) -> dict:
    """The engine's KV-cache option: sized from memory when asked, else to the job."""
    if args.gpu_memory_utilization is not None:
        return {"gpu_memory_utilization": args.gpu_memory_utilization}
    return {"num_gpu_blocks_override": num_kv_blocks(args, num_replicas)}


def build_llm(args, model_dir: str, shape: tuple[int, int, int]) -> LLM:
    tensor, pipe, data = shape
    llm = LLM(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        tensor_parallel_size=tensor,
        pipeline_parallel_size=pipe,
        data_parallel_size=data,
        max_model_len=args.input_len + max(args.output_len, args.latency_output_len),  # the batch-1 run's too
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        **kv_cache_size(args, data),
        **variant_engine_options(args),
    )
    if args.num_microbatches:
        for runner in replica_runners(llm):
            if isinstance(runner, PipelineRunner):
                runner.num_microbatches = args.num_microbatches
    return llm


def replica_runners(llm: LLM) -> list:
    core = llm.llm_engine.core
    return [r.runner for r in core.replicas] if isinstance(core, DataParallelEngine) else [core.runner]


def runner_arrays(runner) -> tuple[list, list]:
    """(parameters, KV cache) arrays of a ``PipelineRunner`` (every stage) or a one-device ``ModelRunner``."""
    if isinstance(runner, PipelineRunner):
        stages = runner.pipeline.stages
        return [s.state for s in stages], [s.kv_caches for s in stages]
    return [runner.params], [runner.kv_caches]


def bytes_per_device(arrays) -> int:
    """The largest number of bytes any one device holds of ``arrays``."""
    per_device: dict[int, int] = {}
    for array in jax.tree.leaves(arrays):
        for shard in array.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def in_use_bytes_per_device(num_devices: int) -> int | None:
    """The most bytes held on any of the first ``num_devices`` devices (the mesh's): what JAX's allocator holds
    (weights, KV cache and whatever else is live), or under an allocator without statistics (XLA's VMM allocator) the
    CUDA driver's used memory (everything on the device); None where neither is known (CPU)."""
    local = [d for d in jax.devices()[:num_devices] if d.process_index == jax.process_index()]  # this process's
    memories = [device_memory(d) for d in local]
    return max(m.in_use for m in memories) if memories and None not in memories else None


def measured_bubble(runner) -> float | None:
    """1 - (sum of stage busy times) / (P x wall time of the pipelined run), on padding microbatches. Each way of
    running them goes once untimed first, so neither times a compile or a pool's first allocation."""
    if not isinstance(runner, PipelineRunner) or runner.pipeline.num_stages == 1:
        return None
    pipeline, config = runner.pipeline, runner.config
    bucket = config.token_buckets[-1]
    rows = config.request_rows_for(bucket)
    batches = [padding_step_batch(bucket, rows, config.max_blocks_per_request)] * runner.num_microbatches
    head_args = [runner.build_head_args([], rows, index, 0) for index in range(len(batches))]

    def pipelined() -> float:
        start = time.perf_counter()
        results = jax.block_until_ready(pipeline.run(batches, head_args))
        wall = time.perf_counter() - start
        pipeline.release(results)
        return wall

    def one_at_a_time() -> float:
        """Seconds the stages (the last with the head, on its devices too) are busy, each call run alone."""
        busy = 0.0
        for batch, args in zip(batches, head_args, strict=True):
            hidden = None
            for index, stage in enumerate(pipeline.stages):
                start = time.perf_counter()
                out = jax.block_until_ready(pipeline.run_stage(stage, hidden, batch))
                if stage is pipeline.stages[-1]:
                    pipeline.release([jax.block_until_ready(pipeline.run_head(out["logits"], batch, args))])
                busy += time.perf_counter() - start
                if hidden is not None:
                    pipeline.stages[index - 1].results.release({"hidden": hidden})
                hidden = out
            pipeline.stages[-1].results.release({"logits": out["logits"]})
        return busy

    pipelined(), one_at_a_time()
    wall = pipelined()
    return max(0.0, 1.0 - one_at_a_time() / (pipeline.num_stages * wall))


def run_mesh(args, model_dir: str, shape: tuple[int, int, int], prompts: list[dict]) -> dict:
    tensor, pipe, data = shape
    start = time.perf_counter()
    llm = build_llm(args, model_dir, shape)
    build_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    itl_p50_ms = None
    if args.latency_output_len:
        vocab_size = llm.llm_engine.model_config.vocab_size
        prompt = random_prompts(1, args.input_len, vocab_size, seed=1)
        run_batch(llm.llm_engine, prompt, 4, "latency-warmup")
        _, itl = run_batch(llm.llm_engine, prompt, args.latency_output_len, "latency")
        itl_p50_ms = percentiles(itl)["p50"]
    runners = replica_runners(llm)
    arrays = [runner_arrays(runner) for runner in runners]
    num_microbatches = getattr(runners[0], "num_microbatches", 1)
    return {
        "mesh": f"{tensor}x{pipe}x{data}",
        "num_devices": tensor * pipe * data,
        "elapsed_s": elapsed,
        "build_s": build_s,
        "compile_s": llm.llm_engine.compile_seconds,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
        "batch1_itl_p50_ms": itl_p50_ms,
        "param_bytes_per_device": bytes_per_device([params for params, _ in arrays]),
        "kv_bytes_per_device": bytes_per_device([kv for _, kv in arrays]),
        "in_use_bytes_per_device": in_use_bytes_per_device(tensor * pipe * data),  # after the runs, engine alive
        "num_kv_blocks": llm.llm_engine.resolved.num_blocks,
        "pool_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),  # after the engine chose (process_env)
        "num_preemptions": sum(r.scheduler.num_preemptions for r in _cores(llm)),
        "num_microbatches": num_microbatches,
        "bubble_theoretical": bubble_fraction(pipe, num_microbatches),
        "bubble_measured": measured_bubble(runners[0]),
    }


def _cores(llm: LLM) -> list:
    core = llm.llm_engine.core
    return core.replicas if isinstance(core, DataParallelEngine) else [core]


def scaling_base(rows: list[dict]) -> dict | None:
    """The row efficiencies are measured against: 1x1x1 where the sweep has it, else (a sweep of meshes too large
    for one device, e.g. the 70B shape's 4x1x1,8x1x1,4x2x1) the first of those with the fewest devices; none for a
    sweep of one mesh."""
    base = next((r for r in rows if r["mesh"] == "1x1x1"), None)
    if base is None and len(rows) > 1:
        base = min(rows, key=lambda r: r["num_devices"])
    return base


def add_efficiency(rows: list[dict], earlier_rows: list[dict] = ()) -> None:
    """Each row's ``scaling_efficiency``: its throughput per device over the base row's (``scaling_base``), and
    ``scaling_base``: that row's mesh. The base is chosen from ``earlier_rows`` (an earlier run's, see
    ``--scaling-base-log``) and ``rows`` together, earlier rows first."""
    base = scaling_base([*earlier_rows, *rows])
    base_label = None
    if base is not None:
        base_label = base["mesh"] + (" (earlier run)" if any(base is row for row in earlier_rows) else "")
    for row in rows:
        row["scaling_base"] = base_label
        row["scaling_efficiency"] = (
            (row["output_tokens_per_s"] / row["num_devices"]) / (base["output_tokens_per_s"] / base["num_devices"])
            if base
            else None
        )


RUN_IDENTITY_KEYS = ("device", "model", "reference_job", "job", "engine")  # what an earlier run must share with this


def earlier_run_rows(path: str, record: dict) -> list[dict]:
    """The rows of the last mesh_scaling JSON record in ``path`` (an earlier run's output, e.g. gpu_session.sh's
    ``$OUT/mesh70.log``) whose device, model, job and engine options are this run's ``record``'s (those of them it
    has). That the earlier run had the same machine is up to the caller. ValueError when the file has no such record,
    naming what differs."""
    lines = pathlib.Path(path).read_text().splitlines()
    records = [r for r in read_records(lines) if r.get("benchmark") == "mesh_scaling"]
    if not records:
        raise ValueError(f"--scaling-base-log {path!r}: no mesh_scaling JSON record in it")
    keys = [key for key in RUN_IDENTITY_KEYS if key in record]
    matching = [r for r in records if all(r.get(key) == record[key] for key in keys)]
    if not matching:
        last = records[-1]
        differing = [key for key in keys if last.get(key) != record[key]]
        differences = "; ".join(f"{key} {last.get(key)!r} there, {record[key]!r} here" for key in differing)
        raise ValueError(f"--scaling-base-log {path!r}: its last run is not this one's kind: {differences}")
    return matching[-1]["rows"]


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        f"{'mesh TxPxD':>10} {'out tok/s':>10} {'params/dev MiB':>15} {'KV/dev MiB':>11} {'efficiency':>10} "
        f"{'M':>3} {'bubble th.':>10} {'bubble meas.':>12} {'b1 ITL ms':>9} {'in use/dev MiB':>14} {'pool':>5}"
    )
    for r in rows:
        print(
            f"{r['mesh']:>10} {r['output_tokens_per_s']:>10.1f} {r['param_bytes_per_device'] / 2**20:>15.2f} "
            f"{r['kv_bytes_per_device'] / 2**20:>11.2f} {fmt(r['scaling_efficiency'], '>10.2f')} "
            f"{r['num_microbatches']:>3} {r['bubble_theoretical']:>10.2f} {fmt(r['bubble_measured'], '>12.2f')} "
            f"{fmt(r['batch1_itl_p50_ms'], '>9.2f')} "
            f"{fmt(None if r['in_use_bytes_per_device'] is None else r['in_use_bytes_per_device'] / 2**20, '>14.0f')} "
            f"{r.get('pool_fraction') or '-':>5}"
        )
    if rows and rows[0].get("scaling_base"):
        print(f"efficiency: throughput per device against {rows[0]['scaling_base']}'s")


def child_argv(argv: list[str], mesh: str) -> list[str]:
    """This run's arguments for one mesh in a child process: ``--meshes`` replaced, ``--process-per-mesh`` dropped."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--meshes":
            skip_next = True
        elif not arg.startswith("--meshes=") and arg != "--process-per-mesh":
            kept.append(arg)
    return [sys.executable, os.path.abspath(__file__), *kept, "--meshes", mesh]


def run_meshes_in_children(argv: list[str], meshes: str) -> tuple[list[dict], dict]:
    """Each mesh's row from its own process, and the first child's record (device, jax, commit)."""
    rows, first_record = [], None
    for mesh in meshes.split(","):
        command = child_argv(argv, mesh.strip())
        done = subprocess.run(command, env=child_env(USER_PREALLOCATE), stdout=subprocess.PIPE, text=True)
        lines = done.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith((RECORD_PREFIX, "ROW "))), flush=True)
        records = read_records(lines)
        if done.returncode != 0 or not records:
            raise RuntimeError(f"mesh {mesh}: the child process failed (exit {done.returncode}); its output is above")
        rows.extend(records[-1]["rows"])
        first_record = first_record or records[-1]
        print("ROW " + json.dumps(rows[-1], sort_keys=True), flush=True)
    return rows, first_record


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.scaling_base_log:  # a wrong log fails now, not after the runs (the device is checked after them)
        earlier_run_rows(args.scaling_base_log, run_description(args))
    if args.process_per_mesh:
        rows, child_record = run_meshes_in_children(argv, args.meshes)
        return report(args, rows, {key: child_record[key] for key in ENVIRONMENT_KEYS})
    with tempfile.TemporaryDirectory() as smoke_dir:
        model_dir = args.model
        if args.smoke:  # a config.json alone: the weights are dummy
            model_dir = smoke_dir
            (pathlib.Path(smoke_dir) / "config.json").write_text(json.dumps(SMOKE_HF_CONFIG))
        vocab_size = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vocab_size"]
        prompts = random_prompts(args.num_prompts, args.input_len, vocab_size)
        rows = []
        for shape in parse_meshes(args.meshes):
            rows.append(run_mesh(args, model_dir, shape, prompts))
            print("ROW " + json.dumps(rows[-1], sort_keys=True), flush=True)  # kept if a later mesh is cut off
    return report(args, rows, environment())


def run_description(args) -> dict:
    """What this run measures, as its JSON record names it: model, job and engine options (not the device)."""
    return {
        "model": args.model or "smoke",
        "reference_job": args.job,
        "job": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len},
        "engine": {
            "dtype": args.dtype,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": args.block_size,
            "kv_cache": "job-sized" if args.gpu_memory_utilization is None else "from device memory",
            "gpu_memory_utilization": args.gpu_memory_utilization,
            **variant_engine_options(args),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "switches": jaxllm_switches(),
        },
    }


def report(args, rows: list[dict], env: dict) -> dict:
    """Prints the table and the JSON record of ``rows``; returns the record."""
    record = {"benchmark": "mesh_scaling", **env, **run_description(args), "rows": rows}
    earlier_rows = []
    if args.scaling_base_log:
        earlier_rows = earlier_run_rows(args.scaling_base_log, record)
        record["scaling_base_log"] = args.scaling_base_log
    add_efficiency(rows, earlier_rows)
    print_table(rows)
    best = max(rows, key=lambda r: r["output_tokens_per_s"])
    print(f"variant: {variant_label(args).lstrip(', ') or 'defaults'}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"mesh_scaling on {record['device']}: best {best['mesh']} at {best['output_tokens_per_s']:.1f} output tok/s")
    print_record(record)
    return record


if __name__ == "__main__":
    main()
