"""A runner's launch thread: one worker that calls a step's jitted programs while the engine's thread goes on.

A jitted call returns once its kernels are queued on the device, and the queueing (arguments checked, the step's
inputs copied, the CUDA graphs launched) is host time: ~0.9 ms for a 1B model's forward program on an H200 host.
Run on a worker thread, with the GIL released inside the call, it overlaps the engine's own host work for the
next step (scheduling, packing, the previous step's outputs). The worker runs launches one at a time, in order, so
a step's KV cache and pending tokens come from the launch before it.

Work queued on the thread must never hold the runner: the runner's finalizer shuts the thread down (waiting for
it), so a runner freed on its own thread would wait for itself. Launches hold the programs (weakly bound to the
runner) and the state they change, never the runner.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import jax

from jaxllm.config import env_switch

LAUNCH_THREAD_ENV = "JAXLLM_LAUNCH_THREAD"


def launch_thread_enabled(backend: str) -> bool:
    """``JAXLLM_LAUNCH_THREAD`` (the one-device runner's switch) when set; unset, on for GPUs, off elsewhere (on
    CPU the "device" shares the host's cores; not measured on TPUs)."""
    setting = env_switch(LAUNCH_THREAD_ENV)
    return backend == "gpu" if setting is None else setting


def start_launch_thread(owner) -> ThreadPoolExecutor:
    """The worker of ``owner`` (a runner), shut down (after the launches queued) when ``owner`` is freed."""
    launcher = ThreadPoolExecutor(1, thread_name_prefix="jaxllm-launch")
    weakref.finalize(owner, launcher.shutdown, wait=True)
    return launcher


class LaunchedResult:
    """A step's device results while its launch runs on the worker thread: ``get()`` waits for the launch and returns
    them; ``block_until_ready()`` (what ``jax.block_until_ready`` calls on a leaf) also waits for the device."""

    def __init__(self, future: Future):
        self._future = future

    def get(self):
        return self._future.result()

    def block_until_ready(self):
        return jax.block_until_ready(self.get())


def resolved(result):
    """``result`` itself, or what its launch returned when it is a ``LaunchedResult``."""
    return result.get() if isinstance(result, LaunchedResult) else result
