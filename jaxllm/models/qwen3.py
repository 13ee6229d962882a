"""Qwen3: the Llama decoder with per-head q/k RMSNorm before rope and an explicit head_dim.

The layers are shared (`jaxllm.models.decoder`); this file names the family for the registry, and is where its
differences from the shared decoder would live.
"""

from jaxllm.models.decoder import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Hugging Face `Qwen3ForCausalLM`; weights use the checkpoint's own tensor names."""
