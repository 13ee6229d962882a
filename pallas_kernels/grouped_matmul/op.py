"""The public grouped matmul: a tile plan for routed rows, validation, and the backend switch.

A mixture of experts multiplies each (token, expert) pair's row by that expert's weight. ``plan_tiles`` sorts the
pairs by expert and pads each expert's run to a multiple of ``block_m`` rows, so every ``block_m``-row tile of the
laid-out rows belongs to one expert (``tile_groups``; -1 for the tiles past the last expert's). ``grouped_matmul``
then multiplies tile ``t`` of ``lhs [P, K]`` by ``rhs[tile_groups[t]]`` (``rhs [E, K, N]``): one expert weight read
per tile, whatever the tokens' order, as vLLM's fused MoE kernels align blocks.

Backends (``impl=``): ``"reference"`` (pure jnp: each tile's weight gathered, one batched product; any platform),
``"pallas_gpu"`` (the Pallas Triton kernel in ``triton_gpu``) and ``"pallas_gpu_interpret"`` (its body interpreted on
CPU). Rows of tiles whose group is -1 are unspecified in the output (the kernel skips them; nothing reads them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IMPLS = ("reference", "pallas_gpu", "pallas_gpu_interpret")
DTYPES = ("bfloat16", "float16", "float32")
MIN_DIM = 16  # K and N must be multiples of this (Triton's smallest tensor-core tile edge)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Where routed rows go. ``slot_of_row [R]``: the laid-out row of routed row r (rows in ``group_ids`` order);
    ``row_of_slot [P]``: the routed row each laid-out row holds (padding slots hold row 0, a harmless copy);
    ``tile_groups [P // block_m]``: each tile's group, -1 past the last."""

    slot_of_row: jax.Array
    row_of_slot: jax.Array
    tile_groups: jax.Array
    block_m: int


def default_impl(platform: str | None = None) -> str:
    """``pallas_gpu`` on a GPU, else ``reference``."""
    return "pallas_gpu" if (platform or jax.default_backend()) == "gpu" else "reference"


def largest_power_of_two_dividing(n: int, at_most: int) -> int:
    """The largest power of two up to ``at_most`` (itself one) that divides ``n``: the kernels' block edges."""
    block = at_most
    while n % block:
        block //= 2
    return block


def num_slots(num_rows: int, num_groups: int, block_m: int) -> int:
    """The laid-out rows ``plan_tiles`` needs at most: every non-empty group (at most ``min(E, R)``) pads by less
    than ``block_m`` rows."""
    padded = num_rows + min(num_groups, num_rows) * (block_m - 1)
    return -(-padded // block_m) * block_m


def plan_tiles(group_ids: jax.Array, num_groups: int, block_m: int, num_valid: jax.Array | None = None) -> TilePlan:
    """The tile layout of routed rows whose groups are ``group_ids [R]`` (int32 in ``[0, num_groups]``: a row of
    group ``num_groups``, e.g. another device's expert, is laid out nowhere). With ``num_valid`` (a traced count) only
    the first ``num_valid`` rows are laid out: the rest (a step's padding) get no slot of their own and no tile. A row
    laid out nowhere has ``slot_of_row`` 0, a valid row's slot, so reading it back is harmless."""
    num_rows = group_ids.shape[0]
    if num_valid is not None:
        group_ids = jnp.where(jnp.arange(num_rows) < num_valid, group_ids, num_groups)  # past every group
    order = jnp.argsort(group_ids, stable=True)  # routed rows by group, the padding last
    counts = jnp.bincount(group_ids, length=num_groups)  # the padding's out-of-range id is not counted
    padded = -(-counts // block_m) * block_m
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    starts = jnp.cumsum(counts) - counts
    size = num_slots(num_rows, num_groups, block_m)
    sorted_groups = group_ids[order]
    in_group = sorted_groups < num_groups
    safe_groups = jnp.minimum(sorted_groups, num_groups - 1)
    sorted_slots = padded_starts[safe_groups] + jnp.arange(num_rows) - starts[safe_groups]
    sorted_slots = jnp.where(in_group, sorted_slots, size).astype(jnp.int32)  # size: dropped by the scatters
    slot_of_row = jnp.zeros(num_rows, jnp.int32).at[order].set(jnp.where(in_group, sorted_slots, 0))
    row_of_slot = jnp.zeros(size, jnp.int32).at[sorted_slots].set(order.astype(jnp.int32), mode="drop")
    tile_starts = jnp.arange(size // block_m) * block_m
    # compare_all: one fused comparison (the default "scan" method is a while loop of log2(E) dependent iterations)
    tile_groups = jnp.searchsorted(padded_ends, tile_starts, side="right", method="compare_all").astype(jnp.int32)
    tile_groups = jnp.where(tile_starts < padded_ends[-1], tile_groups, -1)
    return TilePlan(slot_of_row, row_of_slot, tile_groups, block_m)


def _validate(lhs, rhs, tile_groups, block_m: int) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"lhs must be [P, K] and rhs [E, K, N], got shapes {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs has K={lhs.shape[1]} columns but rhs is [E, K, N] = {list(rhs.shape)}")
    if lhs.shape[0] % block_m or tile_groups.shape != (lhs.shape[0] // block_m,):
        raise ValueError(
            f"lhs rows ({lhs.shape[0]}) must be whole tiles of block_m={block_m}, one tile_groups entry each "
            f"(got {tile_groups.shape})"
        )
    for name, array in (("lhs", lhs), ("rhs", rhs)):
        if jnp.dtype(array.dtype).name not in DTYPES:
            raise TypeError(f"{name} must have dtype in {DTYPES}, got {array.dtype}")


def _validate_kernel_shapes(lhs, rhs, block_m: int) -> None:
    k, n = rhs.shape[1:]
    if k % MIN_DIM or n % MIN_DIM:
        raise ValueError(
            f"the Pallas kernel needs K and N multiples of {MIN_DIM}, got rhs [E, K, N] = {list(rhs.shape)}"
        )
    if block_m < MIN_DIM or block_m & (block_m - 1):
        raise ValueError(f"the Pallas kernel needs block_m a power of two >= {MIN_DIM}, got {block_m}")


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, tile_groups: jax.Array, *, block_m: int, impl: str | None = None, out_dtype=None
) -> jax.Array:
    """``out[t*bm:(t+1)*bm] = lhs[t*bm:(t+1)*bm] @ rhs[tile_groups[t]]`` for every tile ``t`` with a group, products
    accumulated in float32 and returned in ``out_dtype`` (default ``lhs``'s dtype)."""
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _validate(lhs, rhs, tile_groups, block_m)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if impl == "reference":
        return _reference(lhs, rhs, tile_groups, block_m, out_dtype)
    _validate_kernel_shapes(lhs, rhs, block_m)
    from pallas_kernels.grouped_matmul import triton_gpu

    return triton_gpu.grouped_matmul_triton(
        lhs, rhs, tile_groups, block_m=block_m, out_dtype=out_dtype, interpret=impl.endswith("_interpret")
    )


def _reference(lhs, rhs, tile_groups, block_m: int, out_dtype) -> jax.Array:
    tiles = lhs.reshape(-1, block_m, lhs.shape[1])  # [T, bm, K]
    weights = rhs[jnp.maximum(tile_groups, 0)]  # [T, K, N]
    out = jnp.einsum("tmk,tkn->tmn", tiles, weights, preferred_element_type=jnp.float32)
    out = jnp.where((tile_groups >= 0)[:, None, None], out, 0)
    return out.reshape(lhs.shape[0], rhs.shape[2]).astype(out_dtype)
