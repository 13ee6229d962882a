"""The only things that cross between the scheduler and the model runner.

``SchedulerOutput`` says which requests run this step and how many of their tokens; ``ModelRunnerOutput`` carries
back the sampled tokens (and the logprobs asked for). Plain Python: imports neither jax nor flax.
"""

from __future__ import annotations

import dataclasses

from jaxllm.request import Request


# Read-only by convention, not frozen: a frozen dataclass is built 4x slower, and the scheduler builds one per request a
# step (0.8 against 0.2 us).
@dataclasses.dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens ``[num_computed_tokens, num_computed_tokens + num_scheduled_tokens)``.

    ``request.block_ids`` already covers every scheduled token. The scheduler advances ``request.num_computed_tokens``
    as it schedules (so a next step can be scheduled before this one's output is back); ``num_computed_tokens`` here
    keeps where this step starts. ``samples_token``: the step reaches the end of the request's tokens (counting
    tokens still pending on the device), so its last token yields a sample.
    """

    request: Request
    num_computed_tokens: int
    num_scheduled_tokens: int
    samples_token: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The scheduled tokens' ids known on the host; with async scheduling the last one may still be pending (on
        the device, from the previous step), and is then missing here."""
        start = self.num_computed_tokens
        return self.request.all_token_ids[start : start + self.num_scheduled_tokens]


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_request_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def wants_logprobs(self) -> bool:
        """Whether any scheduled request asked for logprobs (else runners fetch only the sampled token ids)."""
        return any(s.request.sampling_params.logprobs is not None for s in self.scheduled)


@dataclasses.dataclass(frozen=True)
class SampledLogprobs:
    """Logprob of the sampled token and the top-k alternatives (k = SamplingParams.logprobs). ``sampled_rank``: the
    sampled token's rank in the whole vocabulary (1 = most likely), as the runners' sampler computes it; None from a
    runner that does not (the output then ranks the token among the top k only)."""

    sampled_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]
    sampled_rank: int | None = None


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Raw logprobs of prompt tokens ``first_position, first_position + 1, ...`` (one step's share of a prompt), each
    given the tokens before it: the prompt token's logprob and its rank (1 = most likely) in the distribution, and
    the top-k alternatives (k = ``SamplingParams.prompt_logprobs``), most likely first."""

    first_position: int
    logprobs: list[float]
    ranks: list[int]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclasses.dataclass(frozen=True)
class ModelRunnerOutput:
    """Sampled token per request id, only for requests whose ``ScheduledRequest.samples_token`` was True.
    ``prompt_logprobs``: for requests that asked for them, the prompt positions this step computed."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, SampledLogprobs] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = dataclasses.field(default_factory=dict)
