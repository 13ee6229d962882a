"""The process-wide runtime settings jaxllm asks for, written into the environment before JAX starts a backend.

Importing ``jaxllm`` applies them; a setting the user made already always wins.

``XLA_PYTHON_CLIENT_PREALLOCATE=true`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``: JAX's pooling allocator reserves
95% of each GPU up front as one pool (JAX's default is 75%). The engine sizes its KV cache itself from
``gpu_memory_utilization``, and one pool keeps the cache's layer-sized buffers from being split across the allocator's
growth regions (which left a 2 GiB buffer unplaceable with 9.8 GiB free).

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

import os
from collections.abc import MutableMapping

POOL_DEFAULTS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Writes the allocator settings into ``environ`` where the user has not chosen (at ``import jaxllm``)."""
    for name, value in POOL_DEFAULTS.items():
        environ.setdefault(name, value)
