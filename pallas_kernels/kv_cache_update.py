"""Writes a step's new K/V into the paged cache at ``slot_mapping``, quantizing to fp8 when the cache is fp8.

A scatter of T rows into the donated cache: XLA updates the buffer in place, so no pass over the whole cache.
Slot ``s`` is row ``s % block_size`` of block ``s // block_size``; padding tokens point into the reserved null block 0.

Scales (vLLM's ``k_scale`` / ``v_scale``): the cache holds ``K / k_scale`` and ``V / v_scale``, and the attention op
multiplies them back (``ragged_paged_attention(..., k_scale=, v_scale=)``). They are static Python floats, 1.0 unless
calibrated. A float8_e4m3fn cache is written by dividing in float32, clipping to e4m3's finite range (±448: the cast
would otherwise turn larger values into NaN, e4m3fn having no infinity) and rounding to nearest.
"""

import jax
import jax.numpy as jnp

FP8_KV_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_KV_DTYPE).max)  # 448


def is_fp8_cache(dtype) -> bool:
    return jnp.dtype(dtype) == FP8_KV_DTYPE


def to_cache_dtype(x: jax.Array, dtype, scale: float = 1.0) -> jax.Array:
    """``x / scale`` in the cache's dtype: clipped to ±448 and rounded for an fp8 cache, a plain cast otherwise."""
    if is_fp8_cache(dtype):
        return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(dtype)
    if scale != 1.0:
        x = x.astype(jnp.float32) / scale
    return x.astype(dtype)


def update_kv_cache(
    k_cache: jax.Array,  # [P, L, K, H]
    v_cache: jax.Array,  # [P, L, K, H]
    k_new: jax.Array,  # [T, K, H]
    v_new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # [T] int32
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    _validate_scales(k_scale, v_scale)
    k_rows, v_rows = to_cache_dtype(k_new, k_cache.dtype, k_scale), to_cache_dtype(v_new, v_cache.dtype, v_scale)
    return _set_rows(k_cache, k_rows, slot_mapping), _set_rows(v_cache, v_rows, slot_mapping)


def _set_rows(cache, rows, slot_mapping):
    """``cache [P, L, K, H]`` with ``rows [T, K, H]`` (cache dtype) at ``slot_mapping``, in place. XLA's GPU backend
    scatters fp8 natively; its CPU backend has no fp8 scatter and converts the whole cache around it (slow on CPU).

    Indexed by (block, row) on the 4-D cache rather than by slot on a ``[P*L, K, H]`` reshape: with one KV head per
    device (K = 1 locally, as tensor parallelism at T = K or KV-head replication gives) XLA laid the reshaped
    scatter out differently from the cache and copied every layer's cache twice per step."""
    block_size = cache.shape[1]
    return cache.at[slot_mapping // block_size, slot_mapping % block_size].set(rows, mode="drop")


def _validate_scales(k_scale, v_scale) -> None:
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < float("inf"):
            raise ValueError(f"{name} must be a positive finite Python number, got {scale!r}")


def update_kv_cache_reference(k_cache, v_cache, k_new, v_new, slot_mapping, *, k_scale=1.0, v_scale=1.0):
    """Readable per-token loop (tests only)."""
    block_size = k_cache.shape[1]
    for t in range(int(slot_mapping.shape[0])):
        block, row = divmod(int(slot_mapping[t]), block_size)
        k_cache = k_cache.at[block, row].set(to_cache_dtype(k_new[t], k_cache.dtype, k_scale))
        v_cache = v_cache.at[block, row].set(to_cache_dtype(v_new[t], v_cache.dtype, v_scale))
    return k_cache, v_cache


__all__ = ["FP8_KV_DTYPE", "FP8_MAX", "is_fp8_cache", "to_cache_dtype", "update_kv_cache", "update_kv_cache_reference"]
