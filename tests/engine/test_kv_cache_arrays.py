"""``JAXLLM_KV_ARRAY_MAX_BYTES`` (jaxllm.models.kv_cache_layout): the one-device engine with its layers sharing KV cache
arrays makes the same greedy tokens as with an array per layer, prefix cache and fp8 cache included; a bad value is a
ValueError naming the variable."""

import numpy as np
import pytest

from jaxllm.models.kv_cache_layout import ARRAY_MAX_BYTES_ENV
from tests.engine.test_kv_cache_dtype import NUM_LAYERS, generate, make_llm, prompts


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_layers_sharing_cache_arrays_keep_the_greedy_tokens(monkeypatch, kv_cache_dtype):
    batch = prompts()[:6]
    per_layer = make_llm(kv_cache_dtype=kv_cache_dtype)
    assert len(per_layer.llm_engine.runner.kv_caches) == NUM_LAYERS
    expected = generate(per_layer, batch)
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, str(2**40))
    shared = make_llm(kv_cache_dtype=kv_cache_dtype)
    (k_cache, v_cache), *rest = shared.llm_engine.runner.kv_caches
    assert not rest and k_cache.shape[0] == v_cache.shape[0] == NUM_LAYERS * shared.llm_engine.resolved.num_blocks
    np.testing.assert_array_equal(generate(shared, batch), expected)
    np.testing.assert_array_equal(generate(shared, batch), expected)  # again, now from the prefix cache


def test_a_byte_limit_splits_the_layers_over_arrays(monkeypatch):
    layer_bytes = 256 * 16 * 2 * 16 * 4  # the fixture's [P, L, K, H] float32, make_llm's 256 blocks (+ the null one)
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, str(int(2.5 * layer_bytes)))  # room for two layers, not three
    llm = make_llm()
    num_blocks = llm.llm_engine.resolved.num_blocks
    assert [k.shape[0] for k, _ in llm.llm_engine.runner.kv_caches] == [2 * num_blocks, num_blocks]  # 3 layers
    assert len(generate(llm, prompts()[:1])[0]) == 32


@pytest.mark.parametrize("value", ["2GiB", "-1", "1e9"])
def test_a_bad_value_is_a_value_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, value)
    with pytest.raises(ValueError, match=ARRAY_MAX_BYTES_ENV):
        make_llm()
