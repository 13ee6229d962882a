"""How much memory an accelerator has and holds: JAX's allocator statistics, else the CUDA driver's figures.

JAX's pooling allocators report ``memory_stats()`` (the pool's limit, bytes in use, the peak). XLA's VMM allocator,
which ``XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP`` selects for the whole process, keeps no statistics
and no pool; there the CUDA driver's ``cuMemGetInfo`` (the device's free and total bytes, every process's use
included) stands in, as in engines built on PyTorch's ``torch.cuda.mem_get_info``. No peak is known then: whoever
sizes a cache must add the step's temporaries from the compiled programs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    limit: int  # bytes the engine may plan with at gpu_memory_utilization=1.0
    in_use: int  # bytes held now
    peak: int | None  # the most held since start-up; None where nobody counts it
    source: str  # "jax" or "cuda driver"


def device_memory(device) -> DeviceMemory | None:
    """``device``'s memory figures; None where neither JAX nor the CUDA driver gives them (CPU, say)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        in_use = int(stats.get("bytes_in_use", 0))
        return DeviceMemory(int(stats["bytes_limit"]), in_use, int(stats.get("peak_bytes_in_use", in_use)), "jax")
    if device.platform != "gpu":
        return None
    driver = _cuda_driver()
    if driver is None:
        return None
    free, total = _cuda_free_and_total(driver, device.local_hardware_id)
    return DeviceMemory(limit=total, in_use=total - free, peak=None, source="cuda driver")


@functools.cache
def _cuda_driver():
    """The CUDA driver library (loaded once), or None where there is none (ROCm, say)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        logger.info("no CUDA driver library: device memory comes from JAX's allocator statistics only")
        return None
    _check(driver.cuInit(0), "cuInit")
    return driver


def _cuda_free_and_total(driver, ordinal: int) -> tuple[int, int]:
    """Free and total bytes of CUDA device ``ordinal``, read in its primary context (the one XLA uses)."""
    device, context = ctypes.c_int(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _check(driver.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
    _check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    try:
        _check(driver.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
        try:
            _check(driver.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        finally:
            driver.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        driver.cuDevicePrimaryCtxRelease_v2(device)
    return int(free.value), int(total.value)


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"CUDA driver call {call} failed with CUresult {result}")
