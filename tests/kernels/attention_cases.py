"""Random ragged paged-attention batches and a naive float64 attention, shared by the GPU and TPU kernel tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    num_tokens: int = 64  # T, padded
    num_requests: int = 8  # S, padded
    block_size: int = 16
    num_blocks: int = 320
    max_blocks: int = 136


@dataclasses.dataclass(frozen=True)
class Batch:
    q: jax.Array  # [T, N, H]
    k_cache: jax.Array  # [P, L, K, H]
    v_cache: jax.Array  # [P, L, K, H]
    block_tables: jax.Array  # [S, max_blocks]
    seq_lens: jax.Array  # [S]
    query_start_loc: jax.Array  # [S+1]
    num_real_tokens: int

    @property
    def args(self):
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc


def make_batch(seed, query_lens, seq_lens, geo: Geometry, dtype, poison_unused=False) -> Batch:
    """Random batch; blocks come from a shuffled pool (block 0 is the null block) and unused table entries hold
    random block ids. ``poison_unused`` fills every cache row that holds no real position with NaN."""
    rng = np.random.default_rng(seed)
    num_real = len(query_lens)
    query_start_loc = np.zeros(geo.num_requests + 1, np.int32)
    query_start_loc[1 : num_real + 1] = np.cumsum(query_lens)
    query_start_loc[num_real + 1 :] = query_start_loc[num_real]  # padding requests own no tokens
    lens = np.zeros(geo.num_requests, np.int32)
    lens[:num_real] = seq_lens
    tables = rng.integers(0, geo.num_blocks, (geo.num_requests, geo.max_blocks)).astype(np.int32)
    pool = iter(rng.permutation(np.arange(1, geo.num_blocks)))
    holds_position = np.zeros((geo.num_blocks, geo.block_size), bool)
    for request, length in enumerate(lens):
        for column in range(-(-length // geo.block_size)):
            tables[request, column] = next(pool)
            rows = min(geo.block_size, length - column * geo.block_size)
            holds_position[tables[request, column], :rows] = True
    cache_shape = (geo.num_blocks, geo.block_size, geo.num_kv_heads, geo.head_dim)
    k_cache, v_cache = rng.standard_normal(cache_shape), rng.standard_normal(cache_shape)
    if poison_unused:
        k_cache[~holds_position], v_cache[~holds_position] = np.nan, np.nan
    q = 3.0 * rng.standard_normal((geo.num_tokens, geo.num_heads, geo.head_dim))  # peaky softmax: errors show
    return Batch(
        *(jnp.asarray(x, dtype) for x in (q, k_cache, v_cache)),
        jnp.asarray(tables),
        jnp.asarray(lens),
        jnp.asarray(query_start_loc),
        int(query_start_loc[-1]),
    )


def naive_attention(batch: Batch, sm_scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Dense float64 attention, one request at a time, over K/V gathered through the block table."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in batch.args[:3])
    tables, lens, starts = (np.asarray(x) for x in batch.args[3:])
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // num_kv_heads
    out = np.zeros(q.shape)
    for request, length in enumerate(lens):
        start, end = starts[request], starts[request + 1]
        if end == start:
            continue
        blocks = tables[request, : -(-length // block_size)]
        keys = np.repeat(k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length], group, axis=1)  # [s, N, H]
        values = np.repeat(v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length], group, axis=1)
        position = length - (end - np.arange(start, end))  # [t]
        scores = np.einsum("tnh,snh->nts", q[start:end], keys) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        visible = np.arange(length)[None, :] <= position[:, None]  # [t, s]
        if sliding_window is not None:
            visible &= np.arange(length)[None, :] > position[:, None] - sliding_window
        scores = np.where(visible[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[start:end] = np.einsum("nts,snh->tnh", probs, values)
    return out
