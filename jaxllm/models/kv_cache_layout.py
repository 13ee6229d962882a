"""How the paged KV cache's layers share arrays: one K and one V array per layer (the default), or, with
``JAXLLM_KV_ARRAY_MAX_BYTES`` (experimental), few arrays each holding several layers' blocks.

Why grouping: every array of the cache is donated into every step's program, and a donated argument costs the host far
more per call than a read-only one (on four H200s ~6-9 us per donated array against ~0.7 us per read-only one, the
outputs that replace it included; benchmarks/RESULTS.md, session 36): the Llama-3.1-8B shape's 64 per-layer arrays
take ~0.38 ms of each tensor-parallel-4 step's launch. Grouped, array pair ``c`` holds layers ``[c * G, (c + 1) * G)``
(``G = layers_per_array``), layer ``i``'s ``P`` blocks being blocks ``[j * P, (j + 1) * P)`` of it (``j = i - c * G``).
A layer reads and writes only its own range: its attention adds ``j * P`` to the step's block tables and ``j * P * L``
to its slot mapping (``AttentionMetadata``'s logical block ids are the same for every layer), so the attention kernels
see one paged cache as before; padding tokens write each layer's own null block (block ``j * P``). Measured (the
8B shape, 32 layers, batch 1; benchmarks/RESULTS.md, sessions 36-38): one array per stage made TP 2's launch 0.8 ms
shorter but not its step (4.54-4.58 against 4.18-4.46 ms). On one H200, with the cache filling the GPU, arrays of 8
to 32 layers (13.6 GiB and more) added ~0.5 ms (5.37-5.44 ms): XLA's rematerialization pass, its memory estimate
counting a shared array more than once, recomputed 231 instructions of every step. The step programs now compile
without that pass (``jaxllm.runner.xla_options``), and one K and one V array of all 32 layers costs one GPU nothing
(4.84-4.86 against 4.83-4.84 ms). Off until measured where the launch bounds the step (TP 2 and 4).

``JAXLLM_KV_ARRAY_MAX_BYTES=N`` groups layers into arrays of at most ``N`` bytes per device (a layer over ``N``
still gets one); unset or 0: one layer per array (except for fp8 layers of 2 to 4 GiB, below). Whatever ``N``, an
array holds at most ``MAX_ARRAY_ROWS`` rows of ``H`` values per device: the Triton attention kernel addresses a
device's cache as ``[P * L * K, H]`` rows with int32 row indices. Pallas' Triton lowering then computes element
offsets in 32 bits for arrays of at most 4 GiB and in 64 bits above (``N = 4294967296`` keeps them 32-bit), so a
one-byte (fp8) array of 2 to 4 GiB would overflow them: no such array is made, not even in the default layout, whose
fp8 layers of that size share arrays (on an H200 the Triton attention kernel faults reading such an array past
2**31 values: ``tests/gpu/test_large_kv_cache_gpu.py``). A one-layer model's cannot.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

MAX_ARRAY_ROWS = 2**31 - 1  # of H values: a [P * L * K, H] view's int32 row index
ARRAY_MAX_BYTES_ENV = "JAXLLM_KV_ARRAY_MAX_BYTES"
NO_BYTE_LIMIT = 2**62

# one (k, v) pair per group of layers, each [G * P, L, K, H]
KVCache = list[tuple[jax.Array, jax.Array]]


def array_max_bytes() -> int | None:
    """``JAXLLM_KV_ARRAY_MAX_BYTES``: None (one layer per array) when unset or 0, else the bytes an array may hold;
    ValueError naming the variable for anything but a non-negative integer."""
    setting = os.environ.get(ARRAY_MAX_BYTES_ENV, "0")
    if not setting.isdigit():
        raise ValueError(f"{ARRAY_MAX_BYTES_ENV} must be a non-negative integer (bytes), got {setting!r}")
    return int(setting) or None


def layers_per_array(num_layers: int, layer_shape: tuple[int, ...], itemsize: int, max_bytes: int | None) -> int:
    """How many layers of ``layer_shape`` (one layer's ``[P, L, K, H]`` on one device, ``itemsize`` bytes a value)
    share an array: as few arrays of at most ``max_bytes`` as the limits allow, the layers spread evenly over them (so
    ``layer_ranges`` can tell the grouping from the arrays); one layer each at worst. ``max_bytes`` None (the default
    layout): one layer per array, unless one layer's array would be a one-byte array of 2 to 4 GiB: then as few as
    fit."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if max_bytes is None:
        layer_bytes = math.prod(layer_shape) * itemsize
        if num_layers == 1 or _fits(1, layer_shape, itemsize, layer_bytes):
            return 1
        max_bytes = NO_BYTE_LIMIT  # an fp8 layer of 2 to 4 GiB: layers grouped, arrays over 4 GiB (64-bit offsets)
    for num_arrays in range(1, num_layers + 1):
        group = -(-num_layers // num_arrays)
        sizes = {min(group, num_layers - first) for first in range(0, num_layers, group)}
        if all(_fits(layers, layer_shape, itemsize, max_bytes) for layers in sizes):
            return group
    return 1


def _fits(layers: int, layer_shape: tuple[int, ...], itemsize: int, max_bytes: int) -> bool:
    """Whether ``layers`` layers fit one array: at most ``max_bytes``, its rows within the kernel's int32 index, and no
    one-byte array of 2 to 4 GiB (the module docstring says why)."""
    rows = layers * math.prod(layer_shape[:-1])
    num_bytes = layers * math.prod(layer_shape) * itemsize
    fp8_overflow = itemsize == 1 and 2**31 < num_bytes <= 2**32
    return num_bytes <= max_bytes and rows <= MAX_ARRAY_ROWS and not fp8_overflow


def array_shapes(
    num_layers: int, layer_shape: tuple[int, ...], dtype, max_bytes: int | None = None, head_shards: int = 1
) -> list[tuple[int, ...]]:
    """The shape of each array (of K, and likewise of V) holding ``num_layers`` layers of ``layer_shape`` in ``dtype``,
    grouped by ``max_bytes`` per device (None: one layer per array; engines pass ``array_max_bytes()``), each device
    holding ``1 / head_shards`` of the KV heads (tensor parallelism): the limits are a device's."""
    num_blocks, block_size, num_kv_heads, head_dim = layer_shape
    if num_kv_heads % head_shards:
        raise ValueError(f"{num_kv_heads} KV heads do not split over {head_shards} devices")
    device_layer = (num_blocks, block_size, num_kv_heads // head_shards, head_dim)
    group = layers_per_array(num_layers, device_layer, np.dtype(dtype).itemsize, max_bytes)
    return [
        (min(group, num_layers - first) * num_blocks, block_size, num_kv_heads, head_dim)
        for first in range(0, num_layers, group)
    ]


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
