"""The paged KV cache: its size from the memory budget, and its allocation.

Per layer, K and V blocks ``[P, L, K, H]`` (a list of ``(k, v)`` pairs: one per layer, or one per group of layers
``[G * P, L, K, H]``, ``jaxllm.models.kv_cache_layout``), allocated once and donated into every step. On GPU/TPU the
budget is ``gpu_memory_utilization`` of the device memory minus what the weights use and the largest step's
temporaries (measured by compiling it); on CPU, where nothing can be measured, ``kv_cache_memory_bytes`` (default 1
GiB). Under an allocator that keeps no statistics (XLA's VMM allocator) the CUDA driver's free and total memory stand
in (``jaxllm.runner.device_memory``). ``kv_cache_dtype="fp8"`` stores the cache as float8_e4m3fn: one byte per value,
so a budget holds twice the blocks of a bf16 cache (writing and reading it: ``pallas_kernels``).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxllm.config import DEFAULT_CPU_KV_CACHE_BYTES
from jaxllm.models.config import ModelConfig
from jaxllm.models.kv_cache_layout import KVCache, array_max_bytes, array_shapes
from jaxllm.runner.device_memory import DeviceMemory, device_memory

logger = logging.getLogger(__name__)

FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype):
    """The cache's dtype for ``EngineConfig.kv_cache_dtype``: the model's for "auto", float8_e4m3fn for "fp8"."""
    if kv_cache_dtype == "auto":
        return jnp.dtype(model_dtype)
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return jnp.dtype(jnp.float8_e4m3fn)
    raise ValueError(f"kv_cache_dtype must be 'auto' or one of {FP8_KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def measured_device_memory(device) -> DeviceMemory:
    """``device``'s memory figures for sizing the cache; a ``ValueError`` naming the way out where there are none."""
    memory = device_memory(device)
    if memory is None:
        raise ValueError(
            f"{device} reports no memory limit (no allocator statistics and no CUDA driver), so the KV cache cannot "
            "be sized from gpu_memory_utilization: set kv_cache_memory_bytes or num_gpu_blocks_override"
        )
    return memory


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype) -> int:
    per_layer = 2 * block_size * model_config.num_kv_heads * model_config.head_dim * jnp.dtype(dtype).itemsize
    return per_layer * model_config.num_layers


def device_memory_budget(gpu_memory_utilization: float, kv_cache_memory_bytes: int | None) -> int:
    """Bytes the KV cache may take: an explicit budget, else the free share of accelerator memory."""
    if kv_cache_memory_bytes is not None:
        return kv_cache_memory_bytes
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return DEFAULT_CPU_KV_CACHE_BYTES
    memory = measured_device_memory(device)
    usable = int(memory.limit * gpu_memory_utilization)
    in_use = memory.in_use  # the weights (and nothing transient: called between steps)
    budget = usable - in_use
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: {in_use / 2**30:.2f} GiB in use (weights + activation peak) of "
            f"{usable / 2**30:.2f} GiB allowed by gpu_memory_utilization={gpu_memory_utilization}"
        )
    return budget


def kv_cache_shapes(
    model_config: ModelConfig, num_blocks: int, block_size: int, dtype, sharding=None, num_layers: int | None = None
) -> list[tuple[int, ...]]:
    """The shape of each K (and each V) array of a cache of ``num_layers`` layers (default: the model's),
    ``num_blocks`` per layer, placed by ``sharding``: one per layer, or grouped under ``JAXLLM_KV_ARRAY_MAX_BYTES``
    (``jaxllm.models.kv_cache_layout``)."""
    layer_shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)  # [P, L, K, H]
    head_shards = 1 if sharding is None else layer_shape[2] // sharding.shard_shape(layer_shape)[2]
    return array_shapes(num_layers or model_config.num_layers, layer_shape, dtype, array_max_bytes(), head_shards)


def allocate_kv_cache(
    model_config: ModelConfig, num_blocks: int, block_size: int, dtype, sharding=None, num_layers: int | None = None
) -> KVCache:
    """Zeroed K and V blocks laid out as ``kv_cache_shapes`` says."""
    shapes = kv_cache_shapes(model_config, num_blocks, block_size, dtype, sharding, num_layers)
    # One call per array, filled from a runtime scalar: a constant output (or one buffer shared by several outputs)
    # could not be donated, and each step would then allocate a fresh copy of the cache.
    fill = jnp.zeros((), dtype)
    make_filled = {  # one program per distinct shape (with an array per layer: one)
        shape: jax.jit(lambda fill, shape=shape: jnp.full(shape, fill, dtype), out_shardings=sharding)
        for shape in set(shapes)
    }
    caches = [(make_filled[shape](fill), make_filled[shape](fill)) for shape in shapes]
    return jax.block_until_ready(caches)  # an allocation failure surfaces here, not in a later step
