"""Pallas GPU (Triton lowering) kernels of the per-pair expert products (``pair_gemv``).

Grid ``(pairs, N tiles, K splits)``, the pairs fastest, so the programs in flight together read the same columns of
whichever experts their pairs chose (a weight two pairs share comes from L2 the second time). A program reads its
pair's expert id, does nothing when the pair is padding, and otherwise walks its split of K in ``block_k`` steps: the
row's ``[block_k]`` slice times the expert's ``[block_k, block_n]`` slice, summed over K on the CUDA cores in float32
(a matrix-vector product: one row per expert leaves the tensor cores nothing to do, and the step reads weights at
memory speed either way). Each program stores its split's float32 partial sums (``[splits, P, N]``); the caller adds
the splits up (an XLA fusion) and masks the padding pairs, whose partials are never written.

K is split so that one token's ``top_k`` pairs alone fill the GPU (``TARGET_PROGRAMS``): at batch 1 a Qwen3-30B-A3B
layer has 8 pairs, whose unsplit gate / up products are 96 programs of 12 K steps, too few loads in flight to read
at memory speed (about 1 TB/s on an H100 against 2.4 TB/s from 16 tokens' 1,536 programs). Given two weights
(gate and up), a program carries two accumulators over one pass of the row.

Every dimension is whole tiles (``block_n`` / ``block_k`` divide N and K's split, multiples of 16): nothing is masked.
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

MAX_BLOCK_N = 64
MAX_BLOCK_K = 256
TARGET_PROGRAMS = 1024  # programs for one token's pairs (about 8 per SM of an H100's 132) that the K split aims at


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    splits: int = 1  # K splits, each its own programs (K / splits a multiple of block_k)
    num_warps: int = 4
    num_stages: int = 3


def default_config(k: int, n: int, top_k: int) -> GemvConfig:
    """``block_n`` up to 64; K split in the most powers of two that keep one token's programs (``top_k`` pairs times
    the N tiles) within ``TARGET_PROGRAMS`` and each split a multiple of 16; ``block_k`` up to 256 within a split."""
    block_n = largest_power_of_two_dividing(n, MAX_BLOCK_N)
    programs, splits = top_k * (n // block_n), 1
    while programs * splits * 2 <= TARGET_PROGRAMS and (k // (splits * 2)) % 16 == 0 and k % (splits * 2) == 0:
        splits *= 2
    return GemvConfig(block_n, largest_power_of_two_dividing(k // splits, MAX_BLOCK_K), splits)


def _row_times_weights(row_ref, row, weight_refs, expert, cols, split, cfg: GemvConfig, num_k_steps: int):
    """``row_ref[row] @ w[expert][:, cols]`` over K split ``split``, for each ``w`` of ``weight_refs``: float32
    ``[block_n]`` vectors."""
    first = split * num_k_steps * cfg.block_k

    def step(i, accs):
        ks = pl.ds(pl.multiple_of(first + i * cfg.block_k, cfg.block_k), cfg.block_k)
        x = row_ref[row, ks].astype(jnp.float32)[:, None]  # [BK, 1]
        return tuple(
            acc + jnp.sum(x * w_ref[expert, ks, cols].astype(jnp.float32), axis=0)
            for acc, w_ref in zip(accs, weight_refs, strict=True)
        )

    zeros = tuple(jnp.zeros((cfg.block_n,), jnp.float32) for _ in weight_refs)
    return lax.fori_loop(0, num_k_steps, step, zeros)


def _kernel(count_ref, ids_ref, row_ref, *refs, rows_per_token: int, cfg: GemvConfig, num_k_steps: int):
    # count_ref [1]; ids_ref [P]; row_ref [rows, K]; refs: the weights [E, K, N] then as many outputs [S, P, N]
    pair, col_tile, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert = ids_ref[pair]
    weight_refs, out_refs = refs[: len(refs) // 2], refs[len(refs) // 2 :]
    cols = pl.ds(pl.multiple_of(col_tile * cfg.block_n, cfg.block_n), cfg.block_n)

    @pl.when(pair < count_ref[0])
    def _():
        row = pair // rows_per_token
        accs = _row_times_weights(row_ref, row, weight_refs, expert, cols, split, cfg, num_k_steps)
        for out_ref, acc in zip(out_refs, accs, strict=True):
            out_ref[split, pair, cols] = acc


@functools.partial(jax.jit, static_argnames=("rows_per_token", "top_k", "interpret", "config"))
def pair_partials_triton(
    rows, expert_ids, weights, count, *, rows_per_token: int, top_k: int, interpret=False, config=None
):
    """Pair ``p`` (of ``expert_ids [P]``, ``top_k`` per token) times ``w[expert_ids[p]]`` for each ``w`` of
    ``weights`` (``[E, K, N]`` each), its row ``rows[p // rows_per_token]``: per weight the float32 partial sums
    ``[splits, P, N]`` of the K splits, unwritten for pairs at or past ``count[0]``."""
    k, n = weights[0].shape[1:]
    num_pairs = expert_ids.shape[0]
    cfg = config or default_config(k, n, top_k)
    num_k_steps = k // cfg.splits // cfg.block_k
    partials = jax.ShapeDtypeStruct((cfg.splits, num_pairs, n), jnp.float32)
    return pl.pallas_call(
        functools.partial(_kernel, rows_per_token=rows_per_token, cfg=cfg, num_k_steps=num_k_steps),
        grid=(num_pairs, n // cfg.block_n, cfg.splits),
        in_specs=[pl.no_block_spec] * (3 + len(weights)),
        out_specs=[pl.no_block_spec] * len(weights),
        out_shape=[partials] * len(weights),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"pair_gemv{len(weights)}_n{cfg.block_n}_k{cfg.block_k}_s{cfg.splits}",
    )(count, expert_ids, rows.astype(weights[0].dtype), *weights)
