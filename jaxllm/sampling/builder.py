"""Host-side, numpy-only construction of SamplingMetadata for one engine step.

Owns the translation Request -> per-row arrays and the caches that keep it cheap: the parameter columns are rebuilt
only when the step's rows hold different requests than the previous step's (steady decoding reuses them), and each
penalised request keeps its token history as a growing numpy buffer that takes only the new output tokens per step.
Imports neither jax nor flax at run time; the runner device_puts the result in one call.
A request's ``sampling_params`` must not be mutated while it runs (the cache is keyed on request identity).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import numpy as np

from jaxllm.bad_words import banned_token_ids
from jaxllm.request import Request
from jaxllm.sampling.metadata import (
    GREEDY_TEMPERATURE_EPS,
    SamplingMetadata,
    bucket_history_width,
    bucket_num_logprobs,
    bucket_token_list_width,
)
from jaxllm.structured_output import fill_bitmasks

_INT32_MAX = 2**31 - 1
# Padding value of each float column, in _FLOAT_FIELDS order. Padding rows are greedy (temperature 0).
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_FLOAT_PADDING = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _ParamColumns:
    """Everything about a row layout that does not change while the same requests occupy the same rows."""

    arrays: dict[str, np.ndarray]  # SamplingMetadata field name -> [S] array
    flags: dict[str, bool | int]  # the static SamplingMetadata flags
    min_tokens_rows: list[tuple[int, int, np.ndarray]]  # (row, min_tokens, ids to suppress until then)
    penalty_rows: list[int]
    bad_word_rows: list[tuple[int, list[tuple[int, ...]]]]  # (row, the request's bad-word token sequences)
    structured_rows: list[int]  # rows whose request follows a grammar (structured outputs)


def _pad(values: np.ndarray, num_rows: int, fill, dtype) -> np.ndarray:
    out = np.full((num_rows, *np.shape(values)[1:]), fill, dtype)
    out[: len(values)] = values
    return out


def seed_key_data(seeds: Sequence[int]) -> np.ndarray:
    """[n, 2] u32: each seed (an int in [-2**63, 2**64), ``SamplingParams``' range) as the raw threefry key that
    ``jax.random.PRNGKey`` makes of a 64-bit seed: the seed mod 2**64 split into its high and low 32 bits. Seeds below
    2**32 give ``PRNGKey(seed)``'s key exactly; every seed of the range has a key of its own (-1 is 2**64 - 1)."""
    wrapped = np.array([int(seed) % 2**64 for seed in seeds], np.uint64).reshape(-1)
    return np.stack([wrapped >> np.uint64(32), wrapped & np.uint64(0xFFFFFFFF)], axis=-1).astype(np.uint32)


def _suppressible_ids(request: Request) -> np.ndarray:
    params = request.sampling_params
    eos = [] if params.ignore_eos else sorted(request.eos_token_ids)
    return np.asarray(eos + list(params.stop_token_ids), np.int32)


def _output_index(request: Request) -> int:
    """Index among the request's outputs of the token this step samples for it. Once scheduled, that token counts as
    pending, as do earlier ones still on the device (async scheduling); the first pending one is this step's."""
    return request.num_output_tokens + max(request.num_pending_tokens - 1, 0)


def _build_param_columns(requests: list[Request], num_rows: int) -> _ParamColumns:
    params = [r.sampling_params for r in requests]
    floats = np.array([[getattr(p, f) for f in _FLOAT_FIELDS] for p in params], np.float64).reshape(-1, 6)
    arrays = {
        f: _pad(floats[:, i], num_rows, pad, np.float32)
        for i, (f, pad) in enumerate(zip(_FLOAT_FIELDS, _FLOAT_PADDING, strict=True))
    }
    top_k = np.clip(np.array([p.top_k for p in params], np.int64), 0, _INT32_MAX)  # -1 (off) -> 0
    arrays["top_k"] = _pad(top_k, num_rows, 0, np.int32)
    arrays["seeded"] = _pad(np.array([p.seed is not None for p in params], bool), num_rows, False, bool)
    arrays["seed"] = _pad(seed_key_data([0 if p.seed is None else p.seed for p in params]), num_rows, 0, np.uint32)
    arrays["sample_index"] = _pad(np.array([r.sample_index for r in requests], np.int32), num_rows, 0, np.int32)

    sampled = arrays["temperature"] >= GREEDY_TEMPERATURE_EPS
    filtered = sampled & ((arrays["top_k"] > 0) | (arrays["top_p"] < 1.0))
    requested_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    flags = {
        "all_greedy": not sampled.any(),
        "any_top_k_top_p": bool(filtered.any()),
        "any_penalties": any(p.uses_penalties for p in params),
        "max_num_logprobs": bucket_num_logprobs(max(requested_logprobs) if requested_logprobs else None),
    }
    min_tokens_rows = [
        (row, r.sampling_params.min_tokens, _suppressible_ids(r))
        for row, r in enumerate(requests)
        if r.sampling_params.min_tokens > 0
    ]
    penalty_rows = [row for row, p in enumerate(params) if p.uses_penalties]
    allowed = [(row, p.allowed_token_ids) for row, p in enumerate(params) if p.allowed_token_ids]
    arrays["allowed_token_ids"] = _token_lists(allowed, num_rows, -1, np.int32)
    biases = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    arrays["logit_bias_ids"] = _token_lists([(row, list(b)) for row, b in biases], num_rows, -1, np.int32)
    values = [(row, list(b.values())) for row, b in biases]
    arrays["logit_bias_values"] = _token_lists(values, num_rows, 0.0, np.float32)
    bad_word_rows = [(row, r.bad_words_token_ids) for row, r in enumerate(requests) if r.bad_words_token_ids]
    structured_rows = [row for row, r in enumerate(requests) if r.structured_output is not None]
    return _ParamColumns(arrays, flags, min_tokens_rows, penalty_rows, bad_word_rows, structured_rows)


def _token_lists(rows: list[tuple[int, Sequence]], num_rows: int, fill, dtype) -> np.ndarray:
    """[S, W] with each ``(row, values)``'s values at the start of its row and ``fill`` elsewhere; W from
    ``bucket_token_list_width`` (0 when no row has any)."""
    out = np.full((num_rows, bucket_token_list_width(max((len(v) for _, v in rows), default=0))), fill, dtype)
    for row, values in rows:
        out[row, : len(values)] = values
    return out


class _TokenHistory:
    """One request's prompt ids and a growing buffer of its output ids, topped up with only the new tokens."""

    __slots__ = ("request", "prompt", "output", "num_output")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.prompt = np.asarray(request.prompt_token_ids, np.int32)
        self.output = np.empty(max(16, 2 * request.num_output_tokens), np.int32)
        self.num_output = 0

    def sync(self) -> None:
        total = self.request.num_output_tokens
        if total < self.num_output:  # the request's outputs were rewritten: start over
            self.num_output = 0
        if total == self.num_output:
            return
        if total > len(self.output):
            grown = np.empty(2 * total, np.int32)
            grown[: self.num_output] = self.output[: self.num_output]
            self.output = grown
        start = len(self.prompt) + self.num_output
        self.output[self.num_output : total] = self.request.all_token_ids[start:]
        self.num_output = total


def _stack_rows(rows: list[int], seqs: list[np.ndarray], num_rows: int) -> np.ndarray:
    """[S, W] int32, -1 padded, with seqs[j] in row rows[j]; W bucketed from the longest seq."""
    out = np.full((num_rows, bucket_history_width(max(map(len, seqs)))), -1, np.int32)
    for row, seq in zip(rows, seqs, strict=True):
        out[row, : len(seq)] = seq
    return out


class SamplingMetadataBuilder:
    """Builds SamplingMetadata each step, reusing what did not change since the previous step."""

    def __init__(self) -> None:
        self._requests: list[Request] = []
        self._num_rows = -1
        self._columns: _ParamColumns | None = None
        self._histories: dict[str, _TokenHistory] = {}
        self._prompt_ids: tuple[_ParamColumns | None, np.ndarray | None] = (None, None)  # prompts fixed per layout

    def build(self, requests: list[Request], num_rows: int) -> SamplingMetadata:
        """Row i samples for ``requests[i]``; rows ``len(requests)..num_rows-1`` are greedy padding."""
        if num_rows < len(requests):
            raise ValueError(f"num_rows={num_rows} is smaller than the number of requests ({len(requests)})")
        columns = self._param_columns(requests, num_rows)
        n = len(requests)
        positions = np.fromiter(map(_output_index, requests), np.int32, n)
        prompt_ids, output_ids = self._token_histories(requests, columns, num_rows)
        return SamplingMetadata(
            **columns.arrays,
            output_position=_pad(positions, num_rows, 0, np.int32),
            suppressed_token_ids=self._suppressed_ids(requests, columns, num_rows),
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            token_bitmask=self._token_bitmask(requests, columns, num_rows),
            **columns.flags,
        )

    def _param_columns(self, requests: list[Request], num_rows: int) -> _ParamColumns:
        same_rows = (
            self._columns is not None
            and num_rows == self._num_rows
            and len(requests) == len(self._requests)
            and all(map(operator.is_, requests, self._requests))
        )
        if not same_rows:
            self._columns = _build_param_columns(requests, num_rows)
            self._requests, self._num_rows = list(requests), num_rows
        return self._columns

    @staticmethod
    def _suppressed_ids(requests: list[Request], columns: _ParamColumns, num_rows: int) -> np.ndarray:
        """EOS and stop ids of rows still short of ``min_tokens``, and the ids that would complete a bad word."""
        suppressed: dict[int, list[int]] = {}
        for row, min_tokens, ids in columns.min_tokens_rows:
            if _output_index(requests[row]) < min_tokens and len(ids):
                suppressed[row] = ids.tolist()
        for row, sequences in columns.bad_word_rows:
            request = requests[row]
            banned = banned_token_ids(sequences, request.all_token_ids, request.num_prompt_tokens)
            if banned:
                suppressed.setdefault(row, []).extend(banned)
        return _token_lists(sorted(suppressed.items()), num_rows, -1, np.int32)

    @staticmethod
    def _token_bitmask(requests: list[Request], columns: _ParamColumns, num_rows: int) -> np.ndarray | None:
        """[S, W] int32, each sampling grammar row's allowed next tokens and every token elsewhere (W from the
        grammars' vocabulary, the model's); None without grammar rows. A grammar row has no token on the device but
        this step's own (the engine does not schedule ahead of it), so it samples this step exactly when it has one
        pending token; a prompt chunk before the last (none pending) keeps every token, its sample being dropped,
        and its grammar is not asked for a mask (host time per row and step)."""
        if not columns.structured_rows:
            return None
        sampling = []
        for row in columns.structured_rows:
            request = requests[row]
            if request.num_pending_tokens > 1:
                raise RuntimeError(f"request {request.request_id!r} follows a grammar but has tokens in flight")
            if request.num_pending_tokens == 1:
                sampling.append((row, request.structured_output))
        width = requests[columns.structured_rows[0]].structured_output.bitmask_width
        out = np.full((num_rows, width), -1, np.int32)
        fill_bitmasks(sampling, out)
        return out

    def _token_histories(
        self, requests: list[Request], columns: _ParamColumns, num_rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """prompt_token_ids [S, Lp] and output_token_ids [S, Lo], filled only on rows that use penalties."""
        if not columns.flags["any_penalties"]:
            self._histories = {}
            empty = np.full((num_rows, 0), -1, np.int32)
            return empty, empty
        histories = {}
        for row in columns.penalty_rows:
            request = requests[row]
            history = self._histories.get(request.request_id)
            if history is None or history.request is not request:
                history = _TokenHistory(request)
            history.sync()
            histories[request.request_id] = history
        self._histories = histories  # requests absent this step are dropped
        rows = columns.penalty_rows
        chosen = [histories[requests[row].request_id] for row in rows]
        cached_for, prompt_ids = self._prompt_ids
        if cached_for is not columns:
            prompt_ids = _stack_rows(rows, [h.prompt for h in chosen], num_rows)
            self._prompt_ids = (columns, prompt_ids)
        output_ids = _stack_rows(rows, [h.output[: h.num_output] for h in chosen], num_rows)
        return prompt_ids, output_ids


def build_sampling_metadata(requests: list[Request], num_rows: int) -> SamplingMetadata:
    """One-off build without caches; an engine keeps one SamplingMetadataBuilder and calls its ``build``."""
    return SamplingMetadataBuilder().build(requests, num_rows)
