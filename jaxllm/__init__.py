"""jaxllm: a vLLM-class LLM inference engine in JAX.

``from jaxllm import LLM, SamplingParams`` is the offline API (vLLM's by name and behaviour). Importing jaxllm writes
its runtime settings into the environment before JAX starts (``jaxllm.process_env``; a user's own settings win). The
public names are imported lazily, so importing a submodule (``jaxllm.models``, ``jaxllm.core``) does not pull in
the whole engine.
"""

import importlib

from jaxllm.process_env import apply_defaults

apply_defaults()

_PUBLIC = {
    "LLM": "jaxllm.entrypoints.llm",
    "LLMEngine": "jaxllm.engine.llm_engine",
    "SamplingParams": "jaxllm.sampling_params",
    "StructuredOutputsParams": "jaxllm.sampling_params",
    "GuidedDecodingParams": "jaxllm.sampling_params",
    "BeamSearchParams": "jaxllm.sampling_params",
    "RequestOutputKind": "jaxllm.sampling_params",
    "RequestOutput": "jaxllm.outputs",
    "CompletionOutput": "jaxllm.outputs",
    "TextPrompt": "jaxllm.inputs",
    "TokensPrompt": "jaxllm.inputs",
    "PromptType": "jaxllm.inputs",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
