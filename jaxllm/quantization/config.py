"""``QuantizationConfig``: which scheme a model's linear layers use, resolved from ``LLM(quantization=...)``.

Owns the user-facing names and the int4 group size; the schemes themselves live in ``schemes``. Imports no jax.
"""

from __future__ import annotations

import dataclasses

from jaxllm.argument_checks import number_error

QUANTIZATION_NAMES = (None, "int8", "int4", "fp8")
DEFAULT_INT4_GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """Weight quantization of the decoder's linear layers (q/k/v/o, gate/up/down); the embeddings stay in the model
    dtype, and so does lm_head unless ``lm_head`` (then a tied lm_head gets a quantized copy of the embedding table,
    which the token lookup keeps reading in the model dtype). ``group_size`` is used by int4 only."""

    method: str
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    lm_head: bool = False
    # int4 only, from a checkpoint stored with zero points (AWQ, asymmetric GPTQ): each layer also holds ``offsets``
    # [K/group, N], ``(8 - zero) * scale``, added to its product as the group sums of x times them
    zero_points: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_NAMES[1:]:
            raise ValueError(f"unknown quantization {self.method!r}; choose one of {QUANTIZATION_NAMES}")
        group = self.group_size
        error = number_error(group, minimum=2) or (ValueError if group % 2 else None)
        if error is not None:
            raise error(f"int4 group_size must be a positive even int, got {group!r}")
        if not isinstance(self.lm_head, bool):
            raise TypeError(f"quantize_lm_head must be a bool, got {self.lm_head!r}")
        if self.zero_points and self.method != "int4":
            raise ValueError(f"zero points are an int4 option, not {self.method}'s")

    def check_in_features(self, in_features: int, out_features: int) -> None:
        """ValueError unless a ``[in_features, out_features]`` linear layer can use this scheme."""
        if self.method == "int4" and in_features % self.group_size:
            raise ValueError(
                f"int4 quantization with group_size {self.group_size} needs every linear layer's in_features to be a "
                f"multiple of {self.group_size}; this model has a layer of in_features={in_features} "
                f"(out_features={out_features})"
            )


def resolve_quantization(
    name: str | None, group_size: int = DEFAULT_INT4_GROUP_SIZE, lm_head: bool = False
) -> QuantizationConfig | None:
    """``LLM(quantization=name, quantization_group_size=group_size, quantize_lm_head=lm_head)`` -> its config (None:
    no quantization); ValueError naming an unknown ``name``, an unusable ``group_size`` or ``lm_head`` without
    ``name``."""
    if name is None:
        if lm_head:
            raise ValueError("quantize_lm_head=True needs quantization set (int8, int4 or fp8), got quantization=None")
        return None
    if name not in QUANTIZATION_NAMES:
        raise ValueError(f"unknown quantization {name!r}; choose one of {QUANTIZATION_NAMES}")
    return QuantizationConfig(name, group_size, lm_head)
