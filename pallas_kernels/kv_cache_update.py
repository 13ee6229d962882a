"""Writes a step's new K/V into the paged cache at ``slot_mapping``.

A scatter of T rows into the donated cache: XLA updates the buffer in place, so no pass over the whole cache.
Slot ``s`` is row ``s % block_size`` of block ``s // block_size``; padding tokens point into the reserved null block 0.
"""

import jax
import jax.numpy as jnp


def update_kv_cache(
    k_cache: jax.Array,  # [P, L, K, H]
    v_cache: jax.Array,  # [P, L, K, H]
    k_new: jax.Array,  # [T, K, H]
    v_new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32
) -> tuple[jax.Array, jax.Array]:
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    flat_shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_flat = k_cache.reshape(flat_shape).at[slot_mapping].set(k_new.astype(k_cache.dtype), mode="drop")
    v_flat = v_cache.reshape(flat_shape).at[slot_mapping].set(v_new.astype(v_cache.dtype), mode="drop")
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def update_kv_cache_reference(k_cache, v_cache, k_new, v_new, slot_mapping):
    """Readable per-token loop (tests only)."""
    block_size = k_cache.shape[1]
    for t in range(int(slot_mapping.shape[0])):
        block, row = divmod(int(slot_mapping[t]), block_size)
        k_cache = k_cache.at[block, row].set(k_new[t].astype(k_cache.dtype))
        v_cache = v_cache.at[block, row].set(v_new[t].astype(v_cache.dtype))
    return k_cache, v_cache


__all__ = ["update_kv_cache", "update_kv_cache_reference", "jnp"]
