"""Structured outputs: ``SamplingParams(structured_outputs=StructuredOutputsParams(...))`` as vLLM applies it.

Owns compiling a request's grammar (JSON schema, regex, choice, Lark/GBNF grammar) against the engine's tokenizer
with llguidance, and each request's matcher: the tokens its grammar allows next, as a bitmask row, and following the
tokens it samples. A bitmask row is ``ceil(V / 32)`` int32 words; token ``t`` is allowed when bit ``t % 32`` of word
``t // 32`` is set (``jaxllm.sampling.logits_processors.apply_token_bitmask`` reads it on the device). Once the grammar
is complete the matcher allows only EOS, so a request ends as any other does. Plain Python and numpy; llguidance is
imported with the first grammar (an engine that never sees one does not need it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from jaxllm.sampling_params import StructuredOutputsParams
from jaxllm.weak_methods import weakly_bound

if TYPE_CHECKING:
    import llguidance


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row over ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


class StructuredOutputMatcher:
    """One request's grammar state: ``fill_bitmask`` before each of its sampling steps, ``accept`` each token."""

    __slots__ = ("_matcher", "bitmask_width")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.bitmask_width = bitmask_width(vocab_size)

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into ``row`` (a C-contiguous int32 row of ``bitmask_width`` words)."""
        if row.dtype != np.int32 or not row.flags["C_CONTIGUOUS"] or row.shape != (self.bitmask_width,):
            raise ValueError(
                f"a bitmask row must be C-contiguous int32 [{self.bitmask_width}], got {row.dtype} {row.shape}"
            )
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token_id: int) -> None:
        """Follows a sampled token. A token the grammar does not allow (possible only when other settings, such as
        ``min_tokens`` holding back EOS, left no allowed token) puts the matcher in its error state."""
        self._matcher.consume_token(token_id)

    @property
    def failed(self) -> bool:
        """A token outside the grammar was sampled: the request is stopped (``jaxllm.core.scheduler.check_stop``)."""
        return self._matcher.is_error()


PARALLEL_MIN_ROWS = 8  # from this many grammar rows a step's masks are computed on llguidance's thread pool


def fill_bitmasks(rows: list[tuple[int, StructuredOutputMatcher]], bitmask: np.ndarray) -> None:
    """Each ``(row, matcher)``'s allowed next tokens into ``bitmask[row]`` (``[S, W]`` C-contiguous int32): one by
    one for a few rows, else in parallel on llguidance's executor (its threads release the GIL; ~6 us a row at a
    49k vocabulary on one core)."""
    if len(rows) < PARALLEL_MIN_ROWS:
        for row, matcher in rows:
            matcher.fill_bitmask(bitmask[row])
        return
    if bitmask.dtype != np.int32 or not bitmask.flags["C_CONTIGUOUS"] or bitmask.ndim != 2:
        raise ValueError(f"a bitmask must be a C-contiguous int32 [S, W] array, got {bitmask.dtype} {bitmask.shape}")
    matchers = [(matcher._matcher, row) for row, matcher in rows]
    _executor().unsafe_compute_mask_ptr(matchers, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])


@functools.cache
def _executor() -> llguidance.LLExecutor:
    import llguidance

    return llguidance.LLExecutor()


class StructuredOutputCompiler:
    """The engine's grammar compiler: its tokenizer in llguidance's form (built on first use) and one compiled matcher
    per distinct grammar (a batch usually shares one), copied for each request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._compiled = functools.lru_cache(maxsize=64)(weakly_bound(self._compile))

    @functools.cached_property
    def _tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance.hf

        try:
            return llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
            )
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"structured outputs need a fast Hugging Face tokenizer: {error}") from error

    def matcher(self, params: StructuredOutputsParams) -> StructuredOutputMatcher:
        """A fresh matcher for one request; ValueError naming the grammar when it does not compile."""
        return self.matcher_factory(params)()

    def matcher_factory(self, params: StructuredOutputsParams) -> Callable[[], StructuredOutputMatcher]:
        """Compiles the grammar now (ValueError naming it when it does not compile); each call of the result makes a
        fresh matcher (a copy of the compiled one) for one request."""
        compiled = self._compiled(params.grammar_spec())
        return lambda: StructuredOutputMatcher(compiled.deep_copy(), self.vocab_size)

    def _compile(self, spec: tuple[str, str]) -> llguidance.LLMatcher:
        import llguidance

        grammar_format, text = spec
        try:
            if grammar_format == "json_compact":  # no whitespace between JSON tokens
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
            else:
                grammar = llguidance.grammar_from(grammar_format, text)
        except ValueError as error:
            raise ValueError(
                f"SamplingParams.structured_outputs: {grammar_format} {text!r} does not compile: {error}"
            ) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(
                f"SamplingParams.structured_outputs: {grammar_format} {text!r} does not compile: {matcher.get_error()}"
            )
        return matcher
