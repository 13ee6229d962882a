"""How the paged KV cache's layers share arrays: a few pairs of K and V arrays, each holding several layers' blocks.

Every array of the cache is donated into every step's program, and a donated argument costs the host far more per
call than a read-only one (on four H200s, ~6 us per donated array against ~0.7 us per read-only one, which also
handles the outputs that replace it; benchmarks/RESULTS.md, session 36): with one K and one V array per layer, the
Llama-3.1-8B shape's 64 cache arrays cost each tensor-parallel-4 step ~0.38 ms of launch time. So the layers are
grouped: array pair ``c`` holds layers ``[c * G, (c + 1) * G)`` (``G = layers_per_array``), layer ``i``'s ``P`` blocks
being blocks ``[j * P, (j + 1) * P)`` of it (``j = i - c * G``). A layer reads and writes only its own range: its
attention adds ``j * P`` to the step's block tables and ``j * P * L`` to its slot mapping (``AttentionMetadata``'s
logical block ids are the same for every layer), so the attention kernels see one paged cache as before. Padding
tokens write each layer's own null block (block ``j * P``), never another layer's.

An array holds whole layers (at least one) and at most ``MAX_ARRAY_ROWS`` rows of ``H`` values: the Triton attention
kernel addresses a cache as ``[P * L * K, H]`` rows with int32 row indices. Pallas' Triton lowering then computes
element offsets in 32 bits for arrays of at most 4 GiB and in 64 bits above, so a one-byte (fp8) array of 2 to 4 GiB
would overflow them: such a cache is split into arrays of at most 2 GiB. At the shapes served the row limit is never
the bound (the Llama-3.1-8B shape's whole bf16 cache on a 140 GB GPU is ~0.25 G rows), so a stage's cache is one K
and one V array, or a few for an fp8 cache of 2 to 4 GiB.
"""

from __future__ import annotations

import math

import jax
import numpy as np

MAX_ARRAY_ROWS = 2**31 - 1  # of H values: a [P * L * K, H] view's int32 row index

# one (k, v) pair per group of layers, each [G * P, L, K, H]
KVCache = list[tuple[jax.Array, jax.Array]]


def layers_per_array(num_layers: int, layer_shape: tuple[int, ...], itemsize: int) -> int:
    """How many layers of ``layer_shape`` (one layer's ``[P, L, K, H]``, ``itemsize`` bytes a value) share an array: as
    few arrays as the limits allow, the layers spread evenly over them (so ``layer_ranges`` can tell the grouping from
    the arrays); one layer each at worst, as the cache was laid out before."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    for num_arrays in range(1, num_layers + 1):
        group = -(-num_layers // num_arrays)
        sizes = {min(group, num_layers - first) for first in range(0, num_layers, group)}
        if all(_fits(layers, layer_shape, itemsize) for layers in sizes):
            return group
    return 1


def _fits(layers: int, layer_shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether ``layers`` layers fit one array: its rows within the kernel's int32 index, and no one-byte array of 2 to
    4 GiB (the module docstring says why)."""
    rows = layers * math.prod(layer_shape[:-1])
    num_bytes = layers * math.prod(layer_shape) * itemsize
    return rows <= MAX_ARRAY_ROWS and (itemsize > 1 or not 2**31 < num_bytes <= 2**32)


def array_shapes(num_layers: int, layer_shape: tuple[int, ...], dtype) -> list[tuple[int, ...]]:
    """The shape of each array (of K, and likewise of V) holding ``num_layers`` layers of ``layer_shape`` in
    ``dtype``."""
    group = layers_per_array(num_layers, layer_shape, np.dtype(dtype).itemsize)
    num_blocks, *rest = layer_shape
    return [(min(group, num_layers - first) * num_blocks, *rest) for first in range(0, num_layers, group)]


def layer_ranges(kv_caches: KVCache, num_layers: int) -> list[tuple[int, int]]:
    """Per layer, ``(array index, first block)``: where its blocks are in ``kv_caches`` (laid out as ``array_shapes``
    lays out ``num_layers`` layers). Static: read from the arrays' shapes while tracing."""
    if not kv_caches:
        raise ValueError("the KV cache has no arrays")
    group = -(-num_layers // len(kv_caches))
    ranges = []
    for index, (k_cache, _) in enumerate(kv_caches):
        layers_here = min(group, num_layers - index * group)
        if layers_here < 1 or k_cache.shape[0] % layers_here:
            raise ValueError(
                f"KV cache array {index} of shape {tuple(k_cache.shape)} does not hold {layers_here} layers' blocks "
                f"({len(kv_caches)} arrays for {num_layers} layers)"
            )
        blocks = k_cache.shape[0] // layers_here
        ranges.extend((index, j * blocks) for j in range(layers_here))
    if len(ranges) != num_layers:
        raise ValueError(f"{len(kv_caches)} KV cache arrays hold {len(ranges)} layers, not {num_layers}")
    return ranges
