"""fp8 (float8_e4m3fn) KV cache: ``update_kv_cache`` stores K / k_scale and V / v_scale rounded to e4m3, and every
ragged paged attention backend reads the fp8 cache back.

References are independent of the code under test: rounding with ``ml_dtypes`` in numpy, and the naive float64
attention of ``attention_cases`` over the dequantized cache (tight: the output dtype's arithmetic tolerance) and over
the unquantized cache (loose: e4m3's rounding error, ``KV_QUANTIZATION_TOLERANCES``). Scales are 1.0 (vLLM's default)
or calibrated (absmax / 448, not powers of two), so a scale applied twice, never or on the wrong side shows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

from pallas_kernels.kv_cache_update import update_kv_cache
from pallas_kernels.ragged_paged_attention import mosaic_tpu, ragged_paged_attention, triton_gpu
from pallas_kernels.tolerances import KV_QUANTIZATION_TOLERANCES, assert_close
from tests.kernels.attention_cases import Batch, Geometry, make_batch, naive_attention
from tests.kernels.backends import interpreted_and_compiled

IMPLS = [
    pytest.param("reference", id="reference"),
    *interpreted_and_compiled("gpu", "pallas_gpu_interpret", "pallas_gpu", interpret_id="gpu-interpret"),
    *interpreted_and_compiled("tpu", "pallas_tpu_interpret", "pallas_tpu", interpret_id="tpu-interpret"),
]
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = 448.0
# Block size 32: the TPU kernel tiles 8-bit pages in 32 sublanes. Lengths 1, L-1, L, L+1 and ~1k contexts.
GEO = Geometry(block_size=32, num_tokens=128, num_blocks=110, max_blocks=40)
SCENARIOS = {
    "mixed": ([1, 31, 32, 33, 1, 5], [1, 31, 64, 33, 1040, 1000]),
    "chunked_prefill": ([40, 65, 1], [80, 1050, 40]),
}


def quantize(x, scale: float) -> np.ndarray:
    """e4m3 rounding as documented: x / scale in float32, clipped to ±448, rounded to nearest (ml_dtypes)."""
    scaled = np.asarray(x, np.float32) / np.float32(scale)
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(FP8)


@dataclasses.dataclass(frozen=True)
class Fp8Case:
    batch: Batch  # the unquantized batch
    args: tuple  # the batch with fp8 caches
    dequantized: Batch  # float64 caches: fp8 value x scale
    scales: dict  # k_scale, v_scale


def fp8_case(seed, scenario, geo: Geometry, dtype, calibrated: bool) -> Fp8Case:
    batch = make_batch(seed, *SCENARIOS[scenario], geo, dtype)
    k, v = np.asarray(batch.k_cache, np.float32), np.asarray(batch.v_cache, np.float32)
    k_scale = float(np.abs(k).max() / FP8_MAX) if calibrated else 1.0
    v_scale = float(np.abs(v).max() / FP8_MAX) if calibrated else 1.0
    k8, v8 = quantize(k, k_scale), quantize(v, v_scale)
    dequantized = dataclasses.replace(
        batch, k_cache=k8.astype(np.float64) * k_scale, v_cache=v8.astype(np.float64) * v_scale
    )
    args = (batch.q, jnp.asarray(k8), jnp.asarray(v8), *batch.args[3:])
    return Fp8Case(batch, args, dequantized, dict(k_scale=k_scale, v_scale=v_scale))


def check(out, case: Fp8Case, dtype, **options) -> None:
    real = case.batch.num_real_tokens
    assert out.dtype == case.batch.q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32))), "padding rows must stay finite too"
    dequantized = naive_attention(case.dequantized, **options)[:real]
    assert_close(out[:real], dequantized, dtype, "fp8 cache vs attention over the dequantized cache")
    unquantized = naive_attention(case.batch, **options)[:real]
    loose = KV_QUANTIZATION_TOLERANCES["float8_e4m3fn"]
    assert_close(out[:real], unquantized, dtype, "fp8 cache vs the unquantized cache", tolerance=loose)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype, calibrated, heads",
    [(jnp.float32, False, (8, 2, 64)), (jnp.float32, True, (8, 2, 64)), (jnp.bfloat16, True, (8, 1, 128))],
    ids=["f32-scale1", "f32-calibrated", "bf16-calibrated-mqa8-h128"],
)
def test_fp8_cache_matches_dequantized_and_unquantized_attention(impl, dtype, calibrated, heads):
    num_heads, num_kv_heads, head_dim = heads
    geo = dataclasses.replace(GEO, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    case = fp8_case(1, "mixed", geo, dtype, calibrated)
    options = dict(sm_scale=head_dim**-0.5)
    out = ragged_paged_attention(*case.args, impl=impl, **options, **case.scales)
    check(out, case, dtype, **options)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_cache_with_sliding_window_and_soft_cap(impl):
    """k_scale must scale the scores before the soft cap, as if the cache held the unscaled K."""
    case = fp8_case(2, "chunked_prefill", GEO, jnp.float32, calibrated=True)
    options = dict(sm_scale=GEO.head_dim**-0.5, sliding_window=40, soft_cap=2.0)
    out = ragged_paged_attention(*case.args, impl=impl, **options, **case.scales)
    check(out, case, jnp.float32, **options)


@functools.cache
def _jitted_update(k_scale, v_scale):
    return jax.jit(functools.partial(update_kv_cache, k_scale=k_scale, v_scale=v_scale))


@pytest.mark.parametrize("k_scale, v_scale", [(1.0, 1.0), (0.37, 2.5)])
def test_update_writes_rows_divided_by_scale_rounded_and_clipped(k_scale, v_scale):
    rng = np.random.default_rng(3)
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 12, 16, 2, 64, 24
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (quantize(rng.standard_normal(cache_shape), 1.0) for _ in range(2))
    k_new, v_new = (4.0 * rng.standard_normal((num_tokens, num_kv_heads, head_dim)) for _ in range(2))
    k_new[0, 0, :4], v_new[1, 1, :4] = [1e4, -1e4, 500.0, -449.0], [3e3, -2e5, 460.0, 447.0]  # past ±448 x scale
    k_new, v_new = k_new.astype(np.float32), v_new.astype(np.float32)
    slots = rng.permutation(np.arange(block_size, num_blocks * block_size))[: num_tokens - 3]
    slot_mapping = np.concatenate([slots, [0, 0, 0]]).astype(np.int32)  # 3 padding tokens into the null block
    k_out, v_out = _jitted_update(k_scale, v_scale)(
        jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slot_mapping)
    )
    assert k_out.dtype == v_out.dtype == jnp.float8_e4m3fn
    for cache, new, out, scale in ((k_cache, k_new, k_out, k_scale), (v_cache, v_new, v_out, v_scale)):
        expected = cache.reshape(-1, num_kv_heads, head_dim).copy()
        expected[slots] = quantize(new[: num_tokens - 3], scale)
        got = np.asarray(out).reshape(expected.shape)
        assert np.all(np.isfinite(got.astype(np.float32))), "values past ±448 must clip, never become NaN"
        np.testing.assert_array_equal(got[block_size:].view(np.uint8), expected[block_size:].view(np.uint8))
    assert float(np.asarray(k_out).reshape(-1, num_kv_heads, head_dim)[slots[0], 0, 0]) == FP8_MAX


def test_update_into_a_model_dtype_cache_is_a_plain_cast():
    rng = np.random.default_rng(4)
    cache = jnp.asarray(rng.standard_normal((4, 16, 2, 64)), jnp.bfloat16)
    new = rng.standard_normal((5, 2, 64)).astype(np.float32)
    slots = np.array([16, 17, 40, 63, 20], np.int32)
    k_out, _ = _jitted_update(1.0, 1.0)(cache, cache, jnp.asarray(new), jnp.asarray(new), jnp.asarray(slots))
    assert k_out.dtype == jnp.bfloat16
    got = np.asarray(k_out, np.float32).reshape(-1, 2, 64)[slots]
    np.testing.assert_array_equal(got, new.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bad_scales_and_cache_dtypes_are_rejected():
    case = fp8_case(5, "mixed", GEO, jnp.float32, calibrated=False)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError) as error:
            ragged_paged_attention(*case.args, sm_scale=0.1, k_scale=bad)
        assert "k_scale" in str(error.value) and repr(bad) in str(error.value)
    new_rows = case.batch.k_cache[:2, 0]  # [2, K, H]
    with pytest.raises(ValueError) as error:
        update_kv_cache(*case.args[1:3], new_rows, new_rows, jnp.zeros(2, jnp.int32), v_scale=float("inf"))
    assert "v_scale" in str(error.value) and "inf" in str(error.value)
    e5m2 = case.args[1].astype(jnp.float8_e5m2)
    with pytest.raises(TypeError) as error:
        ragged_paged_attention(case.batch.q, e5m2, e5m2, *case.args[3:], sm_scale=0.1)
    assert "float8_e5m2" in str(error.value)


def test_tpu_kernel_needs_32_row_blocks_for_fp8():
    geo = dataclasses.replace(GEO, block_size=16, num_blocks=200, max_blocks=72)
    case = fp8_case(6, "mixed", geo, jnp.float32, calibrated=False)
    with pytest.raises(ValueError) as error:
        mosaic_tpu.ragged_paged_attention_tpu(*case.args, sm_scale=0.1, interpret=True)
    assert "block size 16" in str(error.value) and "float8_e4m3fn" in str(error.value)


def test_fp8_cache_lowers_to_mosaic_for_tpu():
    """Pallas -> Mosaic lowering of the fp8 read (no TPU needed; Mosaic's own passes run only inside libtpu)."""
    case = fp8_case(7, "mixed", GEO, jnp.bfloat16, calibrated=True)
    attend = functools.partial(mosaic_tpu.ragged_paged_attention_tpu, sm_scale=0.125, **case.scales)
    lowered = export.export(jax.jit(attend), platforms=["tpu"])(*case.args)
    assert lowered.mlir_module().count("tpu_custom_call") == 2  # the short and the long tier


def test_fp8_cache_lowers_to_triton_for_an_h100(monkeypatch):
    """Pallas -> Triton lowering of the fp8 read for compute capability 9.0, on CPU (no GPU needed; Triton's own
    compile to PTX runs only on a GPU, so this does not prove the kernel compiles there)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
    case = fp8_case(8, "mixed", GEO, jnp.bfloat16, calibrated=True)
    attend = functools.partial(triton_gpu.ragged_paged_attention_triton, sm_scale=0.125, **case.scales)
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    lowered = export.export(jax.jit(attend), platforms=["cuda"], disabled_checks=[triton_call])(*case.args)
    assert lowered.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 2  # short and long launch
