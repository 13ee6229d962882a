"""ModelConfig: the architecture facts a model needs, read from a Hugging Face ``config.json`` dict.

Owns parsing and validating HF config fields (both ``rope_scaling`` + ``rope_theta`` and transformers 5's
``rope_parameters`` spellings), including the mixture-of-experts fields of Mixtral, Qwen2-MoE and Qwen3-MoE
(``MoEConfig``). Frozen; imports neither jax nor flax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP: each token's ``top_k`` experts (by a softmax router) run a SwiGLU of width
    ``intermediate_size`` and their outputs are summed with the router's weights (renormalized over the chosen
    experts when ``normalize_top_k``). ``sparse_layers``: the layers that have one (the others keep the dense MLP).
    ``shared_expert_intermediate_size`` > 0: Qwen2-MoE's shared expert, a dense SwiGLU every token runs, scaled by
    a sigmoid gate. ``expert_parallel``: on a device mesh, whole experts are split over the tensor axis instead of every
    expert's intermediate dimension (set by the engine from ``enable_expert_parallel``; ``sharding.rules``)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize_top_k: bool
    sparse_layers: tuple[int, ...]
    shared_expert_intermediate_size: int = 0
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name} of the experts must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} exceeds the {self.num_experts} experts")


# the architectures whose config.json describes a mixture of experts (read by _parse_moe)
_MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; only silu (SwiGLU) is supported")
        if self.moe is not None and any(not 0 <= i < self.num_layers for i in self.moe.sparse_layers):
            raise ValueError(f"sparse layers {self.moe.sparse_layers} out of range for {self.num_layers} layers")

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is a mixture of experts."""
        return self.moe is not None and layer in self.moe.sparse_layers

    def with_expert_parallel(self, enabled: bool) -> ModelConfig:
        """This config with its experts split whole over a mesh's tensor axis (``MoEConfig.expert_parallel``) when
        ``enabled``; a dense model's, or ``enabled=False``, unchanged."""
        if not enabled or self.moe is None:
            return self
        return dataclasses.replace(self, moe=dataclasses.replace(self.moe, expert_parallel=True))

    @property
    def derived_max_model_len(self) -> int:
        """The longest sequence the model supports: linear and dynamic RoPE scaling stretch the trained context by
        their factor (as vLLM derives it); llama3 scaling already states the extended length."""
        if self.rope.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        try:
            return cls._from_hf_config(hf)
        except KeyError as missing:
            raise ValueError(f"config.json lacks the field {missing.args[0]!r}") from None

    @classmethod
    def _from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model to build")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        architecture = architectures[0]
        return cls(
            architecture=architectures[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope=_parse_rope(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(architecture, hf),
            qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=_parse_sliding_window(hf),
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
            checkpoint_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            moe=_parse_moe(architecture, hf),
        )


def _attention_bias(architecture: str, hf: dict[str, Any]) -> bool:
    """Whether q/k/v_proj have biases: always in Qwen2, ``qkv_bias`` (default true) in Qwen2-MoE, else
    ``attention_bias``."""
    if architecture == "Qwen2ForCausalLM":
        return True
    if architecture == "Qwen2MoeForCausalLM":
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes rope_parameters (holding rope_theta); older configs write rope_scaling + rope_theta.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings")
        ),
    )


def _parse_sliding_window(hf: dict[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if window is None:
        return None
    # Qwen2/Qwen3 configs carry a sliding_window value but only apply it when use_sliding_window is true.
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None
    return int(window)


def _parse_moe(architecture: str, hf: dict[str, Any]) -> MoEConfig | None:
    """The experts of a Mixtral / Qwen2-MoE / Qwen3-MoE config (transformers' defaults where a field is absent);
    None for dense architectures."""
    if architecture not in _MOE_ARCHITECTURES:
        return None
    num_layers = hf["num_hidden_layers"]
    # Hub configs name the count num_local_experts (Mixtral) or num_experts (Qwen); transformers 5 writes either
    # as num_local_experts.
    num_experts = hf.get("num_local_experts", hf.get("num_experts"))
    if architecture == "MixtralForCausalLM":  # every layer sparse; intermediate_size is each expert's
        return MoEConfig(
            num_experts=8 if num_experts is None else num_experts,
            top_k=hf.get("num_experts_per_tok", 2),
            intermediate_size=hf["intermediate_size"],
            normalize_top_k=True,
            sparse_layers=tuple(range(num_layers)),
        )
    # Qwen: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or ())
    if num_experts is None:
        raise KeyError("num_experts")
    sparse = tuple(i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0)
    return MoEConfig(
        num_experts=num_experts,
        top_k=hf["num_experts_per_tok"],
        intermediate_size=hf["moe_intermediate_size"],
        normalize_top_k=bool(hf.get("norm_topk_prob", False)),
        sparse_layers=sparse,
        shared_expert_intermediate_size=(
            hf.get("shared_expert_intermediate_size", 0) if architecture == "Qwen2MoeForCausalLM" else 0
        ),
    )
