"""LLMEngine: vLLM's step-wise engine API (``add_request``, ``step``, ``abort_request``, ...).

Owns assembling the parts (model, model runner(s), engine core(s), output processor) and the step loop
schedule -> execute -> update (in ``EngineCore``; one per data-parallel replica behind ``sharding.DataParallelEngine``),
then detokenize. With ``tensor_parallel_size`` / ``pipeline_parallel_size`` / ``data_parallel_size`` the runners come
from ``sharding.engine_runners`` on a device mesh. Bad input is rejected in ``add_request`` before any state changes,
so a rejected request never affects the others.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable

import jax

from jaxllm import process_env
from jaxllm.bad_words import bad_words_token_ids
from jaxllm.config import EngineConfig
from jaxllm.engine import setup
from jaxllm.engine.default_sampling import default_sampling_fields
from jaxllm.engine.engine_core import EngineCore
from jaxllm.engine.prompts import tokenize_prompt
from jaxllm.engine.sleep_mode import SleepMode, check_sleep_level
from jaxllm.engine.vllm_arguments import check_request_options, engine_arguments
from jaxllm.loading.model_loader import resolve_dtype
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.metrics import reader
from jaxllm.metrics.prometheus import EngineMetrics
from jaxllm.metrics.stats import IterationStats
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.output_processor import OutputProcessor, make_child_requests
from jaxllm.outputs import RequestOutput
from jaxllm.request import RequestStatus
from jaxllm.runner.kv_cache import resolve_kv_cache_dtype
from jaxllm.runner.launch_thread import launch_thread_enabled
from jaxllm.runner.model_runner import ModelRunner
from jaxllm.runner.xla_options import StepCompilerOptions, check_compiler_options
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_output import StructuredOutputCompiler
from jaxllm.weak_methods import weakly_bound
from sharding.data_parallel import DataParallelEngine
from sharding.engine_runners import build_mesh_runners, engine_mesh, load_replica_model
from sharding.mesh import replica_meshes

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        setup.free_unreachable_engines()  # a dropped engine's device memory, before this one sizes its cache
        process_env.fit_pool_to_mesh(config.tensor_parallel_size * config.pipeline_parallel_size)  # before JAX starts
        setup.enable_compilation_cache()
        source = resolve_model_source(config.model, config.load_format, config.tokenizer)
        self.config = config = setup.with_checkpoint_quantization(config, source.hf_config)
        get_model_class((source.hf_config.get("architectures") or ["<missing>"])[0])  # unsupported: fail first
        self.model_config = ModelConfig.from_hf_config(source.hf_config).with_expert_parallel(
            config.enable_expert_parallel
        )
        if config.enable_expert_parallel and self.model_config.moe is None:
            logger.warning(
                "enable_expert_parallel=True has no effect: %s has no experts", self.model_config.architecture
            )
        setup.resolve_limits(config, self.model_config, num_blocks=2)  # bad max_model_len / budget: fail before loading
        self.tokenizer = None if config.skip_tokenizer_init else source.load_tokenizer()
        # checked token sequences once per word list (a batch usually shares one SamplingParams); errors are not kept
        self._bad_word_sequences = functools.lru_cache(maxsize=64)(weakly_bound(self._tokenize_bad_words))
        self.eos_token_ids = _eos_token_ids(self.model_config, source.generation_config, self.tokenizer)
        self.default_sampling_fields = default_sampling_fields(config, source.generation_config)
        if self.default_sampling_fields:
            logger.info("default sampling parameters from the generation config: %s", self.default_sampling_fields)
        model_dtype = resolve_dtype(config.dtype, self.model_config.checkpoint_dtype)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, model_dtype)
        self.compiler_options = StepCompilerOptions.for_engine(config, jax.default_backend())
        check_compiler_options(config.xla_compiler_options)
        logger.info("XLA options of the step programs: %s", self.compiler_options.describe())
        start = time.perf_counter()
        runners, self.resolved = self._build_runners(source)
        logger.info(
            "loaded %s (%s) in %.1f s", source.name, self.model_config.architecture, time.perf_counter() - start
        )
        self.compile_seconds = setup.warm_up(runners)
        self._sleep_mode = None  # vLLM's sleep / wake_up, with enable_sleep_mode=True (jaxllm.engine.sleep_mode)
        if config.enable_sleep_mode:
            reload_models = functools.partial(_load_models, config, source, self.model_config)
            self._sleep_mode = SleepMode(runners, reload_models)
        cores = [
            EngineCore(
                runner,
                self.resolved,
                enable_chunked_prefill=config.enable_chunked_prefill,
                enable_prefix_caching=config.enable_prefix_caching,
                async_scheduling=config.async_scheduling,
            )
            for runner in runners
        ]
        # One queue: a data-parallel engine hands each request to its least-loaded replica.
        self.core = cores[0] if len(cores) == 1 else DataParallelEngine(cores)
        self.runner, self.scheduler = cores[0].runner, cores[0].scheduler  # replica 0's (the only one unless D > 1)
        self._schedulers = [core.scheduler for core in cores]  # every replica's
        self.step_times = cores[0].step_times  # replica 0's: host work vs device wait per step
        self.output_processor = OutputProcessor(self.tokenizer)
        self.metrics = (
            None if config.disable_log_stats else EngineMetrics(config.model_name, self.resolved.max_model_len)
        )

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        """An engine from ``LLM``'s keyword arguments (vLLM's arguments without a counterpart are checked, then
        dropped: ``jaxllm.engine.vllm_arguments``)."""
        return cls(EngineConfig(**engine_arguments(kwargs)))

    def _build_runners(self, source) -> tuple[list, object]:
        """One runner per data-parallel replica: a ``ModelRunner`` on one device, ``PipelineRunner``s on a mesh."""
        mesh = engine_mesh(self.config)  # ValueError when T x P x D does not divide the devices
        if mesh is None:
            runner, resolved = self._build_runner(setup.load_model(self.config, source, self.model_config))
            return [runner], resolved
        return build_mesh_runners(self.config, source, self.model_config, self.kv_dtype, mesh)

    def _runner_options(self) -> dict:
        """The one-device runner's keyword arguments from the engine's config."""
        config = self.config
        return {
            "seed": config.seed,
            "compiler_options": self.compiler_options,
            "logprobs_mode": config.logprobs_mode,
            "launch_thread": launch_thread_enabled(jax.default_backend()),
        }

    def _build_runner(self, model) -> tuple[ModelRunner, object]:
        """Sizes the KV cache: on an accelerator from memory free after weights, less the largest step's temporaries."""
        config, model_config = self.config, self.model_config
        measure = (
            jax.default_backend() != "cpu"
            and config.num_gpu_blocks_override is None
            and config.kv_cache_memory_bytes is None
        )
        if not measure:
            resolved = setup.resolve_limits(
                config, model_config, setup.num_kv_blocks(config, model_config, self.kv_dtype)
            )
            setup.log_kv_cache(resolved, model_config, self.kv_dtype)
            runner = ModelRunner(model, resolved, self.kv_dtype, **self._runner_options())
            return runner, resolved
        probe = setup.resolve_limits(config, model_config, num_blocks=2)
        runner = ModelRunner(model, probe, self.kv_dtype, **self._runner_options())
        small = probe.max_blocks_per_request + 1
        temp_small, temp_large = runner.step_temp_bytes(small), runner.step_temp_bytes(2 * small)
        temp_per_block = max(0, temp_large - temp_small) / small
        step_temp_fixed = max(0, temp_small - temp_per_block * small)
        num_blocks = setup.num_kv_blocks(config, model_config, self.kv_dtype, step_temp_fixed, temp_per_block)
        resolved = setup.with_num_blocks(probe, num_blocks)
        runner.resize_kv_cache(resolved)
        setup.log_kv_cache(resolved, model_config, self.kv_dtype)
        return runner, resolved

    def get_tokenizer(self):
        return self.tokenizer

    def add_request(
        self,
        request_id: str,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        *,
        lora_request=None,
        priority: int = 0,
    ) -> None:
        """Validates and queues a request (n > 1 becomes n sibling requests sharing the prompt's cached blocks).

        ``params.output_kind`` says what ``step()`` returns for it, as in vLLM: CUMULATIVE (the default) its whole
        output whenever it gains tokens, DELTA only what is new, FINAL_ONLY one output when it finishes (what
        ``LLM.generate`` uses: no per-step detokenization unless stop strings need it). Without
        ``params``, the generation config's defaults (``default_sampling_fields``). ``lora_request`` and ``priority``
        are vLLM's and must keep their defaults (no LoRA adapters; first come, first served).
        """
        check_request_options(lora_request, priority)
        self._check_awake()
        params = SamplingParams(**self.default_sampling_fields) if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r}")
        params = self._with_whole_vocabulary_logprobs(params)
        self._check_against_model(params)
        vocab_size, keep_last = self.model_config.vocab_size, params.truncate_prompt_tokens
        if keep_last == -1:  # vLLM's "as many as the model takes", less one: a prompt of max_model_len has no room
            keep_last = self.resolved.max_model_len - 1
        tokenized = tokenize_prompt(prompt, self.tokenizer, vocab_size, keep_last)
        bad_words = self._bad_words_token_ids(params)
        structured_output = self._structured_output_matchers(params)
        children = make_child_requests(
            request_id, tokenized.token_ids, params, self.eos_token_ids, arrival_time, bad_words, structured_output
        )
        for child in children:
            self.scheduler.validate_request(child)  # raises before anything is queued (replicas share limits)
        self.output_processor.add_request(request_id, tokenized.text, children)
        replica = None  # with data parallelism, every sibling on the first one's replica (shared prompt blocks)
        for child in children:
            if isinstance(self.core, DataParallelEngine):
                replica = self.core.add_request(child.request_id, child, replica=replica)
            else:
                self.core.add_request(child.request_id, child)

    def _with_whole_vocabulary_logprobs(self, params: SamplingParams) -> SamplingParams:
        """``logprobs`` / ``prompt_logprobs`` of -1 (vLLM's "every token") as the vocabulary size; a copy, so the
        caller's params stay as given."""
        vocab_size, cap = self.model_config.vocab_size, self.config.max_logprobs
        whole = {name: vocab_size for name in ("logprobs", "prompt_logprobs") if getattr(params, name) == -1}
        for name in whole:
            if cap != -1 and vocab_size > cap:
                raise ValueError(
                    f"SamplingParams.{name}=-1 asks for all {vocab_size} tokens' logprobs, more than the engine's "
                    f"max_logprobs={cap} (LLM(max_logprobs=-1) lifts the cap)"
                )
        return params.clone(**whole) if whole else params

    def _check_against_model(self, params: SamplingParams) -> None:
        """ValueError for token ids outside the vocabulary (``allowed_token_ids``, ``logit_bias``) and for more top
        logprobs than ``max_logprobs`` (vLLM's cap: the top-k arrays of a step grow with it, a prompt's by prompt
        length)."""
        vocab_size = self.model_config.vocab_size
        for name, ids in (("allowed_token_ids", params.allowed_token_ids), ("logit_bias", params.logit_bias)):
            outside = [t for t in ids or () if t >= vocab_size]
            if outside:
                raise ValueError(
                    f"SamplingParams.{name} names token id {outside[0]}, outside the vocabulary of {vocab_size}"
                )
        cap = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and cap != -1 and value > cap:
                raise ValueError(
                    f"SamplingParams.{name}={value} is more than the engine's max_logprobs={cap} "
                    "(LLM(max_logprobs=...) raises the cap; -1 removes it)"
                )

    def _bad_words_token_ids(self, params: SamplingParams) -> list[tuple[int, ...]]:
        """``params.bad_words`` as token sequences; ValueError without a tokenizer or for ids outside the vocabulary."""
        if not params.bad_words:
            return []
        self._require_tokenizer("bad_words", params.bad_words)
        return self._bad_word_sequences(tuple(params.bad_words))

    def _structured_output_matchers(self, params: SamplingParams):
        """None, or a factory of fresh grammar matchers for ``params.structured_outputs`` (one per sample; the grammar
        compiles here, once per distinct grammar); ValueError without a tokenizer or for a grammar that does not
        compile."""
        if params.structured_outputs is None:
            return None
        self._require_tokenizer("structured_outputs", params.structured_outputs)
        return self._structured_output_compiler.matcher_factory(params.structured_outputs)

    def _require_tokenizer(self, field: str, value) -> None:
        if self.tokenizer is None:
            raise ValueError(f"SamplingParams.{field}={value!r} needs a tokenizer (the engine has skip_tokenizer_init)")

    @functools.cached_property
    def _structured_output_compiler(self) -> StructuredOutputCompiler:
        """Built with the first grammar (llguidance's tokenizer takes a while to build)."""
        return StructuredOutputCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)

    def _tokenize_bad_words(self, words: tuple[str, ...]) -> list[tuple[int, ...]]:
        sequences = bad_words_token_ids(words, self.tokenizer)
        vocab_size = self.model_config.vocab_size
        outside = [t for word_ids in sequences for t in word_ids if t >= vocab_size]
        if outside:
            raise ValueError(
                f"SamplingParams.bad_words encodes to token id {outside[0]}, outside the vocabulary of {vocab_size}"
            )
        return sequences

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        child_ids = self.output_processor.abort_requests(ids)
        self.core.abort_request(child_ids)
        if self.metrics is not None:
            self.metrics.request_success["abort"].inc(len(child_ids))
            self.metrics.record_schedulers(self._schedulers)

    def get_metrics(self) -> list[reader.Metric]:
        """vLLM's: a snapshot of the engine's statistics (``jaxllm.metrics.reader``); ValueError when they are off."""
        if self.metrics is None:
            raise ValueError(
                "statistics are off (disable_log_stats=True, the default): build the engine with "
                "disable_log_stats=False to keep them"
            )
        return reader.snapshot(self.metrics.collectors)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forgets every cached prefix (on every replica), e.g. between benchmark runs. Only while no request
        holds KV blocks; returns whether it did."""
        if self.has_unfinished_requests():
            return False
        return all([scheduler.block_manager.reset_prefix_cache() for scheduler in self._schedulers])

    def sleep(self, level: int = 1) -> None:
        """vLLM's: gives an idle engine's device memory back. Level 1 keeps the weights in host memory, level 2
        discards them (``wake_up`` loads them again); both free the KV cache and forget cached prefixes. Needs
        ``enable_sleep_mode=True`` and no unfinished request (else a ``ValueError``)."""
        sleep_mode = self._require_sleep_mode("sleep")
        level = check_sleep_level(level)
        if self.has_unfinished_requests():
            raise ValueError(
                f"sleep(level={level}) with {self.get_num_unfinished_requests()} unfinished request(s): finish or "
                "abort them first"
            )
        if not sleep_mode.is_sleeping:
            self.reset_prefix_cache()  # their KV goes with the cache
        sleep_mode.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's: takes the device memory back for ``tags`` (``"weights"``, ``"kv_cache"``; None: both)."""
        self._require_sleep_mode("wake_up").wake_up(tags)

    def is_sleeping(self) -> bool:
        return self._sleep_mode is not None and self._sleep_mode.is_sleeping

    def _require_sleep_mode(self, method: str) -> SleepMode:
        if self._sleep_mode is None:
            raise ValueError(f"{method}() needs sleep mode: build the engine with enable_sleep_mode=True")
        return self._sleep_mode

    def _check_awake(self) -> None:
        if self.is_sleeping():
            raise ValueError(
                f"the engine is asleep (level {self._sleep_mode.level}; asleep: {self._sleep_mode.asleep_tags()}): "
                "call wake_up() before adding requests"
            )

    def get_num_unfinished_requests(self) -> int:
        return self.core.get_num_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()  # schedule -> execute -> update, on every replica with work
        if not core_outputs:
            return []
        stats = None if self.metrics is None else IterationStats()
        processed = self.output_processor.process_outputs(core_outputs, stats)
        if processed.stopped_request_ids:
            self.core.finish_requests(processed.stopped_request_ids, RequestStatus.FINISHED_STOPPED)
        if stats is not None:
            self.metrics.record_step(stats, self._schedulers)
        return processed.request_outputs


def _load_models(config: EngineConfig, source, model_config: ModelConfig) -> list:
    """Each runner's model loaded again as at start, in the runners' order (a level-2 sleep's ``wake_up``)."""
    mesh = engine_mesh(config)
    if mesh is None:
        return [setup.load_model(config, source, model_config)]
    return [load_replica_model(config, source, model_config, replica) for replica in replica_meshes(mesh)]


def _eos_token_ids(model_config: ModelConfig, generation_config: dict, tokenizer) -> frozenset[int]:
    ids = set(model_config.eos_token_ids)
    eos = generation_config.get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
