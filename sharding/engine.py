"""ShardedEngine: one engine replica (scheduler + pipeline runner) on one replica mesh, token ids in and out.

Owns the step loop schedule -> execute -> update for a model laid out by ``sharding`` (tensor x pipeline), in the
shape of vLLM's engine core: prompts are token ids, outputs are ``EngineCoreOutput`` (no tokenizer, no detokenizer).
It is what ``DataParallelEngine`` replicates and what ``benchmarks/mesh_scaling.py`` times, until ``LLMEngine``
builds its runner from a mesh (see the report of issue 6 for that change).
"""

from __future__ import annotations

from jax.sharding import Mesh

from jaxllm.config import ResolvedConfig
from jaxllm.core.block_manager import BlockManager
from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams
from sharding.runner import PipelineRunner


class ShardedEngine:
    """The step loop over any runner with ``execute(SchedulerOutput) -> ModelRunnerOutput``."""

    def __init__(
        self,
        runner,
        config: ResolvedConfig,
        *,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.runner = runner
        scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            num_blocks=config.num_blocks,
            enable_chunked_prefill=enable_chunked_prefill,
            enable_prefix_caching=enable_prefix_caching,
        )
        block_manager = BlockManager(config.num_blocks, config.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, block_manager)

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

    def abort_request(self, request_ids) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        return self.scheduler.update_from_output(scheduler_output, self.runner.execute(scheduler_output))


def generate(engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    """Runs ``prompts`` (request id -> token ids) to completion on any engine-like object; output ids per request."""
    for request_id, token_ids in prompts.items():
        engine.add_request(request_id, token_ids, params)
    outputs: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].extend(output.new_token_ids)
    return outputs
