"""The same offline job through transformers on the same GPU, beside jaxllm: throughput and the ratios.

    PYTHONPATH=. python3 benchmarks/compare_hf.py --job J8          # on the GPU machine (torch + transformers there)
    PYTHONPATH=. python3 benchmarks/compare_hf.py --smoke            # tiny model on CPU, where torch is installed

Runs jaxllm first, in a child process (``benchmarks/throughput.py``, so the GPU is free again afterwards), then
transformers in this process with random weights of the same config in the same dtype: continuous batching through
``model.generate_batch`` and static batches through ``model.generate`` (``--static-batch`` prompts at a time; all
prompts of a job have one length, so no padding). Every request generates exactly ``output_len`` tokens (EOS off).
Prints each figure as output tokens/s and jaxllm's ratio to each, plus a JSON record; ``--record`` appends a row to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

USER_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # benchmarks.common imports jax; keep it off the GPU

from benchmarks.common import (  # noqa: E402
    JOBS,
    SMOKE_CONFIG,
    Job,
    append_result_row,
    child_env,
    git_commit,
    print_record,
    random_prompts,
    read_records,
)

SMOKE_JOB = Job("smoke", SMOKE_CONFIG, 8, 24, 8)


def run_jaxllm(job: Job, args) -> dict:
    """throughput.py in a child process; its ``JSON {...}`` line."""
    command = [sys.executable, "benchmarks/throughput.py"]
    command += ["--smoke"] if args.smoke else ["--job", job.name]
    env = child_env(USER_PREALLOCATE)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"jaxllm run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return read_records(done.stdout.splitlines())[-1]


def hf_model(config_dir: str, dtype: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model.eval()


def greedy_config(output_len: int):
    from transformers import GenerationConfig

    # No EOS: every request runs to output_len, as jaxllm's ignore_eos=True does.
    return GenerationConfig(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )


def timed(fn) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_transformers(job: Job, args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float32" if args.smoke else args.dtype
    model = hf_model(job.model_config, dtype, device)
    prompts = [p["prompt_token_ids"] for p in random_prompts(job.num_prompts, job.input_len, model.config.vocab_size)]
    generation_config = greedy_config(job.output_len)
    results = {}
    warm = prompts[: min(4, len(prompts))]
    model.generate_batch(inputs=warm, generation_config=greedy_config(4))
    outputs = {}

    def continuous_batching():
        outputs.update(model.generate_batch(inputs=prompts, generation_config=generation_config))

    seconds = timed(continuous_batching)
    failed = [o.error for o in outputs.values() if o.error]
    if failed:
        raise RuntimeError(f"transformers generate_batch failed on {len(failed)} requests: {failed[0]}")
    num_output = sum(len(o.generated_tokens) for o in outputs.values())
    results["continuous_batching"] = {"elapsed_s": seconds, "output_tokens_per_s": num_output / seconds}

    counted = []

    def static_batches():
        for start in range(0, len(prompts), args.static_batch):
            ids = torch.tensor(prompts[start : start + args.static_batch], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation_config)
            counted.append((out.shape[1] - ids.shape[1]) * ids.shape[0])

    with torch.inference_mode():
        model.generate(torch.tensor(warm, device=device), generation_config=greedy_config(4))
        seconds = timed(static_batches)
    results[f"static_batches_of_{args.static_batch}"] = {
        "elapsed_s": seconds,
        "output_tokens_per_s": sum(counted) / seconds,
    }
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device_name, "torch": torch.__version__, "runs": results}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="J8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--static-batch", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny model and job (CPU is fine)")
    p.add_argument("--record", action="store_true", help="append a row to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.smoke:
        args.static_batch = 4
    job = SMOKE_JOB if args.smoke else JOBS[args.job]
    ours = run_jaxllm(job, args)
    theirs = run_transformers(job, args)
    import transformers

    record = {
        "job": job.name,
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "jaxllm": {k: ours[k] for k in ("device", "jax", "output_tokens_per_s", "elapsed_s")},
        "transformers": {**theirs, "version": transformers.__version__},
        "ratios": {
            name: ours["output_tokens_per_s"] / run["output_tokens_per_s"] for name, run in theirs["runs"].items()
        },
    }
    print(f"job {job.name} on {ours['device']}, jax {ours['jax']}, commit {record['commit']}")
    print(f"  jaxllm: {ours['output_tokens_per_s']:.0f} output tok/s")
    for name, run in theirs["runs"].items():
        ratio = record["ratios"][name]
        print(f"  transformers {name}: {run['output_tokens_per_s']:.0f} output tok/s (jaxllm {ratio:.1f}x)")
    print_record(record)
    if args.record:
        cells = "; ".join(
            f"transformers {name} {run['output_tokens_per_s']:.0f} ({record['ratios'][name]:.1f}x)"
            for name, run in theirs["runs"].items()
        )
        append_result_row(
            f"| {record['date']} | compare_hf {job.name} | {ours['device']} | jax {ours['jax']} | {record['commit']} | "
            f"jaxllm {ours['output_tokens_per_s']:.0f} output tok/s; {cells} |"
        )
    return record


if __name__ == "__main__":
    main()
