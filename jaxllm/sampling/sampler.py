"""On-device sampling inside the jitted step: one token per row from logits [S, V], plus raw logprobs.

Order as in vLLM: a grammar's token bitmask (structured outputs) -> allowed token ids -> logit bias -> penalties ->
suppressed tokens (EOS/stop ids before min_tokens) -> greedy rows take the argmax -> temperature -> top-k -> top-p ->
min-p -> Gumbel-max sampling with each row's key.
Stages a batch does not use are cut at trace time by SamplingMetadata's static flags and array widths (no vocab sort
unless a sampled row uses top-k/top-p; no noise when every row is greedy; no mask or bias of width 0). Logprobs are
the model's raw log-softmax before any processing (vLLM v1's default) but a grammar's mask, which vLLM also applies
to the logits before its sampler.

With async scheduling a row's newest output token may still be on the device (sampled by the step in flight, so
missing from ``SamplingMetadata.output_token_ids``): the caller's program passes it as ``in_flight_tokens`` and the
penalties count it with the rest (``in_flight_output_tokens`` gathers it from the in-flight step's samples).

What the logprobs hold is the engine's ``logprobs_mode`` (vLLM's): ``raw_logprobs`` (the default) and
``raw_logits`` take the model's logits before any processing (log-softmaxed or as they are); ``processed_logprobs``
and ``processed_logits`` take the values each row's token was chosen from: for a sampled row its logits after every
processor, temperature, top-k/top-p and min-p (filtered tokens -inf), for a greedy row after the processors (allowed
ids, logit bias, penalties, bans). Prompt logprobs are not affected (vLLM's are not either).

Keys: a seeded row uses ``seeded_request_key(seed_key, sample_index, output_position)``, which depends on nothing
else, so it samples the same tokens whatever batch or row it lands in (``seed_key``: the request's 64-bit seed as a
raw key, ``builder.seed_key_data``); an unseeded row's key comes from ``step_key`` and its row.
Pure and jittable; no host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.config import LOGPROBS_MODES
from jaxllm.sampling.logits_processors import (
    apply_allowed_token_ids,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_token_bitmask,
    apply_top_k_top_p,
    suppress_tokens,
)
from jaxllm.sampling.metadata import GREEDY_TEMPERATURE_EPS, SamplingMetadata


class SamplerOutput(NamedTuple):
    token_ids: jax.Array  # [S] i32
    sampled_logprob: jax.Array  # [S] f32 raw logprob of token_ids; zeros when max_num_logprobs == 0
    sampled_rank: jax.Array  # [S] i32, 1 + the tokens more likely than token_ids; zeros when max_num_logprobs == 0
    top_token_ids: jax.Array  # [S, k] i32, k = min(max_num_logprobs, V), most likely first
    top_logprobs: jax.Array  # [S, k] f32


def seeded_request_key(seed_key: jax.Array, sample_index: jax.Array, output_position: jax.Array) -> jax.Array:
    """Raw uint32 PRNG key for one seeded request's next token: fold_in(fold_in(seed_key, index), position), where
    ``seed_key`` is the request's seed as a raw [2] key (``builder.seed_key_data``; ``PRNGKey(seed)`` below 2**32)."""
    return jax.random.fold_in(jax.random.fold_in(seed_key, sample_index), output_position)


def row_keys(md: SamplingMetadata, step_key: jax.Array) -> jax.Array:
    """Raw PRNG key per row [S, 2]: seeded rows get ``seeded_request_key``; the others
    fold_in(fold_in(step_key, row), 0).

    Both are two fold_ins from a base key, so one loop body holds the only threefry hash XLA has to compile.
    """
    if jnp.issubdtype(step_key.dtype, jax.dtypes.prng_key):
        step_key = jax.random.key_data(step_key)
    rows = jnp.arange(md.num_rows)
    base = jnp.where(md.seeded[:, None], md.seed, step_key[None, :])  # [S, 2]
    folds = jnp.stack(
        [jnp.where(md.seeded, md.sample_index, rows), jnp.where(md.seeded, md.output_position, 0)]
    )  # [2, S]
    return jax.lax.fori_loop(0, 2, lambda i, keys: jax.vmap(jax.random.fold_in)(keys, folds[i]), base)


def _gumbel_argmax(logits: jax.Array, keys: jax.Array) -> jax.Array:
    """One categorical draw per row from softmax(logits): argmax(logits + Gumbel noise from the row's own key)."""
    vocab_size = logits.shape[-1]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab_size,), jnp.float32))(keys)  # [S, V]
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def in_flight_output_tokens(pending_tokens: jax.Array, row_index: jax.Array) -> jax.Array:
    """Each sampled row's output token still on the device: ``pending_tokens[row_index]`` (the in-flight step's
    samples, ``[R]``) where ``row_index [S] >= 0``, else -1."""
    return jnp.where(row_index >= 0, pending_tokens[jnp.maximum(row_index, 0)], -1)


def process_logits(logits: jax.Array, md: SamplingMetadata, in_flight_tokens: jax.Array | None = None) -> jax.Array:
    """Allowed tokens, logit bias, penalties, then suppressed tokens: the logits greedy rows take the argmax of.
    [S, V] -> [S, V]. ``in_flight_tokens [S]``: each row's output token not yet in ``md.output_token_ids`` (-1 none)."""
    logits = apply_allowed_token_ids(logits, md.allowed_token_ids)
    logits = apply_logit_bias(logits, md.logit_bias_ids, md.logit_bias_values)
    if md.any_penalties:
        output_token_ids = md.output_token_ids
        if in_flight_tokens is not None:
            output_token_ids = jnp.concatenate([output_token_ids, in_flight_tokens[:, None]], axis=1)
        logits = apply_penalties(
            logits,
            md.prompt_token_ids,
            output_token_ids,
            md.presence_penalty,
            md.frequency_penalty,
            md.repetition_penalty,
        )
    return suppress_tokens(logits, md.suppressed_token_ids)


def sampling_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Processed logits -> the logits a sampled row draws from: temperature, top-k, top-p, min-p. [S, V]."""
    is_greedy = md.temperature < GREEDY_TEMPERATURE_EPS
    logits = logits / jnp.where(is_greedy, 1.0, md.temperature)[:, None]
    if md.any_top_k_top_p:
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
    return apply_min_p(logits, md.min_p)


def sample(
    logits: jax.Array,
    md: SamplingMetadata,
    step_key: jax.Array,
    in_flight_tokens: jax.Array | None = None,
    logprobs_mode: str = "raw_logprobs",
) -> SamplerOutput:
    """logits [S, V] -> one token per row (and logprobs when md.max_num_logprobs > 0). Jittable; md is an argument.
    ``in_flight_tokens [S]`` (-1 none): each row's output token still on the device, for the penalties;
    ``logprobs_mode`` (static, one of ``LOGPROBS_MODES``): what the logprobs hold (module docstring)."""
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    if logits.ndim != 2 or logits.shape[0] != md.num_rows:
        raise ValueError(f"logits must be [S={md.num_rows}, V], got shape {logits.shape}")
    logits = logits.astype(jnp.float32)
    if md.token_bitmask is not None:  # a grammar's mask comes first, so logprobs see it too (as vLLM's do)
        logits = apply_token_bitmask(logits, md.token_bitmask)
    processed = process_logits(logits, md, in_flight_tokens)
    token_ids = jnp.argmax(processed, axis=-1).astype(jnp.int32)  # [S] greedy choice
    chosen_from = processed  # what each row's token was chosen from
    if not md.all_greedy:
        is_greedy = md.temperature < GREEDY_TEMPERATURE_EPS
        drawn_from = sampling_logits(processed, md)
        sampled = _gumbel_argmax(drawn_from, row_keys(md, step_key))
        token_ids = jnp.where(is_greedy, token_ids, sampled)
        chosen_from = jnp.where(is_greedy[:, None], processed, drawn_from)
    source = logits if logprobs_mode.startswith("raw") else chosen_from
    return _with_logprobs(source, token_ids, md.max_num_logprobs, as_logits=logprobs_mode.endswith("logits"))


def _with_logprobs(
    source: jax.Array, token_ids: jax.Array, max_num_logprobs: int, as_logits: bool = False
) -> SamplerOutput:
    """The sampled tokens' values and the top ``max_num_logprobs`` of ``source`` per row: its log-softmax, or
    ``source`` itself with ``as_logits``."""
    num_rows, vocab_size = source.shape
    if max_num_logprobs == 0:
        return SamplerOutput(
            token_ids,
            jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows,), jnp.int32),
            jnp.zeros((num_rows, 0), jnp.int32),
            jnp.zeros((num_rows, 0), jnp.float32),
        )
    logprobs = source if as_logits else jax.nn.log_softmax(source, axis=-1)  # [S, V]
    sampled_logprob = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]  # [S]
    # vLLM reports the sampled token's rank in the whole vocabulary, whether or not it is among the top k
    sampled_rank = 1 + jnp.sum(logprobs > sampled_logprob[:, None], axis=-1, dtype=jnp.int32)  # [S]
    top_logprobs, top_token_ids = jax.lax.top_k(logprobs, min(max_num_logprobs, vocab_size))  # [S, k]
    return SamplerOutput(token_ids, sampled_logprob, sampled_rank, top_token_ids.astype(jnp.int32), top_logprobs)
