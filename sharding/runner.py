"""PipelineRunner: the model runner's seam (``execute(SchedulerOutput) -> ModelRunnerOutput``) on a replica mesh.

Owns packing the step (``jaxllm.runner.step_batch``), splitting it into microbatches, running them through a
``PipelinedModel`` and the one device->host copy of the results. Sampling is the head function, run after the last
stage on its devices in a program of its own (so a new sampling variant never recompiles a stage): by default
jaxllm's sampler (``jaxllm.sampling.sample``, with per-microbatch SamplingMetadata and the step key
``fold_in(key(seed), step)`` as ``ModelRunner`` uses), so the runner is a drop-in for ``ModelRunner`` on a mesh;
tests pass a head returning logits. A head returns a dict with at least ``token_ids [S]`` (and the SamplerOutput
logprob fields when asked). Results of a step are kept in ``last_results`` (host numpy, one row per request). Prompt
logprobs (``SamplingParams.prompt_logprobs``) come back beside the head's results, one row per token of each call, and
are split per microbatch into each request's share (``jaxllm.runner.prompt_logprobs``).

The runner offers ``dispatch``/``collect`` (``execute`` is the two in a row), so the engine core schedules ahead as it
does on one device, on every mesh: a step's pending tokens (the in-flight step's samples) are gathered into its input
ids inside the first stage's program, from the in-flight step's token ids, which the last stage pads to the most rows
of any bucket (so one program per bucket serves every previous bucket). With several microbatches each reads the
previous step's microbatch that holds its requests (``sharding.pending``), so on a pipeline the next step's first
microbatch enters stage 0 while the step in flight still occupies the later stages, and the host's work for a step
overlaps the devices' instead of leaving every stage idle between steps.

``launch_thread=True`` (engines' default on GPUs; ``JAXLLM_MESH_LAUNCH_THREAD`` sets it) hands each dispatched step's
launch to one worker thread. A multi-GPU program's execute returns only once every GPU's host thread has launched its
share, ~7 ms per batch-1 step at TP 4 on H200s (benchmarks/RESULTS.md), during which the engine's own host work for
the next step would otherwise wait; with the worker, the two overlap. ``dispatch`` packs the step on the caller's
thread (``PipelinedModel.prepare``), so the worker only copies the packed inputs and calls the programs. Launches
stay in dispatch order, and a collected step's buffers go back to the pool on the same worker, after the launch that
reads them as pending tokens.
``stable_step_outputs=True`` (engines' default; ``JAXLLM_STABLE_STEP_OUTPUTS=0`` turns it off) and
``stable_stage_outputs=True`` (experimental; ``JAXLLM_STABLE_STAGE_OUTPUTS=1``): see ``sharding.pipeline``; the
runner releases a step's result buffers once it has read them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import ResolvedConfig
from jaxllm.core.step_io import ModelRunnerOutput, PromptLogprobs, SampledLogprobs, SchedulerOutput
from jaxllm.runner import prompt_logprobs
from jaxllm.runner.host_block_table import HostBlockTable
from jaxllm.runner.launch_thread import LaunchedResult, resolved, start_launch_thread
from jaxllm.runner.model_runner import InFlightStep, sampler_variants
from jaxllm.runner.parallel_compile import compile_concurrently, compile_threads
from jaxllm.runner.step_batch import StepBatch, pack_step_batch, padding_step_batch
from jaxllm.runner.xla_options import CompilerOptions
from jaxllm.sampling import SamplerOutput, SamplingMetadataBuilder, sample
from sharding.microbatch import Microbatch, split_step_batch
from sharding.pending import fed_tokens, plan_feed, warm_up_merges
from sharding.pipeline import HeadFn, PipelinedModel
from sharding.rules import replicated

logger = logging.getLogger(__name__)

# SamplerOutput's fields past the token ids, fetched only when a step's requests ask for logprobs
LOGPROB_FIELDS = tuple(name for name in SamplerOutput._fields if name != "token_ids")

# (requests of one microbatch, its padded row count, microbatch index, step index) -> its head_args pytree
BuildHeadArgs = Callable[[list, int, int, int], object]


def sampler_head(logits, head_args, in_flight_tokens, logprobs_mode: str = "raw_logprobs") -> dict:
    """jaxllm's sampler on the last stage; ``head_args`` is ``(SamplingMetadata, base key data, step index)``. The
    step key is folded in here, inside the program, as ModelRunner folds its own; ``in_flight_tokens`` (each row's
    newest output still on the device) go to the penalties; ``logprobs_mode``: the engine's (bind it with
    ``functools.partial``)."""
    metadata, base_key_data, step = head_args
    step_key = jax.random.fold_in(jax.random.wrap_key_data(base_key_data), step)
    return sample(logits, metadata, step_key, in_flight_tokens, logprobs_mode)._asdict()


class SamplerHeadArgs:
    """Builds ``sampler_head``'s arguments: one cached metadata builder per microbatch slot, the base key, the step.

    Everything stays host numpy (the key as its raw uint32 data), so the pipeline's one ``device_put`` can place it
    on a last stage that spans several processes, and building it never waits on the device: with async scheduling
    the next step is built while the previous one runs (an eager ``fold_in`` read back to the host here used to
    stall every tensor-parallel step until the one before it had finished).
    """

    def __init__(self, seed: int = 0):
        self.base_key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
        self.builders: dict[int, SamplingMetadataBuilder] = {}

    def __call__(self, requests: list, num_rows: int, microbatch: int, step: int):
        builder = self.builders.setdefault(microbatch, SamplingMetadataBuilder())
        return builder.build(requests, num_rows), self.base_key_data, np.int32(step)

    def warm_up_variants(self, num_rows: int) -> list:
        """Padding-only arguments of the head programs compiled at warm-up, as ``ModelRunner`` compiles its sampler:
        greedy, random, random with top-k/top-p."""
        return [(metadata, self.base_key_data, np.int32(0)) for metadata in sampler_variants(num_rows)]


@dataclasses.dataclass
class MeshStep(InFlightStep):
    """A dispatched mesh step: ``result`` holds one head-result dict per microbatch (device arrays; or the launch
    thread's ``LaunchedResult`` of that list), ``rows`` each request's flat row (``sharding.pending``)."""

    microbatches: list[Microbatch] = dataclasses.field(default_factory=list)


class PipelineRunner:
    supports_async = True  # dispatch / collect may overlap steps (jaxllm.engine.engine_core)

    def __init__(
        self,
        model,
        mesh: Mesh,
        config: ResolvedConfig,
        kv_dtype,
        *,
        num_microbatches: int | None = None,
        seed: int = 0,
        head_fn: HeadFn = sampler_head,
        build_head_args: BuildHeadArgs | None = None,
        compiler_options: CompilerOptions = None,
        launch_thread: bool = False,
        stable_step_outputs: bool = False,
        stable_stage_outputs: bool = False,
    ):
        self.config = config
        max_rows = config.request_rows_for(config.token_buckets[-1])  # sampled ids padded to this, fed on device
        self.pipeline = PipelinedModel(
            model,
            mesh,
            head_fn=head_fn,
            compiler_options=compiler_options,
            token_rows=max_rows,
            stable_step_outputs=stable_step_outputs,
            stable_stage_outputs=stable_stage_outputs,
        )
        self.num_microbatches = num_microbatches or self.pipeline.num_stages
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be at least 1, got {self.num_microbatches}")
        self.build_head_args = build_head_args or SamplerHeadArgs(seed)
        self.num_steps = 0
        self._host_block_table = HostBlockTable(config.max_blocks_per_request, 2 * max_rows)
        self.kv_dtype = kv_dtype
        self.pipeline.allocate_kv_cache(config.num_blocks, config.block_size, kv_dtype)
        self.last_results: dict[str, np.ndarray] | None = None
        # Launches hold the pipeline, never the runner (jaxllm.runner.launch_thread): a dropped engine frees its
        # device memory at `del`, after its queued launches, and leaves no thread behind.
        self._launcher = start_launch_thread(self) if launch_thread else None

    @property
    def num_traces(self) -> int:
        return self.pipeline.num_traces

    @property
    def num_head_traces(self) -> int:
        return self.pipeline.num_head_traces

    def dispatch(self, scheduler_output: SchedulerOutput, prev: MeshStep | None = None) -> MeshStep:
        """Launches a step's microbatches through the stages without waiting; ``prev``, the step in flight, supplies
        its pending tokens (``sharding.pending``)."""
        scheduled = scheduler_output.scheduled
        batch = pack_step_batch(
            scheduler_output, self.config, None if prev is None else prev.rows, self._host_block_table
        )
        microbatches = split_step_batch(batch, self.num_microbatches, self.config)
        rows_per_result = self.pipeline.pending_rows
        feeds = [plan_feed(mb.batch.prev_index, rows_per_result) for mb in microbatches]
        batches = [
            dataclasses.replace(mb.batch, prev_index=feed.prev_index)
            for mb, feed in zip(microbatches, feeds, strict=True)
        ]
        targets, width = _prompt_targets(microbatches, scheduled)
        targets = targets or [None] * len(batches)
        calls = [  # the host work, here on the caller's thread; the launch copies and runs (sharding.step_inputs)
            self.pipeline.prepare(batch, self._head_args(index, mb, scheduled), targets[index], width)
            for index, (batch, mb) in enumerate(zip(batches, microbatches, strict=True))
        ]
        prev_result = None if prev is None else prev.result
        self.num_steps += 1
        rows = {
            s.request_id: index * rows_per_result + row
            for index, mb in enumerate(microbatches)
            for row, s in enumerate(_microbatch_requests(scheduled, mb))
        }

        pipeline = self.pipeline  # (not self: see __init__)

        def launch() -> list[dict]:
            prev_results = None if prev_result is None else resolved(prev_result)  # in flight: still on the device
            pending = [fed_tokens(feed, prev_results) for feed in feeds]
            results = pipeline.launch(calls, pending)
            for result in results:
                result["token_ids"].copy_to_host_async()
            return results

        if self._launcher is None:
            return MeshStep(scheduler_output, launch(), rows, microbatches=microbatches)
        return MeshStep(
            scheduler_output, LaunchedResult(self._launcher.submit(launch)), rows, microbatches=microbatches
        )

    def collect(self, step: MeshStep) -> ModelRunnerOutput:
        """Waits for a dispatched step and returns its sampled tokens (and logprobs where asked)."""
        results = resolved(step.result)
        wanted = results
        if not step.scheduler_output.wants_logprobs:  # no logprob transfers
            wanted = [{key: value for key, value in r.items() if key not in LOGPROB_FIELDS} for r in results]
        host = jax.device_get(wanted)
        self._release(results)
        scheduled = step.scheduler_output.scheduled
        self.last_results = _gather_rows([_step_rows(r) for r in host], step.microbatches)
        prompt = {}
        for result, mb in zip(host, step.microbatches, strict=True):
            prompt.update(_prompt_logprobs(result, _microbatch_requests(scheduled, mb)))
        return _to_output(scheduled, self.last_results, prompt)

    def _release(self, results: list[dict]) -> None:
        """Hands a collected step's result buffers back to the pool. With the launch thread the release queues behind
        the launches already submitted: the next step's launch may not have read these token ids (its pending
        tokens) yet, and a buffer back in the pool is one a later call donates."""
        if self._launcher is None:
            self.pipeline.release(results)
        else:
            self._launcher.submit(self.pipeline.release, results)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(scheduler_output))

    def _head_args(self, index: int, microbatch: Microbatch, scheduled: list):
        requests = [s.request for s in _microbatch_requests(scheduled, microbatch)]
        return self.build_head_args(requests, microbatch.batch.seq_lens.shape[0], index, self.num_steps)

    def resize_kv_cache(self, config: ResolvedConfig) -> None:
        self.config = config
        self._host_block_table = HostBlockTable(
            config.max_blocks_per_request, 2 * config.request_rows_for(config.token_buckets[-1])
        )
        self.pipeline.allocate_kv_cache(config.num_blocks, config.block_size, self.kv_dtype)

    # Sleep mode (jaxllm.engine.sleep_mode), as ModelRunner's: the pipeline's stages hold the arrays.
    def param_arrays(self) -> list[jax.Array]:
        return self.pipeline.param_arrays()

    def set_param_arrays(self, arrays: list[jax.Array]) -> None:
        self.pipeline.set_param_arrays(arrays)

    def load_params(self, model) -> None:
        self.pipeline.load_params(model)

    def free_kv_cache(self) -> None:
        self.pipeline.free_kv_cache()

    def profile_largest_bucket(self) -> None:
        """Runs the largest bucket once so each device's peak memory includes a step's activations."""
        self._run_padding(self.config.token_buckets[-1])

    def largest_step_temp_bytes(self) -> int:
        """XLA's temporary memory of the largest bucket's step (compiled, not run): the most of any stage's program
        and the head's (its logits input plus the vocabulary sort of top-k/top-p, as ``ModelRunner.step_temp_bytes``
        counts its sampler), for an allocator that keeps no peak (each stage's devices run only their own programs)."""
        batch, head_args = self._padding_step(self.config.token_buckets[-1])
        stages = [
            self.pipeline.lower_stage(index, batch).compile().memory_analysis().temp_size_in_bytes
            for index in range(self.pipeline.num_stages)
        ]
        costliest = self._head_variants(batch, head_args)[-1]
        head = self.pipeline.lower_head(batch, costliest).compile().memory_analysis().temp_size_in_bytes
        logits_bytes = batch.logits_indices.shape[0] * self.pipeline.config.vocab_size * 4
        return max(*stages, head + logits_bytes)

    def _head_variants(self, batch: StepBatch, head_args) -> list:
        """The head arguments compiled at warm-up for ``batch`` (``head_args`` first): the builder's
        ``warm_up_variants`` where it has them."""
        variants = getattr(self.build_head_args, "warm_up_variants", None)
        return [head_args] if variants is None else variants(batch.logits_indices.shape[0])

    def _padding_step(self, bucket: int, max_query_len: int | None = None):
        """A padding-only batch of ``bucket`` tokens (and that query bound) and its head arguments."""
        rows = self.config.request_rows_for(bucket)
        batch = padding_step_batch(bucket, rows, self.config.max_blocks_per_request, max_query_len)
        return batch, self.build_head_args([], rows, 0, 0)

    def _run_padding(self, bucket: int, max_query_len: int | None = None) -> tuple[StepBatch, object]:
        """Runs a padding-only step of ``bucket`` tokens (and that query bound); returns its batch and head
        arguments."""
        batch, head_args = self._padding_step(bucket, max_query_len)
        results = jax.block_until_ready(self.pipeline.run([batch], [head_args]))
        self.pipeline.release(results)
        return batch, head_args

    def _warm_up_programs(self):
        """The stage and head programs ``warm_up`` runs, lowered as it calls them (each once)."""
        head_rows = set()
        for bucket, max_query_len in self.config.step_variants():
            batch, head_args = self._padding_step(bucket, max_query_len)
            for index in range(self.pipeline.num_stages):
                yield self.pipeline.lower_stage(index, batch)
            rows = batch.logits_indices.shape[0]
            if rows not in head_rows:
                head_rows.add(rows)
                for variant in self._head_variants(batch, head_args):
                    yield self.pipeline.lower_head(batch, variant)

    def warm_up(self) -> float:
        """Compiles every stage for every token bucket (and bound: ``ResolvedConfig.step_variants``) with padding-only
        batches, and the common head programs of each bucket's rows (greedy, random, top-k/top-p:
        ``warm_up_variants``), all compiled first, side by side, when ``JAXLLM_COMPILE_THREADS`` asks
        (``jaxllm.runner.parallel_compile``); returns seconds spent."""
        start = time.perf_counter()
        compile_concurrently(self._warm_up_programs(), compile_threads())
        for bucket, max_query_len in self.config.step_variants():
            batch, head_args = self._run_padding(bucket, max_query_len)
            if max_query_len is not None:  # the unbounded step of the bucket ran the head programs of its rows
                continue
            for variant in self._head_variants(batch, head_args):
                self.pipeline.warm_up_head(batch, variant)
        last_stage = replicated(self.pipeline.stages[-1].mesh)
        warm_up_merges(self.num_microbatches, self.pipeline.pending_rows, last_stage)
        elapsed = time.perf_counter() - start
        logger.info(
            "compiled %d step variants x %d stages and %d head programs in %.1f s",
            len(self.config.step_variants()),
            self.pipeline.num_stages,
            self.pipeline.num_head_traces,
            elapsed,
        )
        return elapsed


def _microbatch_requests(scheduled: list, microbatch: Microbatch) -> list:
    """The scheduled requests of ``microbatch``, in its rows' order."""
    return scheduled[microbatch.first_request :][: microbatch.batch.num_requests]


def _prompt_targets(microbatches: list[Microbatch], scheduled: list) -> tuple[list | None, int | None]:
    """Each microbatch's prompt-logprob targets and the step's top-k width; (None, None) when no request asks."""
    width = prompt_logprobs.prompt_logprob_width(scheduled)
    if width is None:
        return None, None
    targets = prompt_logprobs.prompt_logprob_targets
    return [targets(_microbatch_requests(scheduled, mb), mb.batch.token_bucket) for mb in microbatches], width


def _prompt_logprobs(host_result: dict, requests: list) -> dict[str, PromptLogprobs]:
    """Each asking request's ``PromptLogprobs`` from one call's host results (empty when it computed none)."""
    arrays = prompt_logprobs.from_results(host_result)
    return {} if arrays is None else prompt_logprobs.split_prompt_logprobs(requests, arrays)


def _step_rows(results: dict) -> dict:
    """The head's per-request-row results, without the per-token prompt logprobs."""
    return {key: value for key, value in results.items() if not key.startswith(prompt_logprobs.RESULT_PREFIX)}


def _gather_rows(results: list[dict], microbatches: list[Microbatch]) -> dict[str, np.ndarray]:
    """Per-microbatch head results -> one array per key with a row per scheduled request, in step order. Per-row
    widths (the top-logprob columns: each microbatch's widest request) are padded to the widest microbatch's; a
    request reads only its own leading columns."""
    gathered = {}
    for key in results[0].keys():
        parts = [np.asarray(r[key])[: mb.batch.num_requests] for r, mb in zip(results, microbatches, strict=True)]
        if parts[0].ndim == 2:
            width = max(part.shape[1] for part in parts)
            parts = [np.pad(part, ((0, 0), (0, width - part.shape[1]))) for part in parts]
        gathered[key] = np.concatenate(parts)
    return gathered


def _to_output(scheduled: list, results: dict[str, np.ndarray], prompt: dict | None = None) -> ModelRunnerOutput:
    token_ids = results["token_ids"].tolist()
    sampled, logprobs = {}, {}
    for row, s in enumerate(scheduled):
        if not s.samples_token:
            continue
        sampled[s.request_id] = token_ids[row]
        num_top = s.request.sampling_params.logprobs
        if num_top is not None and "top_logprobs" in results:
            logprobs[s.request_id] = SampledLogprobs(
                sampled_logprob=float(results["sampled_logprob"][row]),
                sampled_rank=int(results["sampled_rank"][row]),
                top_token_ids=results["top_token_ids"][row, :num_top].tolist(),
                top_logprobs=results["top_logprobs"][row, :num_top].tolist(),
            )
    return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs=prompt or {})
