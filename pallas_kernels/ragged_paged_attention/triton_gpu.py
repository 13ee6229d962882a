"""Pallas GPU (Triton lowering) kernel for ragged paged attention: one kernel body for prefill and decode.

Grid ``(tile slot, KV head, KV split)``. A program owns one tile of up to ``block_rows // G`` consecutive query tokens
of one request together with the G query heads that share its KV head: a ``[M = block_rows, H]`` block of queries, so
each K/V block is read once per group. It walks the request's KV positions ``block_kv`` tokens at a time, finds each
token's cache block through the block table, and keeps an online softmax in float32 (base 2). Steps that lie wholly
inside the causal horizon (and the sliding window) run without masks; only the edge steps pay for masking.

``ragged_paged_attention_triton`` launches the body twice: short queries (decode, a few speculative tokens) in small
tiles, optionally split along the KV axis to fill the GPU and merged afterwards; long queries (prefill chunks) in
large tiles that keep the tensor cores busy. Each launch writes only its own tokens' rows of the shared output.
``interpret=True`` runs the same body on CPU. The tile plan lives in ``tile_plan``; this module owns the kernel.

An fp8 (float8_e4m3fn) cache: each K/V tile is loaded as fp8 (half the bytes of bf16) and converted to float16 in
registers before its dot (every e4m3 value is exact there; ``compute_dtype`` says why not bfloat16), q too; ``k_scale``
is folded into ``sm_scale`` and ``v_scale`` into the final normalisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_cache_update import is_fp8_cache
from pallas_kernels.ragged_paged_attention import tile_plan as plan_lib

_LOG2E = math.log2(math.e)
_EXACT = lax.Precision.HIGHEST  # float32 inputs multiply in IEEE float32, never TF32; bf16 is unaffected
_INIT_MAX = -1e30  # finite start of the running max; masked scores are -inf, so exp2 turns them into exact zeros


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tuning parameters of one launch."""

    block_rows: int  # M: query rows per program (tile tokens x G), a power of two >= 16
    block_kv: int  # KV tokens per inner step, a power of two >= 16
    num_kv_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_rows", "block_kv"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {self.num_kv_splits}")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shapes and attention options shared by both launches."""

    num_heads: int
    num_kv_heads: int
    block_size: int
    max_blocks: int  # columns of the block table
    num_query_rows: int  # T * N
    num_requests: int  # S
    sm_scale: float  # times k_scale
    sliding_window: int | None
    soft_cap: float | None
    v_scale: float

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


class _Tile(NamedTuple):
    """Traced per-program values used by every KV step."""

    q: jax.Array  # [M, H] queries of the tile
    position: jax.Array  # [M] absolute position of each row's token
    table_base: jax.Array  # flat index of the request's first block-table entry
    kv_head: jax.Array
    kv_lo: jax.Array  # first visible KV position of any row
    kv_hi: jax.Array  # one past the last visible KV position of any row
    full_lo: jax.Array  # first interior step (see _StepRanges)
    full_hi: jax.Array


def _rows(ref, rows):
    """View of whole rows ``rows [R]`` of a 2-D ref, as two broadcast index arrays (a form interpret mode accepts)."""
    columns = jnp.arange(ref.shape[1], dtype=jnp.int32)
    return ref.at[rows[:, None], columns[None, :]]


def _scaled_scores(q, k, geo: _Geometry):
    """``[M, BKV]`` float32 scores in base-2 units, with the optional soft cap."""
    scores = plgpu.dot(q, k, trans_b=True, precision=_EXACT)  # [M, BKV]
    if geo.soft_cap is None:
        return scores * (geo.sm_scale * _LOG2E)
    capped = geo.soft_cap * jnp.tanh(scores * (geo.sm_scale / geo.soft_cap))
    return capped * _LOG2E


def _kv_step(step, carry, *, tile: _Tile, refs, cfg: KernelConfig, geo: _Geometry, masking):
    """One block of ``block_kv`` KV positions. ``masking``: False (interior step), True (edge step) or "dynamic"
    (decide from the step index: the single-loop form that interpret mode runs, which checks the same ranges)."""
    tables_ref, k_ref, v_ref = refs
    acc, row_max, row_sum = carry  # [M, H], [M], [M]
    block_size = geo.block_size
    kv_pos = step * cfg.block_kv + jnp.arange(cfg.block_kv, dtype=jnp.int32)  # [BKV]
    in_range = row_mask = other = kv_other = None
    if masking is not False:
        in_range = (kv_pos >= tile.kv_lo) & (kv_pos < tile.kv_hi)  # [BKV]
        if masking == "dynamic":
            is_interior = (step >= tile.full_lo) & (step < tile.full_hi)
            in_range |= is_interior
        row_mask, other = in_range[:, None], 0
        kv_other = 0.0 if is_fp8_cache(k_ref.dtype) else 0  # Triton casts a float zero to fp8, not an int one
    table_index = tile.table_base + lax.div(kv_pos, block_size)
    block = plgpu.load(tables_ref.at[table_index], mask=in_range, other=other)  # [BKV]
    kv_rows = (block * block_size + lax.rem(kv_pos, block_size)) * geo.num_kv_heads + tile.kv_head  # [BKV]
    k = plgpu.load(_rows(k_ref, kv_rows), mask=row_mask, other=kv_other).astype(tile.q.dtype)  # [BKV, H]
    scores = _scaled_scores(tile.q, k, geo)  # [M, BKV]
    if masking is not False:
        visible = kv_pos[None, :] <= tile.position[:, None]  # [M, BKV]
        if geo.sliding_window is not None:
            visible &= kv_pos[None, :] > tile.position[:, None] - geo.sliding_window
        if masking == "dynamic":
            visible |= is_interior
        scores = jnp.where(visible, scores, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))  # [M]
    correction = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(scores - new_max[:, None])  # [M, BKV]
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    v = plgpu.load(_rows(v_ref, kv_rows), mask=row_mask, other=kv_other).astype(tile.q.dtype)  # [BKV, H]
    acc = acc * correction[:, None] + plgpu.dot(probs.astype(v.dtype), v, precision=_EXACT)
    return acc, new_max, row_sum


class _StepRanges(NamedTuple):
    kv_lo: jax.Array  # first visible KV position of any row
    kv_hi: jax.Array  # one past the last visible KV position of any row
    full_lo: jax.Array  # interior steps [full_lo, full_hi) see every row's window and causal horizon whole
    full_hi: jax.Array
    loops: list  # (first step, end step, masking) of this program's split, run in order


def _step_ranges(pos_first, count, split, cfg: KernelConfig, geo: _Geometry, single_loop: bool) -> _StepRanges:
    """This program's KV steps: lower window edge (masked), interior (unmasked), causal edge (masked)."""
    block_kv = cfg.block_kv
    kv_hi = pos_first + count  # one past the position of the tile's last token
    if geo.sliding_window is None:
        kv_lo = full_lo = jnp.int32(0)
    else:
        kv_lo = jnp.maximum(pos_first - geo.sliding_window + 1, 0)
        beyond = kv_hi - 1 - geo.sliding_window  # steps starting after this see every row's whole window
        full_lo = jnp.where(beyond >= 0, lax.div(jnp.maximum(beyond, 0), block_kv) + 1, 0)
    steps_lo = lax.div(kv_lo, block_kv)
    steps_hi = lax.div(kv_hi + block_kv - 1, block_kv)
    full_hi = jnp.maximum(lax.div(pos_first + 1, block_kv), full_lo)  # steps wholly at or before every row
    splits = cfg.num_kv_splits
    per_split = lax.div(steps_hi - steps_lo + splits - 1, splits)
    split_lo = steps_lo + split * per_split
    split_hi = jnp.minimum(split_lo + per_split, steps_hi)
    if single_loop:
        loops = [(split_lo, split_hi, "dynamic")]
    else:
        loops = [(full_lo, full_hi, False), (full_hi, steps_hi, True)]
        if geo.sliding_window is not None:
            loops.insert(0, (steps_lo, full_lo, True))
        loops = [(jnp.maximum(lo, split_lo), jnp.minimum(hi, split_hi), masking) for lo, hi, masking in loops]
    return _StepRanges(kv_lo, kv_hi, full_lo, full_hi, loops)


class _TileRule(NamedTuple):
    """Which requests a launch covers and how it cuts them into tiles (static)."""

    tile_tokens: int
    min_query_len: int
    max_query_len: int  # inclusive; a large number for "no limit"


def _find_tile(query_start_loc_ref, slot, rule: _TileRule, geo: _Geometry):
    """(request, first token, token count) of tile slot ``slot``, count 0 for an empty slot. Every program derives
    the batch's tile list from ``query_start_loc`` itself (one vector load and a cumsum), so a launch needs no
    plan built by separate XLA ops. A request's tiles are numbered last (longest causal) first."""
    request = jnp.arange(_next_power_of_two(geo.num_requests), dtype=jnp.int32)  # [S'] padded to a power of two
    is_request = request < geo.num_requests
    starts = plgpu.load(query_start_loc_ref.at[request], mask=is_request, other=0)  # [S']
    lengths = plgpu.load(query_start_loc_ref.at[request + 1], mask=is_request, other=0) - starts
    eligible = is_request & (lengths >= rule.min_query_len) & (lengths <= rule.max_query_len)
    tiles = jnp.where(eligible, lax.div(lengths + rule.tile_tokens - 1, rule.tile_tokens), 0)  # [S']
    tile_end = jnp.cumsum(tiles)  # [S'] inclusive
    owns = (tile_end - tiles <= slot) & (slot < tile_end)  # [S'] one-hot, or all False for an empty slot
    pick = lambda values: jnp.sum(jnp.where(owns, values, 0))
    num_tiles = pick(tiles)
    tile_index = pick(tile_end) - 1 - slot  # reversed order within the request
    count = jnp.minimum(rule.tile_tokens, pick(lengths) - tile_index * rule.tile_tokens)
    return pick(request), pick(starts) + tile_index * rule.tile_tokens, jnp.where(num_tiles > 0, count, 0)


def _attention_kernel(*refs, cfg: KernelConfig, geo: _Geometry, rule: _TileRule, single_loop: bool):
    query_start_loc_ref, seq_lens_ref, tables_ref = refs[:3]  # [S+1], [S], [S*max_blocks]
    q_ref, k_ref, v_ref = refs[3:6]  # [T*N, H], [P*L*K, H], [P*L*K, H]
    out_refs = refs[-2:] if cfg.num_kv_splits > 1 else refs[-1:]  # see _store_tile
    slot, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # read outside pl.when
    request, first, count = _find_tile(query_start_loc_ref, slot, rule, geo)

    @pl.when(count > 0)
    def _():
        pos_first = seq_lens_ref[request] - query_start_loc_ref[request + 1] + first
        row = jnp.arange(cfg.block_rows, dtype=jnp.int32)  # [M]
        token_offset = lax.div(row, geo.group)
        row_valid = token_offset < count  # [M]
        q_rows = (first + token_offset) * geo.num_heads + kv_head * geo.group + lax.rem(row, geo.group)
        q = plgpu.load(_rows(q_ref, q_rows), mask=row_valid[:, None], other=0)  # [M, H]
        ranges = _step_ranges(pos_first, count, split, cfg, geo, single_loop)
        tile = _Tile(
            q=_to_compute_dtype(q, compute_dtype(q_ref.dtype, k_ref.dtype)),
            position=pos_first + token_offset,
            table_base=request * geo.max_blocks,
            kv_head=kv_head,
            kv_lo=ranges.kv_lo,
            kv_hi=ranges.kv_hi,
            full_lo=ranges.full_lo,
            full_hi=ranges.full_hi,
        )
        carry = (
            jnp.zeros(q.shape, jnp.float32),
            jnp.full((cfg.block_rows,), _INIT_MAX, jnp.float32),
            jnp.zeros((cfg.block_rows,), jnp.float32),
        )
        for lo, hi, masking in ranges.loops:
            step = functools.partial(
                _kv_step, tile=tile, refs=(tables_ref, k_ref, v_ref), cfg=cfg, geo=geo, masking=masking
            )
            carry = lax.fori_loop(lo, hi, step, carry)
        _store_tile(out_refs, carry, q_rows, row_valid, split, cfg, geo)


def _store_tile(out_refs, carry, q_rows, row_valid, split, cfg: KernelConfig, geo: _Geometry):
    """Normalised rows into the output, or (split launches) f32 partial rows plus their base-2 log-sum-exp."""
    acc, row_max, row_sum = carry
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # [M]
    out = acc / safe_sum[:, None]  # [M, H]
    if geo.v_scale != 1.0:
        out = out * geo.v_scale
    if cfg.num_kv_splits == 1:
        (out_ref,) = out_refs
        plgpu.store(_rows(out_ref, q_rows), out.astype(out_ref.dtype), mask=row_valid[:, None])
        return
    out_ref, lse_ref = out_refs
    rows = split * geo.num_query_rows + q_rows
    plgpu.store(_rows(out_ref, rows), out, mask=row_valid[:, None])
    lse = jnp.where(row_sum > 0, row_max + jnp.log2(safe_sum), -jnp.inf)  # [M]
    plgpu.store(lse_ref.at[rows], lse, mask=row_valid)


def _launch(rule: _TileRule, num_slots, metadata, q_rows, k_rows, v_rows, init_out, cfg, geo, interpret):
    """One pallas_call over ``num_slots`` tile slots of ``rule``; writes into ``init_out`` (aliased) unless the
    launch splits the KV axis, in which case it returns f32 partial rows and their log-sum-exp."""
    num_kv_splits = cfg.num_kv_splits
    head_dim = q_rows.shape[1]
    operands = [*metadata, q_rows, k_rows, v_rows]
    if num_kv_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype)
        operands.append(init_out)
        aliases = {len(operands) - 1: 0}
    else:
        out_shape = (
            jax.ShapeDtypeStruct((num_kv_splits * geo.num_query_rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits * geo.num_query_rows,), jnp.float32),
        )
        aliases = {}
    kernel = functools.partial(_attention_kernel, cfg=cfg, geo=geo, rule=rule, single_loop=interpret)
    return pl.pallas_call(
        kernel,
        grid=(num_slots, geo.num_kv_heads, num_kv_splits),
        in_specs=[pl.no_block_spec] * len(operands),
        out_specs=pl.no_block_spec if num_kv_splits == 1 else (pl.no_block_spec, pl.no_block_spec),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_m{cfg.block_rows}_kv{cfg.block_kv}_s{num_kv_splits}",
    )(*operands)


def compute_dtype(q_dtype, cache_dtype):
    """The dtype both dots run in: the cache's (q is cast to it), except for an fp8 cache: float16 for 16-bit queries
    (Hopper converts e4m3 to float16 natively but to bfloat16 only through float32: on an H100 the decode kernel read
    an fp8 cache at 1.7-2.0 TB/s computing in bfloat16, 2.1-2.5 TB/s in float16), q's dtype for float32 ones."""
    if not is_fp8_cache(cache_dtype):
        return jnp.dtype(cache_dtype)
    return jnp.dtype(jnp.float16) if jnp.dtype(q_dtype).itemsize == 2 else jnp.dtype(q_dtype)


def _to_compute_dtype(q, dtype):
    """q in the dots' dtype. bfloat16 -> float16 is exact for magnitudes in float16's normal range; larger ones are
    clipped to its largest finite value rather than turned into inf."""
    if q.dtype == jnp.bfloat16 and dtype == jnp.float16:
        largest = float(jnp.finfo(jnp.float16).max)
        q = jnp.clip(q, -largest, largest)
    return q.astype(dtype)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_configs(
    num_tokens: int,
    num_requests: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    itemsize: int = 2,
    num_cores: int = 132,
) -> tuple[KernelConfig, KernelConfig]:
    """(short-query config, long-query config) for these static shapes on a GPU with ``num_cores`` SMs."""
    group_rows = _next_power_of_two(num_heads // num_kv_heads)
    wide_head = head_dim * itemsize > 256 or itemsize > 2  # big rows or f32 math: smaller tiles fit registers
    splits = 1  # split the KV axis of short queries only while the (request, KV head) programs underfill the GPU
    partial_bytes = num_tokens * num_heads * head_dim * 4
    while num_requests * num_kv_heads * splits < num_cores and splits < 16 and 2 * splits * partial_bytes <= 2**26:
        splits *= 2
    short = KernelConfig(
        block_rows=max(16, group_rows), block_kv=64 if wide_head else 128, num_kv_splits=splits, num_warps=4
    )
    long = KernelConfig(
        block_rows=max(64 if wide_head else 256, group_rows),
        block_kv=32 if wide_head else 64,
        num_warps=8,
        num_stages=2,
    )
    return short, long


def _num_cores() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


class _Launches(NamedTuple):
    """What both launches share: configs, geometry, metadata and the flattened tensors."""

    short_cfg: KernelConfig
    long_cfg: KernelConfig
    geo: _Geometry
    metadata: tuple  # query_start_loc [S+1], seq_lens [S], block_tables [S*max_blocks], all int32
    tensors: tuple  # q [T*N, H], k [P*L*K, H], v [P*L*K, H]
    short_tokens: int  # queries of up to this many tokens take the short launch


def _prepare(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, options, short_config, long_config, interpret
):
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_requests, max_blocks = block_tables.shape
    group = num_heads // num_kv_heads
    short_default, long_default = default_configs(
        num_tokens,
        num_requests,
        num_heads,
        num_kv_heads,
        head_dim,
        compute_dtype(q.dtype, k_cache.dtype).itemsize,
        132 if interpret else _num_cores(),
    )
    short_cfg, long_cfg = short_config or short_default, long_config or long_default
    if min(short_cfg.block_rows, long_cfg.block_rows) < group or long_cfg.block_rows < short_cfg.block_rows:
        raise ValueError(f"block_rows must be >= G={group} and long >= short, got {short_cfg}, {long_cfg}")
    if long_cfg.num_kv_splits != 1:
        raise ValueError(f"the long-query launch does not split the KV axis, got {long_cfg}")
    geo = _Geometry(
        num_heads, num_kv_heads, block_size, max_blocks, num_tokens * num_heads, num_requests,
        options["sm_scale"] * options["k_scale"], options["sliding_window"], options["soft_cap"], options["v_scale"],
    )  # fmt: skip
    metadata = (
        query_start_loc.astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        block_tables.reshape(-1).astype(jnp.int32),
    )
    kv_shape = (num_blocks * block_size * num_kv_heads, head_dim)
    tensors = (q.reshape(num_tokens * num_heads, head_dim), k_cache.reshape(kv_shape), v_cache.reshape(kv_shape))
    return _Launches(short_cfg, long_cfg, geo, metadata, tensors, short_cfg.block_rows // group)


def _short_launch(launches: _Launches, num_tokens: int, interpret: bool):
    """``[T*N, H]``: rows of short-query tokens filled, every other row zero."""
    short_cfg, _, geo, metadata, tensors, short_tokens = launches
    q_rows = tensors[0]
    short_rule = _TileRule(short_tokens, 1, short_tokens)
    short_slots = plan_lib.max_tile_slots(num_tokens, geo.num_requests, short_tokens, 1, short_tokens)
    out = jnp.zeros_like(q_rows)  # padding tokens keep these zeros
    if short_cfg.num_kv_splits == 1:
        return _launch(short_rule, short_slots, metadata, *tensors, out, short_cfg, geo, interpret)
    partial, lse = _launch(short_rule, short_slots, metadata, *tensors, None, short_cfg, geo, interpret)
    splits, head_dim = short_cfg.num_kv_splits, q_rows.shape[1]
    merged = plan_lib.merge_kv_splits(partial.reshape(splits, -1, head_dim), lse.reshape(splits, -1))
    is_short = plan_lib.tokens_in_query_range(metadata[0], num_tokens, 1, short_tokens)  # [T]
    merged = merged.reshape(num_tokens, geo.num_heads, head_dim)
    return jnp.where(is_short[:, None, None], merged, 0.0).astype(q_rows.dtype).reshape(q_rows.shape)


def short_query_launch(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, short_config=None, interpret=False, **options
) -> tuple[jax.Array, int]:
    """(``[T, N, H]`` with the rows of short-query tokens filled and the rest zero, the short launch's largest query
    length); the entry for a backend that brings its own long-query kernel. Options as for the full op."""
    launches = _prepare(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, options, short_config, None, interpret
    )
    return _short_launch(launches, q.shape[0], interpret).reshape(q.shape), launches.short_tokens


def ragged_paged_attention_triton(
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
    short_config: KernelConfig | None = None,
    long_config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention (layout in ``op``); queries of up to ``short_config.block_rows // G`` tokens take the
    short launch, longer ones the long launch, which a ``max_query_len`` bound within the short launch's reach
    leaves out (and otherwise sizes). Configs default to ``default_configs``."""
    num_tokens, num_heads, head_dim = q.shape
    options = dict(
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale
    )
    launches = _prepare(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, options, short_config, long_config, interpret
    )
    out = _short_launch(launches, num_tokens, interpret)
    short_tokens, long_cfg, geo = launches.short_tokens, launches.long_cfg, launches.geo
    longest = num_tokens if max_query_len is None else min(max_query_len, num_tokens)
    if longest > short_tokens:
        long_tokens = long_cfg.block_rows // geo.group
        long_rule = _TileRule(long_tokens, short_tokens + 1, num_tokens)
        long_slots = plan_lib.max_tile_slots(num_tokens, geo.num_requests, long_tokens, short_tokens + 1, longest)
        out = _launch(long_rule, long_slots, launches.metadata, *launches.tensors, out, long_cfg, geo, interpret)
    return out.reshape(num_tokens, num_heads, head_dim)
