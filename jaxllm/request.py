"""Request: one sequence's state as the scheduler and the runner see it.

Owns the token list (prompt + output), ``num_computed_tokens``, the block table and the finish status. Plain Python:
imports neither jax nor flax. ``n > 1`` is expanded into several Requests before they get here.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jaxllm.bad_words import needs_output_history
from jaxllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jaxllm.core.step_io import PromptLogprobs
    from jaxllm.structured_output import StructuredOutputMatcher

# One prompt position's prompt logprob: (logprob, rank, top-k token ids, top-k logprobs).
PromptLogprobEntry = tuple[float, int, list[int], list[float]]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self._value_ in _FINISHED_VALUES  # by value: a str's hash is C code, an Enum member's is Python

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
_FINISHED_VALUES = frozenset(status.value for status in _FINISHED)
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A sequence being generated. ``all_token_ids`` grows by one token per sampling step."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        sample_index: int = 0,
        bad_words_token_ids: Sequence[tuple[int, ...]] = (),
        structured_output: StructuredOutputMatcher | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        # Index of this sample among its parent's n samples; folded into the seed so siblings differ.
        self.sample_index = sample_index
        # SamplingParams.bad_words as token sequences (jaxllm.bad_words), tokenized by the engine.
        self.bad_words_token_ids = list(bad_words_token_ids)
        # SamplingParams.structured_outputs as a grammar matcher (jaxllm.structured_output); follows each output token
        self.structured_output = structured_output
        # Whether sampling this request's next token needs all its earlier output tokens on the host (bad words of
        # several tokens, a grammar), so the engine does not schedule ahead of it. Penalties do not: the one output
        # token still in flight reaches the sampler on the device (StepBatch.in_flight_rows). Fixed for the
        # request's life, so the per-step check reads one attribute.
        self.needs_host_outputs = needs_output_history(self.bad_words_token_ids) or structured_output is not None
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt plus the most output tokens it may get (max_tokens, capped at max_model_len); set by the scheduler
        # that accepts it (``Scheduler.add_request``), read every step.
        self.token_limit: int | None = None
        # Tokens sampled by dispatched steps whose ids have not reached the host yet (async scheduling): the
        # scheduler counts them as known when it schedules ahead; each is appended when its step's output arrives.
        self.num_pending_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_prompt_tokens = 0  # prefix-cache hit length at first admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # Logprobs of each output token, filled by the engine when sampling_params.logprobs is set.
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        # Prompt logprobs by prompt position when sampling_params.prompt_logprobs is set (position 0 has none).
        self.prompt_logprobs: list[PromptLogprobEntry | None] | None = (
            None if sampling_params.prompt_logprobs is None else [None] * len(self.prompt_token_ids)
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """Tokens including those sampled on the device and not yet appended."""
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self.structured_output is not None:
            self.structured_output.accept(token_id)

    def record_prompt_logprobs(self, computed: PromptLogprobs) -> None:
        """Store one step's share of the prompt logprobs by position (a recomputation after preemption rewrites the
        same positions)."""
        entries = zip(computed.logprobs, computed.ranks, computed.top_token_ids, computed.top_logprobs, strict=True)
        for offset, entry in enumerate(entries):
            self.prompt_logprobs[computed.first_position + offset] = entry

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, num_tokens={self.num_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
