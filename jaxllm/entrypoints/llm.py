"""LLM: vLLM's offline API (``generate``, ``chat``, ``beam_search``, ``get_tokenizer``) over an LLMEngine.

Owns turning a batch of prompts into requests, driving the engine to completion with a tqdm progress bar, and
returning outputs in input order. A bad prompt or parameter raises before anything runs, and any request of the
batch already queued is aborted, so the engine stays clean for the next call. vLLM's pooling methods (``encode``,
``embed``, ``classify``, ``score``, ``reward``) raise ValueError: no pooling model runs here.
"""

from __future__ import annotations

import itertools
import pathlib
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from jaxllm.argument_checks import check_positive_int
from jaxllm.beam_search import BeamSearchOutput, beam_search
from jaxllm.config import EngineConfig
from jaxllm.engine.chat import chat_prompts
from jaxllm.engine.gc_freeze import objects_before_frozen
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.profiler import EngineProfiler
from jaxllm.engine.prompts import as_prompt_list
from jaxllm.engine.vllm_arguments import check_request_options, engine_arguments
from jaxllm.metrics.reader import Metric
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams, expand_sampling_params


def _no_pooling(method: str) -> ValueError:
    return ValueError(
        f"LLM.{method}() needs a pooling model (vLLM's runner='pooling'); jaxllm runs generative models only: "
        "use generate(), chat() or beam_search(), or generate(..., SamplingParams(prompt_logprobs=k)) for token scores"
    )


class LLM:
    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = EngineConfig.block_size,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: int | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        load_format: str = "auto",
        skip_tokenizer_init: bool = False,
        **kwargs,
    ) -> None:
        config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            num_gpu_blocks_override=num_gpu_blocks_override,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
            load_format=load_format,
            skip_tokenizer_init=skip_tokenizer_init,
            **engine_arguments(kwargs),
        )
        self.llm_engine = LLMEngine(config)
        self._request_counter = itertools.count()
        self._profiler = EngineProfiler()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def reset_prefix_cache(self, device=None) -> bool:
        """vLLM's: forgets every cached prefix, so the next prompts are computed in full (e.g. between benchmark
        runs); False while requests are in flight. ``device`` (vLLM's cache tier) must stay None."""
        if device is not None:
            raise ValueError(f"device={device!r}: jaxllm has one prefix cache, on the accelerator; leave it None")
        return self.llm_engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM's: frees the engine's device memory while it is idle (``LLMEngine.sleep``; needs
        ``enable_sleep_mode=True``): level 1 keeps the weights in host memory, level 2 discards them."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's: takes the memory back (``"weights"``, ``"kv_cache"``, or both when None); then ``generate`` runs."""
        self.llm_engine.wake_up(tags)

    def start_profile(self, profile_prefix: str | None = None) -> None:
        """vLLM's: records a JAX profiler trace of what runs until ``stop_profile()``, under ``$JAXLLM_PROFILER_DIR``
        (or vLLM's ``$VLLM_TORCH_PROFILER_DIR``), in its subdirectory ``profile_prefix`` when given
        (``jaxllm.engine.profiler``)."""
        self._profiler.start(profile_prefix)

    def stop_profile(self) -> pathlib.Path:
        """vLLM's: stops the trace ``start_profile()`` began and writes it; returns its directory."""
        return self._profiler.stop()

    def get_metrics(self) -> list[Metric]:
        """vLLM's: the engine's statistics now (counters, gauges, histograms; ``jaxllm.metrics.reader``), kept when
        the engine is built with ``disable_log_stats=False``; ValueError otherwise."""
        return self.llm_engine.get_metrics()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what ``generate`` and ``chat`` sample with when given no ``SamplingParams``: the model's
        recommended fields from its generation config (``jaxllm.engine.default_sampling``) over the defaults."""
        return SamplingParams(**self.llm_engine.default_sampling_fields)

    # vLLM's pooling API: a script written for a pooling model gets vLLM's kind of error, not an AttributeError
    def encode(self, *args, **kwargs):
        raise _no_pooling("encode")

    def embed(self, *args, **kwargs):
        raise _no_pooling("embed")

    def classify(self, *args, **kwargs):
        raise _no_pooling("classify")

    def score(self, *args, **kwargs):
        raise _no_pooling("score")

    def reward(self, *args, **kwargs):
        raise _no_pooling("reward")

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable = True,
        *,
        lora_request=None,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's ``generate``: without ``sampling_params``, ``get_default_sampling_params()``; ``lora_request``
        and ``priority`` (one per prompt) exist for vLLM scripts and pass only at their defaults (None, zeros)."""
        check_request_options(lora_request)
        prompt_list = as_prompt_list(prompts)
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"priority has {len(priority)} values for {len(prompt_list)} prompts; give one per prompt")
        for request_priority in priority or ():
            check_request_options(priority=request_priority)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = expand_sampling_params(sampling_params, len(prompt_list))
        request_ids = self._add_requests(prompt_list, params)
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | Callable = True,
        lora_request=None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations, through the tokenizer's
        chat template (or ``chat_template``), as vLLM's ``chat`` (``jaxllm.engine.chat``): ``continue_final_message``
        extends the last message instead of opening a new one, ``tools`` and ``chat_template_kwargs`` (e.g. Qwen3's
        ``{"enable_thinking": False}``) go to the template."""
        check_request_options(lora_request)
        prompts = chat_prompts(
            self.get_tokenizer(),
            messages,
            chat_template=chat_template,
            content_format=chat_template_content_format,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
        )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self,
        prompts,
        params: BeamSearchParams,
        lora_request=None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: the ``params.beam_width`` best continuations of each prompt (``jaxllm.beam_search``);
        ``concurrency_limit``: search at most that many prompts at once (vLLM's), in order."""
        check_request_options(lora_request)
        if concurrency_limit is None:
            return beam_search(self, prompts, params, use_tqdm=use_tqdm)
        check_positive_int("concurrency_limit", concurrency_limit, allow_none=True)
        prompt_list = as_prompt_list(prompts)
        outputs: list[BeamSearchOutput] = []
        for start in range(0, len(prompt_list), concurrency_limit):
            outputs += beam_search(self, prompt_list[start : start + concurrency_limit], params, use_tqdm=use_tqdm)
        return outputs

    def _add_requests(self, prompts: list, params: list[SamplingParams]) -> list[str]:
        """Queues every prompt, returned once finished (``output_kind`` FINAL_ONLY, as vLLM's ``generate`` sets it;
        the user's params are copied, once per distinct object, not changed)."""
        request_ids: list[str] = []
        final_only: dict[int, SamplingParams] = {}
        try:
            for prompt, sampling_params in zip(prompts, params, strict=True):
                request_id = str(next(self._request_counter))
                if id(sampling_params) not in final_only:
                    final_only[id(sampling_params)] = sampling_params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                self.llm_engine.add_request(request_id, prompt, final_only[id(sampling_params)])
                request_ids.append(request_id)
        except Exception:
            self.llm_engine.abort_request(request_ids)
            raise
        return request_ids

    def _run_engine(self, request_ids: list[str], use_tqdm: bool | Callable) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = _Progress(len(request_ids), use_tqdm)
        with objects_before_frozen():  # full collections walk only the run's objects (jaxllm.engine.gc_freeze)
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(output)
        progress.close()
        return [finished[request_id] for request_id in request_ids]


class _Progress:
    """vLLM-style bar: finished prompts with estimated input and output tokens/s. ``use_tqdm`` is a bool or, as in
    vLLM, a tqdm-like class to build the bar with."""

    def __init__(self, total: int, use_tqdm) -> None:
        bar_class = use_tqdm if callable(use_tqdm) else tqdm
        self.bar = bar_class(total=total, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        self.start = time.perf_counter()
        self.input_tokens = 0
        self.output_tokens = 0

    def update(self, output: RequestOutput) -> None:
        self.input_tokens += len(output.prompt_token_ids or [])
        self.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        input_rate, output_rate = self.input_tokens / elapsed, self.output_tokens / elapsed
        self.bar.set_postfix_str(
            f"est. speed input: {input_rate:.2f} toks/s, output: {output_rate:.2f} toks/s", refresh=False
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
