"""Pure-jnp backends of the quantized matmul: ``reference`` (dequantize, then an f32 matmul) and ``xla`` (what XLA
makes of the same computation in the activation dtype, the baseline the Pallas kernels must beat).

Both follow the scheme's semantics: int8 and int4 are weight-only; fp8 quantizes the activations per token
(``quantize_activations_fp8``) and multiplies two fp8 operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxllm.quantization.schemes import QuantizedWeight, dequantize_weight, quantize_activations_fp8, unpack_int4

_CONTRACT_LAST_WITH_FIRST = (((1,), (0,)), ((), ()))
_CONTRACT_LAST_WITH_LAST = (((1,), (1,)), ((), ()))


def _precision(dtype):
    """Full f32 precision for f32 operands (no TF32 on GPU); the operand dtype's own otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def quantized_matmul_reference(x, qw: QuantizedWeight, *, out_dtype) -> jax.Array:
    """``x [M, K] @ dequantize_weight(qw) [K, N]`` in float32, cast to ``out_dtype``."""
    if qw.method == "fp8":
        x_values, x_scales = quantize_activations_fp8(x)  # [M, K], [M]
        # The barrier keeps the f32 -> e4m3 -> f32 round trip: XLA may otherwise drop a convert pair as "excess
        # precision" (on the GPU this reference differed from the fp8 products by 2.5% where the CPU's by 4e-7).
        x = lax.optimization_barrier(x_values).astype(jnp.float32) * x_scales[:, None]
    y = jnp.dot(x.astype(jnp.float32), dequantize_weight(qw), precision=lax.Precision.HIGHEST)  # [M, N]
    return y.astype(out_dtype)


def _dequantize_in(qw: QuantizedWeight, dtype):
    """int4 weights as ``dtype [K, N]`` for an XLA dot (XLA fuses the unpacking into the operand where it can)."""
    k, n = qw.shape
    codes = unpack_int4(qw.values, qw.group_size).reshape(-1, qw.group_size, n)  # [K/g, g, N]
    return (codes.astype(jnp.float32) * qw.scales[:, None, :]).astype(dtype).reshape(k, n)


def quantized_matmul_xla(x, qw: QuantizedWeight, *, out_dtype, fp8_fast_accumulation: bool = False) -> jax.Array:
    """The same product left to XLA: int8 as an integer-valued operand with the scale after the dot, int4
    dequantized into the activation dtype, fp8 as a dot of two float8_e4m3fn operands with f32 accumulation.

    fp8 dots ask for ``Precision.HIGHEST`` unless ``fp8_fast_accumulation``: with ``DEFAULT`` XLA lets cuBLASLt use
    Hopper's fast fp8 accumulation, whose partial sums keep fewer mantissa bits (on the GPU it put 10 of 1.5M outputs
    of a K = 4096 product 0.03 off, outside bf16's tolerance, and is faster only in wide products; ``op`` picks it
    by the number of rows)."""
    dtype = x.dtype
    if qw.method == "int8":
        y = lax.dot_general(
            x,
            qw.values.astype(dtype),
            _CONTRACT_LAST_WITH_FIRST,
            precision=_precision(dtype),
            preferred_element_type=jnp.float32,
        )  # [M, N]
        y = y * qw.scales[None, :]
    elif qw.method == "int4":
        y = lax.dot_general(
            x,
            _dequantize_in(qw, dtype),
            _CONTRACT_LAST_WITH_FIRST,
            precision=_precision(dtype),
            preferred_element_type=jnp.float32,
        )
    else:
        x_values, x_scales = quantize_activations_fp8(x)  # [M, K], [M]
        precision = lax.Precision.DEFAULT if fp8_fast_accumulation else lax.Precision.HIGHEST
        y = lax.dot_general(
            x_values, qw.values, _CONTRACT_LAST_WITH_LAST, precision=precision, preferred_element_type=jnp.float32
        )
        y = y * x_scales[:, None] * qw.scales[None, :]
    return y.astype(out_dtype)
