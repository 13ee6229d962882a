"""Pallas Mosaic GPU (Hopper: TMA + wgmma, warp specialised) kernel for the long-query tiles of ragged paged attention.

Grid ``(tile slot, query head)``; each program runs three warpgroups. Two compute warpgroups own ``block_q`` query
rows each of one tile (``2 * block_q`` consecutive tokens of one request, from ``tile_plan.build_tile_plan``); a
memory warpgroup streams the request's K/V through a ``num_stages``-deep SMEM ring, ``block_kv`` tokens per step,
gathered by TMA one cache page (``block_size`` tokens of one KV head) at a time, the page taken from the block table.
The compute warpgroups run QK^T and PV on the tensor cores (wgmma, f32 accumulators) with an online softmax in base 2;
only the steps crossing a row's causal horizon or window edge are masked, and the KV loop stops at the tile's horizon.
A per-head grid (rather than one program per KV head holding the G query heads) keeps each program's tile at the
wgmma's natural 64-row shape for any G; the G programs of a KV head read the same pages, which stay in L2.

Raggedness. A tile holds up to ``2 * block_q - 8`` tokens; its TMA window of ``2 * block_q`` q rows starts at the
tile's first token rounded down to a multiple of 8 (a TMA copy into the (8, 64)-tiled SMEM buffer must start on such
a row), moved back so it never passes the end of q (q and the output are padded to whole 8-row groups, and to one
window when q is shorter). Window rows of other requests
are computed and dropped: the output is written from an unswizzled SMEM buffer by a ladder of TMA stores of 64, 32,
..., 1 rows that covers exactly the tile's real rows. Pages past the request's horizon are replaced by its last
visible page (never a stray table entry), and on the step holding the request's last position the compute
warpgroups zero the V rows past it in SMEM, since P = 0 does not cancel a NaN or Inf left in unused cache rows.

Owns only this kernel and ``ragged_paged_attention_mosaic``, which runs the Triton short-query launch
(``triton_gpu``) for decode-like queries and this kernel for the rest, into one output. Falls back to the Triton
long launch (``supports`` says when): q not bf16/f16 (wgmma takes 16-bit inputs), a cache dtype other than q's
(an fp8 cache included), head dim other than 64 or 128 (256 does not fit SMEM with a 2-stage ring and a
separate output buffer), or a block size that is not a multiple of 8 dividing ``block_kv``.
``interpret=True`` runs the kernel in Mosaic GPU's interpret mode on CPU (TMA, barriers and wgmma simulated). The
simulated warpgroups block in XLA's CPU thread pool: on a 2-core machine with one CPU device it hung (jax 0.11.2), with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` or more (the tests run with 8) it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention import tile_plan as plan_lib
from pallas_kernels.ragged_paged_attention import triton_gpu

_LOG2E = math.log2(math.e)
_INIT_MAX = -1e30  # finite: a row that sees nothing yet keeps exp2(-inf - max) = 0 and never makes NaN
_NUM_COMPUTE = 2  # compute warpgroups; the memory warpgroup is number 2
_META = 6  # int32 fields per tile slot, see _tile_metadata
_ROW_ALIGN = 8  # a TMA copy into an (8, 64)-tiled SMEM buffer must start at a row that is a multiple of 8


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tuning parameters: query rows per compute warpgroup, KV tokens per step, SMEM ring depth."""

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma row block per warpgroup), got {self.block_q}")
        if self.block_kv % 64 or self.block_kv > 256:
            raise ValueError(f"block_kv must be a multiple of 64 up to 256, got {self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")

    @property
    def window_rows(self) -> int:
        """q rows a program loads: one ``block_q`` block per compute warpgroup."""
        return _NUM_COMPUTE * self.block_q

    @property
    def tile_tokens(self) -> int:
        """Real query tokens per tile: the window less the up to 7 rows it starts early (see _tile_metadata)."""
        return self.window_rows - _ROW_ALIGN


@dataclasses.dataclass(frozen=True)
class _Options:
    sm_scale: float  # times k_scale
    sliding_window: int | None
    soft_cap: float | None
    v_scale: float
    group: int  # G query heads per KV head
    block_size: int
    interpret: bool


def supports(q_dtype, cache_dtype, head_dim: int, block_size: int, cfg: MosaicConfig) -> bool:
    """Whether this kernel takes the long tiles of these shapes (else the Triton long launch does)."""
    sixteen_bit = jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    same_dtype = jnp.dtype(cache_dtype) == jnp.dtype(q_dtype)
    return (
        sixteen_bit and same_dtype and head_dim in (64, 128) and block_size % 8 == 0 and cfg.block_kv % block_size == 0
    )


def _scores(qk, masked, row_pos, kv_first, cfg: MosaicConfig, opt: _Options):
    """``[BQ, BKV]`` f32 scores in base-2 units (soft cap applied), masked on edge steps."""
    if opt.soft_cap is None:
        scores = qk * (opt.sm_scale * _LOG2E)
    else:
        scores = jnp.tanh(qk * (opt.sm_scale / opt.soft_cap)) * (opt.soft_cap * _LOG2E)
    if not masked:
        return scores
    shape = (cfg.block_q, cfg.block_kv)
    rows = row_pos + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    cols = kv_first + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    visible = cols <= rows
    if opt.sliding_window is not None:
        visible &= cols > rows - opt.sliding_window
    return jnp.where(visible, scores, -jnp.inf)


def _zero_v_past_end(v_ref, kv_first, seq_len, cfg: MosaicConfig):
    """Zeroes the rows of one V stage at positions >= seq_len (both compute warpgroups may do it: idempotent)."""
    shape = v_ref.shape  # [BKV, H]
    v = v_ref[...]
    pos = kv_first + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    v_ref[...] = jnp.where(pos < seq_len, v, jnp.zeros_like(v))
    plgpu.commit_smem()  # make the generic-proxy writes visible to the wgmma (async proxy)


def _compute_warpgroup(refs, scratch, meta, steps, head, cfg: MosaicConfig, opt: _Options):
    """One compute warpgroup: q rows ``[wg * BQ, (wg + 1) * BQ)`` of the tile window, every KV step of the program."""
    q_ref, out_ref = refs
    (q_smem2, k_smem, v_smem, o_smem2, *p_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scratch
    window_start, first_real, count, pos_first, seq_len = meta
    step_lo, step_hi = steps
    wg = lax.axis_index("wg")
    plgpu.set_max_registers(232, action="increase")
    q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
    row0 = wg * cfg.block_q
    q_row = pl.multiple_of(window_start + row0, _ROW_ALIGN)
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row, cfg.block_q), head], q_smem, q_ready.at[wg])
    lo = jnp.clip(first_real - row0, 0, cfg.block_q)  # this warpgroup's real rows are [lo, hi)
    hi = jnp.clip(first_real + count - row0, 0, cfg.block_q)
    row_pos = pos_first - first_real + row0  # position of row 0 (rows of other requests get made-up positions)
    interior_hi = lax.div(row_pos + lo + 1, cfg.block_kv)  # steps wholly at or before every real row
    interior_lo = jnp.int32(0)
    if opt.sliding_window is not None:  # steps starting after this see every real row's whole window
        beyond = row_pos + jnp.maximum(hi, lo + 1) - 1 - opt.sliding_window
        interior_lo = jnp.where(beyond >= 0, lax.div(jnp.maximum(beyond, 0), cfg.block_kv) + 1, 0)
    interior_lo = jnp.clip(interior_lo, step_lo, step_hi)
    interior_hi = jnp.clip(interior_hi, interior_lo, step_hi)

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    def step(s, carry, masked):
        acc, row_max, row_sum = carry
        slot = lax.rem(s - step_lo, cfg.num_stages)

        def qk_scope(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            take_turn()
            return acc_ref[...]

        qk = pl.run_scoped(qk_scope, plgpu.ACC((cfg.block_q, cfg.block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        scores = _scores(qk, masked, row_pos, s * cfg.block_kv, cfg, opt)
        new_max = jnp.maximum(row_max, scores.max(axis=1))
        correction = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(scores - lax.broadcast_in_dim(new_max, scores.shape, [0]))
        acc *= lax.broadcast_in_dim(correction, acc.shape, [0])
        row_sum = row_sum * correction + probs.sum(axis=1)
        probs = probs.astype(q_smem.dtype)
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(v_ready.at[slot])
        if masked:
            pl.when((s + 1) * cfg.block_kv > seq_len)(
                lambda: _zero_v_past_end(v_smem.at[slot], s * cfg.block_kv, seq_len, cfg)
            )
        plgpu.barrier_wait(turn)

        def pv_scope(acc_ref):
            if opt.interpret:  # interpret mode's wgmma takes A from SMEM only: stage P there
                p_smem = p_smem2[0].at[wg]
                p_smem[...] = probs
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
            else:
                plgpu.wgmma(acc_ref, probs, v_smem.at[slot])
            next_slot = lax.rem(s + 1 - step_lo, cfg.num_stages)
            pl.when(s + 1 < step_hi)(lambda: plgpu.barrier_wait(k_ready.at[next_slot]))  # overlaps the wgmma

        if opt.interpret:  # interpret mode runs wgmma only into a fresh accumulator (not one from ACC.init)
            acc += pl.run_scoped(lambda acc_ref: (pv_scope(acc_ref), acc_ref[...])[1], plgpu.ACC(acc.shape))
        else:
            acc = pl.run_state(pv_scope)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, row_sum

    reduced = plgpu.Layout.WGMMA.reduce(1)
    carry = (
        plgpu.layout_cast(jnp.full((cfg.block_q, q_smem.shape[-1]), 0.0, jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((cfg.block_q,), _INIT_MAX, jnp.float32), reduced),
        plgpu.layout_cast(jnp.full((cfg.block_q,), 0.0, jnp.float32), reduced),
    )
    plgpu.barrier_wait(q_ready.at[wg])
    pl.when(step_lo < step_hi)(lambda: plgpu.barrier_wait(k_ready.at[0]))
    pl.when(wg == 1)(take_turn)  # warpgroup 1 runs half a step behind: their softmax overlaps the other's wgmma
    for first, last, masked in ((step_lo, interior_lo, True), (interior_lo, interior_hi, False)):
        carry = lax.fori_loop(first, last, functools.partial(step, masked=masked), carry)
    carry = lax.fori_loop(interior_hi, step_hi, functools.partial(step, masked=True), carry)
    pl.when(wg == 0)(take_turn)
    acc, _, row_sum = carry
    scale = jnp.where(row_sum > 0, opt.v_scale / row_sum, 0.0)
    o_smem[...] = (acc * lax.broadcast_in_dim(scale, acc.shape, [0])).astype(o_smem.dtype)
    plgpu.commit_smem()
    _store_rows(o_smem, out_ref, lo, hi, window_start + row0, head, cfg)


def _store_rows(o_smem, out_ref, lo, hi, gmem_row0, head, cfg: MosaicConfig):
    """TMA-stores rows ``[lo, hi)`` of ``o_smem [BQ, H]`` exactly, as a ladder of power-of-two row blocks."""
    start = lo
    size = cfg.block_q
    while size >= 1:
        take = (hi - lo) & size

        @pl.when(take != 0)
        def _(start=start, size=size):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)], out_ref.at[pl.ds(gmem_row0 + start, size), head])

        start = start + take
        size //= 2
    plgpu.wait_smem_to_gmem(0)


def _memory_warpgroup(refs, scratch, meta, steps, kv_head, cfg: MosaicConfig, opt: _Options):
    """Issues the page-by-page TMA gathers of every KV step into the SMEM ring, a stage as soon as it is free."""
    tables_ref, k_ref, v_ref = refs
    (_, k_smem, v_smem, *_), (k_ready, v_ready, _), (k_free, v_free), _ = scratch
    table_base, block_lo, block_hi = meta
    step_lo, step_hi = steps
    plgpu.set_max_registers(40, action="decrease")
    pages_per_step = cfg.block_kv // opt.block_size

    def issue(cache_ref, smem, ready, s, slot):
        for j in range(pages_per_step):
            block = jnp.clip(s * pages_per_step + j, block_lo, block_hi)  # past the horizon: a visible page
            page = tables_ref[table_base + block]
            rows = pl.ds(j * opt.block_size, opt.block_size)
            plgpu.copy_gmem_to_smem(cache_ref.at[page, :, kv_head], smem.at[slot, rows], ready.at[slot])

    for i in range(cfg.num_stages):

        @pl.when(step_lo + i < step_hi)
        def _(i=i):
            issue(k_ref, k_smem, k_ready, step_lo + i, i)
            issue(v_ref, v_smem, v_ready, step_lo + i, i)

    @pl.loop(step_lo + cfg.num_stages, step_hi)
    def _(s):
        slot = lax.rem(s - step_lo, cfg.num_stages)
        plgpu.barrier_wait(k_free.at[slot])
        issue(k_ref, k_smem, k_ready, s, slot)
        plgpu.barrier_wait(v_free.at[slot])
        issue(v_ref, v_smem, v_ready, s, slot)

    # Observe the last steps' releases too, so every phase of the free barriers is consumed before they go away
    # (the hardware would not mind; interpret mode checks it).
    @pl.loop(jnp.maximum(step_hi - cfg.num_stages, step_lo), step_hi)
    def _(s):
        slot = lax.rem(s - step_lo, cfg.num_stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def _kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, out_ref, *, cfg: MosaicConfig, opt: _Options):
    # meta_ref [R * _META] int32, tables_ref [S * max_blocks] int32, q_ref / out_ref [T', N, H], k/v_ref [P, L, K, H]
    slot, head = lax.axis_index("slot"), lax.axis_index("head")
    window_start, first_real, count, pos_first, seq_len, table_base = (meta_ref[slot * _META + i] for i in range(_META))
    kv_hi = pos_first + count  # one past the tile's last position
    kv_lo = jnp.int32(0) if opt.sliding_window is None else jnp.maximum(pos_first - opt.sliding_window + 1, 0)
    steps = (lax.div(kv_lo, cfg.block_kv), jnp.where(count > 0, lax.div(kv_hi + cfg.block_kv - 1, cfg.block_kv), 0))
    head_dim = q_ref.shape[-1]
    swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    kv_buffer = plgpu.SMEM((cfg.num_stages, cfg.block_kv, head_dim), q_ref.dtype, **swizzled)
    kv_barriers = plgpu.Barrier(num_arrivals=cfg.block_kv // opt.block_size, num_barriers=cfg.num_stages)
    free_barriers = plgpu.Barrier(num_arrivals=_NUM_COMPUTE, num_barriers=cfg.num_stages)

    def body(*scratch):
        wg = lax.axis_index("wg")
        compute_meta = (window_start, first_real, count, pos_first, seq_len)
        pl.when((wg < _NUM_COMPUTE) & (count > 0))(
            lambda: _compute_warpgroup((q_ref, out_ref), scratch, compute_meta, steps, head, cfg, opt)
        )
        memory_meta = (table_base, lax.div(kv_lo, opt.block_size), lax.div(kv_hi - 1, opt.block_size))
        kv_head = lax.div(head, opt.group)
        pl.when((wg == _NUM_COMPUTE) & (count > 0))(
            lambda: _memory_warpgroup((tables_ref, k_ref, v_ref), scratch, memory_meta, steps, kv_head, cfg, opt)
        )

    pl.run_scoped(
        body,
        (
            plgpu.SMEM((_NUM_COMPUTE, cfg.block_q, head_dim), q_ref.dtype, **swizzled),
            kv_buffer,
            kv_buffer,
            plgpu.SMEM((_NUM_COMPUTE, cfg.block_q, head_dim), q_ref.dtype),  # unswizzled: any row offset stores
            *([plgpu.SMEM((_NUM_COMPUTE, cfg.block_q, cfg.block_kv), q_ref.dtype)] if opt.interpret else []),
        ),
        (kv_barriers, kv_barriers, plgpu.Barrier(num_barriers=_NUM_COMPUTE)),
        (free_barriers, free_barriers),
        plgpu.Barrier(num_arrivals=_NUM_COMPUTE),
        collective_axes="wg",
    )


def _tile_metadata(query_start_loc, seq_lens, max_blocks, num_rows, num_slots, min_query_len, cfg: MosaicConfig):
    """``[R * _META]`` int32: per tile slot its window start, first real row in the window, real row count, first
    real position, request length and block-table offset (count 0 marks an empty slot)."""
    plan = plan_lib.build_tile_plan(
        query_start_loc, tile_tokens=cfg.tile_tokens, num_slots=num_slots, min_query_len=min_query_len
    )
    # The window starts at the tile's first token rounded down to a multiple of 8 (a tiled TMA copy's row must be),
    # moved back if needed so it stays inside q (num_rows is a multiple of 8 too).
    aligned = plan.first_token - plan.first_token % _ROW_ALIGN
    window_start = jnp.clip(aligned, 0, num_rows - cfg.window_rows)
    pos_first = seq_lens[plan.request] - query_start_loc[plan.request + 1] + plan.first_token
    fields = (
        window_start,
        plan.first_token - window_start,
        plan.num_tokens,
        pos_first,
        seq_lens[plan.request],
        plan.request * max_blocks,
    )
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=1).reshape(-1)


def long_tiles_mosaic(
    out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, min_query_len, max_query_len, opt, cfg
):
    """Writes the rows of tokens of requests with at least ``min_query_len`` query tokens into ``out [T, N, H]``;
    ``max_query_len`` (no request has more) sizes the grid."""
    num_tokens, num_heads, head_dim = q.shape
    num_requests, max_blocks = block_tables.shape
    pad = max(cfg.window_rows, -(-num_tokens // _ROW_ALIGN) * _ROW_ALIGN) - num_tokens  # whole windows of 8 rows
    if pad:
        q, out = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, out))
    num_slots = plan_lib.max_tile_slots(num_tokens, num_requests, cfg.tile_tokens, min_query_len, max_query_len)
    meta = _tile_metadata(
        query_start_loc, seq_lens, max_blocks, num_tokens + pad, num_slots, min_query_len, cfg
    )  # fmt: skip
    tables = block_tables.reshape(-1).astype(jnp.int32)
    kernel = pl.kernel(
        functools.partial(_kernel, cfg=cfg, opt=opt),
        out_type=(),
        mesh=plgpu.Mesh(
            grid=(num_slots, num_heads), grid_names=("slot", "head"), num_threads=_NUM_COMPUTE + 1, thread_name="wg"
        ),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if opt.interpret else False,
        name=f"ragged_paged_attention_mgpu_q{cfg.window_rows}_kv{cfg.block_kv}_st{cfg.num_stages}",
    )

    def run(out_ref):
        kernel(meta, tables, q, k_cache, v_cache, out_ref)

    out = pl.run_state(run)(out)
    return out[:num_tokens]


def ragged_paged_attention_mosaic(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [P, L, K, H]
    v_cache: jax.Array,  # [P, L, K, H]
    block_tables: jax.Array,  # [S, max_blocks]
    seq_lens: jax.Array,  # [S]
    query_start_loc: jax.Array,  # [S+1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_query_len: int | None = None,
    short_config: triton_gpu.KernelConfig | None = None,
    mosaic_config: MosaicConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention (layout in ``op``): the Triton short launch for short queries, this module's kernel
    for the long-query tiles (or the Triton long launch where ``supports`` says no). Under a ``max_query_len`` bound
    that the short launch covers, only the short launch runs: the long launch's grid is static, and its all-empty
    programs cost 13-21 us a layer in decode steps of 256 requests on an H200 (benchmarks/RESULTS.md, session 43)."""
    cfg = mosaic_config or MosaicConfig()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale)
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if not supports(q.dtype, k_cache.dtype, head_dim, block_size, cfg):
        return triton_gpu.ragged_paged_attention_triton(
            *args, **options, v_scale=v_scale, max_query_len=max_query_len, short_config=short_config,
            interpret=interpret,
        )  # fmt: skip
    out, short_tokens = triton_gpu.short_query_launch(
        *args, **options, v_scale=v_scale, short_config=short_config, interpret=interpret
    )
    longest = q.shape[0] if max_query_len is None else min(max_query_len, q.shape[0])
    if longest <= short_tokens:
        return out
    group = q.shape[1] // num_kv_heads
    opt = _Options(sm_scale * k_scale, sliding_window, soft_cap, v_scale, group, block_size, interpret)
    query_start_loc, seq_lens = query_start_loc.astype(jnp.int32), seq_lens.astype(jnp.int32)
    return long_tiles_mosaic(
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        min_query_len=short_tokens + 1, max_query_len=longest, opt=opt, cfg=cfg,
    )  # fmt: skip
