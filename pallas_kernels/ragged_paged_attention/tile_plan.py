"""Maps a flat ragged batch onto fixed-size query tiles, and merges KV-split partial results.

The GPU kernel runs one program per (tile slot, KV head, KV split). A tile holds up to ``tile_tokens`` consecutive
query tokens of one request. The number of tile slots is a static bound derived from the static shapes (T, S), so the
grid never depends on data; slots beyond the batch's real tiles are empty and their programs return at once. The plan
is computed with jnp on device (no host sync) and is the same for every layer of a step, so XLA computes it once.
This module owns no kernel code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TilePlan(NamedTuple):
    """Per tile slot ``[R]`` int32 arrays; ``num_tokens == 0`` marks an empty slot."""

    request: jax.Array  # [R] request owning the tile
    first_token: jax.Array  # [R] flat index of the tile's first query token
    num_tokens: jax.Array  # [R] query tokens in the tile, 0..tile_tokens


def max_tile_slots(num_tokens: int, num_requests: int, tile_tokens: int, min_query_len: int, max_query_len) -> int:
    """Static bound on the tiles of requests whose query length lies in ``[min_query_len, max_query_len]``."""
    max_requests = max(1, min(num_requests, num_tokens // min_query_len))
    bound = (num_tokens + max_requests * (tile_tokens - 1)) // tile_tokens
    if max_query_len is not None:
        bound = min(bound, max_requests * -(-max_query_len // tile_tokens))
    return max(1, min(num_tokens, bound))


def build_tile_plan(
    query_start_loc: jax.Array,  # [S+1]
    *,
    tile_tokens: int,
    num_slots: int,
    min_query_len: int = 1,
    max_query_len: int | None = None,
) -> TilePlan:
    """Tiles of every request whose query length is in range; a request's last (longest causal) tile comes first."""
    num_requests = query_start_loc.shape[0] - 1
    query_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    eligible = query_lens >= min_query_len
    if max_query_len is not None:
        eligible &= query_lens <= max_query_len
    tiles = jnp.where(eligible, (query_lens + tile_tokens - 1) // tile_tokens, 0)  # [S]
    tile_ends = jnp.cumsum(tiles)  # [S]
    slot = jnp.arange(num_slots, dtype=jnp.int32)  # [R]
    request = jnp.sum(tile_ends[None, :] <= slot[:, None], axis=1, dtype=jnp.int32)  # [R], S for empty slots
    is_used = slot < tile_ends[-1]
    safe_request = jnp.minimum(request, num_requests - 1)
    index_in_request = slot - (tile_ends[safe_request] - tiles[safe_request])
    tile_index = tiles[safe_request] - 1 - index_in_request  # reversed: long causal tiles are scheduled first
    first_token = query_start_loc[safe_request] + tile_index * tile_tokens
    num_tokens = jnp.minimum(tile_tokens, query_lens[safe_request] - tile_index * tile_tokens)
    return TilePlan(
        request=safe_request.astype(jnp.int32),
        first_token=jnp.where(is_used, first_token, 0).astype(jnp.int32),
        num_tokens=jnp.where(is_used, num_tokens, 0).astype(jnp.int32),
    )


def tokens_in_query_range(query_start_loc, num_tokens: int, min_query_len: int, max_query_len: int) -> jax.Array:
    """``[T]`` bool: token belongs to a request whose query length is in ``[min_query_len, max_query_len]``."""
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    request = jnp.sum(query_start_loc[None, 1:] <= token[:, None], axis=1)  # [T], S for padding tokens
    query_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    safe_request = jnp.minimum(request, query_lens.shape[0] - 1)
    length = query_lens[safe_request]
    return (request < query_lens.shape[0]) & (length >= min_query_len) & (length <= max_query_len)


def merge_kv_splits(
    partial_out: jax.Array,  # [splits, T*N, H] float32, each split normalised by its own softmax sum
    partial_lse: jax.Array,  # [splits, T*N] float32, base-2 log-sum-exp of each split (-inf when empty)
) -> jax.Array:
    """Combines the splits' softmax results into ``[T*N, H]`` float32 (rows no split wrote come out as garbage)."""
    lse_max = jnp.max(partial_lse, axis=0)  # [T*N]
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp2(partial_lse - lse_max[None])  # [splits, T*N]
    total = jnp.sum(weights, axis=0)  # [T*N]
    merged = jnp.sum(partial_out * weights[:, :, None], axis=0)  # [T*N, H]
    return merged / jnp.maximum(total, 1e-30)[:, None]
