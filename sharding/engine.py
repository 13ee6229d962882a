"""ShardedEngine: one engine replica (scheduler + pipeline runner) on one replica mesh, token ids in and out.

Owns taking prompts as token ids: the step loop schedule -> execute -> update is ``jaxllm.engine.engine_core``'s,
for a model laid out by ``sharding`` (tensor x pipeline); outputs are ``EngineCoreOutput`` (no tokenizer, no
detokenizer). It is what ``benchmarks/mesh_scaling.py`` times; ``LLMEngine`` runs the same core with the runners
of ``sharding.engine_runners``.
"""

from __future__ import annotations

from jax.sharding import Mesh

from jaxllm.config import ResolvedConfig
from jaxllm.engine.engine_core import EngineCore
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams
from sharding.runner import PipelineRunner


class ShardedEngine(EngineCore):
    """jaxllm's ``EngineCore`` (any runner with ``execute(SchedulerOutput) -> ModelRunnerOutput``), token ids in."""

    def __init__(
        self,
        runner,
        config: ResolvedConfig,
        *,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        super().__init__(
            runner, config, enable_chunked_prefill=enable_chunked_prefill, enable_prefix_caching=enable_prefix_caching
        )
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_model(
        cls, model, mesh: Mesh, config: ResolvedConfig, kv_dtype, *, runner_kwargs=None, **engine_kwargs
    ) -> ShardedEngine:
        """A model placed on ``mesh`` (one replica: data=1) run by a ``PipelineRunner``."""
        runner = PipelineRunner(model, mesh, config, kv_dtype, **(runner_kwargs or {}))
        return cls(runner, config, **engine_kwargs)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError(f"ShardedEngine takes one sample per request, got n={params.n}")
        self.scheduler.add_request(Request(request_id, prompt_token_ids, params, eos_token_ids=self.eos_token_ids))


def generate(engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    """Runs ``prompts`` (request id -> token ids) to completion on any engine-like object; output ids per request."""
    for request_id, token_ids in prompts.items():
        engine.add_request(request_id, token_ids, params)
    outputs: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].extend(output.new_token_ids)
    return outputs
