"""Qwen2 / Qwen2.5: the Llama decoder with q/k/v projection biases.

The layers are shared (`jaxllm.models.decoder`); this file names the family for the registry, and is where its
differences from the shared decoder would live.
"""

from jaxllm.models.decoder import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Hugging Face `Qwen2ForCausalLM`; weights use the checkpoint's own tensor names."""
