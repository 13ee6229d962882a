"""What one engine step adds to the statistics: tokens, time to first token, inter-token latencies and the samples
that finished. Filled by the output processor (``OutputProcessor.process_outputs(..., stats)``), read by
``jaxllm.metrics.prometheus.EngineMetrics``. Plain Python; times are ``time.monotonic()`` seconds, as the requests'."""

from __future__ import annotations

import dataclasses

from jaxllm.request import Request


@dataclasses.dataclass(frozen=True)
class FinishedRequestStats:
    """One sample that finished: why ("stop", "length" or "abort"), its latencies and token counts."""

    finish_reason: str
    e2e_latency_s: float  # arrival to finish
    queue_time_s: float | None  # arrival to first scheduled; None if never scheduled
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclasses.dataclass
class IterationStats:
    num_prompt_tokens: int = 0  # prompts of the samples whose first token came in this step
    num_generation_tokens: int = 0
    time_to_first_tokens_s: list[float] = dataclasses.field(default_factory=list)
    inter_token_latencies_s: list[float] = dataclasses.field(default_factory=list)  # one per sample per step
    finished: list[FinishedRequestStats] = dataclasses.field(default_factory=list)

    def record_new_tokens(self, request: Request, num_new: int, last_token_time: float | None, now: float) -> None:
        """``num_new`` tokens of ``request`` arrived at ``now``; ``last_token_time``: when its previous ones did (None:
        these are its first)."""
        self.num_generation_tokens += num_new
        if last_token_time is None:
            self.num_prompt_tokens += request.num_prompt_tokens
            self.time_to_first_tokens_s.append(now - request.arrival_time)
        else:
            self.inter_token_latencies_s.append(now - last_token_time)

    def record_finished(self, request: Request, finish_reason: str, num_generation_tokens: int, now: float) -> None:
        scheduled = request.first_scheduled_time
        self.finished.append(
            FinishedRequestStats(
                finish_reason,
                now - request.arrival_time,
                None if scheduled is None else scheduled - request.arrival_time,
                request.num_prompt_tokens,
                num_generation_tokens,
            )
        )
