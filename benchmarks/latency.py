"""Latency (job L8): time to first token and inter-token latency percentiles at batch 1 and batch 32; the mean time
per output token (TPOT) and how many arrivals brought a request's tokens (fewer than its tokens when steps bring
two at once, which widens the ITL percentiles but not TPOT).

    PYTHONPATH=. python3 benchmarks/latency.py                  # Llama-3.1-8B shape, dummy weights, on the GPU
    python benchmarks/latency.py --smoke                         # tiny CPU run

Drives LLMEngine step by step and stamps each request's tokens as they come back to the host. The engine build
(which compiles every bucket) and one untimed warm-up round stay out of the numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import (
    CONFIGS_DIR,
    SMOKE_CONFIG,
    add_engine_variant_arguments,
    append_result_row,
    environment,
    print_record,
    random_prompts,
    variant_engine_options,
    variant_label,
)
from jaxllm import LLMEngine, SamplingParams


def arrivals(engine: LLMEngine, prompts: list[dict], output_len: int, tag: str):
    """Runs ``prompts`` to ``output_len`` tokens each. Returns the submit time, each request's token arrival times
    (one per step that brought it new tokens) and its number of tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    submit = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    stamps: dict[str, list[float]] = {}
    seen: dict[str, int] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            count = len(out.outputs[0].token_ids) if out.outputs else 0
            if count > seen.get(out.request_id, 0):
                stamps.setdefault(out.request_id, []).append(now)
                seen[out.request_id] = count
    return submit, stamps, seen


def latencies(submit: float, stamps: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """Times to first token and inter-token latencies (between two arrivals of a request's tokens), in seconds."""
    ttft = [s[0] - submit for s in stamps.values()]
    itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False)]
    return ttft, itl


def run_batch(engine: LLMEngine, prompts: list[dict], output_len: int, tag: str) -> tuple[list[float], list[float]]:
    """``latencies`` of ``prompts`` run to ``output_len`` tokens each."""
    submit, stamps, _ = arrivals(engine, prompts, output_len, tag)
    return latencies(submit, stamps)


def time_per_output_token(stamps: dict[str, list[float]], counts: dict[str, int]) -> list[float]:
    """Each request's (last arrival - first) / (tokens - 1), vLLM's TPOT: unlike the ITL percentiles it does not
    depend on how its tokens were grouped into arrivals."""
    return [(s[-1] - s[0]) / (counts[r] - 1) for r, s in stamps.items() if counts[r] > 1]


def percentiles(values: list[float]) -> dict:
    arr = np.asarray(values) * 1e3
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)} if len(arr) else {}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CONFIGS_DIR / "llama-3.1-8b"))
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=64, help="the engine's (fewer: fewer buckets to compile)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the engine's step budget (--smoke: 64)")
    add_engine_variant_arguments(p)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--record", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.input_len, args.output_len, args.dtype, args.batch_sizes = (
            SMOKE_CONFIG,
            16,
            4,
            "float32",
            "1,2",
        )
        args.max_num_batched_tokens = 64
    engine = LLMEngine.from_engine_args(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        skip_tokenizer_init=True,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=256 if args.smoke else 2048,
        enable_prefix_caching=False,
        **variant_engine_options(args),
    )
    vocab = engine.model_config.vocab_size
    run_batch(engine, random_prompts(2, args.input_len, vocab, seed=99), 4, "warmup")
    record = {
        "job": "L8" if not args.smoke else "smoke",
        **environment(),
        "model": args.model,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "xla_compiler_options": engine.compiler_options.describe(),
        "batches": {},
    }
    label = f"{record['job']}{variant_label(args)}"
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = random_prompts(batch, args.input_len, vocab, seed=batch)
        submit, stamps, counts = arrivals(engine, prompts, args.output_len, f"b{batch}")
        ttft, itl = latencies(submit, stamps)
        record["batches"][batch] = stats = {
            "ttft_ms": percentiles(ttft),
            "itl_ms": percentiles(itl),
            "tpot_mean_ms": float(np.mean(time_per_output_token(stamps, counts))) * 1e3,
            "arrivals_per_request": float(np.mean([len(s) for s in stamps.values()])),
        }
        t, i = stats["ttft_ms"], stats["itl_ms"]
        print(
            f"{label} batch {batch}: TTFT p50 {t['p50']:.1f} ms p99 {t['p99']:.1f} ms | ITL p50 {i['p50']:.2f} ms "
            f"p90 {i['p90']:.2f} ms p99 {i['p99']:.2f} ms | TPOT mean {stats['tpot_mean_ms']:.2f} ms, "
            f"{stats['arrivals_per_request']:.1f} arrivals for {args.output_len} tokens"
        )
        if args.record:
            append_result_row(
                f"| {record['date']} | latency {label} batch {batch} | {record['device']} | "
                f"jax {record['jax']} | "
                f"{record['commit']} | TTFT p50 {t['p50']:.1f} ms; ITL p50 {i['p50']:.2f} / p90 {i['p90']:.2f} / "
                f"p99 {i['p99']:.2f} ms |"
            )
    print_record(record)
    return record


if __name__ == "__main__":
    main()
