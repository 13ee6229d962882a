"""Running an attention op once per tensor shard with ``jax.shard_map``, for kernels GSPMD cannot partition.

The pure-jnp reference partitions by itself under GSPMD when q and the cache are split over heads, but a Pallas
kernel is opaque to the partitioner: wrapped here, each tensor device runs the op on its own ``N/T`` query heads and
``K/T`` KV heads (heads are independent, so no communication), with the ragged metadata replicated. ``K % T == 0``
is required; when there are fewer KV heads than T, expand them first (``sharding.model_sharding.expand_kv_heads``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import ragged_paged_attention
from sharding.mesh import TENSOR_AXIS, axis_size, stage_meshes
from sharding.stages import stage_layer_ranges

QUERY_SPEC = PartitionSpec(None, TENSOR_AXIS, None)  # q and out [T, N, H]: split over query heads
CACHE_SPEC = PartitionSpec(None, None, TENSOR_AXIS, None)  # k/v cache [P, L, K, H]: split over KV heads
METADATA_SPEC = PartitionSpec()  # block_tables [S, M], seq_lens [S], query_start_loc [S+1]: replicated


def shard_mapped_attention(mesh: Mesh, fn: Callable = ragged_paged_attention) -> Callable:
    """``fn`` with ``ragged_paged_attention``'s signature, run per tensor shard of ``mesh`` (the same signature)."""
    tensor_size = axis_size(mesh, TENSOR_AXIS)

    def attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, **kwargs):
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        if num_heads % tensor_size or num_kv_heads % tensor_size:
            raise ValueError(
                f"shard-mapped attention splits heads {tensor_size} ways: num_heads={num_heads} and "
                f"num_kv_heads={num_kv_heads} must both be multiples of {tensor_size} (expand KV heads first)"
            )

        def per_shard(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc):
            return fn(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, **kwargs)

        mapped = jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(QUERY_SPEC, CACHE_SPEC, CACHE_SPEC, METADATA_SPEC, METADATA_SPEC, METADATA_SPEC),
            out_specs=QUERY_SPEC,
            check_vma=False,  # kernels may not declare how their outputs vary over the mesh
        )
        return mapped(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)

    return attention


def install_shard_mapped_attention(model, mesh: Mesh, fn: Callable = ragged_paged_attention) -> None:
    """Routes each layer's attention through ``shard_mapped_attention`` over its own pipeline stage's sub-mesh.

    Needs the decoder's ``Attention.attention_fn`` hook (proposed in issue 6's report); call it on the sharded model
    before handing it to ``PipelinedModel``.
    """
    meshes = stage_meshes(mesh)
    for stage, layers in enumerate(stage_layer_ranges(model.config.num_layers, len(meshes))):
        attention = shard_mapped_attention(meshes[stage], fn)
        for index in layers:
            module = model.model.layers[index].self_attn
            if not hasattr(module, "attention_fn"):
                raise TypeError(
                    f"{type(module).__name__} has no attention_fn attribute: the decoder calls its attention op "
                    "directly, so it cannot be swapped for a shard-mapped one"
                )
            module.attention_fn = attention
