"""A ``jax.profiler`` trace of decode steps of a job, summarized as a time split of one step.

    PYTHONPATH=. python3 benchmarks/profile_step.py --job J8 --out $OUT/trace     # on the GPU machine
    python benchmarks/profile_step.py --smoke --out /tmp/trace                     # tiny CPU run

Submits the job's requests to an ``LLMEngine``, steps until every prompt is prefilled (all rows decode), then traces
``--steps`` steps (``--phase prefill``: traces the job's first steps instead, chunks of new prompts). The Perfetto
trace (``*.trace.json.gz``) is read back and each device op is put in a class by its name: attention (the Pallas
kernel or the reference), matmuls (cuBLAS / XLA gemm and dot fusions), sampling (sort, top-k, argmax, reduce over
the vocabulary) or other. The host gap is the step's wall time minus device-busy time (the union of device op
intervals). Also prints the wall time of untraced steps (the profiler's own cost stays out). On CPU the trace has no
device threads, so only the wall time is reported.

The launch path: host events whose names say CUDA graph or command-buffer work (``cuGraphLaunch``,
``cuGraphExecUpdate``, XLA's command-buffer record / update / execute spans, kernel launches), with calls and time per
step, summed over every host thread (one per GPU on a mesh). A multi-GPU step whose graphs are updated every step
shows about one update per graph per GPU. ``cuGraphLaunch`` time per device op: the host's cost of launching a
graph grows with the kernels in it (2.3-2.8 us per op on two H200s in session 24), though cutting about a fifth of a
layer's device ops did not shorten a TP 4 batch-1 step (session 25; both in ``benchmarks/RESULTS.md``).

The forward program's host work: every host event inside the forward program's launches on the first GPU's thread,
by name with numbers folded, per step: on a mesh it splits the launch into graph launches (one graph per stretch
between two all-reduces), the all-reduce thunks, and per-step work outside any graph (clique acquisition,
rendezvous, slices and copies). ``--model`` profiles another config directory, e.g. the job's shape with two layers
(a quick compile; the per-layer ops are the same)."""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import re
import time

import jax

from benchmarks.common import (
    JOBS,
    SMOKE_CONFIG,
    Job,
    add_engine_variant_arguments,
    environment,
    print_record,
    random_prompts,
    variant_engine_options,
)
from jaxllm import LLMEngine, RequestOutputKind, SamplingParams

SMOKE_JOB = Job("smoke", SMOKE_CONFIG, 8, 24, 16)

OP_CLASSES = (  # first match wins; names as XLA, Triton and cuBLAS print them
    ("attention", re.compile(r"ragged|paged|attention|_attn|triton_kernel|pallas", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|\bdot|dot[._]|matmul|sm90_xmma|wgmma", re.I)),
    ("sampling", re.compile(r"sort|top_?k|argmax|gumbel|reduce.*vocab|softmax", re.I)),
)


TOP_OPS = 25  # the costliest device ops by name, listed under the split
FIRST_DEVICE_EXECUTION = "[0] GpuExecutable::ExecuteThunks"  # XLA's span of one device's program launch
FORWARD_PROGRAM = re.compile(r"jit__traced_forward|jit_program")  # one GPU's forward program, a mesh stage's
LAUNCH_PATH = re.compile(r"graph|command.?buffer|cuLaunch|LaunchKernel|ExecuteThunks|LaunchOnDevice", re.I)


def classify(name: str) -> str:
    return next((label for label, pattern in OP_CLASSES if pattern.search(name)), "other")


def _device_pids(trace: dict) -> set:
    names = {}
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "M" and event.get("name") == "process_name":
            names[event["pid"]] = event["args"]["name"]
    return {pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)", name)}


def device_events(trace: dict) -> list[dict]:
    """Complete events on device threads (GPU streams / TPU cores); none on CPU, whose trace has no device."""
    device_pids = _device_pids(trace)
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e and e["pid"] in device_pids]


def launch_path_ops(trace: dict, num_steps: int) -> list[dict]:
    """Host events of the launch path (``LAUNCH_PATH`` names), by name: calls and ms per step, costliest first."""
    device_pids = _device_pids(trace)
    by_name: dict[str, tuple[float, int]] = {}
    for event in trace.get("traceEvents", []):
        name = event.get("name", "")
        if event.get("ph") != "X" or "dur" not in event or event.get("pid") in device_pids:
            continue
        if LAUNCH_PATH.search(name):
            total, count = by_name.get(name, (0.0, 0))
            by_name[name] = (total + event["dur"], count + 1)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    return [
        {"name": name, "ms_per_step": us / 1e3 / num_steps, "calls_per_step": n / num_steps} for name, (us, n) in ranked
    ]


def forward_host_work(trace: dict, num_steps: int) -> list[dict]:
    """Host events inside the forward program's executions on the first GPU's launch thread (``[0]
    GpuExecutable::ExecuteThunks`` spans that run ``FORWARD_PROGRAM``), by name with numbers folded
    (``all-reduce.3.0-fusion.1`` -> ``all-reduce_N_N-fusion_N``): ms and calls per step, costliest first, the
    execution itself included. Splits a mesh step's host time into graph launches, collective thunks and per-step
    work (clique acquisition, rendezvous, thunks outside any graph); spans nest, so rows overlap."""
    device_pids = _device_pids(trace)
    by_thread: dict[tuple, list[dict]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and "dur" in event and event.get("pid") not in device_pids:
            by_thread.setdefault((event["pid"], event["tid"]), []).append(event)
    by_name: dict[str, tuple[float, int]] = {}
    for events in by_thread.values():
        for execution in (e for e in events if e["name"].startswith(FIRST_DEVICE_EXECUTION)):
            end = execution["ts"] + execution["dur"]
            inside = [e for e in events if execution["ts"] <= e["ts"] <= end]
            if not any(FORWARD_PROGRAM.search(e["name"]) for e in inside):
                continue
            for event in inside:
                name = re.sub(r"[._]\d+", "_N", event["name"].split(" (")[0])
                total, count = by_name.get(name, (0.0, 0))
                by_name[name] = (total + event["dur"], count + 1)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    return [
        {"name": name, "ms_per_step": us / 1e3 / num_steps, "calls_per_step": n / num_steps} for name, (us, n) in ranked
    ]


def graph_launch_cost(launch_path: list[dict], num_device_ops: float) -> dict:
    """Device ops per step (every device; kernels and copies, about a step's graph nodes), ``cuGraphLaunch`` host
    time per step (every host thread) and that time per device op, from ``launch_path_ops`` rows."""
    launch_ms = sum(op["ms_per_step"] for op in launch_path if op["name"].startswith("cuGraphLaunch"))
    per_op_us = launch_ms * 1e3 / num_device_ops if num_device_ops else None
    return {
        "device_ops_per_step": num_device_ops,
        "graph_launch_ms_per_step": launch_ms,
        "graph_launch_us_per_device_op": per_op_us,
    }


def busy_time_us(events: list[dict]) -> float:
    """Length of the union of the events' intervals (streams overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(trace_dir: pathlib.Path, num_steps: int, wall_s: float) -> dict:
    paths = sorted(trace_dir.rglob("*.trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = device_events(trace)
    split, by_name = {}, {}
    for event in events:
        name = event.get("name", "")
        label = classify(name)
        split[label] = split.get(label, 0.0) + event["dur"]
        total, count = by_name.get(name, (0.0, 0))
        by_name[name] = (total + event["dur"], count + 1)
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_OPS]
    step_us = wall_s * 1e6 / num_steps
    busy_us = busy_time_us(events) / num_steps
    per_step = {label: us / num_steps for label, us in sorted(split.items())}
    launch_path = launch_path_ops(trace, num_steps)
    return {
        "trace": str(paths[-1]),
        "step_wall_ms": step_us / 1e3,
        "device_busy_ms": busy_us / 1e3,
        "host_gap_ms": max(0.0, step_us - busy_us) / 1e3,
        "device_ms_by_class": {label: us / 1e3 for label, us in per_step.items()},
        "num_device_events": len(events),
        "top_ops": [
            {
                "name": name,
                "class": classify(name),
                "ms_per_step": us / 1e3 / num_steps,
                "calls_per_step": n / num_steps,
            }
            for name, (us, n) in top
        ],
        "launch_path": launch_path,
        "forward_host_work": forward_host_work(trace, num_steps),
        **graph_launch_cost(launch_path, len(events) / num_steps),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="J8")
    p.add_argument("--model", help="a directory holding config.json, instead of the job's (e.g. fewer layers)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--phase",
        choices=("decode", "prefill"),
        default="decode",
        help="decode: steps once every request decodes; prefill: the job's first steps (chunks of new prompts)",
    )
    p.add_argument("--out", default="/tmp/jaxllm-trace")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--num-prompts", type=int, help="default: the job's (1 profiles batch-1 decode)")
    add_engine_variant_arguments(p)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    job = SMOKE_JOB if args.smoke else JOBS[args.job]
    engine = LLMEngine.from_engine_args(
        model=args.model or job.model_config,
        load_format="dummy",
        dtype="float32" if args.smoke else args.dtype,
        skip_tokenizer_init=True,
        max_num_seqs=max(job.num_prompts, 1),
        max_num_batched_tokens=64 if args.smoke else args.max_num_batched_tokens,
        max_model_len=256 if args.smoke else 2048,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        **variant_engine_options(args),
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=job.output_len, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )
    num_prompts = args.num_prompts or job.num_prompts
    for i, prompt in enumerate(random_prompts(num_prompts, job.input_len, engine.model_config.vocab_size)):
        engine.add_request(f"r{i}", prompt, params)
    scheduler = engine.scheduler

    def all_decoding() -> bool:
        return not scheduler.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running)

    wall_s = []
    if args.phase == "prefill":
        engine.step()  # the first step (its dispatch also schedules the next one ahead), untraced
    else:
        while not all_decoding():
            engine.step()
        engine.step()  # one plain decode step, untraced
        for _ in range(args.steps):  # untraced: host time per step
            start = time.perf_counter()
            engine.step()
            wall_s.append(time.perf_counter() - start)
    out = pathlib.Path(args.out)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        traced_wall_s = time.perf_counter() - start
    record = {
        "job": job.name,
        **environment(),
        "phase": args.phase,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "num_running": len(scheduler.running),
        "untraced_step_ms": sorted(w * 1e3 for w in wall_s),
        **summarize(out, args.steps, traced_wall_s),
    }
    print(f"job {record['job']} on {record['device']}, jax {record['jax']}, commit {record['commit']}")
    print(
        f"{args.phase} step with {record['num_running']} requests: {record['step_wall_ms']:.2f} ms wall (traced), "
        f"device busy {record['device_busy_ms']:.2f} ms, host gap {record['host_gap_ms']:.2f} ms"
    )
    for label, ms in record["device_ms_by_class"].items():
        print(f"  {label:10s} {ms:8.2f} ms")
    print("costliest device ops (ms per step, calls per step, class, name):")
    for op in record["top_ops"]:
        print(f"  {op['ms_per_step']:8.3f} {op['calls_per_step']:6.1f}  {op['class']:9s} {op['name'][:100]}")
    if record["graph_launch_us_per_device_op"] is not None:
        ops, launch_ms = record["device_ops_per_step"], record["graph_launch_ms_per_step"]
        per_op = record["graph_launch_us_per_device_op"]
        print(
            f"device ops per step {ops:.0f} (all devices); cuGraphLaunch {launch_ms:.2f} ms per step, "
            f"{per_op:.2f} us per op"
        )
    print("launch path, host events summed over host threads (ms per step, calls per step, name):")
    for op in record["launch_path"][:TOP_OPS]:
        print(f"  {op['ms_per_step']:8.3f} {op['calls_per_step']:6.1f}  {op['name'][:100]}")
    if record["forward_host_work"]:
        print("forward program on the first GPU's launch thread (ms per step, calls per step, name; spans nest):")
        for op in record["forward_host_work"][:TOP_OPS]:
            print(f"  {op['ms_per_step']:8.3f} {op['calls_per_step']:6.1f}  {op['name'][:100]}")
    print_record(record)
    return record


if __name__ == "__main__":
    main()
