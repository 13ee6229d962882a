"""What users get back from generation: vLLM-compatible ``RequestOutput``, ``CompletionOutput`` and ``Logprob``.

Plain data, built by the output processor. Names, fields and defaults follow vLLM so code written against vLLM's
outputs reads ours unchanged. Imports neither jax nor flax.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class Logprob:
    """Log probability of one token; ``rank`` is its 1-based rank in the distribution when known."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per output token: the sampled token and the top-k alternatives.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first, then a dict of the prompt token and the top-k alternatives.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclasses.dataclass
class CompletionOutput:
    """One sample of a request. ``finish_reason`` is "stop", "length", "abort" or None while running;
    ``stop_reason`` is the stop string or stop token id that ended it (None for EOS or length)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Times (``time.monotonic()`` seconds) of one request's milestones."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    """A prompt's result: one ``CompletionOutput`` per sample (``n`` of them, ordered by index).
    ``prompt_logprobs``: when ``SamplingParams.prompt_logprobs`` is set, one entry per prompt token."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    prompt_logprobs: PromptLogprobs | None = None
