"""jaxllm: a vLLM-class LLM inference engine in JAX.

``from jaxllm import LLM, SamplingParams`` is the offline API (vLLM's by name and behaviour). Importing jaxllm makes
JAX's allocator reserve 95% of GPU memory up front as one pool (JAX's default is 75%; a user's own setting wins): the
engine sizes its KV cache itself from ``gpu_memory_utilization``, and one pool keeps the cache's layer-sized buffers
from being split across the allocator's growth regions (which left a 2 GiB buffer unplaceable with 9.8 GiB free).
The public names are imported lazily, so importing a submodule (``jaxllm.models``, ``jaxllm.core``) does not pull in
the whole engine.
"""

import importlib
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

_PUBLIC = {
    "LLM": "jaxllm.entrypoints.llm",
    "LLMEngine": "jaxllm.engine.llm_engine",
    "SamplingParams": "jaxllm.sampling_params",
    "RequestOutput": "jaxllm.outputs",
    "CompletionOutput": "jaxllm.outputs",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
