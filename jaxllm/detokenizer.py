"""Incremental detokenization of one request's output, and the stop-string search on the text it produces.

``IncrementalDetokenizer`` decodes only a short window per call (the prefix/read-offset technique): the text of
``tokens[prefix_offset:read_offset]`` was already emitted, so the new text is what ``tokens[prefix_offset:]``
decodes to beyond it. Decoding a few tokens of left context keeps merges and leading spaces right, and a window
whose text ends in an incomplete UTF-8 character (U+FFFD) waits for the next token. Plain Python around a Hugging
Face tokenizer: imports neither jax nor flax.
"""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens decoded as left context of the first output tokens (vLLM uses the same number).
NUM_PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, a window at a time.

    ``append`` only stores ids; ``decode_pending`` decodes what was appended since the last text was emitted.
    Calling ``decode_pending(final=True)`` once at the end gives the same text as calling it after every token
    (for tokenizers, such as byte-level BPE, where the text of a token sequence starts with the text of its prefix),
    so a request whose text is only needed at the end decodes once.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the left-context window
        self._read_offset = len(self._token_ids)  # tokens before this have had their text emitted
        self.text = ""

    def append(self, token_ids: Sequence[int]) -> None:
        self._token_ids.extend(token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return len(self._token_ids) - self._read_offset

    def decode_pending(self, final: bool = False) -> str:
        """Text of the tokens appended since the last emitted text; appended to ``self.text`` and returned.

        Unless ``final``, returns "" while the window's text is empty or ends in an incomplete character.
        """
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._token_ids[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self.text += delta
        return delta

    def truncate(self, num_chars: int) -> None:
        """Cut the text to its first ``num_chars`` characters (a stop string was found)."""
        self.text = self.text[:num_chars]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )


def find_stop_string(text: str, num_new_chars: int, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last ``num_new_chars`` characters of ``text``.

    Returns ``(start index, stop string)``, or None. Only the new characters and the ``len(stop) - 1`` before them
    are searched, so a stop string split across tokens (or steps) is found exactly once.
    """
    best: tuple[int, str] | None = None
    for stop in stop_strings:
        start = max(len(text) - num_new_chars - len(stop) + 1, 0)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
