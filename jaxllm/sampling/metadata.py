"""SamplingMetadata: the per-row sampling parameters that travel into the jitted step, and their shape buckets.

Owns the pytree layout (arrays padded to S rows, static flags that are part of the jit cache key) and the rules that
keep the number of distinct shapes small. Building it from Requests lives in ``builder.py``; using it lives in
``sampler.py`` and ``logits_processors.py``. Imports no jax at run time (the arrays are numpy on the host and
jax arrays under jit).
"""

from __future__ import annotations

from typing import Any

from flax import struct

# A row whose temperature is below this is greedy (same constant as SamplingParams.is_greedy).
from jaxllm.sampling_params import GREEDY_TEMPERATURE_EPS

__all__ = [
    "GREEDY_TEMPERATURE_EPS",
    "LOGPROB_BUCKETS",
    "MIN_HISTORY_WIDTH",
    "MIN_TOKEN_LIST_WIDTH",
    "SamplingMetadata",
    "bucket_history_width",
    "bucket_num_logprobs",
    "bucket_token_list_width",
]

# Static top-logprob widths: a batch whose largest request asks for k logprobs compiles for the next bucket.
LOGPROB_BUCKETS = (1, 5, 20)
# Token-history and token-list (suppressed, allowed, biased ids) widths are 0 (stage unused) or a power of two at
# least this large.
MIN_HISTORY_WIDTH = 64
MIN_TOKEN_LIST_WIDTH = 8

Array = Any  # numpy on the host, jax.Array under jit


@struct.dataclass
class SamplingMetadata:
    """Sampling parameters of S rows. Row i is the i-th request of the step; rows past them are greedy padding.

    Padding values (and the values of a request that does not use a stage) leave the logits exactly unchanged:
    top_k 0, top_p 1, min_p 0, penalties 0/0/1, token ids -1.
    """

    temperature: Array  # [S] f32; below GREEDY_TEMPERATURE_EPS the row is greedy
    top_k: Array  # [S] i32; 0 = off
    top_p: Array  # [S] f32; 1 = off
    min_p: Array  # [S] f32; 0 = off
    presence_penalty: Array  # [S] f32
    frequency_penalty: Array  # [S] f32
    repetition_penalty: Array  # [S] f32
    seeded: Array  # [S] bool
    seed: Array  # [S, 2] u32: the request's seed as a raw PRNG key (seed_key_data: its 64 bits, high word first)
    sample_index: Array  # [S] i32; which of the parent's n samples
    output_position: Array  # [S] i32; output tokens generated so far
    suppressed_token_ids: Array  # [S, E] i32, -1 padded: EOS and stop ids while num_output_tokens < min_tokens;
    # the ids that would complete a bad word (jaxllm.bad_words)
    prompt_token_ids: Array  # [S, Lp] i32, -1 padded; Lp = 0 unless any_penalties
    output_token_ids: Array  # [S, Lo] i32, -1 padded; Lo = 0 unless any_penalties
    allowed_token_ids: Array  # [S, A] i32, -1 padded: a row with any samples only among them; A = 0 if no row has
    logit_bias_ids: Array  # [S, B] i32, -1 padded; B = 0 if no row has a logit bias
    logit_bias_values: Array  # [S, B] f32, added to the logits of logit_bias_ids (0 on padding)
    # [S, ceil(V / 32)] i32: the tokens each row's grammar allows next (jaxllm.structured_output; -1 rows allow every
    # token); None, a leaf-less field, when no row has a grammar
    token_bitmask: Array | None = None
    all_greedy: bool = struct.field(pytree_node=False, default=True)  # skip temperature, filters and noise
    any_top_k_top_p: bool = struct.field(pytree_node=False, default=False)  # sort the vocab for top-k/top-p
    any_penalties: bool = struct.field(pytree_node=False, default=False)
    max_num_logprobs: int = struct.field(pytree_node=False, default=0)  # 0 = no logprobs; else a bucket

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bucket_history_width(max_len: int) -> int:
    """Width of the prompt/output token-history arrays for a longest history of ``max_len`` tokens."""
    return _next_pow2(max(max_len, MIN_HISTORY_WIDTH))


def bucket_token_list_width(max_count: int) -> int:
    """Width of a per-row list of token ids (suppressed, allowed, biased) whose longest has ``max_count`` ids: 0 when
    no row has one (the stage costs nothing), else a power of two at least ``MIN_TOKEN_LIST_WIDTH``."""
    return 0 if max_count == 0 else _next_pow2(max(max_count, MIN_TOKEN_LIST_WIDTH))


def bucket_num_logprobs(max_logprobs: int | None) -> int:
    """Static top-logprob width for a batch whose largest ``SamplingParams.logprobs`` is ``max_logprobs``.

    None (no row asked) -> 0. ``logprobs=0`` still needs the sampled token's logprob, so it maps to the first bucket.
    Beyond the last bucket: the next power of two.
    """
    if max_logprobs is None:
        return 0
    for bucket in LOGPROB_BUCKETS:
        if max_logprobs <= bucket:
            return bucket
    return _next_pow2(max_logprobs)
