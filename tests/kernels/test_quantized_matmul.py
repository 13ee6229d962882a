"""Quantized matmul: the Pallas GPU kernels (interpret mode on CPU, compiled on the GPU machine), the Pallas TPU
kernels (interpret mode), the xla backend and the reference, each against a float64 product computed here from the
stored bytes (weights decoded by numpy, fp8 activations quantized by ml_dtypes).

Shapes are shared between tests so that each kernel variant compiles once per session: K=512 and N=200 (N is no
multiple of any tile width, so edge tiles are exercised); int4 uses groups of 64 unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.quantization import METHODS, QuantizedWeight, quantize_weight
from pallas_kernels.quantized_matmul import (
    FP8_FAST_ACCUMULATION_MIN_ROWS,
    default_fp8_fast_accumulation,
    default_impl,
    mosaic_tpu,
    quantized_matmul,
    triton_gpu,
)
from pallas_kernels.tolerances import assert_close
from tests.kernels.backends import ON_GPU, interpreted_and_compiled

GPU_KERNEL = interpreted_and_compiled("gpu", "pallas_gpu_interpret", "pallas_gpu")
K, N, GROUP = 512, 200, 64
FP8_MAX = 448.0


def random_weight(seed, k=K, n=N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * rng.uniform(0.5, 2.0, (1, n)) / np.sqrt(k)
    return w.astype(np.float32)


def make_activations(seed, m, k=K, dtype=jnp.bfloat16):
    """Random ``[m, k]`` activations with a few large entries, as real activations have."""
    rng = np.random.default_rng(seed + 1000)
    x = rng.standard_normal((m, k)) * np.where(rng.random((m, k)) < 0.01, 20.0, 1.0)
    return jnp.asarray(x, dtype)


def make_case(seed, m, method, dtype=jnp.bfloat16, group_size=GROUP, k=K, n=N):
    qw = quantize_weight(jnp.asarray(random_weight(seed, k, n)), method, group_size)
    return make_activations(seed, m, k, dtype), qw


def decoded_weight(qw: QuantizedWeight, dtype=np.float64) -> np.ndarray:
    """``W [K, N]`` from the stored bytes, following the layout documented in the schemes module."""
    values, scales = np.asarray(qw.values), np.asarray(qw.scales, dtype)
    if qw.method == "int8":
        return values.astype(dtype) * scales[None, :]
    if qw.method == "fp8":
        return values.astype(dtype).T * scales[None, :]
    half = qw.group_size // 2
    packed = values.reshape(-1, half, values.shape[1]).astype(np.int8)  # [K/g, g/2, N]
    codes = np.concatenate([(packed & 0xF) - 8, (packed >> 4 & 0xF) - 8], axis=1)  # [K/g, g, N]
    return (codes.astype(dtype) * scales[:, None, :]).reshape(qw.shape)


def naive_product(x, qw: QuantizedWeight, dtype=np.float64) -> np.ndarray:
    """The product in ``dtype`` (float64; float32 is exact enough for bf16 outputs of the large GPU shapes)."""
    x = np.asarray(x, np.float32)
    if qw.method == "fp8":  # per-token scales (compared in f32 as the op computes them), e4m3 by ml_dtypes
        scales = np.abs(x).max(axis=1) * np.float32(1 / FP8_MAX)
        scales = np.where(scales > 0, scales, np.float32(1.0))
        x_fp8 = np.clip(x / scales[:, None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        x = x_fp8.astype(dtype) * scales[:, None]
    return x.astype(dtype) @ decoded_weight(qw, dtype)


def check(out, x, qw, dtype, what="output", naive_dtype=np.float64):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert_close(out, naive_product(x, qw, naive_dtype), dtype, what)


ROWS = [1, 3, 16, 64, 200]  # decode sizes, one full 64-row tile, and a prefill size with a partial 128-row tile


@functools.cache
def products_over_rows(impl):
    """One jitted call running ``impl`` on several activation matrices: one compilation for all of ``ROWS``."""
    return jax.jit(lambda xs, qw: [quantized_matmul(x, qw, impl=impl, out_dtype=jnp.float32) for x in xs])


@pytest.mark.parametrize("impl", [pytest.param("reference", id="reference"), *GPU_KERNEL])
@pytest.mark.parametrize("method", METHODS)
def test_matches_naive_product_for_decode_and_prefill_rows(impl, method):
    qw = quantize_weight(jnp.asarray(random_weight(1)), method, GROUP)
    xs = [make_activations(m, m) for m in ROWS]
    for m, x, out in zip(ROWS, xs, products_over_rows(impl)(xs, qw), strict=True):
        check(out, x, qw, jnp.float32, f"{impl} {method} M={m}")


@pytest.mark.parametrize("method, dtype", [("int8", jnp.float32), ("int4", jnp.float16)])
@pytest.mark.parametrize("impl", GPU_KERNEL)
def test_kernel_activation_dtypes(impl, method, dtype):
    x, qw = make_case(7, 24, method, dtype)
    check(quantized_matmul(x, qw, impl=impl, out_dtype=jnp.float32), x, qw, jnp.float32, f"{method} x {dtype}")


@pytest.mark.parametrize("impl", GPU_KERNEL)
def test_kernel_default_out_dtype_and_group_128(impl):
    x, qw = make_case(8, 40, "int4", group_size=128)
    check(quantized_matmul(x, qw, impl=impl), x, qw, jnp.bfloat16)


@pytest.mark.parametrize(
    "method, config, out_dtype",
    [
        ("int8", triton_gpu.KernelConfig(block_m=16, block_n=32, block_k=32, num_k_splits=4), jnp.float32),
        ("int4", triton_gpu.KernelConfig(block_m=32, block_n=16, block_k=16, num_k_splits=2), jnp.float32),
        ("int4", triton_gpu.KernelConfig(16, 64, 16, num_k_splits=2, int4_groups_per_step=2), jnp.float32),
        ("int4", triton_gpu.KernelConfig(16, 32, 16, int4_groups_per_step=8, int4_bit_convert=True), jnp.float32),
        # Hopper's fp8 MMA accumulates with less than f32 precision: checked at the bf16 output it serves
        ("fp8", triton_gpu.KernelConfig(16, 64, 64, num_k_splits=4, fp8_dot=True), jnp.bfloat16),
    ],
    ids=["int8-split4", "int4-split2", "int4-split2-2groups", "int4-8groups-bitconvert", "fp8-split4-fp8dot"],
)
@pytest.mark.parametrize("impl", GPU_KERNEL)
def test_kernel_explicit_tilings(impl, method, config, out_dtype):
    x, qw = make_case(9, 40, method)
    kernel = jax.jit(
        lambda x, qw: triton_gpu.quantized_matmul_triton(
            x, qw, out_dtype=out_dtype, config=config, interpret=impl.endswith("_interpret")
        )
    )
    check(kernel(x, qw), x, qw, out_dtype, f"{method} {config}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])  # f32 keeps the integer conversion
@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("impl", GPU_KERNEL)
def test_int4_bit_convert_matches_the_naive_product(impl, rows, dtype):
    """int4 codes made floats by OR-ing them into a mantissa: every code -8..7 occurs in these random weights."""
    x, qw = make_case(12, rows, "int4", dtype)
    packed = np.asarray(qw.values)
    assert set(np.unique(packed & 0xF)) == set(np.unique(packed >> 4)) == set(range(16))
    config = dataclasses.replace(triton_gpu.default_config(rows, K, N, "int4", GROUP), int4_bit_convert=True)
    kernel = jax.jit(
        lambda x, qw: triton_gpu.quantized_matmul_triton(
            x, qw, out_dtype=jnp.float32, config=config, interpret=impl.endswith("_interpret")
        )
    )
    check(kernel(x, qw), x, qw, jnp.float32, f"int4 bit convert, {rows} rows of {jnp.dtype(dtype).name}")


def fused_case(seed, rows, method, widths, dtype=jnp.bfloat16):
    """Activations and one weight per N in ``widths`` (a q/k/v or gate/up set), K and group as the shared shapes."""
    weights = tuple(
        quantize_weight(jnp.asarray(random_weight(seed + i, K, n)), method, GROUP) for i, n in enumerate(widths)
    )
    return make_activations(seed, rows, K, dtype), weights


@pytest.mark.parametrize("rows", [1, 16, 200])  # decode (K split), a prefill width with a partial M tile
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", GPU_KERNEL)
def test_fused_weights_match_each_naive_product(impl, method, rows):
    """Several weights sharing x in one launch (q/k/v, gate/up): each product as if multiplied alone."""
    x, weights = fused_case(17, rows, method, (256, 128, 128))
    config = triton_gpu.fused_config(rows, weights, interpret=True)
    assert config is not None
    fused = jax.jit(
        lambda x, ws: triton_gpu.quantized_matmul_triton_fused(
            x, ws, out_dtype=jnp.float32, config=config, interpret=impl.endswith("_interpret")
        )
    )
    outs = fused(x, weights)
    assert [o.shape for o in outs] == [(rows, 256), (rows, 128), (rows, 128)]
    for i, (out, qw) in enumerate(zip(outs, weights, strict=True)):
        check(out, x, qw, jnp.float32, f"{method} fused weight {i}, {rows} rows, {config}")


def test_fused_weights_need_whole_tiles_and_one_scheme():
    x, weights = fused_case(18, 16, "int8", (256, 200))
    assert triton_gpu.fused_config(16, weights) is None  # 200 is no multiple of the tile width
    config = triton_gpu.default_config(16, K, 456, "int8")
    with pytest.raises(ValueError, match="N=200"):
        triton_gpu.quantized_matmul_triton_fused(x, weights, out_dtype=jnp.float32, config=config, interpret=True)
    mixed = (weights[0], quantize_weight(jnp.asarray(random_weight(19, K, 256)), "int4", GROUP))
    assert triton_gpu.fused_config(16, mixed) is None
    with pytest.raises(ValueError, match="share method"):
        triton_gpu.quantized_matmul_triton_fused(x, mixed, out_dtype=jnp.float32, config=config, interpret=True)


@pytest.mark.parametrize("method", METHODS)
def test_fused_weights_lower_to_triton_for_an_h100(monkeypatch, method):
    """Pallas -> Triton lowering of the per-weight branches for compute capability 9.0, on CPU (as above: Triton's
    compile to PTX runs only on a GPU)."""
    from jax import export
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
    x, weights = fused_case(20, 16, method, (256, 128, 128))
    product = functools.partial(triton_gpu.quantized_matmul_triton_fused, out_dtype=jnp.bfloat16)
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    lowered = export.export(jax.jit(product), platforms=["cuda"], disabled_checks=[triton_call])(x, weights)
    assert lowered.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1


LLAMA_8B_UNFUSED = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 28672)]


def test_int4_decode_splits_to_two_programs_per_core():
    """Decode splits K to about one wave of programs, int4 to about two (the fastest split of each 8B shape on an
    H100 at M = 16)."""
    splits = {kn: triton_gpu.default_config(16, *kn, "int4", 128).num_k_splits for kn in LLAMA_8B_UNFUSED}
    assert splits == {(4096, 4096): 8, (4096, 6144): 4, (4096, 14336): 2, (14336, 4096): 8, (4096, 28672): 1}
    assert triton_gpu.default_config(16, 14336, 4096, "int8").num_k_splits == 4
    assert triton_gpu.default_config(256, 14336, 4096, "int4", 128).num_k_splits == 2  # prefill: the two-wave rule


def test_int4_bit_convert_default_and_env(monkeypatch):
    monkeypatch.delenv(triton_gpu.INT4_BIT_CONVERT_ENV, raising=False)
    limit = triton_gpu.INT4_BIT_CONVERT_MAX_ROWS
    assert triton_gpu.default_config(limit, K, N, "int4", GROUP).int4_bit_convert
    assert not triton_gpu.default_config(limit + 1, K, N, "int4", GROUP).int4_bit_convert
    assert not triton_gpu.default_config(16, K, N, "int8").int4_bit_convert
    monkeypatch.setenv(triton_gpu.INT4_BIT_CONVERT_ENV, "1")
    assert triton_gpu.default_config(256, K, N, "int4", GROUP).int4_bit_convert
    monkeypatch.setenv(triton_gpu.INT4_BIT_CONVERT_ENV, "0")
    assert not triton_gpu.default_config(16, K, N, "int4", GROUP).int4_bit_convert
    monkeypatch.setenv(triton_gpu.INT4_BIT_CONVERT_ENV, "yes")
    with pytest.raises(ValueError, match="JAXLLM_INT4_BIT_CONVERT must be 0 or 1.*'yes'"):
        triton_gpu.default_config(16, K, N, "int4", GROUP)


@pytest.mark.parametrize("dtype, groups", [(jnp.bfloat16, 1), (jnp.float16, 1), (jnp.bfloat16, 4)])
def test_int4_bit_convert_lowers_to_triton_for_an_h100(monkeypatch, dtype, groups):
    """Pallas -> Triton lowering of the bit-operation conversion (and of several groups per step) for compute
    capability 9.0, on CPU (Triton's own compile to PTX runs only on a GPU, so this does not prove the kernel compiles
    there)."""
    from jax import export
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
    x, qw = make_case(13, 16, "int4", dtype)
    config = dataclasses.replace(
        triton_gpu.default_config(16, K, N, "int4", GROUP), int4_bit_convert=True, int4_groups_per_step=groups
    )
    config = dataclasses.replace(config, num_k_splits=min(config.num_k_splits, K // (GROUP * groups)))
    product = functools.partial(triton_gpu.quantized_matmul_triton, out_dtype=dtype, config=config)
    triton_call = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    lowered = export.export(jax.jit(product), platforms=["cuda"], disabled_checks=[triton_call])(x, qw)
    assert lowered.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("method", METHODS)
def test_tpu_kernel_interpret(method):
    x, qw = make_case(10, 40, method)
    config = mosaic_tpu.TpuConfig(block_m=16, block_n=N, block_k=128)  # 3 M tiles (the last partial), 4 K steps
    kernel = jax.jit(
        lambda x, qw: mosaic_tpu.quantized_matmul_tpu(x, qw, out_dtype=jnp.float32, config=config, interpret=True)
    )
    check(kernel(x, qw), x, qw, jnp.float32, f"tpu {method} {config}")


@pytest.mark.parametrize("method", METHODS)
def test_xla_backend_in_bfloat16(method):
    x, qw = make_case(11, 16, method)
    check(quantized_matmul(x, qw, impl="xla"), x, qw, jnp.bfloat16, f"xla {method}")


def test_default_impl_by_platform_and_rows():
    on_gpu = {m: [default_impl(m, rows, "gpu") for rows in (1, 16, 64, 65, 128, 256, 512, 8192)] for m in METHODS}
    assert on_gpu["int8"] == ["xla"] * 3 + ["pallas_gpu"] * 3 + ["xla"] * 2
    assert on_gpu["int4"] == ["pallas_gpu"] * 5 + ["xla"] * 3
    assert on_gpu["fp8"] == ["pallas_gpu"] * 3 + ["xla"] * 5
    assert [default_impl(m, 16, "tpu") for m in METHODS] == ["pallas_tpu", "pallas_tpu", "xla"]
    assert [default_impl(m, 4096, "cpu") for m in METHODS] == ["reference"] * 3


def test_fp8_fast_accumulation_by_platform_and_rows():
    rows = FP8_FAST_ACCUMULATION_MIN_ROWS
    assert [default_fp8_fast_accumulation(m, "gpu") for m in (1, 256, rows - 1, rows, 8192)] == [False] * 3 + [True] * 2
    assert not default_fp8_fast_accumulation(8192, "tpu") and not default_fp8_fast_accumulation(8192, "cpu")
    x, qw = make_case(15, 4, "int8")
    with pytest.raises(ValueError, match="int8 with 'xla'"):
        quantized_matmul(x, qw, impl="xla", fp8_fast_accumulation=True)
    x, qw = make_case(15, 4, "fp8")
    with pytest.raises(ValueError, match="fp8 with 'reference'"):
        quantized_matmul(x, qw, impl="reference", fp8_fast_accumulation=True)


def test_op_rejects_bad_inputs():
    x, qw = make_case(12, 4, "int8")
    cases = [
        (ValueError, lambda: quantized_matmul(x[:, :-1], qw), "K=511"),
        (ValueError, lambda: quantized_matmul(x[0], qw), "(512,)"),
        (TypeError, lambda: quantized_matmul(x.astype(jnp.int32), qw), "int32"),
        (TypeError, lambda: quantized_matmul(x, qw, out_dtype=jnp.int8), "int8"),
        (ValueError, lambda: quantized_matmul(x, qw, impl="cuda"), "'cuda'"),
        (TypeError, lambda: quantized_matmul(x, qw.values), "QuantizedWeight"),
    ]
    for error_type, call, fragment in cases:
        with pytest.raises(error_type) as error:
            call()
        assert fragment in str(error.value)


def test_kernels_reject_tilings_that_do_not_divide_k():
    x, qw = make_case(13, 4, "int4", k=480, group_size=48)  # g/2 = 24 is no tensor-core tile edge
    with pytest.raises(ValueError) as error:
        quantized_matmul(x, qw, impl="pallas_gpu_interpret")
    assert "group_size a power of two >= 32, got 48" in str(error.value)
    x, qw = make_case(13, 4, "int8", k=40)
    with pytest.raises(ValueError) as error:
        quantized_matmul(x, qw, impl="pallas_gpu_interpret")
    assert "K=40" in str(error.value)
    with pytest.raises(ValueError) as error:
        mosaic_tpu.check_config(mosaic_tpu.TpuConfig(16, 100, 512), 40, 512, 200, None)
    assert "block_n=100" in str(error.value)


LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
GPU_DEFAULTS = [("pallas_gpu", "int8"), ("pallas_gpu", "int4"), ("pallas_gpu", "fp8"), ("xla", "fp8")]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU to compile the Triton kernel")
@pytest.mark.parametrize("m", [1, 256])
@pytest.mark.parametrize("k, n", LLAMA_8B_SHAPES)
@pytest.mark.parametrize("impl, method", GPU_DEFAULTS)
def test_llama_shapes_on_gpu(impl, method, k, n, m):
    x, qw = make_case(14, m, method, k=k, n=n, group_size=128)
    what = f"{impl} {method} [{m}, {k}] x [{k}, {n}]"
    check(quantized_matmul(x, qw, impl=impl), x, qw, jnp.bfloat16, what, naive_dtype=np.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="Hopper's fast fp8 accumulation needs a GPU")
@pytest.mark.parametrize("k, n", [(4096, 6144), (14336, 4096)])
def test_fp8_fast_accumulation_error_beside_fp8_rounding(k, n):
    """The engine's wide fp8 products accumulate in Hopper's fast mode: the error that adds (against the exact product
    of the same e4m3 operands) must stay under a quarter of the error e4m3 rounding itself makes (against the product
    of the unrounded operands), in RMS over all outputs: the two being independent, the total error then grows by at
    most 3%."""
    m = FP8_FAST_ACCUMULATION_MIN_ROWS * 2
    x, qw = make_case(16, m, "fp8", k=k, n=n)
    unrounded = np.asarray(x, np.float64) @ random_weight(16, k, n).astype(np.float64)
    exact = naive_product(x, qw)

    def rms(a):
        return float(np.sqrt(np.mean(np.square(a))))

    rounding = rms(exact - unrounded)
    errors = {
        fast: rms(
            np.asarray(quantized_matmul(x, qw, impl="xla", out_dtype=jnp.float32, fp8_fast_accumulation=fast)) - exact
        )
        for fast in (False, True)
    }
    print(
        f"\nfp8 [{m}, {k}] x [{k}, {n}]: RMS error of e4m3 rounding {rounding:.3e}, of the accumulation "
        f"{errors[False]:.3e} (full) / {errors[True]:.3e} (fast), output RMS {rms(exact):.3e}"
    )
    assert errors[True] < 0.25 * rounding
