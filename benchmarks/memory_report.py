"""Device memory of a job's engine: what the KV-cache sizing left free, and what each compiled program asks for.

    PYTHONPATH=. python3 benchmarks/memory_report.py --job J1 --gpu-memory-utilization 0.9   # on the GPU machine
    PYTHONPATH=. python3 benchmarks/memory_report.py --smoke                                  # tiny CPU run

Builds the engine as ``throughput.py`` does (dummy weights; every bucket compiled and run once in warm-up) and prints
the allocator's statistics (limit, in use, peak, largest free block) after start-up and after a short generate, then
XLA's memory analysis of each token bucket's forward program and of the sampler (argument, output, aliased and
temporary bytes). If the start-up runs out of memory, it prints the statistics at that point and the error, then
builds again at ``--fallback-utilization`` to analyse the programs. Takes throughput.py's options.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback

from benchmarks.common import environment, print_record
from benchmarks.throughput import build_llm, parse_args, resolve_job

GIB = 2**30


def allocator_stats(label: str) -> dict:
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    keys = ("bytes_limit", "bytes_in_use", "peak_bytes_in_use", "largest_free_block_bytes", "bytes_reserved")
    picked = {key: stats[key] for key in keys if key in stats}
    print(f"{label}: " + (", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in picked.items()) or "no allocator stats"))
    return picked


def program_memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {field.removesuffix("_size_in_bytes"): int(getattr(analysis, field)) for field in fields}


def analyse_programs(runner) -> list[dict]:
    """Memory analysis of each bucket's forward program and of the sampler at each bucket's row count."""
    rows = []
    print(f"{'program':28s} {'argument':>10s} {'output':>10s} {'aliased':>10s} {'temp':>10s}  (MiB)")
    for bucket in runner.config.token_buckets:
        num_rows = runner.config.request_rows_for(bucket)
        for name, lowered in (
            (f"forward {bucket} tokens", runner.lower_forward(bucket)),
            (f"sampler {num_rows} rows", runner.lower_sampler(num_rows)),
        ):
            if any(row["program"] == name for row in rows):
                continue
            row = {"program": name, **program_memory(lowered.compile())}
            rows.append(row)
            sizes = (row["argument"], row["output"], row["alias"], row["temp"])
            print(f"{name:28s} " + " ".join(f"{size / 2**20:10.1f}" for size in sizes))
    return rows


def build(args, job) -> tuple[object | None, dict]:
    try:
        llm = build_llm(args, job)
    except Exception as error:  # noqa: BLE001 - the report is about exactly this failure
        traceback.print_exc()
        stats = allocator_stats(f"start-up failed at gpu_memory_utilization={args.gpu_memory_utilization}")
        return None, {"error": f"{type(error).__name__}: {error}"[:2000], "stats_at_failure": stats}
    return llm, {"stats_after_startup": allocator_stats("after start-up (weights, KV cache, warm-up)")}


def main(argv=None) -> dict:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--fallback-utilization", type=float, default=0.8)
    known, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
    args = parse_args(rest)
    job = resolve_job(args)
    record = {**environment(), "job": job.name, "gpu_memory_utilization": args.gpu_memory_utilization}
    allocator_stats("before start-up")
    llm, outcome = build(args, job)
    record["first_start"] = outcome
    if llm is None:
        gc.collect()
        args.gpu_memory_utilization = known.fallback_utilization
        llm, outcome = build(args, job)
        record["fallback_start"] = {"gpu_memory_utilization": args.gpu_memory_utilization, **outcome}
    if llm is not None:
        engine = llm.llm_engine
        record["num_kv_blocks"] = engine.resolved.num_blocks
        print(f"KV cache: {engine.resolved.num_blocks} blocks of {engine.resolved.block_size} tokens")
        from jaxllm import SamplingParams

        prompts = [{"prompt_token_ids": [1 + i % 97] * min(job.input_len, 64)} for i in range(8)]
        llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        record["stats_after_generate"] = allocator_stats("after a short generate")
        record["programs"] = analyse_programs(engine.runner)
    print_record(record)
    return record


if __name__ == "__main__":
    main()
