"""Pallas Mosaic (TPU) kernel body for ragged paged attention, and the ``pallas_call`` that launches it.

Grid ``(K kv heads, R tile slots)``. Tile slot r holds up to ``tile_tokens`` consecutive query tokens of one request;
the caller lays the queries out as ``[K, R, rows, H]`` with row ``i * G + g`` = token i of the tile, query head g of
the kv head's group (rows padded to the sublane tiling), so every grid step sees one dense ``[rows, H]`` query block
and each K/V page is read once for the whole group. Per-tile scalars (request, first position, KV column range) and
the flat block table are scalar-prefetched into SMEM.

The step walks its request's visible KV columns ``pages_per_step`` cache blocks at a time. Pages are copied by hand
(``make_async_copy``) from the caches left in HBM into a two-slot VMEM buffer: while step j is computed, step j+1 (or
the next tile's first step) is already in flight, so the copy latency hides behind the matmuls. Softmax is online in
float32. Slots past the batch's used tiles write zeros. An fp8 cache's pages are copied as fp8 and converted to q's
dtype after the copy; ``v_scale`` multiplies the normalised output. This module owns no layout glue (see
``mosaic_tpu``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kv_cache_update import is_fp8_cache

_MASK_VALUE = -1e30  # finite: a fully masked row keeps max == _MASK_VALUE and gets zero probabilities


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    """Static shapes and attention options of one launch."""

    group: int  # G = N // K query heads per kv head
    rows: int  # query rows per tile: tile_tokens * G padded to the sublane tiling
    pages_per_step: int  # cache blocks per inner KV step
    max_blocks: int  # M, columns of the block table
    sm_scale: float  # times k_scale
    sliding_window: int | None
    soft_cap: float | None
    v_scale: float


class TileMetadata(NamedTuple):
    """Per tile slot ``[R]`` int32 arrays, plus the count of used slots (used slots come first)."""

    request: jax.Array  # [R]
    first_position: jax.Array  # [R] absolute position of the tile's first token
    num_tokens: jax.Array  # [R] 0 for an empty slot
    first_column: jax.Array  # [R] first block-table column any token of the tile can see
    last_column: jax.Array  # [R] last such column (holds the tile's last token)
    num_used: jax.Array  # [1]


class _KernelRefs(NamedTuple):
    tiles: TileMetadata  # SMEM refs
    block_tables: jax.Array  # [S * M] int32, SMEM
    k_hbm: jax.Array  # [P, L, K, H], HBM
    v_hbm: jax.Array  # [P, L, K, H], HBM
    k_buf: jax.Array  # [2, pages_per_step, L, H], VMEM
    v_buf: jax.Array  # [2, pages_per_step, L, H], VMEM
    sems: jax.Array  # DMA semaphores [2 (K, V), 2 (slot)]


def _for_each_page_copy(refs: _KernelRefs, shape: LaunchShape, kv_head, tile, step, slot, action) -> None:
    """Applies ``action`` ("start" or "wait") to the copies moving KV step ``step`` of tile slot ``tile`` into buffer
    ``slot``: one K and one V copy of ``[L, H]`` per cache block, all signalling the slot's two semaphores."""
    tiles = refs.tiles
    request, last_column = tiles.request[tile], tiles.last_column[tile]
    first_column = tiles.first_column[tile] + step * shape.pages_per_step

    def copy_page(page, carry):
        column = jnp.minimum(first_column + page, last_column)  # columns past the range re-read a visible block
        block = refs.block_tables[request * shape.max_blocks + column]
        for kind, (hbm, buf) in enumerate(((refs.k_hbm, refs.k_buf), (refs.v_hbm, refs.v_buf))):
            copy = pltpu.make_async_copy(hbm.at[block, :, kv_head, :], buf.at[slot, page], refs.sems.at[kind, slot])
            getattr(copy, action)()
        return carry

    lax.fori_loop(0, shape.pages_per_step, copy_page, 0)


def _visible(shape: LaunchShape, num_cols: int, first_position, num_tokens, first_kv_position):
    """``[rows, C]`` mask: row r (token r // G) sees KV position p iff causal, inside the window, and a real token.

    With a = p - first_position, ``a <= r // G`` iff ``a * G <= r``, so no vector division is needed.
    """
    row = lax.broadcasted_iota(jnp.int32, (shape.rows, num_cols), 0)
    offset = first_kv_position - first_position + lax.broadcasted_iota(jnp.int32, (shape.rows, num_cols), 1)
    visible = (row < num_tokens * shape.group) & (offset * shape.group <= row)
    if shape.sliding_window is not None:
        visible &= (offset + shape.sliding_window) * shape.group > row
    return visible


def _matmul(a, b, contract_b: int):
    """``a [rows, X] @ b`` contracting ``b``'s axis ``contract_b``, accumulated in float32 (exact f32 for f32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (contract_b,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _attend_kv_step(q, k, v, m_prev, l_prev, acc_ref, *, shape: LaunchShape, visible, kv_row_valid):
    """One online-softmax update of ``m, l [rows, 1]`` and ``acc_ref [rows, H]`` with ``k, v [C, H]``."""
    scores = _matmul(q, k, contract_b=1) * shape.sm_scale  # [rows, C]
    if shape.soft_cap is not None:
        scores = shape.soft_cap * jnp.tanh(scores / shape.soft_cap)
    scores = jnp.where(visible, scores, _MASK_VALUE)  # also drops scores of NaN K rows
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))  # [rows, 1]
    probs = jnp.where(visible, jnp.exp(scores - m_next), 0.0)  # [rows, C]
    correction = jnp.exp(m_prev - m_next)  # [rows, 1]
    l_next = l_prev * correction + jnp.sum(probs, axis=1, keepdims=True)
    # V rows past the tile's last position may hold anything (NaN included) and 0 * NaN = NaN: zero them.
    v = jnp.where(kv_row_valid, v.astype(jnp.float32), 0.0).astype(v.dtype)  # [C, H]
    acc_ref[...] = acc_ref[...] * correction + _matmul(probs.astype(v.dtype), v, contract_b=0)
    return m_next, l_next


def _from_cache(page, q_dtype):
    """An fp8 page converted to q's dtype; any other cache dtype as it is."""
    return page.astype(q_dtype) if is_fp8_cache(page.dtype) else page


def _prefetch_next(refs, shape, kv_head, tile, step, num_steps, slot) -> None:
    """Starts the copy of the work item after ``(tile, step)`` into the other slot: the tile's next step, else the
    first step of the next used tile (same kv head). Tiles run in grid order, so that tile will wait on it."""
    is_last_step = step + 1 == num_steps
    next_tile = jnp.where(is_last_step, tile + 1, tile)
    next_step = jnp.where(is_last_step, 0, step + 1)

    @pl.when(next_tile < refs.tiles.num_used[0])
    def _():
        _for_each_page_copy(refs, shape, kv_head, next_tile, next_step, 1 - slot, "start")


def _attend_tile(refs: _KernelRefs, q_ref, out_ref, acc_ref, slot_ref, shape: LaunchShape, kv_head, tile):
    """Attention of one used tile: walks its KV steps, prefetching one item ahead, then normalises."""
    tiles = refs.tiles
    first_position, num_tokens = tiles.first_position[tile], tiles.num_tokens[tile]
    first_column = tiles.first_column[tile]
    num_steps = pl.cdiv(tiles.last_column[tile] - first_column + 1, shape.pages_per_step)
    block_size, num_cols = refs.k_buf.shape[2], shape.pages_per_step * refs.k_buf.shape[2]
    last_position = first_position + num_tokens - 1
    q = q_ref[...]  # [rows, H]
    base_slot = slot_ref[0]
    acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(step, carry):
        slot = lax.rem(base_slot + step, 2)
        _prefetch_next(refs, shape, kv_head, tile, step, num_steps, slot)
        _for_each_page_copy(refs, shape, kv_head, tile, step, slot, "wait")
        first_kv_position = (first_column + step * shape.pages_per_step) * block_size
        visible = _visible(shape, num_cols, first_position, num_tokens, first_kv_position)
        kv_position = first_kv_position + lax.broadcasted_iota(jnp.int32, (num_cols, 1), 0)  # [C, 1]
        k = _from_cache(refs.k_buf[slot].reshape(num_cols, -1), q.dtype)  # [C, H]
        v = _from_cache(refs.v_buf[slot].reshape(num_cols, -1), q.dtype)  # [C, H]
        return _attend_kv_step(
            q, k, v, *carry, acc_ref, shape=shape, visible=visible, kv_row_valid=kv_position <= last_position
        )

    init = (jnp.full((shape.rows, 1), _MASK_VALUE, jnp.float32), jnp.zeros((shape.rows, 1), jnp.float32))
    _, denom = lax.fori_loop(0, num_steps, body, init)
    slot_ref[0] = lax.rem(base_slot + num_steps, 2)
    out = acc_ref[...] / jnp.maximum(denom, 1e-30)  # [rows, H]; empty rows: 0 / tiny = 0
    if shape.v_scale != 1.0:
        out = out * shape.v_scale
    out_ref[...] = out.astype(out_ref.dtype)


def _attention_kernel(*refs, shape: LaunchShape):
    tile_refs = TileMetadata(*refs[:6])
    block_tables, q_ref, k_hbm, v_hbm, out_ref, k_buf, v_buf, sems, acc_ref, slot_ref = refs[6:]
    # q_ref, out_ref: [rows, H]; acc_ref: [rows, H] f32 VMEM; slot_ref: [1] int32 SMEM, the slot of the next tile
    kernel_refs = _KernelRefs(tile_refs, block_tables, k_hbm, v_hbm, k_buf, v_buf, sems)
    kv_head, tile = pl.program_id(0), pl.program_id(1)
    is_used = tile < tile_refs.num_used[0]

    @pl.when(is_used & (tile == 0))
    def _():
        slot_ref[0] = 0
        _for_each_page_copy(kernel_refs, shape, kv_head, tile, 0, 0, "start")

    @pl.when(is_used)
    def _():
        _attend_tile(kernel_refs, q_ref, out_ref, acc_ref, slot_ref, shape, kv_head, tile)

    @pl.when(jnp.logical_not(is_used))
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)


def launch(
    tiles: TileMetadata,
    block_tables,  # [S * M] int32
    q_tiles,  # [K, R, rows, H]
    k_cache,  # [P, L, K, H]
    v_cache,  # [P, L, K, H]
    shape: LaunchShape,
    interpret,
):
    """Runs the kernel over every (kv head, tile slot); returns ``[K, R, rows, H]`` in q's dtype."""
    num_kv_heads, num_slots, rows, head_dim = q_tiles.shape
    block_size = k_cache.shape[1]
    tile_spec = pl.BlockSpec((None, None, rows, head_dim), lambda kv_head, tile, *_: (kv_head, tile, 0, 0))
    page_buffer = pltpu.VMEM((2, shape.pages_per_step, block_size, head_dim), k_cache.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(tiles) + 1,
        grid=(num_kv_heads, num_slots),
        in_specs=[tile_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=tile_spec,
        scratch_shapes=[
            page_buffer,  # k_buf
            page_buffer,  # v_buf
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((rows, head_dim), jnp.float32),  # acc
            pltpu.SMEM((1,), jnp.int32),  # slot of the next tile's first step
        ],
    )
    kernel = pl.pallas_call(
        functools.partial(_attention_kernel, shape=shape),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_tiles.shape, q_tiles.dtype),
        # kv heads are independent (megacore may split them); tiles run in order so the prefetch chain holds.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )
    return kernel(*tiles, block_tables, q_tiles, k_cache, v_cache)
