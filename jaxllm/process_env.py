"""The process-wide runtime settings jaxllm asks for, written into the environment before JAX starts a backend.

Importing ``jaxllm`` applies them; a setting the user made already (in the environment, or an ``XLA_FLAGS`` entry
naming the same option) always wins.

- ``XLA_PYTHON_CLIENT_PREALLOCATE=true`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``: JAX's pooling allocator reserves
  95% of each GPU up front as one pool (JAX's default is 75%). The engine sizes its KV cache itself from
  ``gpu_memory_utilization``, and one pool keeps the cache's layer-sized buffers from being split across the
  allocator's growth regions (which left a 2 GiB buffer unplaceable with 9.8 GiB free).
- Where JAX's CUDA plugin is installed, ``XLA_FLAGS`` gains ``--xla_gpu_command_buffer_update_mode=SKIP_TEMP``: XLA
  gives every temporary buffer a CUDA graph uses a fixed virtual address, so a graph whose step temporaries would
  otherwise land elsewhere need not be re-recorded before each launch (with the default, every layer's graph was
  updated on every batch-1 step of the 8B shape at tensor parallelism 4: 6.94 -> 4.63 ms per token on 4 x H100,
  benchmarks/RESULTS.md). The flag selects XLA's VMM allocator for the whole process, which has no pool (the two
  variables above then do nothing) and keeps no statistics; ``jaxllm.runner.device_memory`` reads the CUDA driver's
  figures instead. ``--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE`` in ``XLA_FLAGS`` keeps XLA's default.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
from collections.abc import MutableMapping

POOL_DEFAULTS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
GRAPH_UPDATE_OPTION = "xla_gpu_command_buffer_update_mode"
GRAPH_UPDATE_DEFAULT = "SKIP_TEMP"


def cuda_plugin_installed() -> bool:
    """Whether a JAX CUDA plugin (``jax_plugins.xla_cuda12`` / ``xla_cuda13``) is installed; imports no jax."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    import jax_plugins  # a namespace package: importing it loads no plugin

    return any(module.name.startswith("xla_cuda") for module in pkgutil.iter_modules(jax_plugins.__path__))


def apply_defaults(environ: MutableMapping[str, str] = os.environ, on_cuda: bool | None = None) -> None:
    """Writes jaxllm's runtime settings into ``environ`` where the user has not chosen (see the module docstring)."""
    for name, value in POOL_DEFAULTS.items():
        environ.setdefault(name, value)
    if on_cuda is None:
        on_cuda = cuda_plugin_installed()
    flags = environ.get("XLA_FLAGS", "")
    if on_cuda and GRAPH_UPDATE_OPTION not in flags:
        environ["XLA_FLAGS"] = f"{flags} --{GRAPH_UPDATE_OPTION}={GRAPH_UPDATE_DEFAULT}".strip()
