"""EngineCore: one engine replica's scheduler and model runner, and its step schedule -> execute -> update.

Owns that loop only (vLLM v1's engine core): requests arrive validated and built (``Request``), outputs leave as
``EngineCoreOutput``; tokenizing and detokenizing stay in ``LLMEngine``. The runner is anything with
``execute(SchedulerOutput) -> ModelRunnerOutput`` (``ModelRunner`` on one device, ``sharding.PipelineRunner`` on a
mesh). ``LLMEngine`` runs one core, or one per data-parallel replica behind ``sharding.DataParallelEngine``, which
takes the same interface.

Async scheduling (``async_scheduling=True``, the default, for runners whose ``supports_async`` is true, which
offer ``dispatch``/``collect``: ``ModelRunner``, and ``sharding.PipelineRunner`` on any mesh): each
``step()`` dispatches the next step before it waits for the one in flight, so the host's scheduling, packing and
output handling overlap the device's work and the device never waits on the host. The in-flight step's sampled
tokens feed the next one on the device (see ``ModelRunner``), and so do they the penalties (repetition, presence,
frequency), which count a request's output token still in flight with those on the host. A step is not scheduled
ahead while a request in flight has bad words of several tokens or a grammar (they need its latest token on the host
first: ``Request.needs_host_outputs``). Each ``step()`` still
returns one step's outputs. ``step_times`` (``jaxllm.engine.step_times``) splits the steps' time into host work and
waiting for the device.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import jax

from jaxllm.config import ResolvedConfig
from jaxllm.core.block_manager import BlockManager
from jaxllm.core.engine_core_output import EngineCoreOutput
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.engine.step_times import StepTimes
from jaxllm.request import Request, RequestStatus


class EngineCore:
    def __init__(
        self,
        runner,
        config: ResolvedConfig,
        *,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = True,
    ):
        self.config = config
        self.runner = runner
        self.async_scheduling = async_scheduling and getattr(runner, "supports_async", False)
        self._in_flight = None  # the runner's InFlightStep dispatched ahead, not yet collected
        self.step_times = StepTimes()
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
        start = time.perf_counter()
        if not self.async_scheduling:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_empty:
                return []
            outputs = self.scheduler.update_from_output(scheduler_output, self.runner.execute(scheduler_output))
            self.step_times.record(time.perf_counter() - start, None)
            return outputs
        current, self._in_flight = self._in_flight, None
        if current is None:
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_empty:
                return []
            current = self.runner.dispatch(scheduler_output)
        if self._can_schedule_ahead(current.scheduler_output):
            ahead = self.scheduler.schedule()
            if not ahead.is_empty:
                self._in_flight = self.runner.dispatch(ahead, current)
        wait_start = time.perf_counter()
        jax.block_until_ready(current.result)
        wait = time.perf_counter() - wait_start
        outputs = self.scheduler.update_from_output(current.scheduler_output, self.runner.collect(current))
        if not self.scheduler.has_unfinished_requests():
            self._in_flight = None  # only dropped requests in it; the device finishes it unobserved
        self.step_times.record(time.perf_counter() - start, wait)
        return outputs

    @staticmethod
    def _can_schedule_ahead(scheduler_output) -> bool:
        return not any(s.samples_token and s.request.needs_host_outputs for s in scheduler_output.scheduled)
