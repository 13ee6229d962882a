"""Pure-jnp reference for ragged paged attention: a loop over block columns with an online softmax.

Each iteration gathers one K/V block per token (``[T, L, K, H]``), so memory stays O(T·L) whatever the cache size,
and the loop runs only as far as the longest request. Readable first; used on CPU and as the kernels' reference.
Any cache dtype (fp8 included) is read as float32; ``k_scale`` multiplies the scores, ``v_scale`` the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -1e30


def token_positions(seq_lens, query_start_loc, num_tokens):
    """Request index ``[T]`` (S for padding tokens) and absolute position ``[T]`` of every query token."""
    num_requests = seq_lens.shape[0]
    token_index = jnp.arange(num_tokens, dtype=jnp.int32)
    request = jnp.searchsorted(query_start_loc[1:], token_index, side="right").astype(jnp.int32)  # [T]
    safe_request = jnp.minimum(request, num_requests - 1)
    query_end = query_start_loc[1:][safe_request]
    position = seq_lens[safe_request] - (query_end - token_index)  # [T]
    return request, position


def ragged_paged_attention_reference(
    q,  # [T, N, H]
    k_cache,  # [P, L, K, H]
    v_cache,  # [P, L, K, H]
    block_tables,  # [S, M]
    seq_lens,  # [S]
    query_start_loc,  # [S+1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
):
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    request, position = token_positions(seq_lens, query_start_loc, num_tokens)
    is_real = request < seq_lens.shape[0]
    safe_request = jnp.minimum(request, seq_lens.shape[0] - 1)
    token_blocks = block_tables[safe_request]  # [T, M]
    qg = q.astype(jnp.float32) * (sm_scale * k_scale)  # scores of the cache's K / k_scale, scaled back
    qg = qg.reshape(num_tokens, num_kv_heads, group, head_dim)  # [T, K, G, H]
    num_block_columns = (jnp.max(seq_lens) + block_size - 1) // block_size

    def body(state):
        column, running_max, denom, acc = state
        block_ids = token_blocks[:, column]  # [T]
        k = k_cache[block_ids].astype(jnp.float32)  # [T, L, K, H]
        v = v_cache[block_ids].astype(jnp.float32)  # [T, L, K, H]
        scores = jnp.einsum("tkgh,tlkh->tkgl", qg, k)  # [T, K, G, L]
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        kv_pos = column * block_size + jnp.arange(block_size)  # [L]
        visible = (kv_pos[None, :] <= position[:, None]) & is_real[:, None]  # [T, L]
        if sliding_window is not None:
            visible &= kv_pos[None, :] > position[:, None] - sliding_window
        scores = jnp.where(visible[:, None, None, :], scores, _MASK_VALUE)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))  # [T, K, G]
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None]) * visible[:, None, None, :]
        denom = denom * correction + probs.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgl,tlkh->tkgh", probs, v)
        return column + 1, new_max, denom, acc

    init = (
        jnp.int32(0),
        jnp.full((num_tokens, num_kv_heads, group), _MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, _, denom, acc = jax.lax.while_loop(lambda s: s[0] < num_block_columns, body, init)
    out = acc / jnp.maximum(denom, 1e-30)[..., None]
    if v_scale != 1.0:
        out = out * v_scale
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
