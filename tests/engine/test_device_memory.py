"""Device memory figures for KV-cache sizing: JAX's allocator statistics, else the CUDA driver's free / total (XLA's
VMM allocator keeps no statistics). The driver is faked here; the GPU machine's test suite reads the real one."""

import ctypes

import pytest

from jaxllm.runner import device_memory as device_memory_module
from jaxllm.runner.device_memory import DeviceMemory, device_memory

GIB = 1 << 30


class FakeDevice:
    platform = "gpu"
    local_hardware_id = 3

    def __init__(self, stats=None):
        self.stats = stats

    def memory_stats(self):
        return self.stats

    def __str__(self):
        return "cuda:3"


class FakeCudaDriver:
    """The CUDA driver calls ``device_memory`` makes, with ctypes by-reference arguments as the real library gets."""

    def __init__(self, free: int, total: int):
        self.free, self.total = free, total
        self.calls = []
        self.context_depth = 0

    def cuDeviceGet(self, device_ref, ordinal):
        self.calls.append(("cuDeviceGet", ordinal))
        device_ref._obj.value = ordinal
        return 0

    def cuDevicePrimaryCtxRetain(self, context_ref, device):
        context_ref._obj.value = 0x1234
        return 0

    def cuCtxPushCurrent_v2(self, context):
        self.context_depth += 1
        return 0

    def cuMemGetInfo_v2(self, free_ref, total_ref):
        assert self.context_depth == 1, "memory read outside the device's context"
        free_ref._obj.value, total_ref._obj.value = self.free, self.total
        return 0

    def cuCtxPopCurrent_v2(self, context_ref):
        self.context_depth -= 1
        return 0

    def cuDevicePrimaryCtxRelease_v2(self, device):
        self.calls.append(("release", device.value if isinstance(device, ctypes.c_int) else device))
        return 0


def test_allocator_statistics_come_first(monkeypatch):
    monkeypatch.setattr(device_memory_module, "_cuda_driver", lambda: pytest.fail("driver read despite statistics"))
    stats = {"bytes_limit": 70 * GIB, "bytes_in_use": 20 * GIB, "peak_bytes_in_use": 31 * GIB}
    assert device_memory(FakeDevice(stats)) == DeviceMemory(70 * GIB, 20 * GIB, 31 * GIB, "jax")


def test_without_statistics_the_cuda_driver_gives_free_and_total(monkeypatch):
    driver = FakeCudaDriver(free=53 * GIB, total=80 * GIB)
    monkeypatch.setattr(device_memory_module, "_cuda_driver", lambda: driver)
    memory = device_memory(FakeDevice(stats=None))
    assert memory == DeviceMemory(limit=80 * GIB, in_use=27 * GIB, peak=None, source="cuda driver")
    assert driver.calls == [("cuDeviceGet", 3), ("release", 3)]  # the JAX device's own ordinal, context released
    assert driver.context_depth == 0


def test_a_failing_driver_call_names_it(monkeypatch):
    driver = FakeCudaDriver(free=1, total=2)
    driver.cuMemGetInfo_v2 = lambda free_ref, total_ref: 201  # CUDA_ERROR_INVALID_CONTEXT
    monkeypatch.setattr(device_memory_module, "_cuda_driver", lambda: driver)
    with pytest.raises(RuntimeError, match="cuMemGetInfo failed with CUresult 201"):
        device_memory(FakeDevice(stats=None))
    assert driver.context_depth == 0  # popped even so


def test_kv_budget_from_the_driver_when_the_allocator_keeps_no_statistics(monkeypatch):
    import jax

    from jaxllm.runner.kv_cache import device_memory_budget

    monkeypatch.setattr(jax, "local_devices", lambda: [FakeDevice(stats=None)])
    monkeypatch.setattr(device_memory_module, "_cuda_driver", lambda: FakeCudaDriver(free=60 * GIB, total=80 * GIB))
    # gpu_memory_utilization of the whole device, less what is held (weights, other processes): vLLM's rule
    assert device_memory_budget(0.9, None) == int(80 * GIB * 0.9) - 20 * GIB


def test_kv_budget_without_any_figures_names_the_way_out(monkeypatch):
    import jax

    from jaxllm.runner.kv_cache import device_memory_budget

    monkeypatch.setattr(jax, "local_devices", lambda: [FakeDevice(stats=None)])
    monkeypatch.setattr(device_memory_module, "_cuda_driver", lambda: None)  # no libcuda: ROCm, say
    way_out = r"cuda:3 reports no memory limit.*kv_cache_memory_bytes or num_gpu_blocks_override"
    with pytest.raises(ValueError, match=way_out):
        device_memory_budget(0.9, None)
    assert device_memory_budget(0.9, 3 * GIB) == 3 * GIB  # an explicit budget needs no figures


def test_no_cuda_library_means_no_driver(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    device_memory_module._cuda_driver.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", missing)
    try:
        assert device_memory_module._cuda_driver() is None
        assert device_memory(FakeDevice(stats=None)) is None
    finally:
        device_memory_module._cuda_driver.cache_clear()
