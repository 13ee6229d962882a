"""Llama 2, 3, 3.1 (llama3 rope scaling) and 3.2 (tied embeddings); linear and dynamic rope scaling.

The layers are shared (`jaxllm.models.decoder`); this file names the family for the registry, and is where its
differences from the shared decoder would live.
"""

from jaxllm.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    """Hugging Face `LlamaForCausalLM`; weights use the checkpoint's own tensor names."""
