"""LLMEngine: vLLM's step-wise engine API (``add_request``, ``step``, ``abort_request``, ...).

Owns assembling the parts (model, model runner, scheduler, output processor) and the step loop
schedule -> execute -> update. Bad input is rejected in ``add_request`` before any state changes, so a rejected request
never affects the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import jax

from jaxllm.config import EngineConfig
from jaxllm.core.block_manager import BlockManager
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.engine import setup
from jaxllm.engine.prompts import tokenize_prompt
from jaxllm.loading.model_loader import resolve_dtype
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.output_processor import OutputProcessor, make_child_requests
from jaxllm.outputs import RequestOutput
from jaxllm.request import RequestStatus
from jaxllm.runner.model_runner import ModelRunner
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        setup.enable_compilation_cache()
        source = resolve_model_source(config.model, config.load_format, config.tokenizer)
        get_model_class((source.hf_config.get("architectures") or ["<missing>"])[0])  # unsupported: fail first
        self.model_config = ModelConfig.from_hf_config(source.hf_config)
        self.tokenizer = None if config.skip_tokenizer_init else source.load_tokenizer()
        self.eos_token_ids = _eos_token_ids(self.model_config, source.generation_config, self.tokenizer)
        start = time.perf_counter()
        model = setup.load_model(config, source, self.model_config)
        logger.info(
            "loaded %s (%s) in %.1f s", source.name, self.model_config.architecture, time.perf_counter() - start
        )
        self.kv_dtype = resolve_dtype(config.dtype, self.model_config.checkpoint_dtype)
        self.runner, self.resolved = self._build_runner(model)
        self.compile_seconds = self.runner.warm_up()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=self.resolved.max_num_seqs,
                max_num_batched_tokens=self.resolved.max_num_batched_tokens,
                max_model_len=self.resolved.max_model_len,
                block_size=self.resolved.block_size,
                num_blocks=self.resolved.num_blocks,
                enable_chunked_prefill=config.enable_chunked_prefill,
                enable_prefix_caching=config.enable_prefix_caching,
            ),
            BlockManager(self.resolved.num_blocks, self.resolved.block_size, config.enable_prefix_caching),
        )
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, **kwargs) -> LLMEngine:
        return cls(EngineConfig(**kwargs))

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
            return ModelRunner(model, resolved, self.kv_dtype, seed=config.seed), resolved
        probe = setup.resolve_limits(config, model_config, num_blocks=2)
        runner = ModelRunner(model, probe, self.kv_dtype, seed=config.seed)
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
        stream: bool = True,
    ) -> None:
        """Validates and queues a request (n > 1 becomes n sibling requests sharing the prompt's cached blocks).

        With ``stream`` (vLLM's engine default) ``step()`` returns the request's cumulative output whenever it gains
        tokens; without it, only once it finishes (what ``LLM.generate`` uses: no per-step detokenization).
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {request_id!r}")
        tokenized = tokenize_prompt(prompt, self.tokenizer, self.model_config.vocab_size)
        children = make_child_requests(request_id, tokenized.token_ids, params, self.eos_token_ids, arrival_time)
        for child in children:
            self.scheduler.validate_request(child)  # raises before anything is queued
        self.output_processor.add_request(request_id, tokenized.text, children, stream=stream)
        for child in children:
            self.scheduler.add_request(child)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        child_ids = self.output_processor.abort_requests(ids)
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        runner_output = self.runner.execute(scheduler_output)
        core_outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.stopped_request_ids:
            self.scheduler.finish_requests(processed.stopped_request_ids, RequestStatus.FINISHED_STOPPED)
        return processed.request_outputs


def _eos_token_ids(model_config: ModelConfig, generation_config: dict, tokenizer) -> frozenset[int]:
    ids = set(model_config.eos_token_ids)
    eos = generation_config.get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
