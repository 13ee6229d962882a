"""Mistral: the Llama decoder with an optional sliding attention window.

The layers are shared (`jaxllm.models.decoder`); this file names the family for the registry, and is where its
differences from the shared decoder would live.
"""

from jaxllm.models.decoder import DecoderForCausalLM


class MistralForCausalLM(DecoderForCausalLM):
    """Hugging Face `MistralForCausalLM`; weights use the checkpoint's own tensor names."""
