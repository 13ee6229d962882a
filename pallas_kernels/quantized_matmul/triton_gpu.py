"""Pallas GPU (Triton lowering) kernels of the quantized matmul: dequantize in the kernel, multiply on the tensor
cores in the activation dtype (bf16/f16; f32 at full precision) with f32 accumulation; fp8's e4m3 tiles multiply as
float16 (every e4m3 value is exact there) unless ``fp8_dot`` multiplies them as fp8.

Grid ``(M tiles, N tiles, K splits)``. A program owns a ``[block_m, block_n]`` output tile and walks its share of K:
int8 and fp8 ``block_k`` rows per step, int4 one quantization group per step (the low nibbles against the first half
of the group's activations, the high nibbles against the second half: see ``jaxllm.quantization.schemes``), or
``int4_groups_per_step`` groups unrolled into one pipelined step (more bytes per step; not timed yet, not a default).
Each weight byte is read by one program per M tile, so decode (``M <= 16``, one M tile) reads the weight once; when
the N tiles alone cannot fill the GPU the K axis is split across programs and the f32 partial tiles are summed after
the launch. Prefill shapes tile M as well and run at the tensor cores' pace.

``quantized_matmul_triton_fused`` multiplies one x by several weights of one scheme (q/k/v, gate/up) in one launch:
their N tiles lie side by side on the grid and each program runs the kernel body for the weight its tile belongs to
(``fused_config`` narrows the tile width to divide every N). A single weight is the same launch without the branch.

``KernelConfig.int4_bit_convert`` makes the int4 codes bf16/f16 values with integer bit operations and one
subtraction instead of integer-to-float conversions, which issue at a fraction of the ALU rate. ``default_config``
turns it on up to ``INT4_BIT_CONVERT_MAX_ROWS`` rows (H100, 2026-11-26: L8 int4 batch-1 ITL 5.12 -> 4.90 ms; kernel
times at M = 1..64 mostly lower, at 128 3-4% higher; benchmarks/RESULTS.md). ``JAXLLM_INT4_BIT_CONVERT=0`` / ``=1``
turns it off / on at every width (experiments).

Scales are applied to the f32 accumulator, never to the weights: per output channel once at the end (int8, fp8), per
group to each group's partial product (int4). The weights' integer codes are exact in bf16, so the only rounding
before accumulation is that of the activations' own dtype.

The Triton lowering neither clips edge blocks nor pads them, so every load and store is masked to ``M`` and ``N``;
interpret mode (``interpret=True``, CPU) pads edge blocks with NaN. A masked-off row of x or column of the weight only
reaches output rows or columns that the store drops, so the fp8 loads need no fill value (Triton cannot cast an
integer fill to fp8).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.config import env_switch
from jaxllm.quantization.schemes import INT4_OFFSET, QuantizedWeight, quantize_activations_fp8

_NN = (((1,), (0,)), ((), ()))  # [BM, K] x [K, BN]
_NT = (((1,), (1,)), ((), ()))  # [BM, K] x [BN, K]
MIN_DOT_DIM = 16  # Triton's smallest tensor-core tile edge
INT4_BIT_CONVERT_ENV = "JAXLLM_INT4_BIT_CONVERT"  # "0" / "1": default_config's int4 configs never / always bit-convert
INT4_BIT_CONVERT_MAX_ROWS = 64  # otherwise: up to this many rows (where the H100 measured it faster)


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tuning parameters of one launch."""

    block_m: int  # activation rows per program, a power of two >= 16
    block_n: int  # output columns per program, a power of two >= 16
    block_k: int  # int8/fp8: K rows per step, a power of two >= 16 (int4 steps one group)
    num_k_splits: int = 1  # programs sharing one output tile along K (f32 partials summed afterwards)
    num_warps: int = 4
    num_stages: int = 3
    fp8_dot: bool = False  # fp8: multiply the fp8 tiles directly (sm89+ fp8 MMA) instead of upcasting them to f16
    int4_bit_convert: bool = False  # int4 with bf16/f16 activations: nibbles OR-ed into a float's mantissa
    int4_groups_per_step: int = 1  # int4: quantization groups one inner step consumes (more bytes per pipelined step)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < MIN_DOT_DIM or not _is_power_of_two(value):
                raise ValueError(f"{name} must be a power of two >= {MIN_DOT_DIM}, got {value}")
        if self.num_k_splits < 1:
            raise ValueError(f"num_k_splits must be >= 1, got {self.num_k_splits}")
        if not _is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if not _is_power_of_two(self.int4_groups_per_step):
            raise ValueError(f"int4_groups_per_step must be a power of two >= 1, got {self.int4_groups_per_step}")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static facts every kernel body needs."""

    num_rows: int  # M
    num_cols: int  # N
    steps_per_split: int  # K steps each program walks
    step_k: int  # K rows per step
    precision: lax.Precision
    first_col_tile: int = 0  # the weight's first N tile on the grid (several weights share one launch)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile_masks(cfg: KernelConfig, geo: _Geometry, tiles=None):
    """Masks of the rows and columns of this program's tile (``tiles``: its grid indices (i, j), read by the caller
    where the body runs under a branch, which interpret mode cannot give program ids)."""
    i, j = (pl.program_id(0), pl.program_id(1)) if tiles is None else tiles
    rows = i * cfg.block_m + jnp.arange(cfg.block_m, dtype=jnp.int32)  # [BM]
    cols = (j - geo.first_col_tile) * cfg.block_n + jnp.arange(cfg.block_n, dtype=jnp.int32)  # [BN]
    return rows < geo.num_rows, cols < geo.num_cols


def _dot(a, b, geo: _Geometry, dimension_numbers=_NN):
    return lax.dot_general(
        a, b, dimension_numbers, precision=geo.precision, preferred_element_type=jnp.float32
    )  # [BM, BN]


def _store(out_ref, tile, row_ok, col_ok):
    plgpu.store(out_ref, tile.astype(out_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _int8_kernel(x_ref, w_ref, s_ref, out_ref, *, cfg: KernelConfig, geo: _Geometry, tiles=None):
    # x_ref [BM, K/splits] activations; w_ref [K/splits, BN] int8; s_ref [BN] f32; out_ref [BM, BN]
    row_ok, col_ok = _tile_masks(cfg, geo, tiles)

    def step(i, acc):
        k0 = pl.multiple_of(i * geo.step_k, geo.step_k)
        x = plgpu.load(x_ref.at[:, pl.ds(k0, geo.step_k)], mask=row_ok[:, None], other=0)  # [BM, BK]
        w = plgpu.load(w_ref.at[pl.ds(k0, geo.step_k), :], mask=col_ok[None, :], other=0)  # [BK, BN]
        return acc + _dot(x, w.astype(x.dtype), geo)

    acc = lax.fori_loop(0, geo.steps_per_split, step, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
    scales = plgpu.load(s_ref, mask=col_ok, other=0)  # [BN]
    _store(out_ref, acc * scales[None, :], row_ok, col_ok)


# int4 codes as floats without integer-to-float conversions (which issue at a quarter of the ALU rate on recent GPUs):
# a code c in 0..15 OR-ed into the low mantissa bits of MAGIC (a float whose mantissa step is 1) is exactly
# MAGIC + c, so one subtraction of MAGIC + INT4_OFFSET gives the signed value c - 8, exactly.
_BIT_CONVERT = {  # activation dtype -> (bit pattern of MAGIC as uint16, MAGIC + INT4_OFFSET)
    jnp.dtype(jnp.bfloat16): (0x4300, 128.0 + INT4_OFFSET),  # bf16 128.0: 7 mantissa bits, step 1
    jnp.dtype(jnp.float16): (0x6400, 1024.0 + INT4_OFFSET),  # f16 1024.0: 10 mantissa bits, step 1
}


def _int4_halves(packed, dtype, bit_convert: bool):
    """Signed values (-8..7, exact in ``dtype``) of the low and high nibbles of ``packed`` (uint8)."""
    if bit_convert and jnp.dtype(dtype) in _BIT_CONVERT:
        magic_bits, bias = _BIT_CONVERT[jnp.dtype(dtype)]
        wide = packed.astype(jnp.uint16)  # one widening per byte; both nibbles come from it
        low = lax.bitcast_convert_type((wide & 0xF) | magic_bits, dtype) - jnp.asarray(bias, dtype)
        high = lax.bitcast_convert_type((wide >> 4) | magic_bits, dtype) - jnp.asarray(bias, dtype)
        return low, high
    low = (packed & 0xF).astype(dtype) - INT4_OFFSET
    high = (packed >> 4).astype(dtype) - INT4_OFFSET
    return low, high


def _int4_kernel(x_ref, w_ref, s_ref, out_ref, *, cfg: KernelConfig, geo: _Geometry, tiles=None):
    # x_ref [BM, K/splits] activations; w_ref [K/2/splits, BN] uint8 (packed groups); s_ref [K/g/splits, BN] f32
    row_ok, col_ok = _tile_masks(cfg, geo, tiles)
    groups = cfg.int4_groups_per_step
    group = geo.step_k // groups  # g
    half = group // 2  # g/2: rows of one nibble half of a group

    def step(i, acc):
        for j in range(groups):  # unrolled: every group's loads belong to the one pipelined step
            index = i * groups + j  # of the group within this split
            k0 = pl.multiple_of(index * group, group)
            packed = plgpu.load(w_ref.at[pl.ds(index * half, half), :], mask=col_ok[None, :], other=0)  # [g/2, BN]
            x_low = plgpu.load(x_ref.at[:, pl.ds(k0, half)], mask=row_ok[:, None], other=0)  # [BM, g/2]
            x_high = plgpu.load(x_ref.at[:, pl.ds(k0 + half, half)], mask=row_ok[:, None], other=0)  # [BM, g/2]
            low, high = _int4_halves(packed, x_low.dtype, cfg.int4_bit_convert)  # [g/2, BN] each, exact -8..7
            partial = _dot(x_low, low, geo) + _dot(x_high, high, geo)  # [BM, BN]
            scales = plgpu.load(s_ref.at[pl.ds(index, 1), :], mask=col_ok[None, :], other=0)  # [1, BN]
            acc = acc + partial * scales
        return acc

    acc = lax.fori_loop(0, geo.steps_per_split, step, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
    _store(out_ref, acc, row_ok, col_ok)


def _fp8_kernel(x_ref, xs_ref, w_ref, s_ref, out_ref, *, cfg: KernelConfig, geo: _Geometry, tiles=None):
    # x_ref [BM, K/splits] e4m3; xs_ref [BM] f32; w_ref [BN, K/splits] e4m3; s_ref [BN] f32; out_ref [BM, BN]
    row_ok, col_ok = _tile_masks(cfg, geo, tiles)

    def step(i, acc):
        k0 = pl.multiple_of(i * geo.step_k, geo.step_k)
        x = plgpu.load(x_ref.at[:, pl.ds(k0, geo.step_k)], mask=row_ok[:, None])  # [BM, BK]
        w = plgpu.load(w_ref.at[:, pl.ds(k0, geo.step_k)], mask=col_ok[:, None])  # [BN, BK]
        if not cfg.fp8_dot:  # e4m3 values are exact in float16, which Hopper converts e4m3 to natively (not bf16)
            x, w = x.astype(jnp.float16), w.astype(jnp.float16)
        return acc + _dot(x, w, geo, _NT)

    acc = lax.fori_loop(0, geo.steps_per_split, step, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
    x_scales = plgpu.load(xs_ref, mask=row_ok, other=0)  # [BM]
    w_scales = plgpu.load(s_ref, mask=col_ok, other=0)  # [BN]
    _store(out_ref, acc * x_scales[:, None] * w_scales[None, :], row_ok, col_ok)


def step_k(method: str, cfg: KernelConfig, group_size: int | None) -> int:
    """K rows one inner step consumes."""
    return group_size * cfg.int4_groups_per_step if method == "int4" else cfg.block_k


def default_config(num_rows: int, k: int, n: int, method: str, group_size=None, num_cores: int = 132):
    """A config for ``[M=num_rows, K] x [K, N]`` on a GPU with ``num_cores`` SMs (starting points, to be tuned)."""
    if num_rows <= 16:  # decode: memory-bound; 128-column tiles, K split until the programs fill the GPU twice
        block_m, block_n, block_k, num_warps, num_stages = 16, 128, 256, 8, 4  # (H100 sweep, benchmarks/RESULTS.md)
    elif num_rows <= 64:
        block_m, block_n, block_k, num_warps, num_stages = _next_power_of_two(num_rows), 64, 128, 4, 4
    else:  # prefill: compute-bound tiles
        block_m, block_n, block_k, num_warps, num_stages = 128, 128, 64, 8, 3
    while block_k > MIN_DOT_DIM and k % block_k:
        block_k //= 2
    bit_convert = method == "int4" and _int4_bit_convert(num_rows)
    cfg = KernelConfig(block_m, block_n, block_k, 1, num_warps, num_stages, int4_bit_convert=bit_convert)
    steps = k // step_k(method, cfg, group_size)
    tiles = _cdiv(num_rows, block_m) * _cdiv(n, block_n)

    # Decode: about one wave of programs (the H100 sweep's best: doubling stops once it would pass the SM count by
    # more than one set of tiles), each split >= 1 step; int4, whose steps move only g/2 x BN bytes, about two waves
    # (H100, M = 16: 192-256 programs were the fastest split of each 8B shape, e.g. the down projection 0.98 -> 1.28
    # TB/s with 8 splits instead of 4; benchmarks/RESULTS.md). Prefill: two waves, each split >= 4 steps.
    def short_of_programs(splits: int) -> bool:
        if num_rows <= 16 and method == "int4":  # int4 steps move few bytes: two programs per SM (H100 sweep)
            return 2 * tiles * splits <= 2 * num_cores
        if num_rows <= 16:
            return 2 * tiles * splits <= num_cores + tiles
        return tiles * splits < 2 * num_cores

    min_steps = 1 if num_rows <= 16 else 4
    splits = 1  # double while the GPU is short of programs, each split keeps >= min_steps, and the f32 partials
    while (  # (8 bytes per output element and split, written and read) stay under half the int8 weight bytes
        short_of_programs(splits)
        and steps % (2 * splits) == 0
        and steps // (2 * splits) >= min_steps
        and 2 * splits * num_rows * 16 <= k
    ):
        splits *= 2
    return dataclasses.replace(cfg, num_k_splits=splits)


def _int4_bit_convert(num_rows: int) -> bool:
    forced = env_switch(INT4_BIT_CONVERT_ENV)
    return num_rows <= INT4_BIT_CONVERT_MAX_ROWS if forced is None else forced


def num_cores(interpret: bool) -> int:
    """The SM count ``default_config`` plans for: the device's, or an H100's (132) when interpreting or unknown."""
    return 132 if interpret else int(getattr(jax.devices()[0], "core_count", 0) or 132)


def check_config(cfg: KernelConfig, method: str, k: int, group_size: int | None) -> None:
    """ValueError unless ``cfg`` tiles K exactly for this weight."""
    step = step_k(method, cfg, group_size)
    if method == "int4" and (group_size // 2 < MIN_DOT_DIM or not _is_power_of_two(group_size)):
        raise ValueError(f"the Pallas GPU int4 kernel needs group_size a power of two >= 32, got {group_size}")
    if k % (step * cfg.num_k_splits):
        raise ValueError(f"K={k} is not a multiple of step {step} x num_k_splits {cfg.num_k_splits} ({cfg})")


def _shared_operands_and_specs(x, method: str, cfg: KernelConfig, k_split: int):
    """The activations' kernel inputs and BlockSpecs on the grid (M tile i, N tile j, K split s), and the kernel."""
    x_spec = pl.BlockSpec((cfg.block_m, k_split), lambda i, j, s: (i, s))
    if method == "int8":
        return (x,), [x_spec], _int8_kernel
    if method == "int4":
        return (x,), [x_spec], _int4_kernel
    x_values, x_scales = quantize_activations_fp8(x)  # [M, K], [M]
    row_scale_spec = pl.BlockSpec((cfg.block_m,), lambda i, j, s: (i,))
    return (x_values, x_scales), [x_spec, row_scale_spec], _fp8_kernel


def _weight_operands_and_specs(
    qw: QuantizedWeight, cfg: KernelConfig, k_split: int, first_tile: int, num_tiles: int | None
):
    """One weight's kernel inputs and BlockSpecs; its N tiles are grid tiles ``first_tile ...`` (programs of other
    weights' tiles map to its nearest tile, which they never read); ``num_tiles`` None: the launch's only weight."""
    bn = cfg.block_n

    def tile(j):
        return j if num_tiles is None else jnp.clip(j - first_tile, 0, num_tiles - 1)

    column_scale_spec = pl.BlockSpec((bn,), lambda i, j, s: (tile(j),))
    if qw.method == "int8":
        return (qw.values, qw.scales), [pl.BlockSpec((k_split, bn), lambda i, j, s: (s, tile(j))), column_scale_spec]
    if qw.method == "int4":
        w_spec = pl.BlockSpec((k_split // 2, bn), lambda i, j, s: (s, tile(j)))
        s_spec = pl.BlockSpec((k_split // qw.group_size, bn), lambda i, j, s: (s, tile(j)))
        return (qw.values, qw.scales), [w_spec, s_spec]
    return (qw.values, qw.scales), [pl.BlockSpec((bn, k_split), lambda i, j, s: (tile(j), s)), column_scale_spec]


def _fused_kernel(*refs, kernel, cfg: KernelConfig, geos: tuple[_Geometry, ...], num_shared: int):
    """Runs ``kernel`` for the weight whose N tiles hold this program's tile (refs: shared inputs, then each weight's
    values and scales, then the output)."""
    shared, out_ref = refs[:num_shared], refs[-1]
    weights = refs[num_shared:-1]
    tiles = (pl.program_id(0), pl.program_id(1))
    for index, geo in enumerate(geos):
        first, last = geo.first_col_tile, geo.first_col_tile + _cdiv(geo.num_cols, cfg.block_n)

        @pl.when((tiles[1] >= first) & (tiles[1] < last))
        def _(geo=geo, refs=weights[2 * index : 2 * index + 2]):
            kernel(*shared, *refs, out_ref, cfg=cfg, geo=geo, tiles=tiles)


def quantized_matmul_triton(
    x: jax.Array,  # [M, K] bf16 | f16 | f32
    qw: QuantizedWeight,
    *,
    out_dtype,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ W`` for a quantized ``W [K, N]``; returns ``[M, N]`` in ``out_dtype``. ``config`` defaults to
    ``default_config`` for these shapes."""
    return quantized_matmul_triton_fused(x, (qw,), out_dtype=out_dtype, config=config, interpret=interpret)[0]


def _odd_one_out(weights) -> QuantizedWeight | None:
    """The first weight whose method, group size or K differs from the first weight's, if any."""
    scheme = (weights[0].method, weights[0].group_size, weights[0].num_inputs)
    return next((w for w in weights if (w.method, w.group_size, w.num_inputs) != scheme), None)


def fused_config(num_rows: int, weights, interpret: bool = False) -> KernelConfig | None:
    """``default_config`` for one launch over every weight of ``weights`` (same method, group and K), its tile width
    narrowed to divide every N, or None when they cannot share one (no common width of at least 16 columns)."""
    qw = weights[0]
    if _odd_one_out(weights) is not None:
        return None
    n = sum(w.num_outputs for w in weights)
    cfg = default_config(num_rows, qw.num_inputs, n, qw.method, qw.group_size, num_cores(interpret))
    common = math.gcd(*(w.num_outputs for w in weights))
    block_n = min(cfg.block_n, common & -common)  # the largest power of two dividing every N, at most the default
    return dataclasses.replace(cfg, block_n=block_n) if block_n >= MIN_DOT_DIM else None


def quantized_matmul_triton_fused(
    x: jax.Array,  # [M, K] bf16 | f16 | f32
    weights,  # QuantizedWeights of one method and group size, each W [K, N_i]
    *,
    out_dtype,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """``x @ W_i`` for every weight in one launch (its N tiles side by side on the grid, one program per tile as for
    a single weight of the summed N); returns the ``[M, N_i]`` products in ``out_dtype``. Several weights need every
    N a multiple of the tile width (``fused_config`` says whether the default config has one)."""
    m, k = x.shape
    qw = weights[0]
    n = sum(w.num_outputs for w in weights)
    cfg = config or default_config(m, k, n, qw.method, qw.group_size, num_cores(interpret))
    odd = _odd_one_out(weights)
    if odd is not None:
        raise ValueError(
            f"fused weights must share method, group size and K; got {odd.method}/{odd.group_size}/"
            f"K={odd.num_inputs} beside {qw.method}/{qw.group_size}/K={qw.num_inputs}"
        )
    for w in weights:
        check_config(cfg, w.method, k, w.group_size)
        if len(weights) > 1 and w.num_outputs % cfg.block_n:
            raise ValueError(f"fused weights need N a multiple of block_n={cfg.block_n}, got N={w.num_outputs}")
    splits = cfg.num_k_splits
    k_split = k // splits
    operands, in_specs, kernel = _shared_operands_and_specs(x, qw.method, cfg, k_split)
    num_shared = len(operands)
    step = step_k(qw.method, cfg, qw.group_size)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
    geos, first = [], 0
    for w in weights:
        num_tiles = _cdiv(w.num_outputs, cfg.block_n)
        w_operands, w_specs = _weight_operands_and_specs(
            w, cfg, k_split, first, num_tiles if len(weights) > 1 else None
        )
        operands, in_specs = operands + w_operands, in_specs + w_specs
        geos.append(_Geometry(m, w.num_outputs, k_split // step, step, precision, first))
        first += num_tiles
    if len(weights) == 1:
        body, name_suffix = functools.partial(kernel, cfg=cfg, geo=geos[0]), ""
    else:
        body = functools.partial(_fused_kernel, kernel=kernel, cfg=cfg, geos=tuple(geos), num_shared=num_shared)
        name_suffix = f"_fused{len(weights)}"
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, cfg.block_m, cfg.block_n), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        body,
        grid=(_cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n), splits),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"quantized_matmul_{qw.method}_m{cfg.block_m}_n{cfg.block_n}_k{step}_s{splits}{name_suffix}",
    )(*operands)
    if splits > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)  # [M, N]
    ends = list(itertools.accumulate(w.num_outputs for w in weights))
    return tuple(out[:, end - w.num_outputs : end] for w, end in zip(weights, ends, strict=True))
