"""Mixtral: the Mistral decoder with a sparse mixture of experts in every layer (softmax router, top-2 of 8 experts in
Mixtral-8x7B, weights renormalized over the chosen experts).

The layers are shared (`jaxllm.models.decoder`, `jaxllm.models.moe`); this file names the family for the registry
and says how its checkpoints name the experts (``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``).
"""

from jaxllm.models.decoder import DecoderForCausalLM
from jaxllm.models.moe import MIXTRAL_EXPERT_NAMES


class MixtralForCausalLM(DecoderForCausalLM):
    """Hugging Face `MixtralForCausalLM`; weights use the checkpoint's own tensor names."""

    MOE_BLOCK_NAME = "block_sparse_moe"
    EXPERT_NAMES = MIXTRAL_EXPERT_NAMES
