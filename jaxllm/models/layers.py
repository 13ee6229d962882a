"""Shared NNX layers of the Llama family: Linear, Embed, RMSNorm and the SwiGLU MLP.

Every parameter carries ``logical_axes`` metadata; ``sharding/`` maps those names onto mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_INIT_STDDEV = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype, stddev=_INIT_STDDEV):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * stddev).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel ``[in, out]`` (the transpose of a torch Linear weight)."""

    def __init__(self, in_features: int, out_features: int, *, axes, dtype, rngs: nnx.Rngs, use_bias=False):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype), logical_axes=axes)
        self.bias = nnx.Param(_normal(rngs, (out_features,), dtype), logical_axes=axes[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value()
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(jnp.float32)
        return y.astype(kernel.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab_size, features), dtype), logical_axes=("vocab", "embed"))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.get_value(), token_ids, axis=0)  # [T, D]

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied lm_head: logits ``[S, V]`` in float32."""
        embedding = self.embedding.get_value()
        return jnp.dot(hidden.astype(embedding.dtype), embedding.T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """Normalizes in float32, scales by ``weight``, returns the input dtype (as transformers' Llama does)."""

    def __init__(self, features: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(1.0 + _normal(rngs, (features,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        weight = self.weight.get_value()
        return weight * xf.astype(weight.dtype)


class SwiGLUMLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
