"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): the Qwen2 decoder (q/k/v bias) with a sparse mixture of experts plus a
shared expert, a dense SwiGLU every token runs, scaled by a sigmoid gate.

The layers are shared (`jaxllm.models.decoder`, `jaxllm.models.moe`); this file names the family for the registry.
"""

from jaxllm.models.decoder import DecoderForCausalLM


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    """Hugging Face `Qwen2MoeForCausalLM`; weights use the checkpoint's own tensor names."""
