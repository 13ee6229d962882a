"""Weight quantizers: ``QuantizedWeight``, ``quantize_weight`` and ``dequantize_weight``, plus the dynamic per-token
activation quantizer of the fp8 scheme.

A linear layer computes ``y = x @ W`` with ``W [K, N]`` (K inputs, N outputs). Each scheme stores:

====== ============================================ ========================= ===================================
method ``values``                                   ``scales``                meaning
====== ============================================ ========================= ===================================
int8   int8 ``[K, N]``, in [-127, 127]              f32 ``[N]``               ``W[k, n] = values[k, n] * s[n]``
int4   uint8 ``[K/2, N]``, two 4-bit codes a byte   f32 ``[K/group, N]``      ``W[k, n] = (code - 8) * s[k//g, n]``
fp8    float8_e4m3fn ``[N, K]`` (transposed)        f32 ``[N]``               ``W[k, n] = values[n, k] * s[n]``
====== ============================================ ========================= ===================================

int4 has no zero point (codes -8..7 stored as 0..15; each group's scale is searched to minimise its rounding error,
see ``_quantize_int4``): dequantizing is one multiply, and a kernel can apply
each group's scale once to a partial dot product instead of to every weight, which a zero point would spoil
(``x . (q - z) * s`` needs an extra ``z * sum(x)`` per group). Round-to-nearest weights are centred on zero, so the
zero point buys little. Packing stays inside each group of ``g`` rows along K: byte ``j`` of group ``i`` (row
``i * g/2 + j`` of ``values``) holds row ``i*g + j`` in its low nibble and row ``i*g + g/2 + j`` in its high nibble.
A kernel thus reads one group as two contiguous halves of x against the low and high nibbles (no interleaving), and
splitting K between devices at group boundaries splits ``values`` and ``scales`` along their first axis.

fp8 values are stored ``[N, K]`` (contracting dimension minor on both operands) because cuBLASLt's fp8 GEMMs need
that layout; stored ``[K, N]``, XLA would transpose the whole weight on every call. At matmul time activations get a
dynamic per-token scale (``quantize_activations_fp8``) and the product of two fp8 operands accumulates in f32.

Scales are float32, ``amax * (1 / qmax)`` (a multiply: XLA rewrites a division by a constant into one anyway, so
written out the scales are the same on every backend and reproducible in numpy). Quantizing runs in jnp at load time,
one weight at a time. This module imports no kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

METHODS = ("int8", "int4", "fp8")
INT8_MAX = 127
INT4_MAX = 7  # codes -8..7, stored offset by INT4_OFFSET; scales are fractions of absmax / 7
INT4_MIN = -8
INT4_OFFSET = 8
INT4_SCALE_FRACTIONS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0, 0.975, ..., 0.6 (0.875 = 7/8 among them)
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["method", "group_size", "shape"]
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``W [K, N]`` (a pytree: ``values`` and ``scales`` are leaves, the rest is static)."""

    values: jax.Array  # int8 [K, N] | uint8 [K/2, N] | float8_e4m3fn [N, K]; see the module table
    scales: jax.Array  # f32 [N] | f32 [K/group, N] | f32 [N]
    method: str
    group_size: int | None  # int4 only
    shape: tuple[int, int]  # (K, N) of the original weight

    @property
    def num_inputs(self) -> int:
        return self.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads for this weight (values plus scales)."""
        return self.values.size * self.values.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize


def expected_layout(method: str, shape: tuple[int, int], group_size: int | None):
    """``((values shape, values dtype), (scales shape, scales dtype))`` of a weight of ``shape`` [K, N]."""
    k, n = shape
    if method == "int8":
        return ((k, n), jnp.dtype(jnp.int8)), ((n,), jnp.dtype(jnp.float32))
    if method == "int4":
        return ((k // 2, n), jnp.dtype(jnp.uint8)), ((k // group_size, n), jnp.dtype(jnp.float32))
    if method == "fp8":
        return ((n, k), jnp.dtype(FP8_DTYPE)), ((n,), jnp.dtype(jnp.float32))
    raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")


def validate_quantized_weight(qw) -> None:
    """Raise TypeError/ValueError unless ``qw`` is a consistent ``QuantizedWeight``."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"expected a QuantizedWeight, got {type(qw).__name__}")
    group = qw.group_size
    if qw.method == "int4" and (not isinstance(group, int) or group < 2 or group % 2 or qw.shape[0] % group):
        raise ValueError(f"int4 weight of shape {qw.shape} has an unusable group_size {qw.group_size!r}")
    (values_shape, values_dtype), (scales_shape, scales_dtype) = expected_layout(qw.method, qw.shape, qw.group_size)
    if qw.values.shape != values_shape or qw.values.dtype != values_dtype:
        raise ValueError(
            f"{qw.method} weight of shape {qw.shape} needs values {values_dtype.name}{list(values_shape)}, "
            f"got {qw.values.dtype.name}{list(qw.values.shape)}"
        )
    if qw.scales.shape != scales_shape or qw.scales.dtype != scales_dtype:
        raise ValueError(
            f"{qw.method} weight of shape {qw.shape} needs scales {scales_dtype.name}{list(scales_shape)}, "
            f"got {qw.scales.dtype.name}{list(qw.scales.shape)}"
        )


def _validate_request(w, method, group_size) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"weight must be a 2-D array [K, N], got shape {getattr(w, 'shape', None)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"weight must be floating point, got dtype {w.dtype}")
    k, n = w.shape
    if k < 1 or n < 1:
        raise ValueError(f"weight shape {w.shape} has an empty dimension")
    if method != "int4":
        return
    if not isinstance(group_size, numbers.Integral) or group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group_size must be a positive even int, got {group_size!r}")
    if k % group_size:
        raise ValueError(
            f"int4 needs K (the weight's first dimension) = {k} to be a multiple of group_size {group_size}"
        )


def _safe(scale):
    """Divisor for ``scale``: an all-zero channel (scale 0) divides by 1 and quantizes to exact zeros."""
    return jnp.where(scale > 0, scale, 1.0)


@jax.jit
def _quantize_int8(w):
    w = w.astype(jnp.float32)  # [K, N]
    scales = jnp.max(jnp.abs(w), axis=0) * (1.0 / INT8_MAX)  # [N]
    values = jnp.clip(jnp.round(w / _safe(scales)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scales


@functools.partial(jax.jit, static_argnames="group_size")
def _quantize_int4(w, group_size: int):
    """Group-wise int4 with each group's scale chosen to minimise its squared rounding error.

    Candidates are ``alpha * absmax / 7`` for ``alpha`` in ``INT4_SCALE_FRACTIONS`` (1 first, so ties keep the plain
    absmax scale); codes use the whole stored range -8..7, so ``alpha = 7/8`` puts a negative extreme on -8. A smaller
    scale clips the largest weights a little and rounds all the others more finely, which usually wins.
    """
    k, n = w.shape
    w = w.astype(jnp.float32).reshape(k // group_size, group_size, n)  # [K/g, g, N]
    amax = jnp.max(jnp.abs(w), axis=1)  # [K/g, N]

    def codes_for(scales):
        return jnp.clip(jnp.round(w / _safe(scales)[:, None, :]), INT4_MIN, INT4_MAX)

    best_scales, best_error = None, None
    for alpha in INT4_SCALE_FRACTIONS:
        scales = amax * (alpha / INT4_MAX)
        error = jnp.sum(jnp.square(codes_for(scales) * scales[:, None, :] - w), axis=1)  # [K/g, N]
        if best_scales is None:
            best_scales, best_error = scales, error
        else:
            better = error < best_error
            best_scales = jnp.where(better, scales, best_scales)
            best_error = jnp.where(better, error, best_error)
    codes = codes_for(best_scales).astype(jnp.int32) + INT4_OFFSET
    return pack_int4(codes.reshape(k, n), group_size), best_scales


def pack_int4(codes, group_size: int):
    """Packed ``values [K/2, N]`` (uint8) from stored codes ``[K, N]`` in 0..15 (signed code + ``INT4_OFFSET``), each
    group of ``group_size`` rows packed within itself as the module docstring lays out; ``unpack_int4`` inverts it."""
    k, n = codes.shape
    half = group_size // 2
    grouped = jnp.asarray(codes, jnp.int32).reshape(k // group_size, group_size, n)  # [K/g, g, N]
    packed = grouped[:, :half, :] | (grouped[:, half:, :] << 4)  # [K/g, g/2, N]
    return packed.astype(jnp.uint8).reshape(k // 2, n)


def _to_fp8(x, scales):
    """``x / scales`` rounded to float8_e4m3fn (clipped first: e4m3fn has no infinity)."""
    return jnp.clip(x / _safe(scales), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


@jax.jit
def _quantize_fp8(w):
    w = w.astype(jnp.float32)  # [K, N]
    scales = jnp.max(jnp.abs(w), axis=0) * (1.0 / FP8_MAX)  # [N]
    return _to_fp8(w, scales).T, scales  # [N, K], [N]


def quantize_weight(w, method: str, group_size: int = 128) -> QuantizedWeight:
    """Quantize ``w [K, N]`` (any float dtype) with ``method`` in ``METHODS``; ``group_size`` is used by int4 only."""
    _validate_request(w, method, group_size)
    if method == "int8":
        values, scales = _quantize_int8(w)
    elif method == "int4":
        values, scales = _quantize_int4(w, int(group_size))
    else:
        values, scales = _quantize_fp8(w)
    group = int(group_size) if method == "int4" else None
    return QuantizedWeight(values, scales, method, group, tuple(int(d) for d in w.shape))


def unpack_int4(values, group_size: int):
    """Signed int4 codes ``[K, N]`` (int8, in -8..7) from packed ``values [K/2, N]``."""
    half_k, n = values.shape
    half = group_size // 2
    packed = values.astype(jnp.int32).reshape(half_k // half, half, n)  # [K/g, g/2, N]
    low, high = (packed & 0xF) - INT4_OFFSET, (packed >> 4) - INT4_OFFSET
    return jnp.concatenate([low, high], axis=1).reshape(2 * half_k, n).astype(jnp.int8)  # [K, N]


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_weight(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The weight ``[K, N]`` that ``qw`` represents, computed in f32 and returned as ``dtype``."""
    validate_quantized_weight(qw)
    if qw.method == "int8":
        w = qw.values.astype(jnp.float32) * qw.scales[None, :]
    elif qw.method == "int4":
        k, n = qw.shape
        codes = unpack_int4(qw.values, qw.group_size).astype(jnp.float32).reshape(-1, qw.group_size, n)
        w = (codes * qw.scales[:, None, :]).reshape(k, n)
    else:
        w = qw.values.astype(jnp.float32).T * qw.scales[None, :]
    return w.astype(dtype)


@jax.jit
def quantize_activations_fp8(x):
    """Dynamic per-token fp8 quantization of ``x [M, K]``: ``(values float8_e4m3fn [M, K], scales f32 [M])`` with
    ``x[m, k] ~= values[m, k] * scales[m]``."""
    x = x.astype(jnp.float32)
    scales = jnp.max(jnp.abs(x), axis=1) * (1.0 / FP8_MAX)  # [M]
    return _to_fp8(x, scales[:, None]), scales
