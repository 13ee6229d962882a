"""Reads a GGUF file (llama.cpp's single-file checkpoint) as if it were a Hugging Face checkpoint.

Owns: GGUF metadata -> a config.json-equivalent dict, GGUF tensor names -> Hugging Face names, dequantization
to float32 one tensor at a time (gguf's own `gguf.quants.dequantize`), and undoing the row permutation that
llama.cpp's converter applies to Llama q/k projections. Supports the Llama and Qwen2 layouts.

It must not know about models, sharding or devices: it hands out host numpy arrays in Hugging Face layout
(`[out, in]` for linear weights) and the model loader decides where they go.
"""

import math
import pathlib
from collections.abc import Iterator

import gguf
import numpy as np

from jaxllm.loading import gguf_tokenizer

# `general.architecture` -> the Hugging Face `architectures` entry of the same layout.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# `blk.{i}.<key>` -> `model.layers.{i}.<value>`
_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Llama 3.1-style RoPE: the converter turns config["rope_scaling"] into per-frequency divisors stored as this
# tensor. It is folded back into config["rope_scaling"] and not handed out as a weight.
_ROPE_FREQS_TENSOR = "rope_freqs.weight"
# The llama3 RoPE parameters are only recoverable up to a common scale of the context lengths; every
# Llama 3.x checkpoint was trained with this one, and the reconstruction is verified against the tensor.
_LLAMA3_DEFAULT_ORIGINAL_CONTEXT = 8192
_MISSING = object()


def load_gguf_checkpoint(path: str | pathlib.Path) -> "GGUFCheckpoint":
    """Opens a GGUF file (memory-mapped: no tensor is read until `tensors()` asks for it)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF checkpoint {str(path)!r} is not a file")
    return GGUFCheckpoint(path, gguf.GGUFReader(path))


class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint: `config`, `generation_config`, `tensors()`, tokenizer."""

    def __init__(self, path: pathlib.Path, reader: gguf.GGUFReader):
        self.path = path
        self._reader = reader
        self._tensors = {tensor.name: tensor for tensor in reader.tensors}
        self.architecture = str(self._metadata(gguf.Keys.General.ARCHITECTURE))  # "llama", "qwen2"
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"GGUF checkpoint {str(path)!r} has architecture {self.architecture!r}; supported "
                f"architectures: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_experts = int(self._model_metadata(gguf.Keys.LLM.EXPERT_COUNT, 0))
        if num_experts:
            raise ValueError(
                f"GGUF checkpoint {str(path)!r} is a mixture of experts ({num_experts} experts); jaxllm reads "
                "mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) from Hugging Face safetensors directories"
            )
        self.config = self._build_config()
        self.generation_config = self._build_generation_config()
        # Named up front so that an unknown tensor fails here, not halfway through loading the weights.
        self._hf_names = {name: hf_tensor_name(name) for name in self._tensors if name != _ROPE_FREQS_TENSOR}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face name -> shape of every tensor `tensors()` yields, without reading any data."""
        return {hf_name: _numpy_shape(self._tensors[name]) for name, hf_name in self._hf_names.items()}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (Hugging Face name, float32 array in Hugging Face layout), one tensor read at a time."""
        for name, hf_name in self._hf_names.items():
            values = _dequantize(self._tensors[name])
            num_heads = self._rope_permuted_heads(name)
            if num_heads is not None:
                values = _undo_rope_row_permutation(values, num_heads, name)
            yield hf_name, values

    def load_tokenizer(self):
        """A `transformers.PreTrainedTokenizerFast` built from the file's `tokenizer.*` metadata."""
        metadata = {key: field.contents() for key, field in self._reader.fields.items() if key.startswith("tokenizer.")}
        return gguf_tokenizer.build_tokenizer(metadata, source=str(self.path))

    def _rope_permuted_heads(self, gguf_name: str) -> int | None:
        """Head count of the converter's q/k row permutation for this tensor; None when it was not permuted.

        Only Llama is permuted: llama.cpp rotates Llama's q/k in interleaved pairs (2j, 2j+1) where Hugging Face
        rotates halves (j, j + H/2), so its converter reorders the rows to make the two agree. Qwen2 runs with
        half-split (NeoX) RoPE in llama.cpp too, and its rows are stored unpermuted.
        """
        if self.architecture != "llama" or not gguf_name.startswith("blk."):
            return None
        suffix = gguf_name.split(".", 2)[2]
        if suffix in ("attn_q.weight", "attn_q.bias"):
            return self.config["num_attention_heads"]
        if suffix in ("attn_k.weight", "attn_k.bias"):
            return self.config["num_key_value_heads"]
        return None

    def _model_metadata(self, key_template: str, default=_MISSING):
        """A `{arch}.*` key, e.g. gguf.Keys.LLM.BLOCK_COUNT -> "llama.block_count"."""
        return self._metadata(key_template.format(arch=self.architecture), default)

    def _metadata(self, key: str, default=_MISSING):
        field = self._reader.fields.get(key)
        if field is not None:
            return field.contents()
        if default is _MISSING:
            raise ValueError(f"GGUF checkpoint {str(self.path)!r} lacks the metadata key {key!r}")
        return default

    def _build_config(self) -> dict:
        keys = gguf.Keys
        num_heads = int(self._model_metadata(keys.Attention.HEAD_COUNT))
        hidden_size = int(self._model_metadata(keys.LLM.EMBEDDING_LENGTH))
        if "token_embd.weight" not in self._tensors:
            raise ValueError(f"GGUF checkpoint {str(self.path)!r} has no token_embd.weight tensor")
        config = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "hidden_size": hidden_size,
            "intermediate_size": int(self._model_metadata(keys.LLM.FEED_FORWARD_LENGTH)),
            "num_hidden_layers": int(self._model_metadata(keys.LLM.BLOCK_COUNT)),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self._model_metadata(keys.Attention.HEAD_COUNT_KV, num_heads)),
            "head_dim": int(self._model_metadata(keys.Attention.KEY_LENGTH, hidden_size // num_heads)),
            "hidden_act": "silu",
            "rms_norm_eps": _float32_as_decimal(self._model_metadata(keys.Attention.LAYERNORM_RMS_EPS)),
            "rope_theta": _float32_as_decimal(self._model_metadata(keys.Rope.FREQ_BASE, 10000.0)),
            "max_position_embeddings": int(self._model_metadata(keys.LLM.CONTEXT_LENGTH)),
            "vocab_size": _numpy_shape(self._tensors["token_embd.weight"])[0],
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": self.architecture == "qwen2" or "blk.0.attn_q.bias" in self._tensors,
            # Weights come out dequantized to float32; transformers 5 spells the key `dtype`.
            "torch_dtype": "float32",
            "dtype": "float32",
        }
        if self.architecture == "llama":
            config["mlp_bias"] = False
        if self.architecture == "qwen2":
            config["use_sliding_window"] = False
        config |= self._special_token_ids()
        rope_scaling = self._rope_scaling(config)
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _special_token_ids(self) -> dict[str, int]:
        keys = gguf.Keys.Tokenizer
        named = {"bos_token_id": keys.BOS_ID, "eos_token_id": keys.EOS_ID, "pad_token_id": keys.PAD_ID}
        token_ids = {name: self._metadata(key, None) for name, key in named.items()}
        return {name: int(token_id) for name, token_id in token_ids.items() if token_id is not None}

    def _rope_scaling(self, config: dict) -> dict | None:
        keys = gguf.Keys.Rope
        original_context = self._model_metadata(keys.SCALING_ORIG_CTX_LEN, None)
        if _ROPE_FREQS_TENSOR in self._tensors:
            rope_divisors = _dequantize(self._tensors[_ROPE_FREQS_TENSOR])  # [H/2]
            return _llama3_rope_scaling(
                rope_divisors,
                config["rope_theta"],
                config["head_dim"],
                int(original_context or _LLAMA3_DEFAULT_ORIGINAL_CONTEXT),
            )
        scaling_type = self._model_metadata(keys.SCALING_TYPE, None)
        if scaling_type in (None, "none"):
            return None
        if scaling_type not in ("linear", "yarn"):
            raise ValueError(
                f"GGUF checkpoint {str(self.path)!r} uses RoPE scaling {scaling_type!r}; supported: linear, yarn"
            )
        scaling = {"rope_type": scaling_type, "factor": _float32_as_decimal(self._model_metadata(keys.SCALING_FACTOR))}
        if original_context is not None:
            scaling["original_max_position_embeddings"] = int(original_context)
        return scaling

    def _build_generation_config(self) -> dict:
        """bos/eos/pad ids; eos lists every end-of-generation id the file names (eos, end-of-turn, end-of-message)."""
        eos_ids = []
        for key in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID):
            token_id = self._metadata(key, None)
            if token_id is not None and int(token_id) not in eos_ids:
                eos_ids.append(int(token_id))
        generation_config = {key: self.config[key] for key in ("bos_token_id", "pad_token_id") if key in self.config}
        if eos_ids:
            generation_config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        return generation_config


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSOR_NAMES:
        return f"model.layers.{int(layer)}.{_LAYER_TENSOR_NAMES[suffix]}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face name in the Llama/Qwen2 layout; known names: "
        f"{sorted(_GLOBAL_TENSOR_NAMES)} and blk.<i>.{{{', '.join(sorted(_LAYER_TENSOR_NAMES))}}}"
    )


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dims innermost first


def _dequantize(tensor) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 dequantizes to a view of the memory map: copy it so no array outlives or writes through the file.
    values = np.array(values, dtype=np.float32, copy=tensor.tensor_type == gguf.GGMLQuantizationType.F32)
    return values.reshape(_numpy_shape(tensor))


def _undo_rope_row_permutation(values: np.ndarray, num_heads: int, gguf_name: str) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation of q/k rows (weights [out, in] or biases [out]).

    Per head the converter moves HF row a*(H/2) + j (a in {0, 1}, j < H/2) to row 2*j + a, i.e.
    `w.reshape(num_heads, 2, H // 2, ...).swapaxes(1, 2)`; reading the rows as (head, j, a) and swapping back
    restores Hugging Face's order.
    """
    num_rows = values.shape[0]
    if num_rows % (2 * num_heads):
        raise ValueError(f"GGUF tensor {gguf_name!r} has {num_rows} rows, not a multiple of 2 * {num_heads} heads")
    head_dim = num_rows // num_heads
    per_head = values.reshape(num_heads, head_dim // 2, 2, *values.shape[1:])  # [N, H/2, 2, D]
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(values.shape))  # [N*H, D]


def _float32_as_decimal(value) -> float:
    """GGUF stores floats as float32; give back the shortest decimal that rounds to it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def llama3_rope_divisors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors [H/2] of Llama 3.1-style RoPE (what llama.cpp stores as rope_freqs.weight)."""
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [H/2]
    wavelength = 2 * math.pi / inv_freq
    original_context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (original_context / wavelength - low) / (high - low)
    divisors = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisors = np.where(wavelength < original_context / high, 1.0, divisors)
    return np.where(wavelength > original_context / low, factor, divisors)


def _llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int, original_context: int) -> dict:
    """Recovers Hugging Face's llama3 `rope_scaling` from the per-frequency divisors, and checks it reproduces them.

    Between the two cut-off wavelengths the divisor is 1 / ((1 - s) / factor + s) with
    s = (original_context / wavelength - low) / (high - low): a straight line in original_context / wavelength,
    whose slope and intercept give low and high.
    """
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [H/2]
    factor = float(divisors.max())
    is_smooth = (divisors > 1.0 + 1e-6) & (divisors < factor * (1.0 - 1e-6))
    if divisors.shape != inv_freq.shape or is_smooth.sum() < 2:
        raise ValueError(
            f"Cannot recover Llama 3 RoPE scaling from rope_freqs.weight of shape {divisors.shape} "
            f"(head_dim {head_dim}, {int(is_smooth.sum())} interpolated frequencies; need at least 2)"
        )
    smooth = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    relative_frequency = original_context * inv_freq / (2 * math.pi)  # original_context / wavelength
    slope, intercept = np.polyfit(relative_frequency[is_smooth], smooth[is_smooth], 1)
    low = -intercept / slope
    scaling = {
        "rope_type": "llama3",
        "factor": _rounded(factor),
        "low_freq_factor": _rounded(low),
        "high_freq_factor": _rounded(low + 1.0 / slope),
        "original_max_position_embeddings": original_context,
    }
    if not np.allclose(llama3_rope_divisors(scaling, rope_theta, head_dim), divisors, rtol=1e-5, atol=0):
        raise ValueError(f"rope_freqs.weight does not follow Llama 3 RoPE scaling (best fit: {scaling})")
    return scaling


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")
