"""The decoder-only transformer shared by the Llama family (Llama, Mistral, Qwen2, Qwen3) and its mixture-of-experts
relatives (Mixtral, Qwen2-MoE, Qwen3-MoE).

Owns the NNX module tree, named as in Hugging Face checkpoints (``model.layers.{i}.self_attn.q_proj``...), and the
forward pass over a ragged step batch: embed -> N x (attention over the paged KV cache, SwiGLU MLP or a sparse
mixture of experts) -> norm, and ``compute_logits`` for the rows that are sampled. Family differences are config flags
(q/k/v bias, q/k norm, sliding window, tied embeddings, experts) and two class attributes naming the experts' modules
as each family's checkpoints do. The KV cache is an explicit argument and result, never module state: a (k, v) pair
per layer, or per group of layers (``jaxllm.models.kv_cache_layout``), each layer's attention told where its blocks
start (``first_block``).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxllm.models import activation_sharding as act
from jaxllm.models.attention_metadata import AttentionMetadata
from jaxllm.models.config import ModelConfig
from jaxllm.models.kv_cache_layout import KVCache, layer_ranges
from jaxllm.models.layers import (
    Embed,
    Linear,
    QuantizedLinear,
    RMSNorm,
    SwiGLUMLP,
    lm_head_logits,
    make_linear,
    project,
)
from jaxllm.models.moe import QWEN_EXPERT_NAMES, SparseMoeBlock
from jaxllm.models.rope import apply_rope, rope_cos_sin
from pallas_kernels import ragged_paged_attention, update_kv_cache


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, attention_impl=None, quantization=None):
        c = config
        linear = functools.partial(make_linear, dtype=dtype, rngs=rngs, quantization=quantization)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = linear(c.hidden_size, q_size, axes=("embed", "q_heads"), use_bias=c.attention_bias)
        self.k_proj = linear(c.hidden_size, kv_size, axes=("embed", "kv_heads"), use_bias=c.attention_bias)
        self.v_proj = linear(c.hidden_size, kv_size, axes=("embed", "kv_heads"), use_bias=c.attention_bias)
        self.o_proj = linear(q_size, c.hidden_size, axes=("q_heads", "embed"))
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.sliding_window = c.sliding_window
        self.attention_impl = attention_impl
        self.k_scale = self.v_scale = 1.0  # the KV cache holds K / k_scale, V / v_scale (vLLM's default without scales)

    def __call__(self, x, kv: tuple[jax.Array, jax.Array], md: AttentionMetadata, cos, sin, first_block: int = 0):
        """``kv``: the (k, v) arrays holding this layer's blocks from ``first_block`` on (static), returned updated."""
        num_tokens = x.shape[0]
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = act.constrain(q, act.Q_HEADS).reshape(num_tokens, self.num_heads, self.head_dim)  # [T, N, H]
        k = act.constrain(k, act.KV_HEADS).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = act.constrain(v, act.KV_HEADS).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = act.per_shard(
            functools.partial(
                _write_and_attend,
                sm_scale=self.head_dim**-0.5,
                sliding_window=self.sliding_window,
                max_query_len=md.max_query_len,
                impl=self.attention_impl,
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            ),
            in_axes=(act.HEADS_Q, act.HEADS_KV, act.HEADS_KV, act.KV_CACHE, act.KV_CACHE) + (act.REPLICATED,) * 4,
            out_axes=(act.HEADS_Q, act.KV_CACHE, act.KV_CACHE),
        )
        slot_mapping, block_tables = md.slot_mapping, md.block_tables  # logical blocks, the same for every layer
        if first_block:  # this layer's blocks start further into the array
            slot_mapping, block_tables = slot_mapping + first_block * kv[0].shape[1], block_tables + first_block
        out, k_cache, v_cache = attend(
            q, k, v, kv[0], kv[1], slot_mapping, block_tables, md.seq_lens, md.query_start_loc
        )  # out [T, N, H]
        out = act.constrain(out.reshape(num_tokens, self.num_heads * self.head_dim), act.Q_HEADS)
        return act.constrain(self.o_proj(out), act.HIDDEN), (k_cache, v_cache)


def _write_and_attend(
    q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, *, k_scale, v_scale, **options
):
    """Writes the step's K/V into the paged cache, then attends: one per-head unit, run per tensor shard on a mesh.
    The cache holds K / k_scale and V / v_scale (quantized when its dtype is fp8); attention multiplies them back."""
    k_cache, v_cache = update_kv_cache(k_cache, v_cache, k, v, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    out = ragged_paged_attention(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale=k_scale, v_scale=v_scale, **options
    )
    return out, k_cache, v_cache


class DecoderLayer(nnx.Module):
    """Attention then the MLP, each pre-normed with a residual. A sparse layer's MLP is a ``SparseMoeBlock`` held
    under ``moe_block_name`` (``mlp``, or Mixtral's ``block_sparse_moe``) with experts named ``expert_names``."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        *,
        dtype,
        rngs: nnx.Rngs,
        attention_impl=None,
        quantization=None,
        moe_block_name="mlp",
        expert_names=QWEN_EXPERT_NAMES,
    ):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(c, dtype=dtype, rngs=rngs, attention_impl=attention_impl, quantization=quantization)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp_name = moe_block_name if c.is_sparse_layer(layer) else "mlp"
        if c.is_sparse_layer(layer):
            mlp = SparseMoeBlock(c.hidden_size, c.moe, dtype=dtype, rngs=rngs, expert_names=expert_names)
        else:
            mlp = SwiGLUMLP(c.hidden_size, c.intermediate_size, dtype=dtype, rngs=rngs, quantization=quantization)
        setattr(self, self.mlp_name, mlp)

    def __call__(self, x, kv, md: AttentionMetadata, cos, sin, first_block: int = 0):
        attn_out, kv = self.self_attn(self.input_layernorm(x), kv, md, cos, sin, first_block)
        x = x + attn_out
        mlp, h = getattr(self, self.mlp_name), self.post_attention_layernorm(x)
        # The experts skip a bucket's padding tokens (query_start_loc's padded tail holds the real token count).
        return x + (mlp(h, md.query_start_loc[-1]) if isinstance(mlp, SparseMoeBlock) else mlp(h)), kv


def run_layers(
    layers, x, kv_caches: KVCache, md: AttentionMetadata, cos, sin, *, constrain_between: bool = True
) -> tuple[jax.Array, KVCache]:
    """``layers`` in order on hidden states ``x [T, D]``, each on its blocks of ``kv_caches``; returns the hidden states
    and the updated cache (the same arrays, updated in place once donated). ``constrain_between``: name the hidden
    states' axes after each layer (a pipeline stage leaves it to the layers' own constraints)."""
    new_caches = list(kv_caches)
    for layer, (index, first_block) in zip(layers, layer_ranges(kv_caches, len(layers)), strict=True):
        x, new_caches[index] = layer(x, new_caches[index], md, cos, sin, first_block)
        if constrain_between:
            x = act.constrain(x, act.HIDDEN)
    return x, new_caches


class DecoderModel(nnx.Module):
    """The ``model.*`` part of a HF checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, **layer_options):
        c = config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        layer = functools.partial(DecoderLayer, c, dtype=dtype, rngs=rngs, **layer_options)
        self.layers = nnx.List([layer(i) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, rngs=rngs)


class DecoderForCausalLM(nnx.Module):
    """A Llama-family causal LM. ``__call__`` runs the step's tokens; ``compute_logits`` the sampled rows.

    ``quantization`` (a ``QuantizationConfig``) makes the decoder layers' linear layers ``QuantizedLinear``s, and
    lm_head one too when ``quantization.lm_head`` (also when tied: the loader fills it from the embedding table);
    the embeddings keep ``dtype``. Mixture-of-experts models are not quantized (a ``ValueError``).
    """

    MOE_BLOCK_NAME = "mlp"  # where a sparse layer's checkpoint tensors live: model.layers.{i}.<this>.experts...
    EXPERT_NAMES = QWEN_EXPERT_NAMES  # the experts' (gate, up, down) projections as the checkpoint names them

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, attention_impl=None, quantization=None):
        if quantization is not None and config.moe is not None:
            raise ValueError(
                f"quantization={quantization.method!r} is not supported for the mixture-of-experts model "
                f"{config.architecture}: its expert weights have no quantized kernel here; run it unquantized"
            )
        self.config = config
        self.quantization = quantization
        self.model = DecoderModel(
            config,
            dtype=dtype,
            rngs=rngs,
            attention_impl=attention_impl,
            quantization=quantization,
            moe_block_name=self.MOE_BLOCK_NAME,
            expert_names=self.EXPERT_NAMES,
        )
        lm_head_axes = ("embed", "vocab")
        if quantization is not None and quantization.lm_head:
            self.lm_head = QuantizedLinear(
                config.hidden_size, config.vocab_size, axes=lm_head_axes, dtype=dtype, quantization=quantization
            )
        elif config.tie_word_embeddings:
            self.lm_head = None  # the embedding table multiplies (Embed.attend)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, axes=lm_head_axes, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, kv_caches: KVCache, md: AttentionMetadata):
        """``input_ids [T]`` -> final hidden states ``[T, D]`` and the updated KV cache."""
        cos, sin = rope_cos_sin(self.config.rope, self.config.head_dim, md.positions, md.context_lens)
        x = act.constrain(self.model.embed_tokens(input_ids), act.HIDDEN)  # [T, D]
        x, kv_caches = run_layers(self.model.layers, x, kv_caches, md, cos, sin)
        return self.model.norm(x), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [S, D]`` -> float32 logits ``[S, V]``."""
        return lm_head_logits(self.lm_head, self.model.embed_tokens, hidden)
