"""vLLM engine arguments with no counterpart in jaxllm, accepted so that a vLLM script runs after changing its import.

``LLM(...)`` and ``LLMEngine.from_engine_args(...)`` pass their keyword arguments through ``engine_arguments``, which
takes these out. Each is checked as vLLM checks it; then:
- ``NO_EFFECT`` ones have nothing to configure here (the reason is in the table) and are dropped;
- ``DEFAULT_ONLY`` ones would change what runs (a Hub revision, weights offloaded to the host, LoRA, speculative
  decoding): vLLM's default is accepted (or, for a ``OneOf``, any value that means what jaxllm does, e.g.
  ``task="generate"``) and anything else is a ``ValueError`` saying why jaxllm cannot honour it.
vLLM names that jaxllm implements (``enforce_eager``, ``tensor_parallel_size``, ...) are ``EngineConfig`` fields.
``check_request_options`` does the same for a request's ``lora_request`` and ``priority``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping

from jaxllm.argument_checks import number_error

logger = logging.getLogger(__name__)


# A check returns None for a valid value, else the error to raise: TypeError for a value of the wrong type,
# ValueError for one of the right type that is out of range or not among the accepted choices.
Check = Callable[[object], "type[Exception] | None"]


def _of_type(*types: type) -> Check:
    def check(value):
        return None if isinstance(value, types) else TypeError

    return check


def _number(minimum: int, *, integer: bool, optional: bool = False) -> Check:
    """An int (or any real number unless ``integer``) of at least ``minimum``; None too when ``optional``."""

    def check(value):
        if optional and value is None:
            return None
        return number_error(value, minimum=minimum, integer=integer)

    return check


def _choice(*values) -> Check:
    """One of ``values`` (strings or None); another string is a bad value, anything else a bad type."""

    def check(value):
        if value in values:
            return None
        return ValueError if isinstance(value, str) else TypeError

    return check


_BOOL = _of_type(bool)
_OPTIONAL_PATH = _of_type(type(None), str, os.PathLike)
_OPTIONAL_POSITIVE_INT = _number(1, integer=True, optional=True)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """The values of a ``DEFAULT_ONLY`` argument that ask for what jaxllm does anyway."""

    values: tuple


# name -> (check, what a valid value is, why it has no effect here)
NO_EFFECT: dict[str, tuple[Check, str, str]] = {
    "trust_remote_code": (
        _BOOL,
        "a bool",
        "jaxllm runs its own model code for the architectures it supports; a checkpoint's own code never runs",
    ),
    "swap_space": (
        _number(0, integer=False),
        "a number of GiB >= 0",
        "a preempted request is recomputed, never swapped to host memory",
    ),
    "download_dir": (_OPTIONAL_PATH, "a path or None", "models load from local directories; nothing is downloaded"),
    "hf_token": (
        _of_type(type(None), bool, str),
        "a str, bool or None",
        "models load from local directories; nothing is downloaded",
    ),
    "disable_custom_all_reduce": (_BOOL, "a bool", "XLA chooses the all-reduce kernels on a mesh"),
    "max_seq_len_to_capture": (
        _OPTIONAL_POSITIVE_INT,
        "a positive int or None",
        "every token bucket is compiled, CUDA graph included, whatever its length",
    ),
    "compilation_config": (
        _of_type(type(None), int, Mapping),
        "an int, a dict or None",
        "these are torch.compile settings; XLA compiles the step programs",
    ),
    "distributed_executor_backend": (
        _choice(None, "mp", "uni", "ray"),
        'None, "mp", "uni" or "ray"',
        "one JAX process drives every local device (several hosts: sharding.initialize_distributed)",
    ),
    "disable_async_output_proc": (
        _BOOL,
        "a bool",
        "outputs are processed on the host after each step (async scheduling overlaps them with the next)",
    ),
    "max_parallel_loading_workers": (_OPTIONAL_POSITIVE_INT, "a positive int or None", "one process loads"),
    "tokenizer_pool_size": (_number(0, integer=True), "an int >= 0", "prompts are tokenized in the calling thread"),
    "use_v2_block_manager": (_BOOL, "a bool", "there is one block manager (paged, with prefix sharing)"),
    "max_loras": (_OPTIONAL_POSITIVE_INT, "a positive int or None", "no LoRA adapters (enable_lora stays False)"),
    "max_lora_rank": (
        _OPTIONAL_POSITIVE_INT,
        "a positive int or None",
        "no LoRA adapters (enable_lora stays False)",
    ),
}

# name -> (vLLM's default, why no other value can be honoured)
DEFAULT_ONLY: dict[str, tuple[object, str]] = {
    "cpu_offload_gb": (0, "weights stay in device memory"),
    "revision": (None, "models load from local directories, which have no revisions"),
    "tokenizer_revision": (None, "tokenizers load from local directories, which have no revisions"),
    "code_revision": (None, "a checkpoint's own code never runs"),
    "tokenizer_mode": ("auto", "the tokenizer loads through transformers' AutoTokenizer"),
    "hf_overrides": (None, "the checkpoint's config.json is used as it is"),
    "task": (OneOf(("auto", "generate")), "the engine generates text; pooling / embedding models are not supported"),
    "runner": (OneOf(("auto", "generate")), "the engine generates text; pooling models are not supported"),
    "convert": (OneOf(("auto", "none")), "models run as the checkpoint's causal LM, never converted"),
    "model_impl": (OneOf(("auto", "vllm")), "jaxllm's own model code runs (transformers' modelling never does)"),
    "enable_lora": (False, "LoRA adapters are not supported"),
    "speculative_config": (None, "speculative decoding is not implemented"),
    "kv_transfer_config": (None, "KV transfer between instances (disaggregated prefill) is not implemented"),
    "limit_mm_per_prompt": (None, "the supported models take text only"),
    "mm_processor_kwargs": (None, "the supported models take text only"),
    "scheduling_policy": ("fcfs", "requests are scheduled first come, first served"),
    "num_scheduler_steps": (1, "each step is scheduled on its own (async scheduling overlaps the next one)"),
    "preemption_mode": (OneOf((None, "recompute")), "a preempted request is recomputed, never swapped"),
}


def engine_arguments(kwargs: Mapping[str, object]) -> dict[str, object]:
    """``kwargs`` without the vLLM arguments above, each checked first: a bad type is a ``TypeError``, a bad value
    a ``ValueError``, each naming the argument and the value."""
    remaining = dict(kwargs)
    for name, (check, expected, why) in NO_EFFECT.items():
        if name not in remaining:
            continue
        if (error := check(value := remaining.pop(name))) is not None:
            raise error(f"{name} must be {expected}, got {value!r}")
        logger.debug("%s=%r has no effect: %s", name, value, why)
    for name, (default, reason) in DEFAULT_ONLY.items():
        if name in remaining and not _is_default(value := remaining.pop(name), default):
            accepted = f"use one of {default.values!r}" if isinstance(default, OneOf) else f"leave it at {default!r}"
            raise ValueError(f"{name}={value!r} is not supported ({reason}); {accepted}")
    return remaining


def _is_default(value, default) -> bool:
    if isinstance(value, Mapping):
        return default is None and not value  # hf_overrides={} overrides nothing
    if isinstance(default, OneOf):
        return any(_is_default(value, one) for one in default.values)
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def check_request_options(lora_request=None, priority=0) -> None:
    """vLLM's per-request options without a counterpart: only their defaults pass (no LoRA adapters; requests run
    first come, first served, as vLLM's default scheduling policy runs them)."""
    if lora_request is not None:
        raise ValueError(f"LoRA adapters are not supported, got lora_request={lora_request!r}")
    if priority != 0:
        raise ValueError(f"priority scheduling is not enabled (first come, first served), got priority={priority!r}")
