"""Assembling an engine: free what a dropped engine still holds, load the model, resolve limits and buckets, size the
KV cache from device memory.

Owns the derived values (``ResolvedConfig``) and the start-up log a user reads to see what the engine will do.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os

import jax

from jaxllm.config import CHECKPOINT_QUANTIZATIONS, EngineConfig, ResolvedConfig, env_switch, power_of_two_buckets
from jaxllm.loading.model_loader import abstract_model, init_dummy_weights, load_weights, resolve_dtype
from jaxllm.loading.model_source import ModelSource
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.quantization.checkpoint import restore_quantized, save_quantized
from jaxllm.quantization.config import DEFAULT_INT4_GROUP_SIZE, resolve_quantization
from jaxllm.quantization.prequantized import checkpoint_quantization
from jaxllm.runner import parallel_compile
from jaxllm.runner.kv_cache import device_memory_budget, kv_bytes_per_block
from pallas_kernels.ragged_paged_attention import takes_query_len_bound

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
SMALLEST_TOKEN_BUCKET = 16


def with_checkpoint_quantization(config: EngineConfig, hf_config: dict) -> EngineConfig:
    """``config`` with the quantization of a checkpoint stored quantized (its scheme, int4 group size, and lm_head
    quantized if the checkpoint's is): a ValueError when ``quantization=`` asks for something else, or names a stored
    format (``"gptq"``, ``"compressed-tensors"``) that the checkpoint's config.json does not have."""
    checkpoint = checkpoint_quantization(hf_config)
    wanted = config.quantization
    if checkpoint is None:
        if wanted in CHECKPOINT_QUANTIZATIONS:
            raise ValueError(
                f"quantization={wanted!r} loads a checkpoint stored quantized, but {config.model!r} has no "
                "quantization_config in its config.json"
            )
        return config
    names = {None, checkpoint.method, checkpoint.quant_method, f"{checkpoint.quant_method}_marlin"}
    if wanted not in names:
        raise ValueError(
            f"quantization={wanted!r} does not match the checkpoint's quantization_config ({checkpoint.quant_method}, "
            f"read as {checkpoint.method}); leave quantization=None to use it"
        )
    group_size = config.quantization_group_size
    if checkpoint.group_size is not None and group_size not in (DEFAULT_INT4_GROUP_SIZE, checkpoint.group_size):
        raise ValueError(
            f"quantization_group_size={group_size} does not match the checkpoint's group size {checkpoint.group_size}"
        )
    logger.info(
        "checkpoint stored quantized: %s, read as %s%s%s",
        checkpoint.quant_method,
        checkpoint.method,
        f" (group size {checkpoint.group_size})" if checkpoint.group_size else "",
        ", lm_head too" if checkpoint.lm_head else "",
    )
    return dataclasses.replace(
        config,
        quantization=checkpoint.method,
        quantization_group_size=checkpoint.group_size or group_size,
        quantize_lm_head=config.quantize_lm_head or checkpoint.lm_head,
    )


def load_model(config: EngineConfig, source: ModelSource, model_config: ModelConfig, placement=None):
    """The model with its weights, its linear layers quantized as each tensor loads when ``config.quantization``."""
    model_cls = get_model_class(model_config.architecture)
    dtype = resolve_dtype(config.dtype, model_config.checkpoint_dtype)
    quantization = resolve_quantization(config.quantization, config.quantization_group_size, config.quantize_lm_head)
    checkpoint = checkpoint_quantization(source.hf_config)
    if checkpoint is not None and checkpoint.zero_points:
        quantization = dataclasses.replace(quantization, zero_points=True)
    kwargs = {} if placement is None else {"placement": placement}
    if config.load_format == "dummy":
        return init_dummy_weights(
            model_cls,
            model_config,
            dtype,
            seed=config.seed,
            attention_impl=config.attention_impl,
            quantization=quantization,
            **kwargs,
        )
    abstract = abstract_model(model_cls, model_config, dtype, config.attention_impl, quantization)
    saved = config.quantized_weights_path
    if quantization is not None and saved is not None and os.path.exists(saved):
        logger.info("restoring %s weights from %s (no re-quantizing)", quantization.method, saved)
        return restore_quantized(abstract, saved, quantization, placement)
    model = load_weights(abstract, source.tensors(), checkpoint_quantization=checkpoint, **kwargs)
    if quantization is not None and saved is not None:
        save_quantized(model, saved, quantization)
        logger.info("saved the %s-quantized weights to %s", quantization.method, saved)
    return model


def resolve_limits(config: EngineConfig, model_config: ModelConfig, num_blocks: int) -> ResolvedConfig:
    supported = model_config.derived_max_model_len
    max_model_len = config.max_model_len or supported
    if max_model_len > supported:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the longest sequence the model supports ({supported}: "
            f"max_position_embeddings={model_config.max_position_embeddings}, rope {model_config.rope.rope_type} "
            f"factor {model_config.rope.factor})"
        )
    budget = config.max_num_batched_tokens
    if budget is None:
        budget = DEFAULT_MAX_NUM_BATCHED_TOKENS if config.enable_chunked_prefill else max_model_len
    if not config.enable_chunked_prefill and budget < max_model_len:
        raise ValueError(  # as vLLM: without chunks, a step must hold the longest prompt whole
            f"max_num_batched_tokens={budget} is smaller than max_model_len={max_model_len} with "
            f"enable_chunked_prefill=False: a prompt is prefilled in one step, so longer ones could never run; raise "
            f"max_num_batched_tokens, lower max_model_len or turn chunked prefill on"
        )
    return ResolvedConfig(
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=budget,
        block_size=config.block_size,
        num_blocks=num_blocks,
        token_buckets=power_of_two_buckets(min(SMALLEST_TOKEN_BUCKET, budget), budget),
        decode_only_programs=decode_only_programs(config),
    )


def decode_only_programs(config: EngineConfig) -> bool:
    """Whether decode-only steps get step programs of their own (``ResolvedConfig.decode_only_programs``): where the
    attention backend skips work under the bound (the GPU kernels), unless ``JAXLLM_DECODE_PROGRAMS`` (0 / 1) says."""
    forced = env_switch("JAXLLM_DECODE_PROGRAMS")
    return takes_query_len_bound(config.attention_impl) if forced is None else forced


def num_kv_blocks(
    config: EngineConfig,
    model_config: ModelConfig,
    kv_dtype,
    step_temp_bytes: float = 0,
    temp_bytes_per_block: float = 0,
    bytes_per_block: int | None = None,
) -> int:
    """Blocks the KV budget holds, plus the reserved null block 0.

    ``step_temp_bytes`` and ``temp_bytes_per_block`` are the largest step's temporary memory (fixed part, and the part
    that grows with the cache), measured by compiling it; they are taken out of the budget first. ``bytes_per_block``
    is what one block costs a device (default: the whole model's; on a mesh, the most loaded device's share).
    """
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override + 1
    per_block = bytes_per_block or kv_bytes_per_block(model_config, config.block_size, kv_dtype)
    budget = device_memory_budget(config.gpu_memory_utilization, config.kv_cache_memory_bytes) - step_temp_bytes
    num_blocks = int(budget // (per_block + temp_bytes_per_block))
    if num_blocks < 2:
        raise ValueError(f"KV cache budget of {budget:.0f} bytes holds no block of {per_block} bytes")
    return num_blocks


def log_kv_cache(resolved: ResolvedConfig, model_config: ModelConfig, kv_dtype) -> None:
    usable_tokens = (resolved.num_blocks - 1) * resolved.block_size
    per_block = kv_bytes_per_block(model_config, resolved.block_size, kv_dtype)
    logger.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB, %s) on %s; %d tokens, maximum concurrency %.1fx at "
        "max_model_len=%d",
        resolved.num_blocks - 1,
        resolved.block_size,
        resolved.num_blocks * per_block / 2**30,
        jax.numpy.dtype(kv_dtype).name,
        jax.default_backend(),
        usable_tokens,
        usable_tokens / resolved.max_model_len,
        resolved.max_model_len,
    )


def with_num_blocks(resolved: ResolvedConfig, num_blocks: int) -> ResolvedConfig:
    return dataclasses.replace(resolved, num_blocks=num_blocks)


def free_unreachable_engines() -> None:
    """Runs a full garbage collection before an engine takes device memory. A dropped engine is freed at ``del`` (no
    object of it refers back to itself: ``jaxllm.weak_methods``), but one a user keeps in a reference cycle, or one
    whose start raised (its half-built objects sit in the traceback's frames, and flax's flattening leaves
    self-referencing closures over the parameters it walked), waits for a full collection, which Python runs rarely
    (none in a 3,000-request offline job on CPU); until then its buffers hold the device memory the next engine sizes
    its own cache from. Costs one collection per engine start: 150 ms on a 2-core CPU host after a 1B-parameter
    engine's start-up; 0.9 s on average in the test suite's processes, which hold many earlier engines' programs."""
    gc.collect()


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache (like vLLM's compile cache), so a second start skips XLA compiles.

    Uses ``$JAXLLM_CACHE_DIR`` (default ``~/.cache/jaxllm/xla``) unless the user already configured a cache directory;
    ``JAXLLM_CACHE_DIR=""`` turns it off. Every program is cached, however quick its compile: a start compiles
    dozens of forward and sampler programs, and the many small ones add up. Under ``JAXLLM_COMPILE_THREADS`` > 1 the
    cache is its subdirectory ``parallel_compile.CONCURRENT_CACHE_SUBDIR``: programs compiled side by side (GEMMs
    autotuned under load) stay out of the programs a one-at-a-time start loads. Set once per process, by its first
    engine.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get("JAXLLM_CACHE_DIR", os.path.expanduser("~/.cache/jaxllm/xla"))
    if not path:
        return None
    if parallel_compile.compile_threads() > 1:
        path = os.path.join(path, parallel_compile.CONCURRENT_CACHE_SUBDIR)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# What XLA's GPU runtime says when a collective cannot get memory of its own (outside JAX's pool).
_COLLECTIVE_MEMORY_ERRORS = ("collective memory", "for all-reduce", "for all-gather", "for reduce-scatter")


def warm_up(runners) -> float:
    """Compiles and runs every runner's step programs once; returns the seconds spent.

    On a GPU mesh XLA's all-reduce kernels take memory for their scratch and signal buffers outside JAX's
    preallocated pool (where there is one: see ``jaxllm.process_env``), per collective and program. With the pool at
    95% of each GPU that remainder ran out for the Llama-3.1-70B shape at tensor parallelism 4 on H200s (80 layers x 2
    all-reduces in each bucket's program) and the first warm-up step failed (``process_env.fit_pool_to_mesh`` now
    lowers jaxllm's pool for such engines where it still can); such a failure is re-raised as a ``RuntimeError`` that
    says what to change.
    """
    try:
        return sum(runner.warm_up() for runner in runners)
    except jax.errors.JaxRuntimeError as error:
        if not any(marker in str(error) for marker in _COLLECTIVE_MEMORY_ERRORS):
            raise
        fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        raise RuntimeError(
            f"a collective's device memory could not be allocated outside JAX's memory pool "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}): set XLA_PYTHON_CLIENT_MEM_FRACTION lower before jax or "
            f"jaxllm is imported (0.85, jaxllm's own choice for an engine of several devices built before JAX starts, "
            f"ran the Llama-3.1-8B shape at tensor parallelism 4 on 80 GB GPUs and the 70B shape on 141 GB ones); "
            f"under XLA's VMM allocator (no pool) set gpu_memory_utilization lower. "
            f"XLA said: {error}"
        ) from error
