"""jaxllm: a vLLM-class LLM inference engine in JAX.

``from jaxllm import LLM, SamplingParams`` is the offline API (vLLM's by name and behaviour). Importing jaxllm turns off
JAX's default preallocation of 75% of GPU memory (unless the user set it) and lets JAX's allocator use up to 95%: the
engine sizes its KV cache itself from ``gpu_memory_utilization``. The public names are imported lazily, so importing a
submodule (``jaxllm.models``, ``jaxllm.core``) does not pull in the whole engine.
"""

import importlib
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
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
