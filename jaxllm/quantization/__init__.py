"""Quantized weights for jaxllm: the ``QuantizedWeight`` pytree and its quantizers (int8, int4, fp8), the
``QuantizationConfig`` behind ``LLM(quantization=...)``, and Orbax save/restore of quantized models (``checkpoint``).

The matmul that consumes them is ``pallas_kernels.quantized_matmul.quantized_matmul``; this package imports no kernels.
"""

from jaxllm.quantization.config import QuantizationConfig, resolve_quantization
from jaxllm.quantization.schemes import (
    METHODS,
    QuantizedWeight,
    dequantize_weight,
    quantize_activations_fp8,
    quantize_weight,
)

__all__ = [
    "METHODS",
    "QuantizationConfig",
    "QuantizedWeight",
    "dequantize_weight",
    "quantize_activations_fp8",
    "quantize_weight",
    "resolve_quantization",
]
