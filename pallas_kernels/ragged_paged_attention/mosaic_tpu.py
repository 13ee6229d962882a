"""TPU (Pallas Mosaic) backend of ragged paged attention: tiling of the ragged batch and the public entry point.

``ragged_paged_attention_tpu`` splits requests into two tiers by query length. Short queries (decode, a few
speculative tokens) each fill one small tile; long queries (prefill chunks) are cut into large tiles. Each tier is one
``pallas_call`` of the kernel in ``mosaic_tpu_kernel`` over ``(K kv heads, tile slots)``. Queries are gathered into
per-tile blocks ``[K, R, rows, H]`` before the kernel and the outputs gathered back to ``[T, N, H]`` after it (both
cheap XLA gathers of q-sized arrays); the KV cache is read only by the kernel's page copies. The tile plan comes from
``tile_plan`` (shared with the GPU kernel). ``interpret=True`` runs the kernel in Pallas' TPU interpret mode on CPU.
This module owns no kernel body and never touches the GPU backend. An fp8 (float8_e4m3fn) cache is copied page by page
as fp8 and converted to q's dtype in VMEM; its block size must be a multiple of 32 (the 8-bit sublane tiling).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import mosaic_tpu_kernel as kernel_lib
from pallas_kernels.ragged_paged_attention import tile_plan as plan_lib


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tuning parameters. ``short_tile_tokens=None`` puts every request in the long tier."""

    short_tile_tokens: int | None = 8  # queries of at most this many tokens take one short tile
    long_tile_tokens: int = 64  # query tokens per tile of longer queries
    kv_tokens_per_step: int = 128  # KV positions per inner step, rounded down to whole cache blocks (at least one)

    def __post_init__(self):
        for name in ("short_tile_tokens", "long_tile_tokens", "kv_tokens_per_step"):
            value = getattr(self, name)
            if value is None and name == "short_tile_tokens":
                continue
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def _sublanes(dtype) -> int:
    """Rows of one (sublane, 128-lane) tile for ``dtype``: 8 for 32-bit, 16 for 16-bit values."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _validate(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> None:
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"need q [T, N, H] and k/v caches [P, L, K, H]; got {q.shape}, {k_cache.shape}, {v_cache.shape}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    num_heads, head_dim = q.shape[1:]
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {q.shape} does not fit caches {k_cache.shape}: need equal H and N a multiple of K")
    if block_size % _sublanes(k_cache.dtype):
        raise ValueError(
            f"block size {block_size} must be a multiple of {_sublanes(k_cache.dtype)} for {k_cache.dtype} caches"
        )
    num_requests = block_tables.shape[0]
    if block_tables.ndim != 2 or seq_lens.shape != (num_requests,) or query_start_loc.shape != (num_requests + 1,):
        raise ValueError(
            f"need block_tables [S, M], seq_lens [S], query_start_loc [S+1]; got "
            f"{block_tables.shape}, {seq_lens.shape}, {query_start_loc.shape}"
        )


def _tile_metadata(plan: plan_lib.TilePlan, seq_lens, query_start_loc, block_size, max_blocks, sliding_window):
    """Per-slot scalars the kernel prefetches: positions and the visible block-table column range."""
    query_end = query_start_loc[1:][plan.request]
    first_position = seq_lens[plan.request] - (query_end - plan.first_token)  # [R]
    last_position = jnp.maximum(first_position + plan.num_tokens - 1, 0)
    first_visible = jnp.zeros_like(first_position)
    if sliding_window is not None:
        first_visible = jnp.maximum(first_position - sliding_window + 1, 0)
    last_column = jnp.clip(last_position // block_size, 0, max_blocks - 1)  # clip: never read past the table row
    first_column = jnp.clip(first_visible // block_size, 0, last_column)
    num_used = jnp.sum(plan.num_tokens > 0, dtype=jnp.int32)[None]
    as_int = lambda x: x.astype(jnp.int32)
    return kernel_lib.TileMetadata(
        *map(as_int, (plan.request, first_position, plan.num_tokens, first_column, last_column, num_used))
    )


def _gather_query_tiles(q, plan: plan_lib.TilePlan, num_kv_heads, tile_tokens, rows):
    """``q [T, N, H]`` -> ``[K, R, rows, H]``; row ``i * G + g`` is token i of the slot, head g of the group."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    token = jnp.minimum(plan.first_token[:, None] + jnp.arange(tile_tokens), num_tokens - 1)  # [R, tile]
    tiles = q.reshape(num_tokens, num_kv_heads, group, head_dim)[token]  # [R, tile, K, G, H]
    tiles = tiles.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, -1, tile_tokens * group, head_dim)
    return jnp.pad(tiles, ((0, 0), (0, 0), (0, rows - tile_tokens * group), (0, 0)))


def _scatter_output_tiles(out_tiles, plan: plan_lib.TilePlan, num_tokens, tile_tokens, group):
    """``[K, R, rows, H]`` -> ``[T, N, H]``. Tokens of no used slot read some finite row; callers mask them."""
    num_kv_heads, num_slots, _, head_dim = out_tiles.shape
    token = plan.first_token[:, None] + jnp.arange(tile_tokens)  # [R, tile]
    token = jnp.where(jnp.arange(tile_tokens) < plan.num_tokens[:, None], token, num_tokens)  # unused -> dropped
    slot = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32)[:, None], token.shape)
    slot_of_token = jnp.zeros(num_tokens, jnp.int32).at[token.ravel()].set(slot.ravel(), mode="drop")  # [T]
    row_of_token = jnp.clip(jnp.arange(num_tokens) - plan.first_token[slot_of_token], 0, tile_tokens - 1)
    out_tiles = out_tiles[:, :, : tile_tokens * group].reshape(num_kv_heads, num_slots, tile_tokens, group, head_dim)
    out = out_tiles[:, slot_of_token, row_of_token]  # [K, T, G, H]
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_kv_heads * group, head_dim)


def _attend_tier(args, *, tile_tokens, min_query_len, max_query_len, config: KernelConfig, options, interpret):
    """One launch over the requests whose query length lies in ``[min_query_len, max_query_len]``."""
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc = args
    (num_tokens, num_heads, _), (_, block_size, num_kv_heads, _) = q.shape, k_cache.shape
    num_requests, max_blocks = block_tables.shape
    group = num_heads // num_kv_heads
    num_slots = plan_lib.max_tile_slots(num_tokens, num_requests, tile_tokens, min_query_len, max_query_len)
    plan = plan_lib.build_tile_plan(
        query_start_loc,
        tile_tokens=tile_tokens,
        num_slots=num_slots,
        min_query_len=min_query_len,
        max_query_len=max_query_len,
    )
    sublanes = _sublanes(q.dtype)
    shape = kernel_lib.LaunchShape(
        group=group,
        rows=-(-tile_tokens * group // sublanes) * sublanes,
        pages_per_step=max(1, config.kv_tokens_per_step // block_size),
        max_blocks=max_blocks,
        **options,
    )
    tiles = _tile_metadata(plan, seq_lens, query_start_loc, block_size, max_blocks, options["sliding_window"])
    q_tiles = _gather_query_tiles(q, plan, num_kv_heads, tile_tokens, shape.rows)
    flat_tables = block_tables.astype(jnp.int32).reshape(-1)  # [S * M]: 1-D keeps SMEM unpadded
    out_tiles = kernel_lib.launch(tiles, flat_tables, q_tiles, k_cache, v_cache, shape, interpret)
    return _scatter_output_tiles(out_tiles, plan, num_tokens, tile_tokens, group)


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "k_scale", "v_scale", "interpret", "config")
)
def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [P, L, K, H], this step's K already written
    v_cache: jax.Array,  # [P, L, K, H]
    block_tables: jax.Array,  # [S, M] int32
    seq_lens: jax.Array,  # [S] int32, 0 for padding requests
    query_start_loc: jax.Array,  # [S+1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    interpret: bool | pltpu.InterpretParams = False,
    config: KernelConfig | None = None,
) -> jax.Array:
    """Causal attention of ragged queries to their own request's paged K/V (layout in ``op``). Returns ``[T, N, H]``
    in q's dtype; rows of padding tokens are finite and meaningless."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    config = config or KernelConfig()
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    options = dict(
        sm_scale=float(sm_scale * k_scale), sliding_window=sliding_window, soft_cap=soft_cap, v_scale=float(v_scale)
    )
    tier = functools.partial(_attend_tier, args, config=config, options=options, interpret=interpret)
    short_len = config.short_tile_tokens
    if short_len is None or short_len >= q.shape[0]:
        return tier(tile_tokens=config.long_tile_tokens, min_query_len=1, max_query_len=None)
    out_short = tier(tile_tokens=short_len, min_query_len=1, max_query_len=short_len)
    out_long = tier(tile_tokens=config.long_tile_tokens, min_query_len=short_len + 1, max_query_len=None)
    is_short = plan_lib.tokens_in_query_range(query_start_loc, q.shape[0], 1, short_len)  # [T]
    return jnp.where(is_short[:, None, None], out_short, out_long)
