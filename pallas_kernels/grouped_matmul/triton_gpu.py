"""Pallas GPU (Triton lowering) kernel of the grouped matmul over tile-aligned groups.

Grid ``(row tiles, N tiles)``. A program reads its tile's group (one scalar), skips the tile when it has none, and
otherwise walks K in ``block_k`` steps: a ``[block_m, block_k]`` slice of the rows against the group's
``[block_k, block_n]`` weight slice on the tensor cores, accumulated in float32, stored once in the output dtype. Each
weight byte is read once per row tile of its group, so at decode (a few rows per expert, one tile each) a step reads
each chosen expert's weight once and never an unchosen one's.

Every dimension is whole tiles (the plan pads rows to ``block_m``; ``block_n`` / ``block_k`` are chosen to divide N
and K), so no load or store needs a mask. float32 operands multiply at full precision (tests), 16-bit ones on the
tensor cores' default path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul.op import largest_power_of_two_dividing

_NN = (((1,), (0,)), ((), ()))  # [BM, BK] x [BK, BN]
MAX_BLOCK_N = 128
MAX_BLOCK_K = 64


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def default_config(k: int, n: int) -> KernelConfig:
    """Tiles that divide K and N (both multiples of 16, checked by the op)."""
    return KernelConfig(
        block_n=largest_power_of_two_dividing(n, MAX_BLOCK_N), block_k=largest_power_of_two_dividing(k, MAX_BLOCK_K)
    )


def _kernel(groups_ref, lhs_ref, rhs_ref, out_ref, *, block_m: int, cfg: KernelConfig, num_k_steps: int, precision):
    # groups_ref [T] int32; lhs_ref [P, K]; rhs_ref [E, K, N]; out_ref [P, N]
    tile, col_tile = pl.program_id(0), pl.program_id(1)  # read outside the branch (interpret mode needs that)
    group = groups_ref[tile]
    rows = pl.ds(pl.multiple_of(tile * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(col_tile * cfg.block_n, cfg.block_n), cfg.block_n)

    @pl.when(group >= 0)
    def _():
        def step(i, acc):
            k0 = pl.multiple_of(i * cfg.block_k, cfg.block_k)
            x = lhs_ref[rows, pl.ds(k0, cfg.block_k)]  # [BM, BK]
            w = rhs_ref[group, pl.ds(k0, cfg.block_k), cols]  # [BK, BN]
            return acc + lax.dot_general(x, w, _NN, precision=precision, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, num_k_steps, step, jnp.zeros((block_m, cfg.block_n), jnp.float32))
        out_ref[rows, cols] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "out_dtype", "interpret", "config"))
def grouped_matmul_triton(
    lhs, rhs, tile_groups, *, block_m: int, out_dtype, interpret: bool = False, config: KernelConfig | None = None
):
    num_slots, k = lhs.shape
    n = rhs.shape[2]
    cfg = config or default_config(k, n)
    rhs = rhs.astype(lhs.dtype)
    precision = lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, block_m=block_m, cfg=cfg, num_k_steps=k // cfg.block_k, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(num_slots // block_m, n // cfg.block_n),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((num_slots, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"grouped_matmul_m{block_m}_n{cfg.block_n}_k{cfg.block_k}",
    )(tile_groups, lhs, rhs)
