"""Weight quantizers against numpy re-derivations of each scheme: scales, the int4 byte layout, error bounds and
the fp8 activation quantizer, plus input validation and pytree behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.quantization import METHODS, QuantizedWeight, dequantize_weight, quantize_activations_fp8, quantize_weight
from jaxllm.quantization.schemes import INT4_SCALE_FRACTIONS, validate_quantized_weight

K, N = 256, 96
FP8_MAX = 448.0


def random_weight(seed, k=K, n=N) -> np.ndarray:
    """f32 weights whose magnitude varies by output channel and by row, so every scale differs."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * rng.uniform(0.05, 3.0, (1, n)) * rng.uniform(0.5, 2.0, (k, 1))
    return w.astype(np.float32)


def rounding_bound(scales, qmax):
    """Half a quantization step, plus the f32 rounding of ``w / s`` and of ``q * s`` (each <= qmax * s * 2**-24)."""
    return np.asarray(scales, np.float64) * (0.5 + qmax * 2.0**-23)


def numpy_int4_codes(values: np.ndarray, group_size: int) -> np.ndarray:
    """Signed codes [K, N] read byte by byte from the documented layout."""
    half_k, n = values.shape
    codes = np.zeros((2 * half_k, n), np.int64)
    for row in range(half_k):
        group, j = divmod(row, group_size // 2)
        codes[group * group_size + j] = (values[row] & 0xF).astype(np.int64) - 8
        codes[group * group_size + group_size // 2 + j] = (values[row] >> 4).astype(np.int64) - 8
    return codes


def test_int8_per_channel_scales_and_error_bound():
    w = random_weight(0)
    qw = quantize_weight(jnp.asarray(w), "int8")
    values, scales = np.asarray(qw.values), np.asarray(qw.scales, np.float64)
    assert qw.values.dtype == jnp.int8 and qw.values.shape == (K, N) and qw.scales.shape == (N,)
    assert (qw.method, qw.group_size, qw.shape) == ("int8", None, (K, N))
    np.testing.assert_allclose(scales, np.abs(w).max(axis=0) / 127, rtol=2e-7)
    assert np.all(np.abs(values.astype(np.int64)).max(axis=0) == 127), "every channel must reach the range edge"
    deq = np.asarray(dequantize_weight(qw), np.float64)
    assert np.all(np.abs(w - deq) <= rounding_bound(scales[None, :], 127))
    np.testing.assert_allclose(deq, values * scales[None, :], rtol=2e-7)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_groupwise_layout_and_error_bound(group_size):
    w = random_weight(1)
    qw = quantize_weight(jnp.asarray(w), "int4", group_size)
    assert qw.values.dtype == jnp.uint8 and qw.values.shape == (K // 2, N)
    assert qw.scales.shape == (K // group_size, N) and qw.group_size == group_size
    scales = np.asarray(qw.scales, np.float64)
    grouped = w.reshape(K // group_size, group_size, N)
    group_amax = np.abs(grouped).max(axis=1)
    fractions = scales * 7 / group_amax  # each scale is one of the searched fractions of absmax / 7
    nearest = np.abs(fractions[..., None] - np.array(INT4_SCALE_FRACTIONS)).min(axis=-1)
    assert nearest.max() < 1e-5
    codes = numpy_int4_codes(np.asarray(qw.values), group_size)
    assert codes.min() >= -8 and codes.max() <= 7
    expected_codes = np.clip(np.round(w / np.repeat(qw.scales, group_size, axis=0)), -8, 7)
    np.testing.assert_array_equal(codes, expected_codes)
    row_scales = np.repeat(scales, group_size, axis=0)  # [K, N]
    deq = np.asarray(dequantize_weight(qw), np.float64)
    np.testing.assert_allclose(deq, codes * row_scales, rtol=2e-7)
    # The search never does worse than plain absmax / 7 rounding, group by group, and on normal data does better.
    plain_scales = group_amax / 7
    plain = np.clip(np.round(grouped / plain_scales[:, None, :]), -7, 7) * plain_scales[:, None, :]
    plain_error = ((plain - grouped) ** 2).sum(axis=1)
    error = ((deq.reshape(grouped.shape) - grouped) ** 2).sum(axis=1)
    assert np.all(error <= plain_error * (1 + 1e-5) + 1e-12)
    assert error.sum() < 0.9 * plain_error.sum()


def test_fp8_per_channel_scales_layout_and_error_bound():
    w = random_weight(2)
    qw = quantize_weight(jnp.asarray(w), "fp8")
    assert qw.values.dtype == jnp.float8_e4m3fn and qw.values.shape == (N, K), "fp8 values are stored [N, K]"
    scales = np.asarray(qw.scales, np.float64)
    np.testing.assert_allclose(scales, np.abs(w).max(axis=0) / FP8_MAX, rtol=2e-7)
    values = np.asarray(qw.values).astype(np.float64)  # [N, K]
    np.testing.assert_array_equal(np.abs(values).max(axis=1), FP8_MAX)
    deq = np.asarray(dequantize_weight(qw), np.float64)
    np.testing.assert_allclose(deq, values.T * scales[None, :], rtol=2e-7)
    # e4m3: 3 mantissa bits, so half a step is 2**-4 of |w| for normals and 2**-10 * scale below 2**-6 * scale
    bound = np.maximum(np.abs(w) * 2.0**-4, 2.0**-10 * scales[None, :]) * (1 + 2.0**-20)
    assert np.all(np.abs(w - deq) <= bound)


def test_fp8_activations_match_numpy_per_token_quantization():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, K)) * rng.uniform(0.01, 50.0, (7, 1))).astype(np.float32)
    values, scales = quantize_activations_fp8(jnp.asarray(x))
    scales = np.asarray(scales)
    np.testing.assert_array_equal(scales, np.abs(x).max(axis=1) * np.float32(1 / FP8_MAX))  # f32, as the op
    expected = np.clip(x / scales[:, None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)  # f32 division
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_channel_quantizes_to_exact_zeros(method):
    w = random_weight(4)
    untouched = np.asarray(dequantize_weight(quantize_weight(jnp.asarray(w), method, 64)))
    w[:, 5] = 0.0
    deq = np.asarray(dequantize_weight(quantize_weight(jnp.asarray(w), method, 64)))
    assert np.all(np.isfinite(deq))
    np.testing.assert_array_equal(deq[:, 5], 0.0)
    others = np.arange(N) != 5
    np.testing.assert_array_equal(deq[:, others], untouched[:, others])  # channels are quantized independently


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_weights_quantize_like_their_f32_values(method):
    w = jnp.asarray(random_weight(5), jnp.bfloat16)
    from_bf16 = quantize_weight(w, method, 64)
    from_f32 = quantize_weight(w.astype(jnp.float32), method, 64)
    np.testing.assert_array_equal(np.asarray(from_bf16.values), np.asarray(from_f32.values))
    np.testing.assert_array_equal(np.asarray(from_bf16.scales), np.asarray(from_f32.scales))


@pytest.mark.parametrize("k, group_size", [(200, 128), (127, 128), (96, 64)])
def test_int4_rejects_k_not_multiple_of_group(k, group_size):
    w = jnp.asarray(random_weight(6, k=k))
    with pytest.raises(ValueError) as error:
        quantize_weight(w, "int4", group_size)
    assert f"K (the weight's first dimension) = {k}" in str(error.value)
    assert f"group_size {group_size}" in str(error.value)


@pytest.mark.parametrize("group_size", [0, 7, -64, 64.0])
def test_int4_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError) as error:
        quantize_weight(jnp.asarray(random_weight(7)), "int4", group_size)
    assert repr(group_size) in str(error.value)


def test_rejects_bad_requests():
    w = jnp.asarray(random_weight(8))
    with pytest.raises(ValueError) as error:
        quantize_weight(w, "int3")
    assert "'int3'" in str(error.value)
    with pytest.raises(ValueError) as error:
        quantize_weight(w[0], "int8")
    assert "(96,)" in str(error.value)
    with pytest.raises(TypeError) as error:
        quantize_weight(w.astype(jnp.int32), "int8")
    assert "int32" in str(error.value)


def test_validate_rejects_inconsistent_weight():
    qw = quantize_weight(jnp.asarray(random_weight(9)), "int4", 64)
    bad = QuantizedWeight(qw.values[:-2], qw.scales, "int4", 64, qw.shape)
    with pytest.raises(ValueError) as error:
        validate_quantized_weight(bad)
    assert "uint8[126, 96]" in str(error.value) and "uint8[128, 96]" in str(error.value)
    with pytest.raises(TypeError) as error:
        validate_quantized_weight(qw.values)
    assert "ArrayImpl" in str(error.value)


def test_quantized_weight_is_a_pytree_with_static_metadata():
    qw = quantize_weight(jnp.asarray(random_weight(10)), "int4", 64)
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == 2 and leaves[0] is qw.values and leaves[1] is qw.scales
    doubled = jax.jit(lambda q: jax.tree.map(lambda a: a, q))(qw)
    assert isinstance(doubled, QuantizedWeight) and (doubled.method, doubled.group_size, doubled.shape) == (
        "int4",
        64,
        (K, N),
    )
    np.testing.assert_array_equal(np.asarray(dequantize_weight(doubled)), np.asarray(dequantize_weight(qw)))
    assert qw.nbytes == K * N // 2 + (K // 64) * N * 4
