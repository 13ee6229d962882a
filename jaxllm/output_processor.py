"""OutputProcessor: turns the scheduler's ``EngineCoreOutput``s into user-facing ``RequestOutput``s.

Owns each request's text (incremental detokenization), the stop-string check, logprob objects and the grouping of a
prompt's ``n`` samples. It never touches the scheduler: when a stop string ends a request, ``process_outputs``
reports its id and the engine calls ``Scheduler.finish_requests(ids, RequestStatus.FINISHED_STOPPED)``. Plain
Python: imports neither jax nor flax.

Samples (n > 1): a prompt becomes n ``Request``s (see ``make_child_requests``) with ids ``f"{request_id}-{i}"`` and
``sample_index`` i, grouped under one ``ParentRequest``; its ``RequestOutput`` (id ``request_id``, one
``CompletionOutput`` per sample, ordered by index) is produced once every sample has finished, or after every step
that touched it when the request streams.

Streaming follows vLLM's ``SamplingParams.output_kind``: CUMULATIVE outputs hold everything so far; DELTA outputs hold
only the tokens, text and logprobs new since the prompt's last output, only the samples that have something new (or
just finished), and the prompt logprobs only in the first; FINAL_ONLY requests are returned once, when finished.

Prompt logprobs (``SamplingParams.prompt_logprobs``) are the first sample's (every sample computes the same ones); the
runner stores them on its ``Request`` by prompt position and they are turned into ``Logprob`` dicts here.

Detokenization is deferred when nothing needs the text early: a request with no stop strings that does not stream
decodes its output once, when it finishes. With ``tokenizer=None`` text stays "" and only token ids are returned.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.step_io import SampledLogprobs
from jaxllm.detokenizer import IncrementalDetokenizer, find_stop_string
from jaxllm.metrics.stats import IterationStats
from jaxllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from jaxllm.request import Request
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from jaxllm.structured_output import StructuredOutputMatcher


def make_child_requests(
    request_id: str,
    prompt_token_ids: Sequence[int],
    sampling_params: SamplingParams,
    eos_token_ids: frozenset[int] = frozenset(),
    arrival_time: float | None = None,
    bad_words_token_ids: Sequence[tuple[int, ...]] = (),
    structured_output: Callable[[], StructuredOutputMatcher] | None = None,
) -> list[Request]:
    """The Requests the scheduler runs for one prompt: ``request_id`` itself when n == 1, else n samples with ids
    ``f"{request_id}-{i}"`` and ``sample_index`` i; ``structured_output`` makes each one's own grammar matcher."""
    arrival_time = time.monotonic() if arrival_time is None else arrival_time
    n = sampling_params.n
    ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
    return [
        Request(
            id_,
            prompt_token_ids,
            sampling_params,
            eos_token_ids,
            arrival_time,
            i,
            bad_words_token_ids,
            None if structured_output is None else structured_output(),
        )
        for i, id_ in enumerate(ids)
    ]


class RequestState:
    """Output state of one sample: its token ids, text, logprobs and finish reason, and (for DELTA outputs) how much
    of them its earlier outputs carried."""

    def __init__(self, request: Request, parent: ParentRequest, tokenizer) -> None:
        params = request.sampling_params
        self.request = request
        self.parent = parent
        self.tokenizer = tokenizer
        self.detokenizer = (
            None
            if tokenizer is None
            else IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        )
        self.decode_every_step = parent.stream or bool(params.stop)
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = None if params.logprobs is None else []
        self.cumulative_logprob: float | None = None if params.logprobs is None else 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.last_token_time: float | None = None  # when the latest tokens arrived (statistics)
        self.num_sent_tokens = 0  # DELTA: token ids, logprobs and characters already returned
        self.num_sent_chars = 0
        self.sent_finish = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: EngineCoreOutput) -> str | None:
        """Take one step's tokens; returns the stop string if one ended the request here."""
        self.token_ids.extend(output.new_token_ids)
        if output.new_logprobs is not None and self.logprobs is not None:
            for token_id, sampled in zip(output.new_token_ids, output.new_logprobs, strict=True):
                self.logprobs.append(self._make_logprobs_entry(token_id, sampled))
                self.cumulative_logprob += sampled.sampled_logprob
        stop = None
        if self.detokenizer is not None:
            self.detokenizer.append(self._tokens_with_text(output))
            if self.decode_every_step or output.finished:
                delta = self.detokenizer.decode_pending(final=output.finished)
                stop = self._check_stop_strings(delta)
        if stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
        elif output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        return stop

    def _tokens_with_text(self, output: EngineCoreOutput) -> list[int]:
        """The step's tokens whose text joins the output: as vLLM does, an EOS or stop token that ended the request
        stays in ``token_ids`` but not in the text, unless ``include_stop_str_in_output``."""
        tokens = output.new_token_ids
        params = self.request.sampling_params
        if output.finish_reason != "stop" or params.include_stop_str_in_output or not tokens:
            return tokens
        last = tokens[-1]
        stopped_on_it = last in params.stop_token_ids or (last in self.request.eos_token_ids and not params.ignore_eos)
        return tokens[:-1] if stopped_on_it else tokens

    def _check_stop_strings(self, delta: str) -> str | None:
        params = self.request.sampling_params
        if not params.stop or not delta or len(self.token_ids) <= params.min_tokens:  # vLLM's: tokens after min_tokens
            return None
        hit = find_stop_string(self.detokenizer.text, len(delta), params.stop)
        if hit is None:
            return None
        index, stop = hit
        self.detokenizer.truncate(index + len(stop) if params.include_stop_str_in_output else index)
        return stop

    def _make_logprobs_entry(self, token_id: int, sampled: SampledLogprobs) -> dict[int, Logprob]:
        """The sampled token first, with its rank in the vocabulary, then the top-k alternatives ranked 1..k."""
        rank = sampled.sampled_rank
        if rank is None:
            rank = {top_id: r for r, top_id in enumerate(sampled.top_token_ids, start=1)}.get(token_id)
        return _logprobs_entry(
            token_id,
            Logprob(sampled.sampled_logprob, rank, _decode_one(self.tokenizer, token_id)),
            sampled.top_token_ids,
            sampled.top_logprobs,
            self.tokenizer,
        )

    def visible_text(self) -> str:
        """The text so far; while running, minus a tail that might still grow into a (trimmed) stop string."""
        if self.detokenizer is None:
            return ""
        text = self.detokenizer.text
        params = self.request.sampling_params
        if self.finished or not params.stop or params.include_stop_str_in_output:
            return text
        hold_back = max(len(stop) for stop in params.stop) - 1
        return text[: max(len(text) - hold_back, 0)]

    def make_completion_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.request.sample_index,
            text=self.visible_text(),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    @property
    def has_delta(self) -> bool:
        """Something a DELTA output has not carried yet: new tokens, or the finish."""
        return len(self.token_ids) > self.num_sent_tokens or (self.finished and not self.sent_finish)

    def make_delta_output(self) -> CompletionOutput:
        """The tokens, logprobs and text new since the last call (the cumulative logprob stays the running sum, as in
        vLLM); marks them sent."""
        text = self.visible_text()
        start = self.num_sent_tokens
        output = CompletionOutput(
            index=self.request.sample_index,
            text=text[self.num_sent_chars :],
            token_ids=self.token_ids[start:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else self.logprobs[start:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        self.num_sent_tokens, self.num_sent_chars, self.sent_finish = len(self.token_ids), len(text), self.finished
        return output


def _decode_one(tokenizer, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])


def _logprobs_entry(token_id: int, logprob: Logprob, top_ids: list[int], top_logprobs: list[float], tokenizer):
    """``{token_id: logprob}``, then the top-k alternatives ranked 1..k (vLLM's layout of a logprobs dict)."""
    entry = {token_id: logprob}
    for rank, (top_id, top_logprob) in enumerate(zip(top_ids, top_logprobs, strict=True), start=1):
        if top_id not in entry:
            entry[top_id] = Logprob(top_logprob, rank, _decode_one(tokenizer, top_id))
    return entry


def make_prompt_logprobs(request: Request, tokenizer) -> PromptLogprobs | None:
    """The user's prompt logprobs from those stored on ``request`` (None when not asked for, or not all computed
    yet): None for the first prompt token, then the prompt token's ``Logprob`` (with its rank) and the top-k."""
    stored = request.prompt_logprobs
    if stored is None or any(entry is None for entry in stored[1:]):
        return None
    out: PromptLogprobs = [None]
    for token_id, (logprob, rank, top_ids, top_logprobs) in zip(request.prompt_token_ids[1:], stored[1:], strict=True):
        prompt_logprob = Logprob(logprob, rank, _decode_one(tokenizer, token_id))
        out.append(_logprobs_entry(token_id, prompt_logprob, top_ids, top_logprobs, tokenizer))
    return out


class ParentRequest:
    """One prompt as the user sees it: its samples (children) and the times they share."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        requests: list[Request],
        output_kind: RequestOutputKind,
        tokenizer=None,
    ) -> None:
        self.request_id = request_id
        self.tokenizer = tokenizer
        self._prompt_logprobs: PromptLogprobs | None = None  # built once, when complete
        self._sent_prompt_logprobs = False  # DELTA: only the first output that has them carries them
        self.prompt = prompt
        self.prompt_token_ids = requests[0].prompt_token_ids
        self.output_kind = output_kind
        self.stream = output_kind is not RequestOutputKind.FINAL_ONLY
        self.children: list[RequestState] = []  # ordered by sample index
        self.num_unfinished = len(requests)
        self.last_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0

    @property
    def has_news(self) -> bool:
        """False only for a DELTA request none of whose samples has anything new to return."""
        return self.output_kind is not RequestOutputKind.DELTA or any(child.has_delta for child in self.children)

    def make_request_output(self) -> RequestOutput:
        requests = [child.request for child in self.children]
        if self.output_kind is RequestOutputKind.DELTA:
            outputs = [child.make_delta_output() for child in self.children if child.has_delta]
            prompt_logprobs = None if self._sent_prompt_logprobs else self._make_prompt_logprobs()
            self._sent_prompt_logprobs = prompt_logprobs is not None
        else:
            outputs = [child.make_completion_output() for child in self.children]
            prompt_logprobs = self._make_prompt_logprobs()
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=outputs,
            finished=self.finished,
            metrics=RequestMetrics(
                arrival_time=min(r.arrival_time for r in requests),
                first_scheduled_time=_earliest(r.first_scheduled_time for r in requests),
                first_token_time=_earliest(r.first_token_time for r in requests),
                last_token_time=self.last_token_time,
                finished_time=self.finished_time,
            ),
            # The most prompt tokens any sample found in the prefix cache.
            num_cached_tokens=max(r.num_cached_prompt_tokens for r in requests),
            prompt_logprobs=prompt_logprobs,
        )

    def _make_prompt_logprobs(self) -> PromptLogprobs | None:
        if self._prompt_logprobs is None:
            self._prompt_logprobs = make_prompt_logprobs(self.children[0].request, self.tokenizer)
        return self._prompt_logprobs


def _earliest(times: Iterable[float | None]) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


@dataclasses.dataclass
class ProcessedOutputs:
    """``request_outputs``: finished prompts (and every touched streaming prompt). ``stopped_request_ids``: request
    ids a stop string ended; pass them to ``Scheduler.finish_requests(ids, RequestStatus.FINISHED_STOPPED)``."""

    request_outputs: list[RequestOutput]
    stopped_request_ids: list[str]


class OutputProcessor:
    def __init__(self, tokenizer=None) -> None:
        """``tokenizer``: a Hugging Face tokenizer (anything with ``decode``), or None to return token ids only."""
        self.tokenizer = tokenizer
        self._parents: dict[str, ParentRequest] = {}
        self._states: dict[str, RequestState] = {}  # unfinished samples by request id

    def add_request(self, request_id: str, prompt: str | None, requests: list[Request]) -> None:
        """Track the samples of one prompt (from ``make_child_requests``; their ``SamplingParams.output_kind`` says
        when it is returned). Raises ValueError before any change."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        if not requests:
            raise ValueError(f"request {request_id!r} has no samples")
        for request in requests:
            if request.request_id in self._states:
                raise ValueError(f"request id {request.request_id!r} is already in use by an unfinished request")
            if self.tokenizer is None and request.sampling_params.stop:
                raise ValueError(
                    f"request {request_id!r}: stop strings {request.sampling_params.stop!r} need a tokenizer "
                    "(the engine was started without one)"
                )
        # SamplingParams.detokenize=False: no text and no decoded logprob tokens, as without a tokenizer
        tokenizer = self.tokenizer if requests[0].sampling_params.detokenize else None
        parent = ParentRequest(request_id, prompt, requests, requests[0].sampling_params.output_kind, tokenizer)
        for request in sorted(requests, key=lambda r: r.sample_index):
            state = RequestState(request, parent, tokenizer)
            parent.children.append(state)
            self._states[request.request_id] = state
        self._parents[request_id] = parent

    def process_outputs(
        self, engine_core_outputs: Iterable[EngineCoreOutput], stats: IterationStats | None = None
    ) -> ProcessedOutputs:
        """Apply one step's outputs (and add their tokens, latencies and finished samples to ``stats``, when given).
        Outputs of requests already finished or aborted here are ignored."""
        now = time.monotonic()
        touched: dict[str, ParentRequest] = {}
        stopped_request_ids = []
        for output in engine_core_outputs:
            state = self._states.get(output.request_id)
            if state is None:
                continue
            parent = state.parent
            if stats is not None and output.new_token_ids:
                stats.record_new_tokens(state.request, len(output.new_token_ids), state.last_token_time, now)
            state.last_token_time = now
            stop = state.update(output)
            if stop is not None and not output.finished:
                stopped_request_ids.append(output.request_id)
            parent.last_token_time = now
            if state.finished:
                self._finish_sample(state, now)
                if stats is not None:
                    stats.record_finished(state.request, state.finish_reason, len(state.token_ids), now)
            if parent.stream or parent.finished:
                touched[parent.request_id] = parent
        request_outputs = [parent.make_request_output() for parent in touched.values() if parent.has_news]
        return ProcessedOutputs(request_outputs, stopped_request_ids)

    def _finish_sample(self, state: RequestState, now: float) -> None:
        del self._states[state.request.request_id]
        parent = state.parent
        parent.num_unfinished -= 1
        if parent.finished:
            parent.finished_time = now
            del self._parents[parent.request_id]

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[str]:
        """Forget these prompts (by the id given to ``add_request``); returns the ids of their unfinished samples,
        to pass to ``Scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)``."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        aborted = []
        for request_id in ids:
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            for child in parent.children:
                if self._states.pop(child.request.request_id, None) is not None:
                    aborted.append(child.request.request_id)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)
