"""Shared pieces of the benchmark scripts: job definitions, the environment record, and RESULTS.md rows."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import time
from unittest import mock

import jax
import numpy as np

BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parent
CONFIGS_DIR = BENCHMARKS_DIR / "configs"
RESULTS_FILE = BENCHMARKS_DIR / "RESULTS.md"
SMOKE_CONFIG = "tests/fixtures/models/llama"  # the tiny fixture model every --smoke run uses


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    model_config: str  # a directory holding config.json
    num_prompts: int
    input_len: int
    output_len: int


JOBS = {
    "J8": Job("J8", str(CONFIGS_DIR / "llama-3.1-8b"), 256, 512, 256),
    "J1": Job("J1", str(CONFIGS_DIR / "llama-3.2-1b"), 256, 512, 256),
}


def add_engine_variant_arguments(parser) -> None:
    """The options every engine benchmark takes to compare variants within one call: quantization, KV-cache dtype,
    XLA compiler options over the platform's defaults (``--xla-compiler-options '{}'`` keeps the defaults), one
    step at a time instead of async scheduling, and a mixture of experts' whole experts per device on a mesh."""
    parser.add_argument("--quantization", choices=("int8", "int4", "fp8"), help="weight quantization (default: none)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="lm_head quantized too (needs --quantization)")
    parser.add_argument("--kv-cache-dtype", default="auto", help='"auto" (the model dtype) or "fp8" (e4m3)')
    parser.add_argument(
        "--xla-compiler-options",
        type=json.loads,
        help="JSON dict over the platform defaults (jaxllm/runner/xla_options.py), e.g. "
        '\'{"xla_gpu_enable_triton_gemm": true, "xla_disable_hlo_passes": ""}\' for XLA\'s own GPU defaults',
    )
    parser.add_argument(
        "--no-async-scheduling", dest="async_scheduling", action="store_false", help="one step at a time (a baseline)"
    )
    parser.add_argument(
        "--enable-expert-parallel", action="store_true", help="vLLM's: whole experts per device on a mesh (MoE only)"
    )


def variant_engine_options(args) -> dict:
    """The ``LLM``/``EngineConfig`` keyword arguments of ``add_engine_variant_arguments``' options."""
    return {
        "quantization": args.quantization,
        "quantize_lm_head": args.quantize_lm_head,
        "kv_cache_dtype": args.kv_cache_dtype,
        "xla_compiler_options": args.xla_compiler_options,
        "async_scheduling": args.async_scheduling,
        "enable_expert_parallel": args.enable_expert_parallel,
    }


def variant_label(args) -> str:
    """``", fp8 weights, fp8 KV cache, XLA {...}, sync steps, JAXLLM_...=1"`` for the variant options not at their
    defaults and the ``JAXLLM_*`` switches set."""
    parts = [f"{args.quantization} weights"] if args.quantization else []
    if args.quantize_lm_head:
        parts.append(f"{args.quantization} lm_head")
    if args.kv_cache_dtype != "auto":
        parts.append(f"{args.kv_cache_dtype} KV cache")
    if args.xla_compiler_options is not None:
        parts.append(f"XLA {json.dumps(args.xla_compiler_options)}")
    if not args.async_scheduling:
        parts.append("sync steps")
    if args.enable_expert_parallel:
        parts.append("expert parallel")
    parts += [f"{name}={value}" for name, value in jaxllm_switches().items()]
    return "".join(", " + part for part in parts)


# name the run, place its cache or tell jaxllm's own defaults from a user's: no engine code path changes with them
BOOKKEEPING_ENV = ("JAXLLM_COMMIT", "JAXLLM_CACHE_DIR", "JAXLLM_DEFAULTED_ENV")


def jaxllm_switches() -> dict[str, str]:
    """The ``JAXLLM_*`` switches set in this process (``JAXLLM_MESH_LAUNCH_THREAD``, ``JAXLLM_STABLE_STEP_OUTPUTS``,
    ...), for a record and its variant line: a run with a switch must not read as one at the defaults."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if name.startswith("JAXLLM_") and name not in BOOKKEEPING_ENV
    }


def child_env(user_preallocate: str | None, **overrides: str) -> dict:
    """The environment for an engine in a child process: the parent's, less the parent's own
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (a parent that stays off the GPU sets it; the child's engine must run
    with its default or the user's ``user_preallocate``), with ``.`` on ``PYTHONPATH`` and ``overrides`` applied."""
    env = dict(os.environ, **overrides)
    if user_preallocate is None:
        env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    else:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user_preallocate
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [".", env.get("PYTHONPATH")]))
    return env


def git_commit() -> str:
    """The checkout's commit; ``$JAXLLM_COMMIT`` where the tree was copied without .git (the GPU machine)."""
    if os.environ.get("JAXLLM_COMMIT"):
        return os.environ["JAXLLM_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCHMARKS_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=BENCHMARKS_DIR, capture_output=True, text=True)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


ENVIRONMENT_KEYS = ("device", "jax", "commit", "date")  # what environment() records


def environment() -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '?')} x{jax.device_count()}",
        "jax": jax.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(num_prompts, input_len))
    return [{"prompt_token_ids": row.tolist()} for row in ids]


RECORD_PREFIX = "JSON "  # starts the line print_record prints


def print_record(record: dict) -> None:
    print(RECORD_PREFIX + json.dumps(record, sort_keys=True))


def read_records(lines: list[str]) -> list[dict]:
    """The records ``print_record`` printed among ``lines`` (a run's output), in order."""
    return [json.loads(line[len(RECORD_PREFIX) :]) for line in lines if line.startswith(RECORD_PREFIX)]


def append_result_row(line: str) -> None:
    with open(RESULTS_FILE, "a") as f:
        f.write(line.rstrip() + "\n")


def median_seconds(fn, *args, target_seconds=0.05, repeats=7, max_calls=2000) -> float:
    """Median over ``repeats`` of the mean time of back-to-back calls; warm-up (and compile) untimed."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(3, min(max_calls, int(target_seconds / max(time.perf_counter() - start, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


class CallTimers:
    """Wall-clock timers around callables, ``(owner, attribute, part)`` each, while ``recording()`` is open, on every
    thread (a launch worker's calls count). ``install()`` wraps them and puts the originals back on exit; ``wrap``
    times a callable made at run time (a bucket's jitted program)."""

    def __init__(self, targets=()):
        self.targets = tuple(targets)
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self._on = False

    @contextlib.contextmanager
    def install(self):
        with contextlib.ExitStack() as stack:
            for owner, name, part in self.targets:
                stack.enter_context(mock.patch.object(owner, name, self.wrap(part, getattr(owner, name))))
            yield self

    @contextlib.contextmanager
    def recording(self):
        self.times.clear()
        self._on = True
        try:
            yield self
        finally:
            self._on = False

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._on:
                    self.times[part].append(time.perf_counter() - start)

        return timed

    def summary(self) -> dict:
        """Per part: calls, and the median, mean and total in ms."""
        return {
            part: {
                "calls": len(t),
                "median_ms": float(np.median(t) * 1e3),
                "mean_ms": float(np.mean(t) * 1e3),
                "total_ms": float(np.sum(t) * 1e3),
            }
            for part, t in sorted(self.times.items())
        }
