"""PipelineRunner: the model runner's seam (``execute(SchedulerOutput) -> ModelRunnerOutput``) on a replica mesh.

Owns packing the step (``jaxllm.runner.step_batch``), splitting it into microbatches, running them through a
``PipelinedModel`` and the one device->host copy of the results. Sampling is the head function run on the last stage:
greedy by default; pass ``head_fn`` and ``build_head_args`` (per microbatch, from its scheduled requests) to plug in
the engine's sampler. Results of a step are also kept in ``last_results`` (host numpy, one row per scheduled
request), so tests can read logits through a head that returns them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import ResolvedConfig
from jaxllm.core.step_io import ModelRunnerOutput, SchedulerOutput
from jaxllm.runner.step_batch import StepBatch, pack_step_batch
from sharding.microbatch import Microbatch, split_step_batch
from sharding.pipeline import HeadFn, PipelinedModel, greedy_head

logger = logging.getLogger(__name__)

# (scheduled requests of one microbatch, its padded row count) -> that microbatch's head_args pytree
BuildHeadArgs = Callable[[list, int], object]


def padding_batch(num_tokens: int, num_rows: int, max_blocks: int) -> StepBatch:
    """A batch of padding only (every token writes the null block, every row has seq_len 0), for compiling."""
    tokens, rows = np.zeros(num_tokens, np.int32), np.zeros(num_rows, np.int32)
    return StepBatch(
        input_ids=tokens,
        positions=tokens,
        slot_mapping=tokens,
        context_lens=tokens,
        block_tables=np.zeros((num_rows, max_blocks), np.int32),
        seq_lens=rows,
        query_start_loc=np.zeros(num_rows + 1, np.int32),
        logits_indices=rows,
        num_requests=0,
        num_tokens=0,
    )


class PipelineRunner:
    def __init__(
        self,
        model,
        mesh: Mesh,
        config: ResolvedConfig,
        kv_dtype,
        *,
        num_microbatches: int | None = None,
        head_fn: HeadFn = greedy_head,
        build_head_args: BuildHeadArgs | None = None,
        compiler_options: dict | None = None,
    ):
        self.config = config
        self.pipeline = PipelinedModel(model, mesh, head_fn=head_fn, compiler_options=compiler_options)
        self.num_microbatches = num_microbatches or self.pipeline.num_stages
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {self.num_microbatches}")
        self.build_head_args = build_head_args or (lambda requests, rows: None)
        self.kv_dtype = kv_dtype
        self.pipeline.allocate_kv_cache(config.num_blocks, config.block_size, kv_dtype)
        self.last_results: dict[str, np.ndarray] | None = None

    @property
    def num_traces(self) -> int:
        return self.pipeline.num_traces

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        scheduled = scheduler_output.scheduled
        microbatches = split_step_batch(
            pack_step_batch(scheduler_output, self.config), self.num_microbatches, self.config
        )
        head_args = [self._head_args(mb, scheduled) for mb in microbatches]
        results = jax.device_get(self.pipeline.run([mb.batch for mb in microbatches], head_args))
        self.last_results = _gather_rows(results, microbatches)
        token_ids = self.last_results["token_ids"].tolist()
        sampled = {s.request_id: token_ids[row] for row, s in enumerate(scheduled) if s.samples_token}
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def _head_args(self, microbatch: Microbatch, scheduled: list):
        requests = [s.request for s in scheduled[microbatch.first_request :][: microbatch.batch.num_requests]]
        return self.build_head_args(requests, microbatch.batch.seq_lens.shape[0])

    def warm_up(self) -> float:
        """Compiles every stage for every token bucket with padding-only batches; returns seconds spent."""
        start = time.perf_counter()
        for bucket in self.config.token_buckets:
            rows = self.config.request_rows_for(bucket)
            batch = padding_batch(bucket, rows, self.config.max_blocks_per_request)
            jax.block_until_ready(self.pipeline.run([batch], [self.build_head_args([], rows)]))
        elapsed = time.perf_counter() - start
        logger.info(
            "compiled %d buckets x %d stages in %.1f s",
            len(self.config.token_buckets),
            self.pipeline.num_stages,
            elapsed,
        )
        return elapsed


def _gather_rows(results: list[dict], microbatches: list[Microbatch]) -> dict[str, np.ndarray]:
    """Per-microbatch head results -> one array per key with a row per scheduled request, in step order."""
    keys = results[0].keys()
    return {
        key: np.concatenate(
            [np.asarray(r[key])[: mb.batch.num_requests] for r, mb in zip(results, microbatches, strict=True)]
        )
        for key in keys
    }
