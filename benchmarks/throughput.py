"""Offline throughput: a reference job of shared/BENCHMARKS.md (J8, J1) or any shape and lengths.

    PYTHONPATH=. python3 benchmarks/throughput.py --job J8            # on the GPU machine
    python benchmarks/throughput.py --smoke                            # tiny CPU run (used by the tests)
    PYTHONPATH=. python3 benchmarks/throughput.py --job J8 --output-len 1 --prompt-logprobs 5   # a scoring job

Builds the engine (which compiles every bucket: that is the untimed warm-up), submits all requests at once and times
``LLM.generate`` from submit to the last output. Prints the job, device, jax version and commit, vLLM's line
``Throughput: X requests/s, Y total tokens/s, Z output tokens/s``, and a JSON record; ``--record`` appends a row to
benchmarks/RESULTS.md. It also prints the steps' mean time split into host work and waiting for the device
(``jaxllm.engine.step_times``).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    JOBS,
    SMOKE_CONFIG,
    Job,
    add_engine_variant_arguments,
    append_result_row,
    environment,
    jaxllm_switches,
    print_record,
    random_prompts,
    variant_engine_options,
    variant_label,
)
from jaxllm import LLM, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), help="a reference job")
    p.add_argument("--model", help="a directory with config.json (weights are random: load_format=dummy)")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-impl", help="ragged paged attention backend (default: the platform's)")
    add_engine_variant_arguments(p)
    p.add_argument(
        "--prompt-logprobs", type=int, help="SamplingParams.prompt_logprobs of every request (a scoring job)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="SamplingParams.repetition_penalty of every request (with async scheduling, penalties run ahead too)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model and job, for a CPU check")
    p.add_argument("--record", action="store_true", help="append a row to benchmarks/RESULTS.md")
    return p.parse_args(argv)


def resolve_job(args) -> Job:
    if args.smoke:
        base = Job("smoke", SMOKE_CONFIG, 8, 24, 8)
    elif args.job:
        base = JOBS[args.job]
    else:
        base = Job("custom", args.model, 256, 512, 256)
    return Job(
        base.name,
        args.model or base.model_config,
        args.num_prompts or base.num_prompts,
        args.input_len or base.input_len,
        args.output_len or base.output_len,
    )


def build_llm(args, job: Job) -> LLM:
    """The engine for ``job`` with the command line's settings (dummy weights, no tokenizer)."""
    return LLM(
        model=job.model_config,
        load_format="dummy",
        dtype="float32" if args.smoke else args.dtype,
        skip_tokenizer_init=True,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=64 if args.smoke else args.max_num_batched_tokens,
        max_model_len=min(args.max_model_len, 256) if args.smoke else args.max_model_len,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_impl=args.attention_impl,
        **variant_engine_options(args),
    )


def run(args) -> dict:
    job = resolve_job(args)
    start = time.perf_counter()
    llm = build_llm(args, job)
    startup_s = time.perf_counter() - start
    vocab_size = llm.llm_engine.model_config.vocab_size
    prompts = random_prompts(job.num_prompts, job.input_len, vocab_size)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=job.output_len,
        ignore_eos=True,
        prompt_logprobs=args.prompt_logprobs,
        repetition_penalty=args.repetition_penalty,
    )
    llm.llm_engine.step_times.reset()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_input = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "job": job.name,
        "model_config": job.model_config,
        **environment(),
        "num_prompts": job.num_prompts,
        "input_len": job.input_len,
        "output_len": job.output_len,
        "elapsed_s": elapsed,
        "startup_s": startup_s,
        "compile_s": llm.llm_engine.compile_seconds,
        "requests_per_s": len(outputs) / elapsed,
        "total_tokens_per_s": (num_input + num_output) / elapsed,
        "output_tokens_per_s": num_output / elapsed,
        "num_output_tokens": num_output,
        "prompt_logprobs": args.prompt_logprobs,
        "repetition_penalty": args.repetition_penalty,
        # prompt positions with a logprob (every prompt token but the first, when asked)
        "num_prompt_logprobs": sum(len(o.prompt_logprobs or [None]) - 1 for o in outputs),
        "num_preemptions": llm.llm_engine.scheduler.num_preemptions,
        "step_times": llm.llm_engine.step_times.summary(),
        "engine": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": args.block_size,
            "dtype": args.dtype,
            "attention_impl": args.attention_impl or "default",
            "kv_cache_dtype": args.kv_cache_dtype,
            "quantization": args.quantization,
            "xla_compiler_options": llm.llm_engine.compiler_options.describe(),
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "async_scheduling": args.async_scheduling,
            "num_kv_blocks": llm.llm_engine.resolved.num_blocks,
            "switches": jaxllm_switches(),
        },
        "architecture": llm.llm_engine.model_config.architecture,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = run(args)
    print(f"job {record['job']} on {record['device']}, jax {record['jax']}, commit {record['commit']}")
    print(
        f"Throughput: {record['requests_per_s']:.2f} requests/s, {record['total_tokens_per_s']:.2f} total tokens/s, "
        f"{record['output_tokens_per_s']:.2f} output tokens/s"
    )
    times = record["step_times"]
    if times["host_ms"] is not None:
        print(
            f"{times['num_steps']} steps: {times['step_ms']:.2f} ms each, host work {times['host_ms']:.2f} ms, "
            f"waiting for the device {times['device_wait_ms']:.2f} ms"
        )
    print_record(record)
    if args.record:
        append_result_row(
            f"| {record['date']} | throughput {record['job']} ({record['engine']['attention_impl']} attention"
            f"{variant_label(args)}{_prompt_logprobs_label(args)}) | "
            f"{record['device']} | jax {record['jax']} | "
            f"{record['commit']} | {record['output_tokens_per_s']:.0f} output tok/s, "
            f"{record['total_tokens_per_s']:.0f} total tok/s ({record['elapsed_s']:.1f} s; compile "
            f"{record['compile_s']:.0f} s) |"
        )
    return record


def _prompt_logprobs_label(args) -> str:
    label = "" if args.prompt_logprobs is None else f", prompt_logprobs={args.prompt_logprobs}"
    if args.repetition_penalty != 1.0:
        label += f", repetition_penalty={args.repetition_penalty}"
    return label


if __name__ == "__main__":
    main()
