"""Qwen3-MoE: the Qwen3 decoder (q/k RMSNorm) with a sparse mixture of experts in its sparse layers (softmax router,
e.g. top-8 of 128 experts in Qwen3-30B-A3B, renormalized when ``norm_topk_prob``).

The layers are shared (`jaxllm.models.decoder`, `jaxllm.models.moe`); this file names the family for the registry.
"""

from jaxllm.models.decoder import DecoderForCausalLM


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Hugging Face `Qwen3MoeForCausalLM`; weights use the checkpoint's own tensor names."""
