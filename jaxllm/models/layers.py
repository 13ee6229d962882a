"""Shared NNX layers of the Llama family: Linear (and its quantized twin), Embed, RMSNorm and the SwiGLU MLP.

Every parameter carries ``logical_axes`` metadata; ``sharding/`` maps those names onto mesh axes.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import env_switch
from jaxllm.models import activation_sharding as act
from jaxllm.quantization.config import QuantizationConfig
from jaxllm.quantization.schemes import QuantizedWeight, expected_layout
from pallas_kernels.quantized_matmul import default_impl, quantized_matmul_fused

_GPU_KERNEL_MIN_K_STEP = 16  # the Pallas GPU kernel's smallest K tile
_GPU_KERNEL_MIN_INT4_GROUP = 32

_INIT_STDDEV = 0.02
# Quantized projections that share an input (q/k/v, gate/up) run as one Pallas launch where the GPU kernel serves
# (fewer, larger launches: each pays a fixed ~5 us at batch 1; H100, L8 batch 1: int4 4.71 -> 4.31 ms, fp8 5.36 ->
# 4.63 ms, benchmarks/RESULTS.md). On unless this variable is "0".
FUSED_PROJECTIONS_ENV = "JAXLLM_FUSED_PROJECTIONS"


def normal_init(rngs: nnx.Rngs, shape, dtype, stddev=_INIT_STDDEV):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * stddev).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel ``[in, out]`` (the transpose of a torch Linear weight)."""

    def __init__(self, in_features: int, out_features: int, *, axes, dtype, rngs: nnx.Rngs, use_bias=False):
        self.kernel = nnx.Param(normal_init(rngs, (in_features, out_features), dtype), logical_axes=axes)
        self.bias = nnx.Param(normal_init(rngs, (out_features,), dtype), logical_axes=axes[1:]) if use_bias else None
        self.axes = tuple(axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value()
        if self.bias is None and act.reduces_in_kernel(self.axes[0]):
            return _row_parallel_product(x, kernel, self.axes)
        if self.bias is None:
            return dense_product(x, kernel)
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        return (y + self.bias.get_value().astype(jnp.float32)).astype(kernel.dtype)


def dense_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` accumulated in float32 by the matmul units, rounded once to the model dtype. Under tensor
    parallelism a row-parallel layer's partial products are summed in that dtype too (half the bytes of float32)."""
    return jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=kernel.dtype)


def _row_parallel_product(x: jax.Array, kernel: jax.Array, axes) -> jax.Array:
    """``Linear``'s product when its input axis is split over the mesh: each device multiplies its shards and
    ``per_shard`` sums the partial products (where GSPMD would insert its own all-reduce)."""
    rows = x.reshape(-1, x.shape[-1])
    (y,) = act.per_shard(
        lambda rows, kernel: (dense_product(rows, kernel),),
        in_axes=[("tokens", axes[0]), axes],
        out_axes=[("tokens", axes[1])],
        sum_over=axes[0],
    )(rows, kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[1])


class QuantizedLinear(nnx.Module):
    """``Linear`` with a quantized kernel: ``values`` and ``scales`` as in ``jaxllm.quantization.schemes`` (filled by
    the loader, which quantizes each checkpoint tensor as it arrives); the bias stays in the model dtype."""

    def __init__(self, in_features, out_features, *, axes, dtype, quantization: QuantizationConfig, use_bias=False):
        quantization.check_in_features(in_features, out_features)
        self.method = quantization.method
        self.group_size = quantization.group_size if self.method == "int4" else None
        self.shape = (in_features, out_features)
        self.matmul_impl = None  # a quantized_matmul backend; None: the platform's default for each step width
        (values_shape, values_dtype), (scales_shape, _) = expected_layout(self.method, self.shape, self.group_size)
        values_axes = axes[::-1] if self.method == "fp8" else axes  # fp8 values are stored [N, K]
        scales_axes = axes if self.method == "int4" else axes[1:]
        self.axes, self.values_axes, self.scales_axes = tuple(axes), tuple(values_axes), tuple(scales_axes)
        self.values = nnx.Param(jnp.zeros(values_shape, values_dtype), logical_axes=values_axes)
        self.scales = nnx.Param(jnp.ones(scales_shape, jnp.float32), logical_axes=scales_axes)
        # zero points of a checkpoint stored with them, as (8 - zero) * scale per group ([K/group, N]); see project
        self.offsets = (
            nnx.Param(jnp.zeros(scales_shape, jnp.float32), logical_axes=scales_axes)
            if quantization.zero_points
            else None
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=axes[1:]) if use_bias else None

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """``x [..., K]`` -> ``[..., N]`` in ``out_dtype`` (default ``x``'s dtype; float32 also makes the product
        itself float32, as the logits want)."""
        out_dtype = out_dtype or x.dtype
        # With a bias the product is float32; else as Linear: partial sums in the model dtype (or in float32 when
        # asked, e.g. for logits).
        (y,) = _sharded_products(x, (self,), jnp.float32 if self.bias is not None else out_dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.get_value().astype(jnp.float32)
        return y.astype(out_dtype).reshape(*x.shape[:-1], self.shape[1])


def shard_weight(values, scales, method: str, group_size: int | None, k: int) -> QuantizedWeight:
    """The ``QuantizedWeight`` of the (shard of the) arrays a device holds, for ``K = k`` input rows (fp8 values are
    stored ``[N, K]``, the others ``[..., N]``)."""
    n = values.shape[0] if method == "fp8" else values.shape[1]
    return QuantizedWeight(values, scales, method, group_size, (k, n))


def project(x: jax.Array, layers) -> tuple[jax.Array, ...]:
    """Each layer's product of the shared input ``x``; quantized layers of one scheme without biases go through
    ``quantized_matmul_fused`` (one launch where the Pallas GPU kernel serves) unless ``JAXLLM_FUSED_PROJECTIONS=0``."""
    if env_switch(FUSED_PROJECTIONS_ENV) is False or not _one_quantized_scheme(layers):
        return tuple(layer(x) for layer in layers)
    ys = _sharded_products(x, layers, x.dtype)
    return tuple(y.reshape(*x.shape[:-1], layer.shape[1]) for y, layer in zip(ys, layers, strict=True))


def _sharded_products(x: jax.Array, layers, out_dtype) -> tuple[jax.Array, ...]:
    """``x [..., K]`` times the weight of each of ``layers`` (``QuantizedLinear``s of one scheme and input axis), as
    ``[M, N_i]`` products in ``out_dtype``. On a mesh each device multiplies its own shards (a Pallas kernel is opaque
    to the partitioner, which would gather the weight): column-parallel layers need no communication, row-parallel
    ones sum partial products."""
    first = layers[0]
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    arrays, in_axes = [], [("tokens", first.axes[0])]
    for layer in layers:
        arrays += [layer.values.get_value(), layer.scales.get_value()]
        in_axes += [layer.values_axes, layer.scales_axes]
    with_offsets = first.offsets is not None
    for layer in layers if with_offsets else ():
        arrays.append(layer.offsets.get_value())
        in_axes.append(layer.scales_axes)
    local_products = act.per_shard(
        functools.partial(
            _local_products,
            method=first.method,
            group_size=first.group_size,
            impl=first.matmul_impl,
            out_dtype=out_dtype,
            num_layers=len(layers) if with_offsets else None,
        ),
        in_axes=in_axes,
        out_axes=tuple(("tokens", layer.axes[1]) for layer in layers),
        sum_over=first.axes[0],
    )
    return local_products(rows, *arrays)


def _one_quantized_scheme(layers) -> bool:
    """Whether ``layers`` are quantized alike (method, group, input size and axis, backend) and have no biases."""
    if not all(isinstance(layer, QuantizedLinear) and layer.bias is None for layer in layers):
        return False
    keys = {(la.method, la.group_size, la.shape[0], la.axes[0], la.matmul_impl, la.offsets is None) for la in layers}
    return len(keys) == 1


def _local_products(rows, *arrays, method, group_size, impl, out_dtype, num_layers=None) -> tuple[jax.Array, ...]:
    """``rows @ W_i`` for the (shards of the) weights in ``arrays`` (values and scales of each, then with
    ``num_layers`` each layer's zero-point offsets), in one launch if it can; the backend re-checked for the local K.

    Zero points: ``W = (code - zero) * scale = (code - 8) * scale + offset`` per group, so the product is the
    symmetric one plus each group's sum of ``rows`` times the group's offsets, a ``[M, K/group] @ [K/group, N]``
    matmul beside the kernel (under tensor parallelism both parts are partial sums over the local rows of K)."""
    offsets = arrays[len(arrays) - num_layers :] if num_layers else ()
    arrays = arrays[: len(arrays) - len(offsets)]
    k = rows.shape[1]
    weights = tuple(
        shard_weight(values, scales, method, group_size, k)
        for values, scales in zip(arrays[::2], arrays[1::2], strict=True)
    )
    impl = matmul_impl(method, k, group_size, rows.shape[0], impl)
    products = quantized_matmul_fused(rows, weights, impl=impl, out_dtype=out_dtype)
    if not offsets:
        return products
    group_sums = rows.astype(jnp.float32).reshape(rows.shape[0], k // group_size, group_size).sum(-1)  # [M, K/g]
    # one dot for all the layers sharing rows (q/k/v, gate/up), split after
    corrections = jnp.dot(group_sums, jnp.concatenate(offsets, axis=1), precision=jax.lax.Precision.HIGHEST)
    ends = list(itertools.accumulate(o.shape[1] for o in offsets))
    return tuple(
        (y.astype(jnp.float32) + corrections[:, end - o.shape[1] : end]).astype(out_dtype)
        for y, o, end in zip(products, offsets, ends, strict=True)
    )


def matmul_impl(method: str, in_features: int, group_size: int | None, num_rows: int, impl: str | None = None) -> str:
    """``impl`` (default: the platform's ``quantized_matmul`` backend for ``num_rows`` rows), or ``"xla"`` where the
    Pallas GPU kernel cannot tile K."""
    impl = impl or default_impl(method, num_rows)
    group = group_size or _GPU_KERNEL_MIN_INT4_GROUP
    bad_int4_group = method == "int4" and (group < _GPU_KERNEL_MIN_INT4_GROUP or group & (group - 1))
    if impl.startswith("pallas_gpu") and (in_features % _GPU_KERNEL_MIN_K_STEP or bad_int4_group):
        return "xla"
    return impl


def make_linear(in_features, out_features, *, axes, dtype, rngs, use_bias=False, quantization=None):
    """A ``Linear``, or a ``QuantizedLinear`` when ``quantization`` (a ``QuantizationConfig``) is given."""
    if quantization is None:
        return Linear(in_features, out_features, axes=axes, dtype=dtype, rngs=rngs, use_bias=use_bias)
    return QuantizedLinear(
        in_features, out_features, axes=axes, dtype=dtype, quantization=quantization, use_bias=use_bias
    )


def lm_head_logits(lm_head: Linear | QuantizedLinear | None, embed_tokens, hidden: jax.Array) -> jax.Array:
    """``hidden [S, D]`` -> float32 logits ``[S, V]`` from ``lm_head``, or from ``embed_tokens`` (an ``Embed``) when
    the head is tied and unquantized (``lm_head`` None)."""
    if lm_head is None:
        return embed_tokens.attend(hidden)
    if isinstance(lm_head, QuantizedLinear):
        return lm_head(hidden, out_dtype=jnp.float32)
    kernel = lm_head.kernel.get_value()
    return jnp.dot(hidden.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(rngs, (vocab_size, features), dtype), logical_axes=("vocab", "embed"))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.get_value(), token_ids, axis=0)  # [T, D]

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied lm_head: logits ``[S, V]`` in float32."""
        embedding = self.embedding.get_value()
        return jnp.dot(hidden.astype(embedding.dtype), embedding.T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """Normalizes in float32, scales by ``weight``, returns the input dtype (as transformers' Llama does)."""

    def __init__(self, features: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(1.0 + normal_init(rngs, (features,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        weight = self.weight.get_value()
        return weight * xf.astype(weight.dtype)


class SwiGLUMLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, rngs: nnx.Rngs, quantization=None):
        linear = functools.partial(make_linear, dtype=dtype, rngs=rngs, quantization=quantization)
        self.gate_proj = linear(hidden_size, intermediate_size, axes=("embed", "mlp"))
        self.up_proj = linear(hidden_size, intermediate_size, axes=("embed", "mlp"))
        self.down_proj = linear(intermediate_size, hidden_size, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        gated = act.constrain(jax.nn.silu(gate) * up, act.MLP)  # [T, I]
        return act.constrain(self.down_proj(gated), act.HIDDEN)
