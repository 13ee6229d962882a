"""Runs a model directly over the paged path for one prompt, so model tests need neither scheduler nor sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention_metadata import AttentionMetadata
from jaxllm.models.kv_cache_layout import array_shapes


def prompt_logits(
    model,
    token_ids,
    *,
    block_size: int = 4,
    chunk_size: int | None = None,
    seed: int = 0,
    kv_dtype=None,
    kv_array_max_bytes: int | None = None,
) -> np.ndarray:
    """Float32 logits ``[len, V]`` at every position, computed chunk by chunk into a shuffled paged cache (of
    ``kv_dtype``; default the model's dtype), one array per layer or grouped by ``kv_array_max_bytes``
    (``jaxllm.models.kv_cache_layout``)."""
    config = model.config
    num_tokens = len(token_ids)
    num_request_blocks = -(-num_tokens // block_size)
    rng = np.random.default_rng(seed)
    block_ids = rng.permutation(np.arange(1, num_request_blocks + 4))[:num_request_blocks]  # never the null block
    num_blocks = num_request_blocks + 4
    dtype = kv_dtype or model.model.embed_tokens.embedding.get_value().dtype
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    shapes = array_shapes(config.num_layers, shape, dtype, kv_array_max_bytes)
    kv = [(jnp.zeros(s, dtype), jnp.zeros(s, dtype)) for s in shapes]
    block_table = jnp.asarray(block_ids[None, :], jnp.int32)
    chunk_size = chunk_size or num_tokens
    logits = []
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        positions = np.arange(start, end, dtype=np.int32)
        slots = block_ids[positions // block_size] * block_size + positions % block_size
        md = AttentionMetadata(
            positions=jnp.asarray(positions),
            slot_mapping=jnp.asarray(slots, jnp.int32),
            context_lens=jnp.full(end - start, end, jnp.int32),
            block_tables=block_table,
            seq_lens=jnp.asarray([end], jnp.int32),
            query_start_loc=jnp.asarray([0, end - start], jnp.int32),
        )
        logits_chunk, kv = _forward_logits(model, jnp.asarray(token_ids[start:end], jnp.int32), kv, md)
        logits.append(np.asarray(logits_chunk, np.float32))
    return np.concatenate(logits)


@jax.jit
def _forward_logits(model, input_ids, kv, md):
    hidden, kv = model(input_ids, kv, md)
    return model.compute_logits(hidden), kv
