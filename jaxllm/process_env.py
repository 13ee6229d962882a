"""The process-wide runtime settings jaxllm asks for, written into the environment before JAX starts a backend.

Importing ``jaxllm`` applies them; a setting the user made already always wins.

``XLA_PYTHON_CLIENT_PREALLOCATE=true`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``: JAX's pooling allocator reserves
95% of each GPU up front as one pool (JAX's default is 75%). The engine sizes its KV cache itself from
``gpu_memory_utilization``, and one pool keeps the cache's layer-sized buffers from being split across the allocator's
growth regions (which left a 2 GiB buffer unplaceable with 9.8 GiB free).

An engine whose replica spans several devices (tensor or pipeline parallelism) lowers the pool to
``MESH_POOL_FRACTION`` (0.85) when it is built before JAX has started a backend and jaxllm, not the user, chose the
fraction (``fit_pool_to_mesh``): XLA's all-reduce kernels take their scratch and signal buffers outside the pool, per
collective and program, and 5% of the GPU was too little for them (the Llama-3.1-8B shape at tensor parallelism 4 on
80 GB H100s, the 70B shape at 4 on 141 GB H200s: both failed in their first warm-up step and ran at 0.85).
The pool is the process's: engines built later in the same process share it. Which settings jaxllm filled in is kept
in ``JAXLLM_DEFAULTED_ENV``, so a child process (which inherits them) still tells them from a user's.

Not set, measured and left to the user: ``XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP``. It gives every
temporary buffer a CUDA graph uses a fixed virtual address, so XLA need not re-record graphs whose temporaries moved
(the 8B shape at tensor parallelism 4 on 4 x H100: batch-1 6.94 -> 4.63 ms per token). But it selects XLA's VMM
allocator for the whole process, which reports no statistics (``jaxllm.runner.device_memory`` reads the CUDA driver
then) and holds far more than the largest step's temporaries: an 8B tensor-parallel-2 engine planned at
``gpu_memory_utilization=0.8`` held 71.7 of 79.2 GiB per GPU after a job (8.4 GiB over the plan; its largest step's
temporaries are 1.5 GiB, all its forward programs' 3.2 GiB). On one GPU it made batch-1 decode slower (6.47 -> 7.13
ms). Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping

POOL_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
POOL_DEFAULTS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", POOL_FRACTION: "0.95"}
MESH_POOL_FRACTION = "0.85"  # for engines of several devices per replica: room for XLA's collectives outside the pool
DEFAULTED = "JAXLLM_DEFAULTED_ENV"  # comma-separated names of the settings jaxllm (not the user) filled in

logger = logging.getLogger(__name__)


def _defaulted(environ: MutableMapping[str, str]) -> set[str]:
    return set(filter(None, environ.get(DEFAULTED, "").split(",")))


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Writes the allocator settings into ``environ`` where the user has not chosen (at ``import jaxllm``)."""
    defaulted = _defaulted(environ)
    for name, value in POOL_DEFAULTS.items():
        if name not in environ:
            environ[name] = value
            defaulted.add(name)
    if defaulted:
        environ[DEFAULTED] = ",".join(sorted(defaulted))


def _started_platform() -> str | None:
    """The default backend's platform if JAX has started one, else None (without starting one)."""
    from jax._src import xla_bridge  # JAX exposes no public "has a backend started" query

    if not xla_bridge.backends_are_initialized():
        return None
    import jax

    return jax.default_backend()


def fit_pool_to_mesh(
    devices_per_replica: int,
    environ: MutableMapping[str, str] = os.environ,
    started_platform: Callable[[], str | None] = _started_platform,
) -> bool:
    """Lowers the pool to ``MESH_POOL_FRACTION`` for an engine of ``devices_per_replica`` > 1 devices where jaxllm
    chose the fraction and no backend has started (later, the pool is fixed); returns whether it did."""
    if devices_per_replica <= 1 or POOL_FRACTION not in _defaulted(environ):
        return False
    if float(environ.get(POOL_FRACTION, "1")) <= float(MESH_POOL_FRACTION):
        return False
    platform = started_platform()
    if platform is not None:
        if platform == "gpu":
            logger.warning(
                "JAX started before this %d-device engine, so its GPU memory pool stays at %s of each GPU, which may "
                "leave XLA's collectives too little memory: build the engine before other JAX work, or set %s=%s",
                devices_per_replica,
                environ.get(POOL_FRACTION),
                POOL_FRACTION,
                MESH_POOL_FRACTION,
            )
        return False
    environ[POOL_FRACTION] = MESH_POOL_FRACTION
    return True
