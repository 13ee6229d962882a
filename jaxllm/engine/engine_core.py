"""EngineCore: one engine replica's scheduler and model runner, and its step schedule -> execute -> update.

Owns that loop only (vLLM v1's engine core): requests arrive validated and built (``Request``), outputs leave as
``EngineCoreOutput``; tokenizing and detokenizing stay in ``LLMEngine``. The runner is anything with
``execute(SchedulerOutput) -> ModelRunnerOutput`` (``ModelRunner`` on one device, ``sharding.PipelineRunner`` on a
mesh). ``LLMEngine`` runs one core, or one per data-parallel replica behind ``sharding.DataParallelEngine``, which
takes the same interface.
"""

from __future__ import annotations

from collections.abc import Iterable

from jaxllm.config import ResolvedConfig
from jaxllm.core.block_manager import BlockManager
from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.request import Request, RequestStatus


class EngineCore:
    def __init__(
        self,
        runner,
        config: ResolvedConfig,
        *,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
    ):
        self.config = config
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

    def add_request(self, request_id: str, request: Request, params=None) -> None:
        """Queues a built request (``request_id`` and ``params`` are the replica interface's; ``request`` has both)."""
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        return self.scheduler.update_from_output(scheduler_output, self.runner.execute(scheduler_output))
