"""EngineConfig: every user-facing engine option, validated once; and the values the engine derives from it.

``EngineConfig`` is frozen and holds what the user asked for (vLLM's ``LLM(...)`` keyword names). Derived values
(resolved dtype, max_model_len, token budget, buckets, number of KV blocks) live in ``ResolvedConfig``, built by the
engine after the model config and the device memory are known. Imports neither jax nor flax.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping

from jaxllm.argument_checks import check_positive_int, number_error

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # KV budget on CPU, where there is no device memory to measure
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = (None, "int8", "int4", "fp8")  # as jaxllm.quantization.config.QUANTIZATION_NAMES
# vLLM's names for a checkpoint stored quantized, accepted for one (jaxllm.quantization.prequantized)
CHECKPOINT_QUANTIZATIONS = ("gptq", "gptq_marlin", "awq", "awq_marlin", "compressed-tensors")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "fp8" is e4m3 (float8_e4m3fn), as in vLLM
# What SamplingParams.logprobs return (vLLM's logprobs_mode; jaxllm.sampling.sampler says what each holds)
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


def _compiler_options(options) -> None:
    """TypeError unless ``options`` is None or a mapping of str XLA option names to str/bool/int/float values."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise TypeError(f"xla_compiler_options must be a dict of XLA option names to values, got {options!r}")
    for name, value in options.items():
        if not isinstance(name, str) or not isinstance(value, str | bool | int | float):
            raise TypeError(
                f"xla_compiler_options entry {name!r}: {value!r} must be a str name with a str, bool, int or float "
                "value (e.g. {'xla_gpu_enable_triton_gemm': False})"
            )


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True  # schedule step N+1 while step N runs (jaxllm.engine.engine_core)
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    attention_impl: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    quantization: str | None = None
    quantization_group_size: int = 128  # int4 only: input rows that share one scale
    quantize_lm_head: bool = False  # lm_head quantized too (a tied one gets its own quantized copy of the embedding)
    quantized_weights_path: str | None = None  # orbax directory: restored if present, else written after quantizing
    kv_cache_dtype: str = "auto"
    # XLA options for the step programs, over the platform's defaults (jaxllm.runner.xla_options)
    xla_compiler_options: dict | None = None
    # The most top logprobs a request may ask for (SamplingParams.logprobs / prompt_logprobs), as vLLM; -1: no cap
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"  # one of LOGPROBS_MODES
    enforce_eager: bool = False  # vLLM's: no CUDA graphs (XLA's command buffers off on GPU; jaxllm.runner.xla_options)
    # vLLM's: on a mesh, a mixture of experts' whole experts split over the tensor axis (sharding.rules)
    enable_expert_parallel: bool = False
    enable_sleep_mode: bool = False  # vLLM's: LLM.sleep / wake_up may free and retake device memory (engine.sleep_mode)
    # vLLM's: where generate / chat find sampling parameters when given none: "auto" (the model's
    # generation_config.json), "vllm" (SamplingParams' defaults) or a directory; jaxllm.engine.default_sampling
    generation_config: str = "auto"
    override_generation_config: dict | None = None  # on top of that source, e.g. {"temperature": 0.0}
    # vLLM's: False keeps statistics (Prometheus metrics, LLM.get_metrics(), a periodic log line; jaxllm.metrics)
    disable_log_stats: bool = True
    served_model_name: str | list[str] | None = None  # vLLM's: the metrics' model_name label (the first name); model

    def __post_init__(self) -> None:
        for name in ("model", "tokenizer", "quantized_weights_path", "generation_config"):  # a Path is a path too
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        check_positive_int("max_num_seqs", self.max_num_seqs)
        check_positive_int("max_model_len", self.max_model_len, allow_none=True)
        check_positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        check_positive_int("block_size", self.block_size)
        check_positive_int("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        check_positive_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "quantization_group_size"):
            check_positive_int(name, getattr(self, name))
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, numbers.Real):
            raise TypeError(f"gpu_memory_utilization must be a number in (0, 1], got {utilization!r}")
        if not 0.0 < utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.quantization not in QUANTIZATIONS + CHECKPOINT_QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS + CHECKPOINT_QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.quantized_weights_path is not None and not isinstance(self.quantized_weights_path, str):
            raise TypeError(f"quantized_weights_path must be a str path or None, got {self.quantized_weights_path!r}")
        if self.quantized_weights_path is not None and self.quantization is None:
            raise ValueError(
                f"quantized_weights_path={self.quantized_weights_path!r} needs a str path and quantization set "
                f"(quantization={self.quantization!r})"
            )
        names = self.served_model_name
        if names is not None:
            message = f"served_model_name must be a non-empty str, a list of them or None, got {names!r}"
            if not (isinstance(names, str) or (isinstance(names, list) and all(isinstance(n, str) for n in names))):
                raise TypeError(message)
            if not names or not all(names if isinstance(names, list) else [names]):
                raise ValueError(message)
        switches = ("quantize_lm_head", "enforce_eager", "enable_expert_parallel", "enable_sleep_mode")
        for name in (*switches, "disable_log_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.quantize_lm_head and self.quantization is None:
            raise ValueError("quantize_lm_head=True needs quantization set (int8, int4 or fp8), got quantization=None")
        _compiler_options(self.xla_compiler_options)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if (error := number_error(self.max_logprobs, minimum=-1)) is not None:
            raise error(f"max_logprobs must be an int >= 0, or -1 for no cap, got {self.max_logprobs!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if not isinstance(self.generation_config, str):
            raise TypeError(f"generation_config must be 'auto', 'vllm' or a directory, got {self.generation_config!r}")
        override = self.override_generation_config
        if override is not None and not isinstance(override, Mapping):
            raise TypeError(f"override_generation_config must be a dict or None, got {override!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"model must be a path string or None, got {type(self.model).__name__}")

    @property
    def model_name(self) -> str:
        """The name the metrics carry: the first ``served_model_name``, else the model path."""
        names = self.served_model_name
        return (names if isinstance(names, str) else names[0]) if names else str(self.model)


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``largest``, with ``largest`` itself as the last bucket."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    buckets.append(largest)
    return tuple(buckets)


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """What the engine runs with, derived from EngineConfig + model + device."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_blocks: int  # including the reserved null block 0
    token_buckets: tuple[int, ...]
    # decode-only steps (one query token per request) run step programs of their own, whose attention skips its
    # long-query launch (AttentionMetadata.max_query_len = 1)
    decode_only_programs: bool = False

    @property
    def max_blocks_per_request(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def request_rows_for(self, num_tokens_bucket: int) -> int:
        """Requests per step bucket: each request has at least one token, so never more rows than tokens."""
        return min(self.max_num_seqs, num_tokens_bucket)

    def step_variants(self) -> list[tuple[int, int | None]]:
        """(token bucket, ``max_query_len``) of each step program that warm-up compiles: every bucket unbounded and,
        with ``decode_only_programs``, each bucket a decode-only step can take (up to ``max_num_seqs`` tokens) bounded
        to one query token."""
        variants = [(bucket, None) for bucket in self.token_buckets]
        if self.decode_only_programs:
            most_tokens = min(self.max_num_seqs, self.token_buckets[-1])
            largest = next(bucket for bucket in self.token_buckets if bucket >= most_tokens)
            variants += [(bucket, 1) for bucket in self.token_buckets if bucket <= largest]
        return variants


def env_switch(name: str) -> bool | None:
    """An experimental on/off environment switch (``JAXLLM_...``): True for "1", False for "0", None when unset;
    ValueError naming the variable for any other value."""
    setting = os.environ.get(name)
    if setting not in (None, "0", "1"):
        raise ValueError(f"{name} must be 0 or 1 when set, got {setting!r}")
    return None if setting is None else setting == "1"
