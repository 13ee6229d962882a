"""Grouped matmul over tile-aligned groups (a mixture of experts' projections): each tile of rows of the left operand
is multiplied by its own group's right operand. ``plan_tiles`` lays routed rows out so every tile holds one group."""

from pallas_kernels.grouped_matmul.op import IMPLS, MIN_DIM, TilePlan, default_impl, grouped_matmul, plan_tiles

__all__ = ["IMPLS", "MIN_DIM", "TilePlan", "default_impl", "grouped_matmul", "plan_tiles"]
