"""Pure jnp transforms of a step's logits [S, V] before sampling: a grammar's token bitmask, allowed tokens, logit
bias, penalties, suppressed tokens, top-k/top-p, min-p.

Each takes the logits and the per-row arrays it needs and returns new logits; removed tokens become -inf. A row whose
parameters switch a stage off (penalties 0/0/1, top_k 0, top_p 1, min_p 0, no ids) gets its logits back bit for bit,
so a seeded request samples the same token whether or not its batch-mates turn a stage on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = float("-inf")


def count_tokens(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """token_ids [S, L] (-1 padded) -> occurrences of each vocab id per row [S, V] f32. Ids outside [0, V) drop."""
    num_rows = token_ids.shape[0]
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], token_ids.shape)  # [S, L]
    ids = jnp.where(token_ids < 0, vocab_size, token_ids)  # -1 would wrap around to V-1: send it out of range
    return jnp.zeros((num_rows, vocab_size), jnp.float32).at[rows, ids].add(1.0, mode="drop")


def apply_penalties(
    logits: jax.Array,  # [S, V] f32
    prompt_token_ids: jax.Array,  # [S, Lp] i32, -1 padded
    output_token_ids: jax.Array,  # [S, Lo] i32, -1 padded
    presence_penalty: jax.Array,  # [S]
    frequency_penalty: jax.Array,  # [S]
    repetition_penalty: jax.Array,  # [S]
) -> jax.Array:
    """Repetition on prompt+output tokens (logit/p if >0 else logit*p), then frequency and presence on outputs."""
    vocab_size = logits.shape[-1]
    output_counts = count_tokens(output_token_ids, vocab_size)  # [S, V]
    in_output = output_counts > 0
    seen = in_output | (count_tokens(prompt_token_ids, vocab_size) > 0)
    repetition = repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
    logits = logits - frequency_penalty[:, None] * output_counts
    return logits - presence_penalty[:, None] * in_output


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """bitmask [S, W] int32 with W * 32 >= V (``jaxllm.structured_output``): token t of a row stays where bit t % 32 of
    word t // 32 is set, the rest become -inf; a row of all ones (-1) is unchanged."""
    num_rows, vocab_size = logits.shape
    if bitmask.shape[-1] * 32 < vocab_size:
        raise ValueError(f"a token bitmask of {bitmask.shape[-1]} words cannot cover a vocabulary of {vocab_size}")
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size] != 0
    return jnp.where(allowed, logits, _NEG_INF)


def suppress_tokens(logits: jax.Array, suppressed_token_ids: jax.Array) -> jax.Array:
    """suppressed_token_ids [S, E] (-1 padded): those logits become -inf. E == 0 costs nothing."""
    if suppressed_token_ids.shape[-1] == 0:
        return logits
    mask = count_tokens(suppressed_token_ids, logits.shape[-1]) > 0  # [S, V]
    return jnp.where(mask, _NEG_INF, logits)


def apply_allowed_token_ids(logits: jax.Array, allowed_token_ids: jax.Array) -> jax.Array:
    """allowed_token_ids [S, A] (-1 padded): a row with any keeps only those logits (the rest -inf); a row with
    none is unchanged. A == 0 costs nothing."""
    if allowed_token_ids.shape[-1] == 0:
        return logits
    allowed = count_tokens(allowed_token_ids, logits.shape[-1]) > 0  # [S, V]
    restricted = jnp.any(allowed_token_ids >= 0, axis=-1, keepdims=True)  # [S, 1]
    return jnp.where(restricted & ~allowed, _NEG_INF, logits)


def apply_logit_bias(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> jax.Array:
    """Adds bias_values [S, B] to the logits of bias_ids [S, B] (-1 padding adds nothing). B == 0 costs nothing."""
    if bias_ids.shape[-1] == 0:
        return logits
    vocab_size = logits.shape[-1]
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], bias_ids.shape)
    ids = jnp.where(bias_ids < 0, vocab_size, bias_ids)  # out of range: dropped
    return logits.at[rows, ids].add(bias_values, mode="drop")


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep each row's top_k logits (0 = all), then the smallest prefix of those whose probability mass reaches top_p.

    One descending sort of the vocab. The cut is a logit threshold, so tokens tied with the last kept one are kept too.
    """
    vocab_size = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1, descending=True)  # [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab_size), vocab_size)  # [S]
    rank = jnp.arange(vocab_size)[None, :]  # [1, V]
    in_top_k = rank < k[:, None]  # [S, V]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, _NEG_INF), axis=-1)  # renormalised over the top k
    cumulative = jnp.cumsum(probs, axis=-1)  # [S, V]
    mass_before = jnp.pad(cumulative[:, :-1], ((0, 0), (1, 0)))  # [S, V] mass of the more likely tokens
    # top_p = 1 keeps everything even where the float cumsum reaches 1 early; rank 0 always survives.
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank == 0)
    num_kept = jnp.sum(in_top_k & in_top_p, axis=-1)  # [S], >= 1; the kept set is a prefix
    threshold = jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)  # [S, 1]
    return jnp.where(logits < threshold, _NEG_INF, logits)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p times the row's top probability (compared in log space)."""
    max_logit = jnp.max(logits, axis=-1, keepdims=True)  # [S, 1]
    cutoff = max_logit + jnp.log(min_p)[:, None]  # -inf where min_p == 0: nothing dropped
    return jnp.where((min_p[:, None] > 0) & (logits < cutoff), _NEG_INF, logits)
