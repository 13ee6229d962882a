"""ModelRunner: executes one SchedulerOutput on the device and returns the sampled tokens.

Owns the model parameters (split from the NNX module, passed as a flat list: ``jaxllm.runner.flat_state``), the KV
cache (donated into every step so XLA updates it in place), the two jitted programs of a step and their warm-up. The
forward program (model -> logits at each request's last scheduled token) is compiled per token bucket; the sampler
program per request-row count and sampling variant (greedy, random, random with top-k/top-p; penalties and logprob
widths compile on first use, a sampler-sized compile). Keeping them apart means a new sampling mix never recompiles
the model. Per step the host packs numpy arrays into two byte buffers (``jaxllm.runner.packed_transfer``: the
forward's and the sampler's inputs) and hands both, still numpy, to the two dispatches, whose C++ path copies them
to the device (a tenth of ``jax.device_put``'s host time), then one device->host copy of the sampled ids (+ logprobs
when asked).

A step is ``dispatch`` (returns at once with an ``InFlightStep``: JAX runs it asynchronously) then ``collect`` (waits
for its sampled ids). Between the two the engine may dispatch the next step, whose pending tokens are the in-flight
step's samples: they stay on the device (a fixed-size ``[R]`` vector, R the most request rows of any bucket, so one
forward program serves every previous bucket) and the forward program gathers them into its input ids. The sampler
program reads the same vector: a pending token is its request's newest output, which penalties must count
(``StepBatch.in_flight_rows``).

With a launch thread (``jaxllm.runner.launch_thread``; on by default on GPUs) ``dispatch`` packs on the caller's
thread and the worker makes the two calls (``launch_step``), whose queueing then overlaps the engine's next host
work. The KV cache's arrays live in a ``KVCacheSlot`` that each launch replaces, so reading ``kv_caches`` waits for
the launches queued.

A step with requests that ask for prompt logprobs runs the forward program's prompt-logprob variant
(``jaxllm.runner.prompt_logprobs``; compiled per token bucket and top-k width on first use, never at warm-up).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ResolvedConfig
from jaxllm.core.step_io import ModelRunnerOutput, SampledLogprobs, SchedulerOutput
from jaxllm.runner.flat_state import FlatState
from jaxllm.runner.host_block_table import HostBlockTable
from jaxllm.runner.kv_cache import allocate_kv_cache, kv_cache_shapes
from jaxllm.runner.launch_thread import LaunchedResult, resolved, start_launch_thread
from jaxllm.runner.packed_transfer import Packed, PackedLayout, unpack
from jaxllm.runner.parallel_compile import compile_concurrently, compile_threads
from jaxllm.runner.prompt_logprobs import (
    compute_prompt_logprobs,
    prompt_logprob_targets,
    prompt_logprob_width,
    split_prompt_logprobs,
)
from jaxllm.runner.step_batch import StepBatch, pack_step_batch, padding_step_batch
from jaxllm.runner.xla_options import CompilerOptions, ProgramsByOptions, sampler_options
from jaxllm.sampling import (
    SamplingMetadata,
    SamplingMetadataBuilder,
    build_sampling_metadata,
    in_flight_output_tokens,
    sample,
)
from jaxllm.weak_methods import weakly_bound

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step: what was scheduled, its sampler output (device arrays), each request's row in it."""

    scheduler_output: SchedulerOutput
    # ModelRunner: (SamplerOutput, PromptLogprobArrays or None) of device arrays, token_ids padded to the runner's
    # max rows; or the launch thread's LaunchedResult of that pair (jaxllm.runner.launch_thread)
    result: object
    rows: dict[str, int]


class KVCacheSlot:
    """The KV cache's arrays, held apart from the runner: each step's launch replaces them (donated in, returned
    updated), on the launch thread when there is one, and work on that thread must not hold the runner."""

    __slots__ = ("arrays",)

    def __init__(self, arrays):
        self.arrays = arrays


def launch_step(forward, sample, param_leaves, kv: KVCacheSlot, inputs: tuple, prev: InFlightStep | None, width):
    """Calls a step's two programs: the forward program (which takes the in-flight step's samples as its pending
    tokens, on the device) and the sampler; starts the sampled ids' copy to the host. ``inputs``: the packed forward
    and sampler inputs, and the all-padding pending tokens for a step with none in flight. Holds no runner."""
    forward_input, sampler_input, no_pending_tokens = inputs
    prev_token_ids = no_pending_tokens if prev is None else resolved(prev.result)[0].token_ids
    logits, kv.arrays, *prompt = forward(
        param_leaves, kv.arrays, forward_input.buffer, prev_token_ids, forward_input.layout, width
    )
    result = sample(logits, sampler_input.buffer, prev_token_ids, sampler_input.layout)
    result.token_ids.copy_to_host_async()
    return result, (prompt[0] if prompt else None)


def feed_pending_tokens(input_ids: jax.Array, prev_index: jax.Array, prev_token_ids: jax.Array) -> jax.Array:
    """``input_ids [T]`` with each pending token (``prev_index >= 0``) taken from the previous step's samples."""
    return jnp.where(prev_index >= 0, prev_token_ids[jnp.maximum(prev_index, 0)], input_ids)


def _model_forward(graphdef, params, kv_caches, batch: dict, prompt_logprob_width: int | None = None):
    """Logits ``[S, V]`` (float32) at each request row's sampled position, and the updated KV cache; with a
    ``prompt_logprob_width`` also the ``PromptLogprobArrays`` of ``batch["prompt_targets"]``."""
    model = nnx.merge(graphdef, params)
    hidden, kv_caches = model(batch["input_ids"], kv_caches, batch["attention"])  # [T, D]
    logits = model.compute_logits(hidden[batch["logits_indices"]])  # [S, V], only sampled rows
    if prompt_logprob_width is None:
        return logits, kv_caches
    prompt = compute_prompt_logprobs(model.compute_logits, hidden, batch["prompt_targets"], prompt_logprob_width)
    return logits, kv_caches, prompt


def sampler_variants(num_rows: int) -> list[SamplingMetadata]:
    """Padding-only metadata of the sampler programs compiled at warm-up: greedy, random, random + top-k/top-p."""
    greedy = build_sampling_metadata([], num_rows)
    return [
        greedy,
        greedy.replace(all_greedy=False),
        greedy.replace(all_greedy=False, any_top_k_top_p=True),
    ]


class ModelRunner:
    def __init__(
        self,
        model,
        config: ResolvedConfig,
        kv_dtype,
        *,
        seed: int = 0,
        kv_sharding=None,
        compiler_options: CompilerOptions = None,
        logprobs_mode: str = "raw_logprobs",
        launch_thread: bool = False,
    ):
        self.config = config
        self.logprobs_mode = logprobs_mode  # what the sampled tokens' logprobs hold (jaxllm.sampling.sampler)
        self.model_config = model.config
        self.graphdef, params = nnx.split(model)
        self.flat_params = FlatState.of(params)  # passed as a flat list: see jaxllm.runner.flat_state
        self.kv_dtype = kv_dtype
        self.kv_sharding = kv_sharding
        self._launcher = start_launch_thread(self) if launch_thread else None  # steps launched on a worker thread
        self._kv = KVCacheSlot(
            allocate_kv_cache(self.model_config, config.num_blocks, config.block_size, kv_dtype, kv_sharding)
        )
        self.base_key = jax.random.key(seed)
        self.num_steps = 0
        self.num_traces = 0  # incremented only when XLA traces a new forward program (prompt-logprob variants too)
        self.num_sampler_traces = 0  # likewise for sampler programs
        self.max_rows = config.request_rows_for(config.token_buckets[-1])
        self._no_pending_tokens = jnp.zeros((self.max_rows,), jnp.int32)
        self._sampling_builder = SamplingMetadataBuilder()
        self._host_block_table = HostBlockTable(config.max_blocks_per_request, 2 * self.max_rows)
        # compiler_options: XLA options of the forward program per token bucket (jaxllm.runner.xla_options)
        # Step inputs cross as one packed buffer per program (jaxllm.runner.packed_transfer); its layout is static, as
        # is the prompt-logprob width (None: the plain program).
        self._forward_programs = ProgramsByOptions(
            weakly_bound(self._traced_forward), compiler_options, donate_argnums=(1,), static_argnums=(4, 5)
        )
        self._jitted_sample = jax.jit(
            weakly_bound(self._traced_sample), static_argnums=(3,), compiler_options=sampler_options(compiler_options)
        )

    @property
    def kv_caches(self):
        """Each layer's (K, V) cache arrays, once the launches queued so far have run."""
        self.wait_for_launches()
        return self._kv.arrays

    @kv_caches.setter
    def kv_caches(self, arrays) -> None:
        self.wait_for_launches()
        self._kv.arrays = arrays

    def wait_for_launches(self) -> None:
        """Returns once the launch thread (if any) has run every launch queued before this call."""
        if self._launcher is not None:
            self._launcher.submit(lambda: None).result()

    @property
    def params(self):
        """The model's parameters as an NNX State (the arrays the forward program takes, as a flat list)."""
        return self.flat_params.unflatten()

    def _traced_forward(self, param_leaves, kv_caches, packed_batch, prev_token_ids, layout: PackedLayout, width):
        self.num_traces += 1
        params = self.flat_params.unflatten(param_leaves)
        batch = unpack(packed_batch, layout)
        # pending tokens: the previous step's samples, still on the device
        batch = {**batch, "input_ids": feed_pending_tokens(batch["input_ids"], batch["prev_index"], prev_token_ids)}
        return _model_forward(self.graphdef, params, kv_caches, batch, width)

    def _traced_sample(self, logits, packed, prev_token_ids, layout: PackedLayout):
        # prev_token_ids: the pending tokens the forward program took (the step in flight's samples), for penalties
        self.num_sampler_traces += 1
        sampling_metadata, step_index, in_flight_rows = unpack(packed, layout)
        in_flight = in_flight_output_tokens(prev_token_ids, in_flight_rows)
        step_key = jax.random.fold_in(self.base_key, step_index)
        out = sample(logits, sampling_metadata, step_key, in_flight, self.logprobs_mode)
        return out._replace(token_ids=jnp.pad(out.token_ids, (0, self.max_rows - out.token_ids.shape[0])))

    supports_async = True  # dispatch / collect may overlap steps (jaxllm.engine.engine_core)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(scheduler_output))

    def dispatch(self, scheduler_output: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Packs and launches a step without waiting for it (on the launch thread when the runner has one).
        ``prev``: the in-flight step whose samples are this step's pending tokens (None when no token is pending)."""
        scheduled = scheduler_output.scheduled
        batch = pack_step_batch(
            scheduler_output, self.config, None if prev is None else prev.rows, self._host_block_table
        )
        sampling_metadata = self._sampling_builder.build([s.request for s in scheduled], batch.seq_lens.shape[0])
        width = prompt_logprob_width(scheduled)
        targets = None if width is None else prompt_logprob_targets(scheduled, batch.token_bucket)
        launch = self._prepare(batch, sampling_metadata, prev, targets, width)
        result = launch() if self._launcher is None else LaunchedResult(self._launcher.submit(launch))
        rows = {s.request_id: row for row, s in enumerate(scheduled)}
        return InFlightStep(scheduler_output, result, rows)

    def collect(self, step: InFlightStep) -> ModelRunnerOutput:
        """Waits for a dispatched step and returns its sampled tokens."""
        result, prompt_logprob_arrays = resolved(step.result)
        output = self._to_output(step.scheduler_output, result)
        if prompt_logprob_arrays is not None:
            host = jax.device_get(prompt_logprob_arrays)
            prompt_logprobs = split_prompt_logprobs(step.scheduler_output.scheduled, host)
            output = dataclasses.replace(output, prompt_logprobs=prompt_logprobs)
        return output

    @staticmethod
    def _forward_arrays(batch: StepBatch, prompt_targets: np.ndarray | None = None) -> dict:
        """The forward program's step inputs (``prompt_targets``: the prompt-logprob variant's targets)."""
        arrays = {
            "input_ids": batch.input_ids,
            "attention": batch.attention_metadata(),
            "logits_indices": batch.logits_indices,
            "prev_index": batch.pending_index,
        }
        if prompt_targets is not None:
            arrays["prompt_targets"] = prompt_targets
        return arrays

    @staticmethod
    def _sampler_arrays(sampling_metadata: SamplingMetadata, step_index: int, in_flight_rows=None) -> tuple:
        """The sampler program's step inputs; ``in_flight_rows`` (``StepBatch.in_flight_rows``) defaults to nothing in
        flight."""
        if in_flight_rows is None:
            in_flight_rows = np.full(sampling_metadata.num_rows, -1, np.int32)
        return sampling_metadata, np.int32(step_index), in_flight_rows

    def _batch_arrays(self, batch: StepBatch) -> tuple:
        """The forward program's inputs on the device: one packed buffer, and its layout."""
        packed = Packed.of(self._forward_arrays(batch))
        return packed.buffer, packed.layout

    def _sampler_args(self, sampling_metadata: SamplingMetadata, step_index: int) -> tuple:
        """The sampler program's arguments after the logits, with nothing in flight."""
        packed = Packed.of(self._sampler_arrays(sampling_metadata, step_index))
        return packed.buffer, self._no_pending_tokens, packed.layout

    def _prepare(
        self,
        batch: StepBatch,
        sampling_metadata: SamplingMetadata,
        prev: InFlightStep | None,
        prompt_targets: np.ndarray | None = None,
        prompt_logprob_width: int | None = None,
    ):
        """The step's launch (``launch_step`` with its arguments bound): it returns the sampler output and the
        ``PromptLogprobArrays`` (None without ``prompt_targets``). Both programs' inputs go in as host bytes: a jitted
        call copies a numpy argument to its device in C++, ~10x cheaper than ``jax.device_put``'s Python path (13
        against 137 us for two buffers on a 2-core CPU host; one device only: a mesh's runner places its buffers with
        ``packed_transfer.place``)."""
        forward_input = Packed.of(self._forward_arrays(batch, prompt_targets))
        sampler_input = Packed.of(self._sampler_arrays(sampling_metadata, self.num_steps, batch.in_flight_rows))
        self.num_steps += 1
        return functools.partial(
            launch_step,
            self._forward_programs.for_tokens(batch.token_bucket),
            self._jitted_sample,
            self.flat_params.leaves,
            self._kv,
            (forward_input, sampler_input, self._no_pending_tokens),
            prev,
            prompt_logprob_width,
        )

    def _to_output(self, scheduler_output: SchedulerOutput, result) -> ModelRunnerOutput:
        wants_logprobs = scheduler_output.wants_logprobs
        host = jax.device_get(result if wants_logprobs else result.token_ids)
        token_ids = (host.token_ids if wants_logprobs else host).tolist()
        scheduled = scheduler_output.scheduled
        if not wants_logprobs:  # the usual step: one comprehension (token_ids is padded past the scheduled rows)
            rows = zip(scheduled, token_ids, strict=False)
            return ModelRunnerOutput(sampled_token_ids={s.request.request_id: t for s, t in rows if s.samples_token})
        sampled, logprobs = {}, {}
        for row, s in enumerate(scheduled):
            if not s.samples_token:
                continue
            sampled[s.request_id] = token_ids[row]
            num_top = s.request.sampling_params.logprobs
            if num_top is not None:
                logprobs[s.request_id] = SampledLogprobs(
                    sampled_logprob=float(host.sampled_logprob[row]),
                    sampled_rank=int(host.sampled_rank[row]),
                    top_token_ids=host.top_token_ids[row, :num_top].tolist(),
                    top_logprobs=host.top_logprobs[row, :num_top].tolist(),
                )
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def lower_sampler(self, rows: int):
        """The sampler program for ``rows`` rows of logits with every sampling feature on, lowered."""
        logits = jax.ShapeDtypeStruct((rows, self.model_config.vocab_size), jnp.float32)
        return self._jitted_sample.lower(logits, *self._sampler_args(sampler_variants(rows)[-1], 0))

    def step_temp_bytes(self, num_blocks: int) -> int:
        """XLA's temporary memory for the largest bucket's step with a KV cache of ``num_blocks`` (compiled, not run):
        the larger of the forward program's temporaries and the sampler's (its logits input plus the vocabulary sort
        of top-k/top-p), since the two run one after the other.

        Compiling at two cache sizes shows whether any temporary scales with the cache (a copy of one layer's cache,
        say), which a run with a tiny cache would hide.
        """
        rows = self.config.request_rows_for(self.config.token_buckets[-1])
        forward = self.lower_forward(num_blocks=num_blocks).compile()
        sampler = self.lower_sampler(rows).compile()
        sampler_bytes = sampler.memory_analysis().temp_size_in_bytes + rows * self.model_config.vocab_size * 4
        return int(max(forward.memory_analysis().temp_size_in_bytes, sampler_bytes))

    def lower_forward(self, bucket: int | None = None, num_blocks: int | None = None):
        """The forward program of token bucket ``bucket`` (default: the largest), lowered (``.compile()`` it to read
        its memory or its HLO) for a KV cache of ``num_blocks`` (default: the runner's)."""
        bucket = self.config.token_buckets[-1] if bucket is None else bucket
        batch = padding_step_batch(bucket, self.config.request_rows_for(bucket), self.config.max_blocks_per_request)
        num_blocks = self.config.num_blocks if num_blocks is None else num_blocks
        shapes = kv_cache_shapes(self.model_config, num_blocks, self.config.block_size, self.kv_dtype, self.kv_sharding)
        kv = [(jax.ShapeDtypeStruct(shape, self.kv_dtype),) * 2 for shape in shapes]
        forward = self._forward_programs.for_tokens(bucket)
        packed, layout = self._batch_arrays(batch)
        return forward.lower(self.flat_params.leaves, kv, packed, self._no_pending_tokens, layout, None)

    # Sleep mode (jaxllm.engine.sleep_mode): the parameters' arrays out and back, the KV cache freed and made again.
    def param_arrays(self) -> list[jax.Array]:
        return list(self.flat_params.leaves)

    def set_param_arrays(self, arrays: list[jax.Array]) -> None:
        self.flat_params = dataclasses.replace(self.flat_params, leaves=list(arrays))

    def load_params(self, model) -> None:
        """The parameters of ``model`` (built as this runner's was: same class, config and placement)."""
        params = FlatState.of(nnx.split(model)[1])
        if params.treedef != self.flat_params.treedef:
            raise ValueError("the model's parameters are not laid out as the runner's")
        self.flat_params = params

    def free_kv_cache(self) -> None:
        for array in jax.tree.leaves(self.kv_caches):
            array.delete()
        self.kv_caches = None

    def resize_kv_cache(self, config: ResolvedConfig) -> None:
        self.config = config
        self._host_block_table = HostBlockTable(config.max_blocks_per_request, 2 * self.max_rows)
        self.kv_caches = None  # free the old cache before allocating the new one
        self.kv_caches = allocate_kv_cache(
            self.model_config, config.num_blocks, config.block_size, self.kv_dtype, self.kv_sharding
        )

    def _padding_forward_args(self, bucket: int, max_query_len: int | None = None) -> tuple:
        """The forward program's arguments for a padding-only step of ``bucket`` tokens (and that query bound)."""
        rows = self.config.request_rows_for(bucket)
        batch = padding_step_batch(bucket, rows, self.config.max_blocks_per_request, max_query_len)
        packed, layout = self._batch_arrays(batch)
        return self.flat_params.leaves, self.kv_caches, packed, self._no_pending_tokens, layout, None

    def _run_padding_step(self, bucket: int, max_query_len: int | None = None) -> None:
        """Runs the bucket's forward program (of that bound) on padding; the unbounded one's step also runs the
        sampler programs of its rows (a bounded program's logits have the same shape: the same samplers)."""
        forward = self._forward_programs.for_tokens(bucket)
        logits, self.kv_caches = forward(*self._padding_forward_args(bucket, max_query_len))
        if max_query_len is not None:
            return
        for metadata in sampler_variants(self.config.request_rows_for(bucket)):
            jax.block_until_ready(self._jitted_sample(logits, *self._sampler_args(metadata, 0)))

    def _warm_up_programs(self):
        """The programs the padding steps of ``warm_up`` run, lowered as those steps call them (each once)."""
        sampler_rows = set()
        for bucket, max_query_len in self.config.step_variants():
            args = self._padding_forward_args(bucket, max_query_len)
            forward = self._forward_programs.for_tokens(bucket).lower(*args)
            yield forward
            rows = self.config.request_rows_for(bucket)
            if rows not in sampler_rows:
                sampler_rows.add(rows)
                logits = forward.out_info[0]
                for metadata in sampler_variants(rows):
                    yield self._jitted_sample.lower(logits, *self._sampler_args(metadata, 0))

    def warm_up(self) -> float:
        """Compiles the forward program of every token bucket (and bound: ``ResolvedConfig.step_variants``) and the
        common sampler programs of each row count by running each one's padding-only step (all compiled first, side by
        side, when ``JAXLLM_COMPILE_THREADS`` asks: ``jaxllm.runner.parallel_compile``); returns seconds spent."""
        start = time.perf_counter()
        compile_concurrently(self._warm_up_programs(), compile_threads())
        for bucket, max_query_len in self.config.step_variants():
            self._run_padding_step(bucket, max_query_len)
        elapsed = time.perf_counter() - start
        logger.info(
            "compiled %d forward and %d sampler programs in %.1f s",
            self.num_traces,
            self.num_sampler_traces,
            elapsed,
        )
        return elapsed
