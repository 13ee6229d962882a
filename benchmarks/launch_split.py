"""Where a mesh engine's step launch goes at batch 1, timed without a profiler.

    PYTHONPATH=. python3 benchmarks/launch_split.py --tensor-parallel-size 4                  # GPU machine
    PYTHONPATH=. python3 benchmarks/launch_split.py --tensor-parallel-size 4 --num-layers 8   # the per-layer slope
    PYTHONPATH=. python3 benchmarks/launch_split.py --smoke                                   # CPU, fake devices

Builds ``LLM(tensor_parallel_size=T, load_format="dummy")`` on the model's shape (``--num-layers`` rewrites its
config with fewer layers) with a small step budget (few buckets: a quick build), then runs a batch-1 decode as
``benchmarks/latency.py`` does and reports its inter-token latency p50 beside wall-clock timers (``perf_counter``)
around each part of a step's launch, medians per step:

- ``place``: the copy of the step's packed inputs to the devices (``jaxllm.runner.packed_transfer.place``);
- ``stage_call``: the stage program's call, which on GPUs returns once every GPU's host thread has launched its share
  (its graphs and all-reduces);
- ``head_call``: the sampler program's call;
- ``launch``: the whole launch (the three above and the pending-token bookkeeping);
- ``dispatch`` / ``collect``: the engine thread's side (packing the step; waiting for and reading its results).

On GPUs the launch runs on the mesh runner's worker thread (``sharding.runner``), so ``launch`` against the ITL says
whether that thread sets the step's pace; two ``--num-layers`` give the stage call's cost per layer. A trace
(``benchmarks/profile_step.py``) names the host events inside these calls but inflates them; these timers do not.
One-device engines (TP 1) have no mesh launch: only their ITL is reported. On fake CPU devices only the plumbing is
checked, not the timing."""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before jax starts: a mesh needs (fake) CPU devices
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import sharding.pipeline  # noqa: E402
import sharding.runner  # noqa: E402
from benchmarks.common import (  # noqa: E402
    CONFIGS_DIR,
    SMOKE_CONFIG,
    CallTimers,
    environment,
    print_record,
    random_prompts,
)
from benchmarks.latency import percentiles, run_batch  # noqa: E402
from benchmarks.mesh_scaling import runner_arrays  # noqa: E402
from jaxllm import LLM  # noqa: E402
from jaxllm.config import EngineConfig  # noqa: E402

# (owner, attribute, part name): what is timed; ``place`` is the name sharding.pipeline calls
TIMED = (
    (sharding.pipeline, "place", "place"),
    (sharding.pipeline.PipelinedModel, "_call_stage", "stage_call"),
    (sharding.pipeline.PipelinedModel, "_call_head", "head_call"),
    (sharding.pipeline.PipelinedModel, "launch", "launch"),
    (sharding.runner.PipelineRunner, "dispatch", "dispatch"),
    (sharding.runner.PipelineRunner, "collect", "collect"),
)


def model_dir(args) -> str:
    """The model's config directory, or a temporary copy of its config with ``--num-layers`` layers."""
    if args.num_layers is None:
        return args.model
    config = json.loads((pathlib.Path(args.model) / "config.json").read_text())
    config["num_hidden_layers"] = args.num_layers
    path = pathlib.Path(tempfile.mkdtemp(prefix=f"jaxllm-{args.num_layers}-layers-"))
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def kv_cache_arrays(engine) -> dict:
    """How the engine's KV cache is laid out: its K arrays (as many V) and the first one's per-device GiB."""
    _, stage_caches = runner_arrays(engine.runner)
    keys = [k for caches in stage_caches for k, _ in caches]
    shard = keys[0].addressable_shards[0].data
    return {"k_arrays": len(keys), "first_k_shape": list(keys[0].shape), "first_k_gib_per_device": shard.nbytes / 2**30}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CONFIGS_DIR / "llama-3.1-8b"), help="a directory with config.json")
    p.add_argument("--num-layers", type=int, help="the config's num_hidden_layers replaced (default: as it is)")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128, help="batch-1 decode tokens per run")
    p.add_argument("--repeats", type=int, default=2, help="batch-1 runs, each reported")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="the engine's (small: few buckets)")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=EngineConfig.gpu_memory_utilization,
        help="the engine's (sizes the KV cache)",
    )
    p.add_argument("--smoke", action="store_true", help="the tiny fixture model at TP 2 on fake CPU devices")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.dtype, args.input_len, args.output_len = SMOKE_CONFIG, "float32", 12, 6
        args.max_num_batched_tokens = 64
    for name in ("tensor_parallel_size", "input_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    timers = CallTimers(TIMED)
    with timers.install():
        llm = LLM(
            model=model_dir(args),
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.input_len + args.output_len,
            max_num_seqs=8,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
        )
        engine = llm.llm_engine
        prompt = random_prompts(1, args.input_len, engine.model_config.vocab_size, seed=1)
        run_batch(engine, prompt, 4, "warm-up")
        runs = []
        for repeat in range(args.repeats):
            with timers.recording():
                _, itl = run_batch(engine, prompt, args.output_len, f"batch-1-{repeat}")
            runs.append({"itl_p50_ms": percentiles(itl)["p50"], "parts": timers.summary()})
    record = {
        "benchmark": "launch_split",
        **environment(),
        "model": args.model,
        "num_layers": args.num_layers,
        "tensor_parallel_size": args.tensor_parallel_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "runs": runs,
        "kv_cache": kv_cache_arrays(engine),
    }
    layers = args.num_layers or "all"
    cache = record["kv_cache"]
    print(
        f"KV cache: {cache['k_arrays']} K arrays (as many V), the first {cache['first_k_shape']}, "
        f"{cache['first_k_gib_per_device']:.2f} GiB per device"
    )
    for run in runs:
        print(f"TP {args.tensor_parallel_size}, {layers} layers: batch-1 ITL p50 {run['itl_p50_ms']:.3f} ms")
        for part, s in run["parts"].items():
            print(f"  {part:<10} {s['median_ms']:8.3f} ms median  {s['mean_ms']:8.3f} mean  ({s['calls']} calls)")
    print_record(record)
    return record


if __name__ == "__main__":
    main()
