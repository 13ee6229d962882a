"""The process-wide runtime settings jaxllm asks for, written into the environment before JAX starts a backend.

Importing ``jaxllm`` applies the first below, building a multi-GPU engine the second; a setting the user made already
(in the environment, or an ``XLA_FLAGS`` entry naming the same option) always wins.

- ``XLA_PYTHON_CLIENT_PREALLOCATE=true`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``: JAX's pooling allocator reserves
  95% of each GPU up front as one pool (JAX's default is 75%). The engine sizes its KV cache itself from
  ``gpu_memory_utilization``, and one pool keeps the cache's layer-sized buffers from being split across the
  allocator's growth regions (which left a 2 GiB buffer unplaceable with 9.8 GiB free).
- For an engine on more than one GPU (tensor or pipeline parallel), ``XLA_FLAGS`` gains
  ``--xla_gpu_command_buffer_update_mode=SKIP_TEMP`` when the engine is built, if JAX's CUDA plugin is installed and
  JAX has not started its backends yet (the flag is read once, when they start). XLA then gives every temporary buffer
  a CUDA graph uses a fixed virtual address, so a graph whose step temporaries would otherwise land elsewhere need not
  be re-recorded before each launch: with XLA's default every layer's graph was updated on every batch-1 step of the
  8B shape at tensor parallelism 4 (6.94 -> 4.63 ms per token with the flag, 4 x H100). On one GPU the flag made
  batch-1 decode slower (L8: 6.47 -> 7.13 ms per token, H100), so a one-device engine keeps XLA's default. The flag
  selects XLA's VMM allocator for the whole process, which has no pool (the two variables above then do nothing) and
  keeps no statistics; ``jaxllm.runner.device_memory`` reads the CUDA driver's figures instead. The user's own
  ``--xla_gpu_command_buffer_update_mode=...`` in ``XLA_FLAGS`` (``ALWAYS_UPDATE`` is XLA's default) always wins.
  Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

POOL_DEFAULTS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
GRAPH_UPDATE_OPTION = "xla_gpu_command_buffer_update_mode"
GRAPH_UPDATE_DEFAULT = "SKIP_TEMP"


def cuda_plugin_installed() -> bool:
    """Whether a JAX CUDA plugin (``jax_plugins.xla_cuda12`` / ``xla_cuda13``) is installed; imports no jax."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    import jax_plugins  # a namespace package: importing it loads no plugin

    return any(module.name.startswith("xla_cuda") for module in pkgutil.iter_modules(jax_plugins.__path__))


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Writes the allocator settings into ``environ`` where the user has not chosen (at ``import jaxllm``)."""
    for name, value in POOL_DEFAULTS.items():
        environ.setdefault(name, value)


def stable_graph_temporaries_for_mesh(
    num_mesh_devices: int,
    environ: MutableMapping[str, str] = os.environ,
    on_cuda: bool | None = None,
    backends_started: bool | None = None,
) -> bool:
    """Adds SKIP_TEMP to ``XLA_FLAGS`` for an engine spanning ``num_mesh_devices`` > 1 GPUs, where it still can take
    effect and the user has not chosen; returns whether it did. Call before the engine first touches JAX's devices."""
    flags = environ.get("XLA_FLAGS", "")
    if num_mesh_devices <= 1 or GRAPH_UPDATE_OPTION in flags:
        return False
    if not (cuda_plugin_installed() if on_cuda is None else on_cuda):
        return False
    if _backends_started() if backends_started is None else backends_started:
        logger.warning(
            "JAX's backends started before this %d-device engine, so XLA's graph updates stay on (slower tensor "
            "parallelism on GPUs): set XLA_FLAGS=--%s=%s before JAX starts",
            num_mesh_devices,
            GRAPH_UPDATE_OPTION,
            GRAPH_UPDATE_DEFAULT,
        )
        return False
    environ["XLA_FLAGS"] = f"{flags} --{GRAPH_UPDATE_OPTION}={GRAPH_UPDATE_DEFAULT}".strip()
    logger.info(
        "XLA_FLAGS += --%s=%s (a %d-device engine)", GRAPH_UPDATE_OPTION, GRAPH_UPDATE_DEFAULT, num_mesh_devices
    )
    return True


def _backends_started() -> bool:
    from jax._src import xla_bridge  # JAX offers no public query; this one has kept its name across releases

    return xla_bridge.backends_are_initialized()
