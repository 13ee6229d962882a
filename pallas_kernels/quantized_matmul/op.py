"""The public quantized matmul op: validates shapes and dtypes and dispatches to a backend.

``quantized_matmul(x [M, K], qw) -> [M, N]`` computes ``x @ W`` for a ``QuantizedWeight`` ``qw`` of a ``W [K, N]``
(layouts and scheme semantics in ``jaxllm.quantization.schemes``: int8 and int4 are weight-only, fp8 also quantizes
the activations per token).

Backends (``impl=``): ``"reference"`` (dequantize, f32 matmul; any platform), ``"xla"`` (the product left to XLA in
the activation dtype; fp8 as a dot of two float8_e4m3fn operands, which XLA hands to cuBLASLt on Hopper),
``"pallas_gpu"`` (Pallas Triton kernels in ``triton_gpu``), ``"pallas_tpu"`` (Pallas Mosaic kernels in
``mosaic_tpu``), and ``"pallas_gpu_interpret"`` / ``"pallas_tpu_interpret"`` (the same kernel bodies interpreted on
CPU). By default the backend follows the platform, the method and the number of rows M (the step's token bucket in the
engine): on a GPU, the Pallas kernel where it measured faster than XLA's product under the engine's XLA options on an
H100 (``benchmarks/quantized_matmul.py --engine-xla-options``, benchmarks/RESULTS.md), XLA elsewhere; TPU ->
``pallas_tpu`` for int8/int4 and ``xla`` for fp8 (not measured); CPU -> ``reference``.

fp8 on the xla backend accumulates at full f32 precision, except in wide products on a GPU
(``FP8_FAST_ACCUMULATION_MIN_ROWS`` rows or more: prefill chunks), which use Hopper's fast fp8 accumulation as vLLM's
CUTLASS fp8 GEMMs do; its extra error is small beside e4m3's own rounding (GPU test
``test_fp8_fast_accumulation_error_beside_fp8_rounding``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.quantization.schemes import QuantizedWeight, validate_quantized_weight
from pallas_kernels.quantized_matmul import reference

IMPLS = ("reference", "xla", "pallas_gpu", "pallas_gpu_interpret", "pallas_tpu", "pallas_tpu_interpret")
ACTIVATION_DTYPES = ("bfloat16", "float16", "float32")


# Rows M (inclusive) where the Pallas GPU kernel beat XLA on the Llama-3.1-8B layer shapes at M = 16 ... 4096 (H100,
# 2026-11-26). Outside them XLA wins: for int8 at M <= 64 its Triton GEMM fuses the int8 -> bf16 conversion and reads
# the weight faster, and from M = 512 cuBLAS after one dequantizing pass wins, as it does for int4 from 256 and for fp8
# (cuBLASLt's fp8 GEMM) from 128.
GPU_PALLAS_ROWS = {"int8": (65, 256), "int4": (1, 128), "fp8": (1, 64)}

# fp8 products of at least this many rows use Hopper's fast accumulation on a GPU. Measured on an H100 (2026-11-26,
# benchmarks/RESULTS.md): cuBLASLt's fp8 GEMM 8-15% faster with it at M = 4096, no faster at M = 256 and slower at
# M = 1; J8's prefill 8% faster with it from 512 rows on, its throughput about 4% higher.
FP8_FAST_ACCUMULATION_MIN_ROWS = 512


def default_impl(method: str, num_rows: int, platform: str | None = None) -> str:
    """The backend ``quantized_matmul`` uses for ``method`` with ``num_rows`` rows of x on ``platform`` (default:
    JAX's default backend)."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        lo, hi = GPU_PALLAS_ROWS[method]
        return "pallas_gpu" if lo <= num_rows <= hi else "xla"
    if platform == "tpu":
        return "xla" if method == "fp8" else "pallas_tpu"
    return "reference"


def default_fp8_fast_accumulation(num_rows: int, platform: str | None = None) -> bool:
    """Whether an fp8 product of ``num_rows`` rows on ``platform`` (default: JAX's default backend) accumulates in
    Hopper's fast mode when left to XLA."""
    platform = platform or jax.default_backend()
    return platform == "gpu" and num_rows >= FP8_FAST_ACCUMULATION_MIN_ROWS


def _validate(x, qw: QuantizedWeight, out_dtype) -> None:
    validate_quantized_weight(qw)
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be [M, K], got shape {getattr(x, 'shape', None)}")
    if jnp.dtype(x.dtype).name not in ACTIVATION_DTYPES:
        raise TypeError(f"x must have dtype in {ACTIVATION_DTYPES}, got {x.dtype}")
    if jnp.dtype(out_dtype).name not in ACTIVATION_DTYPES:
        raise TypeError(f"out_dtype must be one of {ACTIVATION_DTYPES}, got {out_dtype}")
    if x.shape[0] < 1:
        raise ValueError(f"x has no rows: shape {x.shape}")
    if x.shape[1] != qw.num_inputs:
        raise ValueError(f"x has K={x.shape[1]} columns but the weight has shape [K, N] = {list(qw.shape)}")


def _backend(impl: str):
    if impl == "reference":
        return reference.quantized_matmul_reference
    if impl == "xla":
        return reference.quantized_matmul_xla
    interpret = impl.endswith("_interpret")
    if impl.startswith("pallas_gpu"):
        from pallas_kernels.quantized_matmul import triton_gpu

        return functools.partial(triton_gpu.quantized_matmul_triton, interpret=interpret)
    from pallas_kernels.quantized_matmul import mosaic_tpu

    return functools.partial(mosaic_tpu.quantized_matmul_tpu, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("impl", "out_dtype", "fp8_fast_accumulation"))
def quantized_matmul(
    x: jax.Array,
    qw: QuantizedWeight,
    *,
    impl: str | None = None,
    out_dtype=None,
    fp8_fast_accumulation: bool | None = None,
) -> jax.Array:
    """``x [M, K] @ W [K, N]`` for the quantized ``qw``; returns ``[M, N]`` in ``out_dtype`` (default: x's dtype).

    ``fp8_fast_accumulation`` (fp8 on the xla backend only): accumulate in Hopper's fast mode; default
    ``default_fp8_fast_accumulation(M)``."""
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _validate(x, qw, out_dtype)
    impl = impl or default_impl(qw.method, x.shape[0])
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    if impl != "xla" or qw.method != "fp8":
        if fp8_fast_accumulation:
            raise ValueError(f"fp8_fast_accumulation applies to fp8 with impl='xla', not {qw.method} with {impl!r}")
        return _backend(impl)(x, qw, out_dtype=out_dtype)
    if fp8_fast_accumulation is None:
        fp8_fast_accumulation = default_fp8_fast_accumulation(x.shape[0])
    return reference.quantized_matmul_xla(x, qw, out_dtype=out_dtype, fp8_fast_accumulation=fp8_fast_accumulation)


@functools.partial(jax.jit, static_argnames=("impl", "out_dtype"))
def quantized_matmul_fused(x: jax.Array, weights, *, impl: str | None = None, out_dtype=None) -> tuple[jax.Array, ...]:
    """``x @ W_i`` for several quantized weights sharing ``x`` (q/k/v, gate/up): one Pallas GPU launch over all of
    them when the backend is ``pallas_gpu`` (or its interpreted twin) and ``triton_gpu.fused_config`` finds a common
    tiling; otherwise one ``quantized_matmul`` each. Returns the ``[M, N_i]`` products."""
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    for qw in weights:
        _validate(x, qw, out_dtype)
    backend = impl or default_impl(weights[0].method, x.shape[0])
    if backend in ("pallas_gpu", "pallas_gpu_interpret") and len(weights) > 1:
        from pallas_kernels.quantized_matmul import triton_gpu

        interpret = backend.endswith("_interpret")
        config = triton_gpu.fused_config(x.shape[0], weights, interpret)
        if config is not None:
            return triton_gpu.quantized_matmul_triton_fused(
                x, tuple(weights), out_dtype=out_dtype, config=config, interpret=interpret
            )
    return tuple(quantized_matmul(x, qw, impl=impl, out_dtype=out_dtype) for qw in weights)
