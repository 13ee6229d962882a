"""On the GPU machine (marker ``gpu``): the CUDA driver's memory figures, which size the KV cache where JAX's
allocator keeps no statistics, agree with JAX's own on a real device; sleep mode gives the engine's memory back."""

import jax
import jax.numpy as jnp
import pytest

from jaxllm import SamplingParams
from jaxllm.runner import device_memory as device_memory_module
from tests.engine.conftest import LLAMA, make_llm, random_token_prompts

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


def test_sleep_gives_the_engines_memory_back_to_jax_and_wake_up_takes_it_again():
    """vLLM's sleep mode on a real device: ``sleep`` frees at least every byte of the engine's weights and KV cache in
    JAX's allocator (``bytes_in_use``), ``wake_up`` takes them again, and the greedy tokens are the same after a
    level-1 and a level-2 sleep. (Under the default preallocated pool the freed bytes stay in this process's pool:
    the driver's free figure is printed, not checked.)"""
    device = jax.local_devices()[0]
    llm = make_llm(
        LLAMA, load_format="auto", enable_sleep_mode=True, num_gpu_blocks_override=None, kv_cache_memory_bytes=4 * 2**30
    )
    prompts = random_token_prompts(3, [7, 30, 12], seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    runner = llm.llm_engine.runner
    held = {id(a): a.nbytes for a in [*runner.param_arrays(), *jax.tree.leaves(runner.kv_caches)]}
    engine_bytes = sum(held.values())
    driver = device_memory_module._cuda_driver()
    for level in (1, 2):
        awake = device.memory_stats()["bytes_in_use"]
        llm.sleep(level=level)
        asleep = device.memory_stats()["bytes_in_use"]
        free_asleep, _ = device_memory_module._cuda_free_and_total(driver, device.local_hardware_id)
        llm.wake_up()
        woken = device.memory_stats()["bytes_in_use"]
        print(
            f"sleep level {level}: engine arrays {engine_bytes / 2**30:.3f} GiB; jax bytes_in_use awake "
            f"{awake / 2**30:.3f}, asleep {asleep / 2**30:.3f}, woken {woken / 2**30:.3f} GiB; "
            f"driver free while asleep {free_asleep / 2**30:.2f} GiB"
        )
        assert engine_bytes >= 2**30  # a cache of GiBs (sized from kv_cache_memory_bytes): the figures are not noise
        assert awake - asleep >= engine_bytes
        assert woken - asleep >= engine_bytes
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert tokens == expected
