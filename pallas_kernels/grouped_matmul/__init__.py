"""Grouped matmul over tile-aligned groups (a mixture of experts' projections): each tile of rows of the left operand
is multiplied by its own group's right operand. ``plan_tiles`` lays routed rows out so every tile holds one group.
``pair_swiglu`` / ``pair_matmul``: the same products one routed row at a time, no plan (small steps)."""

from pallas_kernels.grouped_matmul.op import IMPLS, MIN_DIM, TilePlan, default_impl, grouped_matmul, plan_tiles
from pallas_kernels.grouped_matmul.pair_gemv import pair_matmul, pair_swiglu

__all__ = ["IMPLS", "MIN_DIM", "TilePlan", "default_impl", "grouped_matmul", "pair_matmul", "pair_swiglu", "plan_tiles"]
