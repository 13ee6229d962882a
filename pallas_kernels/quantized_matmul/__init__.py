"""Quantized matmul: ``x @ W`` for int8, int4 and fp8 weights (``jaxllm.quantization``).

Public entry point ``quantized_matmul``; backends are chosen with ``impl=`` or, by default, by platform.
"""

from pallas_kernels.quantized_matmul.op import (
    FP8_FAST_ACCUMULATION_MIN_ROWS,
    IMPLS,
    default_fp8_fast_accumulation,
    default_impl,
    quantized_matmul,
    quantized_matmul_fused,
)

__all__ = [
    "FP8_FAST_ACCUMULATION_MIN_ROWS",
    "IMPLS",
    "default_fp8_fast_accumulation",
    "default_impl",
    "quantized_matmul",
    "quantized_matmul_fused",
]
