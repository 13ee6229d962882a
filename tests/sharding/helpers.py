"""Shared pieces of the sharding tests: a tiny random Llama, a one-device reference runner, and a mixed job.

The reference runs the model's own ``__call__`` and ``compute_logits`` (not ``sharding``'s stage code) on the
default device, so every sharded run is compared with an independent path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ResolvedConfig, power_of_two_buckets
from jaxllm.core.step_io import ModelRunnerOutput, SchedulerOutput
from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.models.attention_metadata import AttentionMetadata
from jaxllm.models.kv_cache_layout import array_shapes
from jaxllm.runner.step_batch import pack_step_batch
from jaxllm.sampling_params import SamplingParams

# Every multi-device test module's marks: tests/conftest.py asks XLA for 8 fake CPU devices; a run that could not
# (e.g. jax initialised earlier with fewer) skips these modules rather than failing them.
NEEDS_8_DEVICES = [
    pytest.mark.multidevice,
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS from tests/conftest.py"),
]
BLOCK_SIZE = 4
TOKEN_BUDGET = 16  # small: the long prompts are prefilled in chunks over several steps
MAX_MODEL_LEN = 64


def tiny_hf_config(**overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
    }
    config.update(overrides)
    return config


def random_hf_tensors(config: ModelConfig, seed: int = 0):
    """Random weights named and laid out as a Hugging Face checkpoint (numpy: no jax RNG program to compile).

    Scales keep activations O(1): kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.1^2).
    """
    rng = np.random.default_rng(seed)
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32)
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        shape, leaf = variable.get_value().shape, path[-1]
        if leaf == "kernel":
            value = rng.normal(0.0, shape[0] ** -0.5, shape).T  # torch Linear layout [out, in]
        elif leaf == "embedding":
            value = rng.normal(0.0, 1.0, shape)
        elif str(path[-2]).endswith("norm"):
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        else:  # biases
            value = rng.normal(0.0, 0.1, shape)
        name = ".".join(map(str, path[:-1] + ("weight" if leaf in ("kernel", "embedding") else leaf,)))
        yield name, value.astype(np.float32)


@functools.cache
def tiny_model(**overrides):
    """A float32 random model on the default device (cached: tests only read it)."""
    config = ModelConfig.from_hf_config(tiny_hf_config(**overrides))
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32)
    return load_weights(abstract, random_hf_tensors(config))


def resolved_config(num_blocks: int = 64) -> ResolvedConfig:
    return ResolvedConfig(
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=TOKEN_BUDGET,
        block_size=BLOCK_SIZE,
        num_blocks=num_blocks,
        token_buckets=power_of_two_buckets(TOKEN_BUDGET, TOKEN_BUDGET),
    )


def mixed_prompts(vocab_size: int, lengths=(3, 9, 21, 14, 1), seed: int = 1) -> dict[str, list[int]]:
    """Random prompts of mixed lengths: some longer than the token budget, so they are prefilled in chunks."""
    rng = np.random.default_rng(seed)
    return {f"r{i}": rng.integers(0, vocab_size, n).tolist() for i, n in enumerate(lengths)}


# LLVM -O0: about a third less compile time on CPU; XLA's own (numerics-relevant) passes are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


class ReferenceRunner:
    """One-device runner: the model's own forward and logits, greedy; keeps every step's logits of sampled rows."""

    def __init__(self, model, config: ResolvedConfig):
        self.model, self.config = model, config
        shape = (config.num_blocks, config.block_size, model.config.num_kv_heads, model.config.head_dim)
        self.kv_caches = [
            (jnp.zeros(s), jnp.zeros(s)) for s in array_shapes(model.config.num_layers, shape, jnp.float32)
        ]
        self.step_logits: list[dict[str, np.ndarray]] = []
        self._forward = jax.jit(_reference_forward, donate_argnums=(1,), compiler_options=FAST_COMPILE)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        batch = pack_step_batch(scheduler_output, self.config)
        logits, self.kv_caches = self._forward(self.model, self.kv_caches, _arrays(batch))
        logits = np.asarray(logits)
        sampled, kept = {}, {}
        for row, s in enumerate(scheduler_output.scheduled):
            kept[s.request_id] = logits[row]
            if s.samples_token:
                sampled[s.request_id] = int(np.argmax(logits[row]))
        self.step_logits.append(kept)
        return ModelRunnerOutput(sampled_token_ids=sampled)


def _arrays(batch) -> dict[str, np.ndarray]:
    return {name: value for name, value in vars(batch).items() if isinstance(value, np.ndarray)}


def _reference_forward(model, kv_caches, batch: dict):
    md = AttentionMetadata(
        positions=batch["positions"],
        slot_mapping=batch["slot_mapping"],
        context_lens=batch["context_lens"],
        block_tables=batch["block_tables"],
        seq_lens=batch["seq_lens"],
        query_start_loc=batch["query_start_loc"],
    )
    hidden, kv_caches = model(batch["input_ids"], kv_caches, md)
    return model.compute_logits(hidden[batch["logits_indices"]]), kv_caches


def no_head_args(requests, num_rows, microbatch, step) -> None:
    return None


def logits_head(logits, head_args, in_flight_tokens) -> dict:
    """A pipeline head that returns the logits with the greedy ids, so tests can compare both."""
    return {"token_ids": jnp.argmax(logits, axis=-1).astype(jnp.int32), "logits": logits}


class RecordingRunner:
    """Wraps a ``PipelineRunner`` whose head returns logits; keeps every step's logits like ``ReferenceRunner``."""

    def __init__(self, runner):
        self.runner = runner
        self.step_logits: list[dict[str, np.ndarray]] = []

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = self.runner.execute(scheduler_output)
        logits = self.runner.last_results["logits"]
        self.step_logits.append({s.request_id: logits[row] for row, s in enumerate(scheduler_output.scheduled)})
        return output
