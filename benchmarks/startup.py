"""Start-up: time from launching a process to its first generated token, cold and then with JAX's persistent
compilation cache warm (the engine turns the cache on; see README "Compilation cache").

    PYTHONPATH=. python3 benchmarks/startup.py --job J8          # on the GPU machine
    PYTHONPATH=. python benchmarks/startup.py --smoke             # tiny model on CPU

Runs the same child process twice against one fresh cache directory: the first compiles every bucket and fills the
cache, the second loads the programs from it. Each child builds ``LLM(load_format="dummy")`` and generates one token
for one prompt; the parent times launch -> the child's first token (imports, weights, KV sizing and warm-up
included). Prints both, their ratio, and a JSON record; ``--record`` appends a row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

USER_PREALLOCATE = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the parent never touches the GPU's memory

from benchmarks.common import (  # noqa: E402
    JOBS,
    SMOKE_CONFIG,
    append_result_row,
    child_env,
    environment,
    print_record,
)


def child(model: str, smoke: bool) -> None:
    from jaxllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        load_format="dummy",
        dtype="float32" if smoke else "bfloat16",
        skip_tokenizer_init=True,
        max_num_batched_tokens=64 if smoke else 8192,
        max_model_len=256 if smoke else 2048,
    )
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=1), use_tqdm=False)
    print("FIRST_TOKEN " + json.dumps({"compile_s": llm.llm_engine.compile_seconds}), flush=True)


def launch(model: str, smoke: bool, cache_dir: str) -> dict:
    env = child_env(USER_PREALLOCATE, JAXLLM_CACHE_DIR=cache_dir)
    command = [sys.executable, "benchmarks/startup.py", "--child", "--model", model] + (["--smoke"] if smoke else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("FIRST_TOKEN "):
            seconds = time.perf_counter() - start
            process.wait()
            return {"first_token_s": seconds, **json.loads(line[len("FIRST_TOKEN ") :])}
    raise RuntimeError(f"the child printed no first token:\n{process.stderr.read()[-4000:]}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", choices=sorted(JOBS), default="J8", help="the job whose model shape starts")
    p.add_argument("--model", help="a directory with config.json (default: the job's)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--record", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model = args.model or (SMOKE_CONFIG if args.smoke else JOBS[args.job].model_config)
    if args.child:
        child(model, args.smoke)
        return {}
    with tempfile.TemporaryDirectory(prefix="jaxllm-startup-cache-") as cache_dir:
        cold = launch(model, args.smoke, cache_dir)
        warm = launch(model, args.smoke, cache_dir)
    record = {
        "job": "smoke" if args.smoke else args.job,
        **environment(),
        "model": model,
        "cold": cold,
        "warm": warm,
        "speedup": cold["first_token_s"] / warm["first_token_s"],
    }
    print(f"job {record['job']} start-up on {record['device']}, jax {record['jax']}, commit {record['commit']}")
    print(
        f"first token: cold {cold['first_token_s']:.1f} s (warm-up {cold['compile_s']:.1f} s), with the compilation "
        f"cache {warm['first_token_s']:.1f} s (warm-up {warm['compile_s']:.1f} s): {record['speedup']:.1f}x sooner"
    )
    print_record(record)
    if args.record:
        append_result_row(
            f"| {record['date']} | start-up {record['job']} | {record['device']} | jax {record['jax']} | "
            f"{record['commit']} | first token cold {cold['first_token_s']:.1f} s, cached "
            f"{warm['first_token_s']:.1f} s ({record['speedup']:.1f}x) |"
        )
    return record


if __name__ == "__main__":
    main()
