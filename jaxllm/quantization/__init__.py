"""Quantized weights for jaxllm: the ``QuantizedWeight`` pytree and its quantizers (int8, int4, fp8).

The matmul that consumes them is ``pallas_kernels.quantized_matmul.quantized_matmul``; this package imports no kernels.
"""

from jaxllm.quantization.schemes import (
    METHODS,
    QuantizedWeight,
    dequantize_weight,
    quantize_activations_fp8,
    quantize_weight,
)

__all__ = ["METHODS", "QuantizedWeight", "dequantize_weight", "quantize_activations_fp8", "quantize_weight"]
