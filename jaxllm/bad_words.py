"""``SamplingParams.bad_words`` (vLLM's): the token sequences a request must not generate, and the ids banned at a step.

Each word becomes token sequences when its request is built (``bad_words_token_ids``, with the engine's tokenizer):
the word without its leading spaces, and the same with one leading space where that gives another first token and as
many tokens (the word in the middle of a text). At each step a sequence of one token bans that token; a longer one
bans its last token where the request's output so far ends with the sequence's other tokens, so the whole sequence can
never be completed. The banned ids join the step's suppressed ids (``SamplingMetadata.suppressed_token_ids``).

Longer sequences need the request's latest output token on the host, so while such a request is in flight the engine
does not schedule the next step ahead (``Request.needs_host_outputs``), as for a grammar. (Penalties need no such
stop: the token still in flight reaches the sampler on the device.)
"""

from __future__ import annotations

from collections.abc import Sequence


def bad_words_token_ids(words: Sequence[str], tokenizer) -> list[tuple[int, ...]]:
    """The token sequences of ``words`` (see the module docstring); ValueError where a word encodes to no tokens."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not bare:
            raise ValueError(f"SamplingParams.bad_words entry {word!r} encodes to no tokens")
        sequences.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if len(spaced) == len(bare) and spaced[0] != bare[0]:
            sequences.append(spaced)
    return sequences


def banned_token_ids(
    sequences: Sequence[tuple[int, ...]], token_ids: Sequence[int], first_output: int = 0
) -> list[int]:
    """The ids that would complete one of ``sequences`` as the next output token (each once, in first-seen order).
    ``token_ids[first_output:]`` are the outputs so far (a request's ``all_token_ids`` and its prompt length: only the
    tail is read, nothing is copied)."""
    banned: dict[int, None] = {}
    for sequence in sequences:
        prefix, start = sequence[:-1], len(token_ids) - len(sequence) + 1
        if start >= first_output and tuple(token_ids[start:]) == prefix:
            banned[sequence[-1]] = None
    return list(banned)


def needs_output_history(sequences: Sequence[tuple[int, ...]]) -> bool:
    """Whether any sequence is longer than one token (its ban depends on the latest outputs)."""
    return any(len(sequence) > 1 for sequence in sequences)
