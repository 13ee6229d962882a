"""Turning user prompts into token ids, with the checks a user's bad input should meet.

Accepts vLLM's prompt forms: a string, ``{"prompt": str}`` and ``{"prompt_token_ids": [...]}``. Empty prompts,
token ids outside the vocabulary and other types raise ``ValueError``/``TypeError`` naming the value. A prompt may be
cut to its last tokens (``SamplingParams.truncate_prompt_tokens``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    text: str | None
    token_ids: list[int]


def is_single_prompt(prompts) -> bool:
    return isinstance(prompts, (str, dict))


def as_prompt_list(prompts) -> list:
    if is_single_prompt(prompts):
        return [prompts]
    if isinstance(prompts, Sequence):
        return list(prompts)
    raise TypeError(f"prompts must be a str, a prompt dict or a list of those, got {type(prompts).__name__}")


def tokenize_prompt(prompt, tokenizer, vocab_size: int, keep_last: int | None = None) -> TokenizedPrompt:
    """The prompt's token ids (only the last ``keep_last`` when given, as vLLM's ``truncate_prompt_tokens``)."""
    if isinstance(prompt, str):
        text, token_ids = prompt, _encode(prompt, tokenizer)
    elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        text, token_ids = prompt.get("prompt"), _check_token_ids(prompt["prompt_token_ids"])
    elif isinstance(prompt, dict) and "prompt" in prompt:
        text, token_ids = prompt["prompt"], _encode(prompt["prompt"], tokenizer)
    else:
        raise TypeError(
            f"a prompt must be a str, {{'prompt': str}} or {{'prompt_token_ids': list[int]}}, got {prompt!r:.80}"
        )
    if not token_ids:
        raise ValueError(f"prompt {text!r:.80} is empty (no tokens)")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if keep_last is not None:
        token_ids = token_ids[-keep_last:]
    return TokenizedPrompt(text=text, token_ids=token_ids)


def _encode(text, tokenizer) -> list[int]:
    if not isinstance(text, str):
        raise TypeError(f"prompt text must be a str, got {type(text).__name__}")
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; with skip_tokenizer_init=True pass prompt_token_ids")
    return list(tokenizer.encode(text))


def _check_token_ids(token_ids) -> list[int]:
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"prompt_token_ids must be a list of ints, got {type(token_ids).__name__}")
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"prompt_token_ids must hold ints, got {t!r}")
    return [int(t) for t in token_ids]
