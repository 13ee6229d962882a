"""Building a model's weights: from checkpoint tensors (HF safetensors or GGUF) or as random ``dummy`` weights.

Owns the mapping from Hugging Face tensor names to NNX parameter paths, shape checking with errors that name the
tensor and both shapes, dtype casting, and placing each tensor straight onto its device(s) (a sharding per
parameter when a mesh is used), one tensor at a time. A quantized model (``QuantizedLinear`` layers) gets each linear
weight quantized as it arrives, so no full-precision copy of the whole model ever exists; its dummy weights are the
quantized dummy weights of the same model unquantized. A mixture of experts' checkpoint holds one tensor per expert
(``...experts.{e}.gate_proj.weight``); the model stacks them (``[E, in, out]``), so each stack is assembled on the
host and placed once its last expert arrives (one layer's projection at a time, not the whole model). A checkpoint
stored quantized (GPTQ, AWQ, compressed-tensors, fp8) has each layer's pieces gathered the same way and placed as
they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.models.config import ModelConfig
from jaxllm.models.decoder import DecoderForCausalLM
from jaxllm.models.layers import QuantizedLinear
from jaxllm.quantization.config import DEFAULT_INT4_GROUP_SIZE, QuantizationConfig
from jaxllm.quantization.prequantized import CheckpointQuantization, StoredLayers, dequantized
from jaxllm.quantization.schemes import QuantizedWeight, quantize_weight

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}

# Given a parameter path and its abstract variable, the sharding to place it with (None: default device).
Placement = Callable[[tuple, nnx.Variable], jax.sharding.Sharding | None]
# vLLM's fp8 KV-cache scales are skipped: the fp8 cache runs with scale 1.0 (jaxllm.models.decoder.Attention).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "self_attn.k_scale", "self_attn.v_scale")
# Linear layers whose names do not end in _proj: the head, the experts' routers and Qwen2-MoE's shared-expert gate
# (an expert's own projections, Mixtral's w1 / w2 / w3, are told by their path).
_LINEAR_OWNERS = ("lm_head", "gate", "shared_expert_gate")
LM_HEAD_KERNEL = ("lm_head", "kernel")  # NNX paths the loader fills specially
EMBEDDING = ("model", "embed_tokens", "embedding")
_DUMMY_STDDEV = 0.02


def resolve_dtype(dtype, checkpoint_dtype: str):
    """``"auto"`` -> the checkpoint's dtype; otherwise one of float32/bfloat16/float16."""
    if not isinstance(dtype, str):
        dtype = jnp.dtype(dtype).name
    name = checkpoint_dtype if dtype == "auto" else dtype
    name = _DTYPE_ALIASES.get(name, name).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[name]


def abstract_model(
    model_cls, config: ModelConfig, dtype, attention_impl=None, quantization: QuantizationConfig | None = None
) -> DecoderForCausalLM:
    kwargs = {} if quantization is None else {"quantization": quantization}
    return nnx.eval_shape(
        lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0), attention_impl=attention_impl, **kwargs)
    )


def hf_name_to_path(name: str) -> tuple[tuple, bool]:
    """HF tensor name -> (NNX parameter path, whether the tensor is a torch Linear weight to transpose)."""
    path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
    owner, leaf = path[-2] if len(path) > 1 else "", path[-1]
    if leaf == "weight" and owner == "embed_tokens":
        return path[:-1] + ("embedding",), False
    linear = str(owner).endswith("_proj") or owner in _LINEAR_OWNERS or split_expert(path) is not None
    if leaf == "weight" and linear:
        return path[:-1] + ("kernel",), True
    return path, False


def _default_placement(path, variable) -> None:
    return None


def split_expert(path: tuple) -> tuple[tuple, int] | None:
    """``(..., "experts", e, proj, "kernel")`` -> the stacked parameter's path ``(..., "experts", proj, "kernel")``
    and ``e``; None for a path that is not one expert's."""
    for i in range(len(path) - 1):
        if path[i] == "experts" and isinstance(path[i + 1], int):
            return path[: i + 1] + path[i + 2 :], path[i + 1]
    return None


class _ExpertStacks:
    """Host buffers that assemble stacked expert kernels ``[E, in, out]`` one expert's tensor at a time."""

    def __init__(self):
        self._buffers: dict[tuple, np.ndarray] = {}
        self._arrived: dict[tuple, set[int]] = {}

    def add(self, name: str, path: tuple, expert: int, value: np.ndarray, variable) -> np.ndarray | None:
        """Stores expert ``expert``'s kernel (already ``[in, out]``); returns the whole stack once complete."""
        shape = tuple(variable.get_value().shape)
        if not 0 <= expert < shape[0]:
            raise ValueError(f"unexpected tensor {name!r}: expert {expert} of a model with {shape[0]} experts")
        if value.shape != shape[1:]:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape[::-1])}, model expects {shape[1:][::-1]} per expert"
            )
        arrived = self._arrived.setdefault(path, set())
        if expert in arrived:
            raise ValueError(f"tensor {name!r} appears twice in the checkpoint")
        buffer = self._buffers.setdefault(path, np.empty(shape, variable.get_value().dtype))
        buffer[expert] = value
        arrived.add(expert)
        if len(arrived) < shape[0]:
            return None
        del self._arrived[path]
        return self._buffers.pop(path)

    def started(self, path: tuple) -> bool:
        """Whether some but not all of the stack at ``path`` arrived."""
        return path in self._arrived

    def missing(self) -> list[str]:
        """The experts' tensors not seen, for stacks that got some."""
        names = []
        for path, arrived in self._arrived.items():
            absent = sorted(set(range(self._buffers[path].shape[0])) - arrived)
            names.append(".".join(map(str, path[:-2])) + f".{{{','.join(map(str, absent))}}}." + str(path[-2]))
        return names


def load_weights(
    abstract: DecoderForCausalLM,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    placement: Placement = _default_placement,
    checkpoint_quantization: CheckpointQuantization | None = None,
) -> DecoderForCausalLM:
    """Fills an abstract model from ``(hf_name, array)`` pairs; every parameter must arrive exactly once. With
    ``checkpoint_quantization`` (a checkpoint stored quantized) each quantized layer's stored tensors become its
    ``values`` / ``scales`` as they are (``jaxllm.quantization.prequantized``)."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    loaded: set[tuple] = set()
    tied = abstract.config.tie_word_embeddings
    # A quantized lm_head of a tied model is the embedding table, quantized (the lookup keeps the table itself).
    tied_quantized_head = _quantized_linear_at(abstract, flat, LM_HEAD_KERNEL) if tied else None
    expert_stacks = _ExpertStacks()
    stored_layers = None if checkpoint_quantization is None else StoredLayers(checkpoint_quantization)
    for name, array in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if stored_layers is not None and stored_layers.owns(name, array):
            loaded.update(_add_stored_piece(abstract, flat, stored_layers, name, array, placement))
            continue
        path, transpose = hf_name_to_path(name)
        expert = split_expert(path)
        if expert is not None and expert[0] in flat:
            path, index = expert
            variable = flat[path]
            stack = expert_stacks.add(name, path, index, np.asarray(array).T, variable)
            if stack is not None:
                variable.set_value(jax.device_put(stack, placement(path, variable)))
                loaded.add(path)
            continue
        linear = _quantized_linear_at(abstract, flat, path)
        if linear is not None:
            got = tuple(array.shape[::-1]) if transpose else tuple(array.shape)
            if got != linear.shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, model expects {linear.shape}")
            value = np.asarray(array).T if transpose else np.asarray(array)
            loaded.update(_set_quantized(flat, path[:-1], linear, value, placement))
            continue
        if path not in flat:
            if stored_layers is not None and path[-1] == "bias" and not np.any(array):
                continue  # GPTQ writes zero biases for layers that have none
            raise ValueError(f"unexpected tensor {name!r} (shape {tuple(array.shape)}) in checkpoint")
        variable = flat[path]
        expected = tuple(variable.get_value().shape)
        got = tuple(array.shape[::-1]) if transpose else tuple(array.shape)
        if got != expected:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(array.shape)}, model expects {expected}"
                + (" (transposed)" if transpose else "")
            )
        value = np.asarray(array).T if transpose else np.asarray(array)
        dtype = variable.get_value().dtype
        variable.set_value(jax.device_put(value.astype(dtype), placement(path, variable)))
        loaded.add(path)
        if tied_quantized_head is not None and path == EMBEDDING:
            loaded.update(_set_quantized(flat, LM_HEAD_KERNEL[:-1], tied_quantized_head, value.T, placement))
    missing = [".".join(map(str, p)) for p in flat if p not in loaded and not expert_stacks.started(p)]
    missing += expert_stacks.missing() + (stored_layers.missing() if stored_layers is not None else [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_dummy_weights(
    model_cls,
    config: ModelConfig,
    dtype,
    *,
    seed: int = 0,
    attention_impl=None,
    placement: Placement = _default_placement,
    quantization: QuantizationConfig | None = None,
) -> DecoderForCausalLM:
    """Random weights from a config alone (``load_format="dummy"``), each created directly in its final placement.

    One small jitted draw per parameter (cached by shape), not one program for the whole model: an 8B model's single
    init program takes minutes to compile. Norm weights are drawn around 1, everything else around 0. With
    ``quantization``, each linear kernel is drawn as the unquantized model's (same key), then quantized.
    """
    if quantization is not None:
        reference = nnx.split(abstract_model(model_cls, config, dtype, attention_impl))[1]
        unquantized_index = {path: i for i, (path, _) in enumerate(nnx.to_flat_state(reference))}
    abstract = abstract_model(model_cls, config, dtype, attention_impl, quantization)
    graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    by_path = dict(flat)
    key = jax.random.key(seed)
    for index, (path, variable) in enumerate(flat):
        if path[-1] in ("scales", "offsets"):
            continue  # filled with its values
        if path[-1] == "values":
            kernel_path = path[:-1] + ("kernel",)
            linear = _quantized_linear_at(abstract, by_path, kernel_path)
            if kernel_path in unquantized_index:
                kernel = _random_param(linear.shape, dtype, None, False)(
                    jax.random.fold_in(key, unquantized_index[kernel_path])
                )
            else:  # a tied model's quantized lm_head: the unquantized model's embedding table, transposed
                embedding_shape = linear.shape[::-1]
                embedding_key = jax.random.fold_in(key, unquantized_index[EMBEDDING])
                kernel = _random_param(embedding_shape, dtype, None, False)(embedding_key).T
            _set_quantized(by_path, path[:-1], linear, kernel, placement)
            continue
        if quantization is not None:
            index = unquantized_index[path]
        value = variable.get_value()
        is_norm_weight = path[-1] == "weight"
        variable.set_value(
            _random_param(value.shape, value.dtype, placement(path, variable), is_norm_weight)(
                jax.random.fold_in(key, index)
            )
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _quantized_linear_at(model, flat, kernel_path: tuple) -> QuantizedLinear | None:
    """The ``QuantizedLinear`` whose kernel a checkpoint tensor at ``kernel_path`` is, if any."""
    if kernel_path[-1] != "kernel" or kernel_path[:-1] + ("values",) not in flat:
        return None
    module = model
    for key in kernel_path[:-1]:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module if isinstance(module, QuantizedLinear) else None


def _add_stored_piece(abstract, flat, stored_layers: StoredLayers, name: str, array, placement) -> list[tuple]:
    """Hands one stored piece of a quantized layer to ``stored_layers``; once the layer is complete, places its
    weight (dequantized into a layer the model keeps unquantized). Returns the paths it filled."""
    kernel_path, _ = hf_name_to_path(name.rpartition(".")[0] + ".weight")
    linear = _quantized_linear_at(abstract, flat, kernel_path)
    if linear is None and (kernel_path not in flat or kernel_path[-1] != "kernel"):
        raise ValueError(f"unexpected tensor {name!r} (shape {tuple(array.shape)}) in checkpoint")
    shape = linear.shape if linear is not None else tuple(flat[kernel_path].get_value().shape)
    completed = stored_layers.add(name, array, shape)
    if completed is None:
        return []
    layer, qw, offsets = completed
    if linear is None:
        variable = flat[kernel_path]
        kernel = dequantized(qw, offsets, variable.get_value().dtype)
        variable.set_value(jax.device_put(kernel, placement(kernel_path, variable)))
        return [kernel_path]
    if (qw.method, qw.group_size) != (linear.method, linear.group_size):
        raise ValueError(
            f"{layer} is stored as {qw.method} (group size {qw.group_size}); the model's layer is {linear.method} "
            f"(group size {linear.group_size})"
        )
    return _place_quantized(flat, kernel_path[:-1], qw, placement, offsets)


def _set_quantized(flat, module_path: tuple, linear: QuantizedLinear, kernel, placement: Placement) -> list[tuple]:
    """Quantizes one ``kernel [K, N]`` into ``linear``'s ``values`` and ``scales``; returns the paths it filled."""
    qw = quantize_weight(jnp.asarray(kernel), linear.method, linear.group_size or DEFAULT_INT4_GROUP_SIZE)
    return _place_quantized(flat, module_path, qw, placement)


def _place_quantized(flat, module_path: tuple, qw: QuantizedWeight, placement: Placement, offsets=None) -> list[tuple]:
    """Places ``qw``'s arrays into the layer at ``module_path``, and its zero-point ``offsets`` where the layer has
    them (zeros when the weight has none: a symmetric one); returns the paths it filled."""
    arrays = {"values": qw.values, "scales": qw.scales}
    if module_path + ("offsets",) in flat:
        arrays["offsets"] = jnp.zeros_like(qw.scales) if offsets is None else offsets
    elif offsets is not None:
        raise ValueError(f"{'.'.join(map(str, module_path))} is stored with zero points; the model's layer has none")
    paths = []
    for name, array in arrays.items():
        path = module_path + (name,)
        flat[path].set_value(jax.device_put(array, placement(path, flat[path])))
        paths.append(path)
    return paths


@functools.cache
def _random_param(shape, dtype, sharding, around_one: bool):
    def draw(key):
        noise = jax.random.normal(key, shape, jnp.float32) * _DUMMY_STDDEV
        return (noise + 1.0 if around_one else noise).astype(dtype)

    return jax.jit(draw, out_shardings=sharding)
