"""Prompt logprobs (``SamplingParams.prompt_logprobs``): each prompt token's raw logprob given the tokens before it.

A step whose requests ask for them runs a variant of the forward program (compiled per token bucket on first use)
that also applies the lm_head to every scheduled token's hidden state, not only to each request's last one, and
reduces the logits on the device to what the user gets: the next prompt token's logprob and rank and the top-k
alternatives. The logits go through the lm_head ``PROMPT_LOGPROB_CHUNK`` tokens at a time, so a step of 8,192 tokens
never holds more than one chunk's ``[chunk, vocab]`` float32 logits.

Host side: ``prompt_logprob_targets`` gives the program each token's target (the prompt token after it, -1 where
none is wanted), and ``split_prompt_logprobs`` cuts the device results back into each request's share of its prompt.
Each takes the scheduled requests of one program call: a whole step on one device, a microbatch on a mesh (where the
last pipeline stage returns the arrays among its results, as ``as_results`` names them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.step_io import PromptLogprobs, ScheduledRequest
from jaxllm.sampling.metadata import bucket_num_logprobs

PROMPT_LOGPROB_CHUNK = 256  # tokens per lm_head application
RESULT_PREFIX = "prompt_"  # the arrays' names among a mesh program's results: prompt_target_logprob, ...


class PromptLogprobArrays(NamedTuple):
    target_logprob: jax.Array  # [T] f32, the target token's logprob (meaningless where the target is -1)
    target_rank: jax.Array  # [T] i32, 1 + the number of tokens more likely than the target
    top_token_ids: jax.Array  # [T, k] i32, most likely first
    top_logprobs: jax.Array  # [T, k] f32


def num_scored_tokens(scheduled: ScheduledRequest) -> int:
    """How many of this share's tokens (its first ones) have a prompt token after them whose logprob is wanted: 0
    unless the request asked for prompt logprobs, and 0 in its decode steps (which run the plain program)."""
    request = scheduled.request
    if request.sampling_params.prompt_logprobs is None:
        return 0
    return max(
        0, min(scheduled.num_scheduled_tokens, len(request.prompt_token_ids) - 1 - scheduled.num_computed_tokens)
    )


def prompt_logprob_width(scheduled: Sequence[ScheduledRequest]) -> int | None:
    """Static top-k width of a step's prompt-logprob program (bucketed like the sampler's), None when no scheduled
    request asks for prompt logprobs; 0 when they ask for the prompt tokens' logprobs only."""
    widths = [s.request.sampling_params.prompt_logprobs for s in scheduled if num_scored_tokens(s)]
    if not widths:
        return None
    return 0 if max(widths) == 0 else bucket_num_logprobs(max(widths))


def prompt_logprob_targets(scheduled: Sequence[ScheduledRequest], token_bucket: int) -> np.ndarray:
    """``[token_bucket]`` int32: for each scheduled token of a request that asks for prompt logprobs, the prompt
    token that follows it; -1 for every other token (the prompt's last token, output tokens, other requests,
    padding)."""
    targets = np.full(token_bucket, -1, np.int32)
    offset = 0
    for s in scheduled:
        count, start = num_scored_tokens(s), s.num_computed_tokens
        targets[offset : offset + count] = s.request.prompt_token_ids[start + 1 : start + 1 + count]
        offset += s.num_scheduled_tokens
    return targets


def compute_prompt_logprobs(
    compute_logits: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, num_top: int
) -> PromptLogprobArrays:
    """``hidden [T, D]`` and ``targets [T]`` -> the targets' raw logprobs and ranks and the top ``num_top`` tokens
    per position, from the lm_head (``compute_logits``) applied chunk by chunk. Jittable."""
    num_tokens, hidden_size = hidden.shape
    chunk = min(num_tokens, PROMPT_LOGPROB_CHUNK)
    pad = -num_tokens % chunk
    hidden_chunks = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, hidden_size)
    target_chunks = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, chunk)

    def one_chunk(args):
        hidden_chunk, target_chunk = args
        logprobs = jax.nn.log_softmax(compute_logits(hidden_chunk).astype(jnp.float32), axis=-1)  # [chunk, V]
        target_logprob = jnp.take_along_axis(logprobs, jnp.maximum(target_chunk, 0)[:, None], axis=-1)[:, 0]
        rank = 1 + jnp.sum(logprobs > target_logprob[:, None], axis=-1, dtype=jnp.int32)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, min(num_top, logprobs.shape[-1]))
        return PromptLogprobArrays(target_logprob, rank, top_ids.astype(jnp.int32), top_logprobs)

    per_chunk = jax.lax.map(one_chunk, (hidden_chunks, target_chunks))
    padded = num_tokens + pad
    return PromptLogprobArrays(*(x.reshape(padded, *x.shape[2:])[:num_tokens] for x in per_chunk))


def split_prompt_logprobs(
    scheduled: Sequence[ScheduledRequest], host: PromptLogprobArrays
) -> dict[str, PromptLogprobs]:
    """Host copies of a step's ``PromptLogprobArrays`` -> each asking request's ``PromptLogprobs`` (requests whose
    share of the step holds no prompt token with a successor are left out)."""
    out = {}
    offset = 0
    for s in scheduled:
        count = num_scored_tokens(s)
        if count:
            rows = slice(offset, offset + count)
            num_top = s.request.sampling_params.prompt_logprobs
            out[s.request_id] = PromptLogprobs(
                first_position=s.num_computed_tokens + 1,
                logprobs=host.target_logprob[rows].tolist(),
                ranks=host.target_rank[rows].tolist(),
                top_token_ids=host.top_token_ids[rows, :num_top].tolist(),
                top_logprobs=host.top_logprobs[rows, :num_top].tolist(),
            )
        offset += s.num_scheduled_tokens
    return out


def as_results(arrays: PromptLogprobArrays) -> dict[str, jax.Array]:
    """(traced) The arrays as named results of a mesh program (``prompt_target_logprob``, ...)."""
    return {RESULT_PREFIX + name: value for name, value in arrays._asdict().items()}


def from_results(results: dict) -> PromptLogprobArrays | None:
    """The arrays among a mesh program's (host) results; None when the call computed none."""
    if RESULT_PREFIX + "target_logprob" not in results:
        return None
    return PromptLogprobArrays(*(results[RESULT_PREFIX + name] for name in PromptLogprobArrays._fields))


def result_shapes(num_tokens: int, width: int, vocab_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of ``as_results`` for a call of ``num_tokens`` tokens and top-k ``width``."""
    k = min(width, vocab_size)
    arrays = PromptLogprobArrays(
        jax.ShapeDtypeStruct((num_tokens,), jnp.float32),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
        jax.ShapeDtypeStruct((num_tokens, k), jnp.int32),
        jax.ShapeDtypeStruct((num_tokens, k), jnp.float32),
    )
    return as_results(arrays)
