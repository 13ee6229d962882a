"""Warm-up compiles on worker threads (opt-in): every token bucket's step programs compiled side by side.

A runner's warm-up compiles each bucket's programs as it runs them, one after the other, and XLA's compile of one
program keeps few host cores busy. With ``JAXLLM_COMPILE_THREADS=N`` (N > 1) the warm-up first lowers (traces) each
program on the runner's thread, one at a time, and hands it to N workers (JAX releases the GIL while XLA compiles); the
padding steps that follow find every program compiled (``Lowered.compile`` fills the cache the jitted function's own
call reads), and nothing is compiled twice.

Off by default: on GPUs it costs throughput, most likely because XLA's GEMM autotuner times its candidates on the GPU
while the other compiles load the host and the GPU, and picks worse kernels. On one H200 (jax 0.11.2, the Llama-3.1-8B
shape, job J8, fresh caches, benchmarks/RESULTS.md session 40) the warm-up compiled in 32-56 s with 2-16 threads against
91-103 s one at a time (first token of J8's engine 71.0 s cold against 156.2 s), and J8 ran 3-6% slower (8,975-9,389
against 9,496-9,631 output tok/s); batch-1 latency did not move. So the engine keeps programs compiled this way apart:
``jaxllm.engine.setup`` puts them in a subdirectory of the persistent cache (``CONCURRENT_CACHE_SUBDIR``), where a later
start with one thread never finds them. Not measured on TPUs; on this project's 2-core CPU host XLA's CPU compiler
already keeps both cores busy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import jax

COMPILE_THREADS_ENV = "JAXLLM_COMPILE_THREADS"
CONCURRENT_CACHE_SUBDIR = "concurrent-compiles"


def compile_threads() -> int:
    """The warm-up's compile workers: ``JAXLLM_COMPILE_THREADS`` when set (a positive int, else a ValueError naming
    it), else 1 (compile as each program first runs)."""
    setting = os.environ.get(COMPILE_THREADS_ENV)
    if setting is None:
        return 1
    if not setting.strip().isdigit() or int(setting) < 1:
        raise ValueError(f"{COMPILE_THREADS_ENV} must be a positive int when set, got {setting!r}")
    return int(setting)


def compile_concurrently(programs: Iterable[jax.stages.Lowered], threads: int) -> int:
    """Compiles each lowered program of ``programs`` on ``threads`` workers while the caller's thread lowers the
    next; returns how many it compiled. With one thread it takes nothing from ``programs`` (the caller's runs compile
    them). A compile's error is raised here once the other compiles have finished."""
    if threads <= 1:
        return 0
    with ThreadPoolExecutor(threads, thread_name_prefix="jaxllm-compile") as pool:
        futures = [pool.submit(lowered.compile) for lowered in programs]
    for future in futures:
        future.result()
    return len(futures)
