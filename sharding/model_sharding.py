"""Putting a whole model onto a replica mesh: load or init straight into shards, or reshard a built model.

Owns the KV-head expansion used when there are fewer KV heads than tensor devices (``T % K == 0``): each KV head is
replicated ``T/K`` times, as vLLM does, so the model becomes an equivalent one with ``K' = T`` KV heads (q head n
uses KV head ``n // (N/K)`` before and ``n // (N/T)`` after; the repeated heads make those the same head) and every
device holds one KV head of k/v_proj and of the cache. The expanded model's ``config.num_kv_heads`` is ``T``, so
the KV cache allocated from it has ``T`` heads. Only k/v_proj are rebuilt; every other parameter keeps its array.
Quantized k/v_proj repeat their values and scales along the output (``kv_heads``) axis, wherever their scheme stores
it (fp8 values are ``[N, K]``), so each head keeps its own codes and scales.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.models.layers import QuantizedLinear
from sharding.mesh import TENSOR_AXIS, axis_size
from sharding.rules import kv_head_replicas, param_placement
from sharding.stages import stage_layer_ranges

_KV_PROJECTIONS = ("k_proj", "v_proj")
_KV_HEADS_AXIS = "kv_heads"  # the logical name of k/v_proj's output axis (jaxllm.models.decoder)


def _dtype_and_impl(model):
    dtype = model.model.embed_tokens.embedding.get_value().dtype
    attention_impl = model.model.layers[0].self_attn.attention_impl
    return dtype, attention_impl


def _is_kv_projection(path: tuple) -> bool:
    return len(path) >= 2 and path[-2] in _KV_PROJECTIONS


def _repeat_heads(value: jax.Array, num_kv_heads: int, replicas: int, axis: int) -> jax.Array:
    """``value`` with its ``K*H`` axis ``axis`` made ``K*replicas*H``, each head repeated ``replicas`` times."""
    moved = jnp.moveaxis(value, axis, -1)  # [..., K*H]
    head_dim = moved.shape[-1] // num_kv_heads
    heads = moved.reshape(*moved.shape[:-1], num_kv_heads, head_dim)  # [..., K, H]
    repeated = jnp.repeat(heads, replicas, axis=-2).reshape(*moved.shape[:-1], num_kv_heads * replicas * head_dim)
    return jnp.moveaxis(repeated, -1, axis)


@functools.cache
def _repeat_heads_program(num_kv_heads: int, replicas: int, axis: int, sharding):
    """One jitted repeat per (heads, replicas, axis, target sharding): every layer of a stage reuses it."""
    return jax.jit(
        functools.partial(_repeat_heads, num_kv_heads=num_kv_heads, replicas=replicas, axis=axis),
        out_shardings=sharding,
    )


def expand_kv_heads(model, mesh: Mesh):
    """The equivalent model with ``T`` KV heads when ``K < T`` (``model`` itself when ``K % T == 0``)."""
    config = model.config
    replicas = kv_head_replicas(config.num_kv_heads, axis_size(mesh, TENSOR_AXIS))
    if replicas == 1:
        return model
    new_config = dataclasses.replace(config, num_kv_heads=config.num_kv_heads * replicas)
    dtype, attention_impl = _dtype_and_impl(model)
    abstract = abstract_model(type(model), new_config, dtype, attention_impl, quantization=model.quantization)
    graphdef, abstract_state = nnx.split(abstract)
    old = dict(nnx.to_flat_state(nnx.state(model)))
    placement = param_placement(mesh, new_config)
    flat = []
    for path, variable in nnx.to_flat_state(abstract_state):
        value = old[path].get_value()
        if _is_kv_projection(path):
            axis = variable.logical_axes.index(_KV_HEADS_AXIS)
            value = _repeat_heads_program(config.num_kv_heads, replicas, axis, placement(path, variable))(value)
        variable.set_value(value)
        flat.append((path, variable))
    expanded = nnx.merge(graphdef, nnx.from_flat_state(flat))
    _copy_matmul_impls(model, expanded)
    return expanded


def _copy_matmul_impls(source, target) -> None:
    """Gives ``target``'s quantized layers the ``matmul_impl`` their namesakes in ``source`` chose (a plain attribute,
    which a model rebuilt from its config would lose)."""
    impls = {path: node.matmul_impl for path, node in nnx.iter_graph(source) if isinstance(node, QuantizedLinear)}
    for path, node in nnx.iter_graph(target):
        if isinstance(node, QuantizedLinear):
            node.matmul_impl = impls[path]


def shard_model(model, mesh: Mesh):
    """A built model (on any devices) moved onto ``mesh``: every parameter placed by the rules, KV heads expanded."""
    placement = param_placement(mesh, model.config)
    graphdef, state = nnx.split(model)
    flat = []
    for path, variable in nnx.to_flat_state(state):
        variable = variable.replace(jax.device_put(variable.get_value(), placement(path, variable)))
        flat.append((path, variable))
    return expand_kv_heads(nnx.merge(graphdef, nnx.from_flat_state(flat)), mesh)


def init_dummy_weights_by_device_set(model_cls, model_config, dtype, placement, seed: int, attention_impl):
    """``init_dummy_weights`` for placements on several device sets (pipeline stages): one jitted init per set.

    A jitted function's outputs must share one device set, so each set gets its own program, which builds the
    whole model's random weights but returns (and, after dead-code elimination, computes) only its own. The values
    equal ``init_dummy_weights``' for the same seed.
    """
    abstract = abstract_model(model_cls, model_config, dtype, attention_impl)
    graphdef, abstract_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abstract_state))
    shardings = {path: placement(path, variable) for path, variable in flat}
    groups: dict[frozenset, list[tuple]] = {}
    for path, sharding in shardings.items():
        groups.setdefault(frozenset(sharding.device_set), []).append(path)
    values = {}
    for paths in groups.values():

        def init(paths=tuple(paths)):
            model = model_cls(model_config, dtype=dtype, rngs=nnx.Rngs(seed), attention_impl=attention_impl)
            state = dict(nnx.to_flat_state(nnx.state(model)))
            return [state[path].get_value() for path in paths]

        values.update(zip(paths, jax.jit(init, out_shardings=[shardings[p] for p in paths])(), strict=True))
    for path, variable in flat:
        variable.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def build_sharded_model(
    model_cls,
    model_config,
    dtype,
    mesh: Mesh,
    *,
    tensors: Iterable[tuple[str, np.ndarray]] | None = None,
    seed: int = 0,
    attention_impl: str | None = None,
):
    """Loads ``(hf_name, array)`` tensors, or random weights when ``tensors`` is None, straight into their shards."""
    placement = param_placement(mesh, model_config)
    if tensors is None:
        model = init_dummy_weights_by_device_set(model_cls, model_config, dtype, placement, seed, attention_impl)
    else:
        abstract = abstract_model(model_cls, model_config, dtype, attention_impl)
        model = load_weights(abstract, tensors, placement=placement)
    return expand_kv_heads(model, mesh)


def kv_bytes_per_block_per_device(model_config, block_size: int, dtype, tensor_size: int, pipe_size: int) -> int:
    """KV bytes one block costs the most loaded device: its stage's layers, its share of the (expanded) KV heads."""
    num_kv_heads = model_config.num_kv_heads * kv_head_replicas(model_config.num_kv_heads, tensor_size)
    heads_per_device = num_kv_heads // tensor_size
    layers_per_stage = max(len(r) for r in stage_layer_ranges(model_config.num_layers, pipe_size))
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * layers_per_stage * block_size * heads_per_device * model_config.head_dim * itemsize
