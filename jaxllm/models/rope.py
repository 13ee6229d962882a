"""Rotary position embeddings: the default, linear, dynamic-NTK and Llama 3 frequency variants.

Owns the inverse-frequency tables and applying the rotation in Hugging Face's rotate-half convention. Pure functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.config import RopeConfig


def _base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [H/2]


def _llama3_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    inv_freq = _base_inv_freq(rope.theta, head_dim)
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def static_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` for the variants that do not depend on sequence length."""
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, head_dim)
    if rope.rope_type == "linear":
        return _base_inv_freq(rope.theta, head_dim) / rope.factor
    return _base_inv_freq(rope.theta, head_dim)


def _dynamic_inv_freq(rope: RopeConfig, head_dim: int, context_lens: jax.Array) -> jax.Array:
    """Dynamic NTK: the base grows with each token's request length once it passes the original length ``[T, H/2]``.

    Matches transformers, which recomputes the base from the longest position of each forward pass: here each token
    uses its own request's length after this step, so a request's keys are rotated as transformers rotates them.
    """
    original = rope.original_max_position_embeddings
    seq_len = jnp.maximum(context_lens, original).astype(jnp.float32)  # [T]
    base = rope.theta * ((rope.factor * seq_len / original) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [H/2]
    return 1.0 / (base[:, None] ** exponents[None, :])


def rope_cos_sin(rope: RopeConfig, head_dim: int, positions: jax.Array, context_lens: jax.Array | None = None):
    """cos and sin ``[T, H]`` for each token position (float32)."""
    if rope.rope_type == "dynamic":
        if context_lens is None:
            raise ValueError("dynamic rope scaling needs each token's request length (context_lens)")
        inv_freq = _dynamic_inv_freq(rope, head_dim, context_lens)  # [T, H/2]
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq
    else:
        inv_freq = jnp.asarray(static_inv_freq(rope, head_dim), jnp.float32)  # [H/2]
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [T, heads, H]`` by per-token cos/sin ``[T, H]``, rotate-half convention, in float32."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.astype(x.dtype)
