"""EngineCoreOutput: what one engine step produced for one request, handed from the scheduler to the output processor.

Carries token ids and finish status only; text belongs to the output processor. Plain Python: imports neither jax
nor flax.
"""

from __future__ import annotations

import dataclasses

from jaxllm.core.step_io import SampledLogprobs
from jaxllm.request import RequestStatus


@dataclasses.dataclass(slots=True)
class EngineCoreOutput:
    """New token(s) of one request this step, and its finish status if the step finished it.

    ``new_logprobs`` is aligned with ``new_token_ids`` when the request asked for logprobs, else None.
    ``stop_reason`` is the stop token id for a stop token, None for EOS or a length finish.
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[SampledLogprobs] | None = None
    finish_status: RequestStatus | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_status is not None

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish reason string: "stop", "length", "abort", or None while running."""
        return None if self.finish_status is None else self.finish_status.finish_reason
