"""On the GPU machine (marker ``gpu``): the CUDA driver's memory figures, which size the KV cache where JAX's
allocator keeps no statistics, agree with JAX's own on a real device."""

import jax
import jax.numpy as jnp
import pytest

from jaxllm.runner import device_memory as device_memory_module

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and its driver")]


def test_cuda_driver_figures_agree_with_jax():
    device = jax.local_devices()[0]
    held = jax.device_put(jnp.ones((256, 1024, 1024), jnp.float32), device)  # 1 GiB that JAX's allocator holds
    driver = device_memory_module._cuda_driver()
    assert driver is not None
    free, total = device_memory_module._cuda_free_and_total(driver, device.local_hardware_id)
    stats = device.memory_stats() or {}
    print(f"cuda driver: free {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB; jax: {stats}")
    assert 0 < free < total
    if "bytes_limit" in stats:  # a pooling allocator: its pool lies within the device, what it holds is in use
        assert stats["bytes_limit"] <= total
        assert total - free >= stats["bytes_in_use"] >= held.nbytes
    del held
