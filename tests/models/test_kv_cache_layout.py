"""The KV cache's grouping of layers into arrays (jaxllm.models.kv_cache_layout)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import kv_cache_layout
from jaxllm.models.kv_cache_layout import (
    ARRAY_MAX_BYTES_ENV,
    NO_BYTE_LIMIT,
    array_max_bytes,
    array_shapes,
    layer_ranges,
)

LAYER = (6, 4, 2, 8)  # [P, L, K, H]
LAYER_ROWS = 6 * 4 * 2


@pytest.mark.parametrize("num_layers", [1, 2, 5, 10, 31, 32, 80])
@pytest.mark.parametrize("limit_layers", [1, 2, 3, 4, 7, 11, 100])
def test_every_layer_gets_its_own_block_range_and_arrays_stay_under_the_limit(monkeypatch, num_layers, limit_layers):
    monkeypatch.setattr(kv_cache_layout, "MAX_ARRAY_ROWS", limit_layers * LAYER_ROWS + 5)
    shapes = array_shapes(num_layers, LAYER, jnp.float32, NO_BYTE_LIMIT)
    assert len(shapes) == -(-num_layers // min(limit_layers, num_layers))  # as few arrays as the limit allows
    assert all(int(np.prod(s[:-1])) <= kv_cache_layout.MAX_ARRAY_ROWS for s in shapes)
    assert all(s[1:] == LAYER[1:] for s in shapes)
    caches = [(jnp.zeros(s), jnp.zeros(s)) for s in shapes]
    ranges = layer_ranges(caches, num_layers)
    # every (array, block) of the cache belongs to exactly one layer, each layer to P consecutive blocks
    owned = [(index, first + block) for index, first in ranges for block in range(LAYER[0])]
    assert len(owned) == len(set(owned)) == sum(s[0] for s in shapes)
    assert [index for index, _ in ranges] == sorted(index for index, _ in ranges)  # layers in order


def test_a_layer_over_the_limit_still_gets_an_array_of_its_own(monkeypatch):
    monkeypatch.setattr(kv_cache_layout, "MAX_ARRAY_ROWS", 10)
    assert array_shapes(3, LAYER, jnp.float32, NO_BYTE_LIMIT) == [LAYER] * 3


def test_a_large_cache_of_a_real_shape_is_one_array():
    # the Llama-3.1-8B shape, a bf16 cache filling most of a 140 GB GPU: 32 layers of 16,000 blocks in one array
    assert array_shapes(32, (16_000, 16, 8, 128), jnp.bfloat16, NO_BYTE_LIMIT) == [(32 * 16_000, 16, 8, 128)]


@pytest.mark.parametrize("num_blocks", [1_000, 3_000, 6_000])
def test_a_one_byte_cache_has_no_array_between_two_and_four_gib(num_blocks):
    layer = (num_blocks, 16, 8, 128)  # 16 MiB per 1,000 blocks of fp8: 32 layers are 0.5, 1.5 and 3 GiB
    for dtype in (jnp.float8_e4m3fn, jnp.bfloat16):
        shapes = array_shapes(32, layer, dtype, NO_BYTE_LIMIT)
        sizes = [int(np.prod(s)) * jnp.dtype(dtype).itemsize for s in shapes]
        assert sum(sizes) == 32 * int(np.prod(layer)) * jnp.dtype(dtype).itemsize
        if jnp.dtype(dtype).itemsize == 1:
            assert not any(2**31 < size <= 2**32 for size in sizes), sizes
        assert len(shapes) == (2 if dtype == jnp.float8_e4m3fn and sum(sizes) > 2**31 else 1)


def test_arrays_that_do_not_match_the_layer_count_are_a_value_error():
    caches = [(jnp.zeros((10, 4, 2, 8)), jnp.zeros((10, 4, 2, 8)))]
    with pytest.raises(ValueError, match="does not hold 3 layers"):
        layer_ranges(caches, 3)
    with pytest.raises(ValueError, match="has no arrays"):
        layer_ranges([], 3)


def test_by_default_every_layer_has_arrays_of_its_own(monkeypatch):
    monkeypatch.delenv(ARRAY_MAX_BYTES_ENV, raising=False)
    assert array_max_bytes() is None
    assert array_shapes(5, LAYER, jnp.float32, array_max_bytes()) == [LAYER] * 5
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, "0")
    assert array_max_bytes() is None


@pytest.mark.parametrize(("max_layers", "expected"), [(1, [1] * 5), (2, [2, 2, 1]), (3, [3, 2]), (4, [3, 2]), (5, [5])])
def test_a_byte_limit_bounds_every_array(monkeypatch, max_layers, expected):
    layer_bytes = int(np.prod(LAYER)) * 4
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, str(max_layers * layer_bytes))
    shapes = array_shapes(5, LAYER, jnp.float32, array_max_bytes())
    assert [s[0] // LAYER[0] for s in shapes] == expected  # layers per array: as few arrays as fit, evenly spread
    assert len(layer_ranges([(jnp.zeros(s), jnp.zeros(s)) for s in shapes], 5)) == 5


@pytest.mark.parametrize("value", ["-1", "4GiB", "1e9", " "])
def test_a_bad_byte_limit_is_a_value_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, value)
    with pytest.raises(ValueError, match=ARRAY_MAX_BYTES_ENV):
        array_max_bytes()


def test_the_default_layout_groups_fp8_layers_that_would_be_two_to_four_gib():
    layer = (10_000, 16, 8, 128)  # 160 MB of fp8 per layer: one array each
    assert array_shapes(3, layer, jnp.float8_e4m3fn) == [layer] * 3
    big = (160_000, 16, 8, 128)  # 2.6 GB of fp8 per layer (2^31 < bytes <= 2^32): one array of 7.9 GB
    assert array_shapes(3, big, jnp.float8_e4m3fn) == [(3 * 160_000, 16, 8, 128)]
    assert array_shapes(3, big, jnp.bfloat16) == [big] * 3  # 5.2 GB of bf16: offsets already 64-bit
    assert array_shapes(1, big, jnp.float8_e4m3fn) == [big]  # one layer: nothing to pair it with


def test_the_limits_are_a_devices_when_tensor_parallelism_splits_the_heads():
    big = (160_000, 16, 8, 128)  # 2.6 GB of fp8 per layer in all, 1.3 GB on each of 2 devices, 0.65 GB on 4
    assert array_shapes(3, big, jnp.float8_e4m3fn, None, head_shards=2) == [big] * 3
    double = (320_000, 16, 8, 128)  # 5.2 GB in all: 2.6 GB on each of 2 devices, in the window there
    assert array_shapes(3, double, jnp.float8_e4m3fn) == [double] * 3
    assert array_shapes(3, double, jnp.float8_e4m3fn, None, head_shards=2) == [(3 * 320_000, 16, 8, 128)]
    with pytest.raises(ValueError, match="8 KV heads do not split over 3"):
        array_shapes(3, big, jnp.float8_e4m3fn, None, head_shards=3)
