"""Registry: maps a checkpoint's ``architectures`` name to the model class that implements it."""

from __future__ import annotations

from jaxllm.models.decoder import DecoderForCausalLM
from jaxllm.models.llama import LlamaForCausalLM
from jaxllm.models.mistral import MistralForCausalLM
from jaxllm.models.mixtral import MixtralForCausalLM
from jaxllm.models.qwen2 import Qwen2ForCausalLM
from jaxllm.models.qwen2_moe import Qwen2MoeForCausalLM
from jaxllm.models.qwen3 import Qwen3ForCausalLM
from jaxllm.models.qwen3_moe import Qwen3MoeForCausalLM

_MODELS: dict[str, type[DecoderForCausalLM]] = {
    cls.__name__: cls
    for cls in (
        LlamaForCausalLM,
        MistralForCausalLM,
        MixtralForCausalLM,
        Qwen2ForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3ForCausalLM,
        Qwen3MoeForCausalLM,
    )
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_MODELS))


def get_model_class(architecture: str) -> type[DecoderForCausalLM]:
    try:
        return _MODELS[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from None
