"""Pallas TPU (Mosaic) kernels of the quantized matmul: dequantize in VMEM, multiply on the MXU in the activation
dtype with an f32 accumulator in VMEM scratch.

Grid ``(M tiles, N tiles, K steps)``, the K axis innermost and sequential ("arbitrary"): a program adds one
``[block_m, block_k] x [block_k, block_n]`` product to its accumulator and the last K step applies the scales and
writes the tile. int4 steps cover ``block_k / group_size`` whole groups, unrolled, each group's scale applied to its
partial product; the int4 scales of an N tile stay resident in VMEM for the whole K walk. fp8 tiles are upcast to
bf16 (exact) before the MXU.

Block shapes follow Mosaic's rules: the last two dimensions of every block are multiples of (8, 128) or the whole
array dimension, so ``block_n`` and ``block_k`` either divide N and K in multiples of 128 or span them; only the M
axis may end in a partial tile (its extra rows are dropped on the store). Verified only in interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.quantization.schemes import INT4_OFFSET, QuantizedWeight, quantize_activations_fp8

_NN = (((1,), (0,)), ((), ()))  # [BM, BK] x [BK, BN]
_NT = (((1,), (1,)), ((), ()))  # [BM, BK] x [BN, BK]
_LANES = 128


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Tile shape of one launch."""

    block_m: int  # rows per tile: a multiple of 16, or M
    block_n: int  # a multiple of 128 dividing N, or N
    block_k: int  # a multiple of 128 (and of group_size for int4) dividing K, or K


def _largest_dividing(total: int, candidates, multiple_of: int = 1) -> int:
    for size in candidates:
        if total % size == 0 and size % multiple_of == 0:
            return size
    return total


def default_config(num_rows: int, k: int, n: int, group_size: int | None = None) -> TpuConfig:
    """Whole M up to 512 rows (decode reads each weight tile once), 256-row tiles beyond."""
    block_m = num_rows if num_rows <= 512 else 256
    block_n = _largest_dividing(n, (512, 256, 128))
    block_k = _largest_dividing(k, (1024, 512, 256, 128), group_size or 1)
    return TpuConfig(block_m, block_n, block_k)


def check_config(cfg: TpuConfig, m: int, k: int, n: int, group_size: int | None) -> None:
    """ValueError unless ``cfg`` obeys the block rules above for this product."""
    if not (cfg.block_m == m or (cfg.block_m % 16 == 0 and cfg.block_m <= m)):
        raise ValueError(f"block_m={cfg.block_m} must be a multiple of 16 no larger than M={m}, or M")
    for name, size, total in (("block_n", cfg.block_n, n), ("block_k", cfg.block_k, k)):
        if total % size or (size != total and size % _LANES):
            raise ValueError(f"{name}={size} must divide {total} in multiples of {_LANES}, or equal it")
    if group_size and cfg.block_k % group_size:
        raise ValueError(f"int4 block_k={cfg.block_k} must be a multiple of group_size {group_size}")


def _dot(a, b, dimension_numbers=_NN):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)


def _accumulate_and_finish(acc_ref, out_ref, partial, finish):
    """Add this K step's ``partial [BM, BN]``; on the last step write ``finish(acc)`` to the output tile."""
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _():
        acc_ref[...] = partial

    @pl.when(k_step > 0)
    def _():
        acc_ref[...] += partial

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _():
        out_ref[...] = finish(acc_ref[...]).astype(out_ref.dtype)


def _int8_kernel(x_ref, w_ref, s_ref, out_ref, acc_ref):
    # x_ref [BM, BK]; w_ref [BK, BN] int8; s_ref [1, BN] f32; out_ref [BM, BN]; acc_ref [BM, BN] f32
    partial = _dot(x_ref[...], w_ref[...].astype(jnp.float32).astype(x_ref.dtype))
    _accumulate_and_finish(acc_ref, out_ref, partial, lambda acc: acc * s_ref[...])


def _int4_kernel(x_ref, w_ref, s_ref, out_ref, acc_ref, *, group_size: int):
    # x_ref [BM, BK]; w_ref [BK/2, BN] uint8; s_ref [K/g, BN] f32 (every group of the N tile); out/acc [BM, BN]
    half = group_size // 2
    groups_per_step = x_ref.shape[1] // group_size
    first_group = pl.program_id(2) * groups_per_step
    partial = jnp.zeros(acc_ref.shape, jnp.float32)
    for group in range(groups_per_step):
        codes = w_ref[group * half : (group + 1) * half, :].astype(jnp.int32)  # [g/2, BN]
        low = ((codes & 0xF) - INT4_OFFSET).astype(jnp.float32).astype(x_ref.dtype)
        high = ((codes >> 4) - INT4_OFFSET).astype(jnp.float32).astype(x_ref.dtype)
        start = group * group_size
        products = _dot(x_ref[:, start : start + half], low) + _dot(x_ref[:, start + half : start + group_size], high)
        partial += products * s_ref[pl.ds(first_group + group, 1), :]  # [BM, BN] * [1, BN]
    _accumulate_and_finish(acc_ref, out_ref, partial, lambda acc: acc)


def _fp8_kernel(x_ref, xs_ref, w_ref, s_ref, out_ref, acc_ref):
    # x_ref [BM, BK] e4m3; xs_ref [BM, 1] f32; w_ref [BN, BK] e4m3; s_ref [1, BN] f32; out/acc [BM, BN]
    x = x_ref[...].astype(jnp.float32).astype(jnp.bfloat16)  # e4m3 values are exact in bf16
    w = w_ref[...].astype(jnp.float32).astype(jnp.bfloat16)
    partial = _dot(x, w, _NT)
    _accumulate_and_finish(acc_ref, out_ref, partial, lambda acc: acc * xs_ref[...] * s_ref[...])


def _operands_and_specs(x, qw: QuantizedWeight, cfg: TpuConfig):
    """Kernel inputs and their BlockSpecs on the grid (M tile i, N tile j, K step k)."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    column_scale_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    if qw.method == "int8":
        specs = [
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            column_scale_spec,
        ]
        return (x, qw.values, qw.scales.reshape(1, -1)), specs, _int8_kernel
    if qw.method == "int4":
        specs = [
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk // 2, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((qw.scales.shape[0], bn), lambda i, j, k: (0, j)),
        ]
        return (x, qw.values, qw.scales), specs, functools.partial(_int4_kernel, group_size=qw.group_size)
    x_values, x_scales = quantize_activations_fp8(x)  # [M, K], [M]
    specs = [
        pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
        pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)),
        pl.BlockSpec((bn, bk), lambda i, j, k: (j, k)),
        column_scale_spec,
    ]
    return (x_values, x_scales.reshape(-1, 1), qw.values, qw.scales.reshape(1, -1)), specs, _fp8_kernel


def quantized_matmul_tpu(
    x: jax.Array,  # [M, K] bf16 | f16 | f32
    qw: QuantizedWeight,
    *,
    out_dtype,
    config: TpuConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x @ W`` for a quantized ``W [K, N]``; returns ``[M, N]`` in ``out_dtype``."""
    m, k = x.shape
    n = qw.num_outputs
    cfg = config or default_config(m, k, n, qw.group_size)
    check_config(cfg, m, k, n, qw.group_size)
    operands, in_specs, kernel = _operands_and_specs(x, qw, cfg)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, cfg.block_m), n // cfg.block_n, k // cfg.block_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((cfg.block_m, cfg.block_n), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((cfg.block_m, cfg.block_n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"quantized_matmul_{qw.method}_m{cfg.block_m}_n{cfg.block_n}_k{cfg.block_k}",
    )(*operands)
