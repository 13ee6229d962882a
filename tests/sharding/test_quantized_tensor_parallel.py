"""Quantized linear layers under tensor parallelism run per shard (``jax.shard_map``): the Pallas quantized matmul
(interpreted on CPU), opaque to the partitioner, multiplies each device's own weight shard, and row-parallel layers
sum their partial products. Greedy tokens and step logits equal the same quantized model on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels.quantized_matmul.op as op
from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.models.layers import QuantizedLinear
from jaxllm.quantization.config import QuantizationConfig
from sharding.engine import ShardedEngine, generate
from tests.sharding.helpers import (
    GREEDY,
    NEEDS_8_DEVICES,
    ReferenceRunner,
    mixed_prompts,
    random_hf_tensors,
    resolved_config,
    tiny_hf_config,
)

pytestmark = NEEDS_8_DEVICES


def use_pallas_kernel(model):
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.matmul_impl = "pallas_gpu_interpret"
    return model, layers


@pytest.mark.parametrize(
    ("method", "group_size", "lm_head"),
    [("int8", 128, False), ("int4", 32, False), ("int4", 32, True)],
    ids=["int8", "int4", "int4-tied-lm_head"],
)
def test_pallas_quantized_matmul_per_shard_matches_one_device(method, group_size, lm_head, monkeypatch):
    """The last case also quantizes a tied lm_head (column-parallel over the vocabulary, from the embedding)."""
    from tests.sharding.test_parallel_generation import run_on_mesh

    config = ModelConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=lm_head))
    quantization = QuantizationConfig(method, group_size, lm_head=lm_head)
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32, quantization=quantization)
    model, layers = use_pallas_kernel(load_weights(abstract, random_hf_tensors(config)))
    assert len(layers) == 7 * config.num_layers + lm_head

    prompts = mixed_prompts(config.vocab_size)
    runner = ReferenceRunner(model, resolved_config())
    expected = generate(ShardedEngine(runner, resolved_config()), prompts, GREEDY)

    local_ks = []
    backend = op._backend

    def recording_backend(impl):
        run = backend(impl)

        def record(x, qw, **kwargs):
            local_ks.append((impl, qw.shape))
            return run(x, qw, **kwargs)

        return record

    monkeypatch.setattr(op, "_backend", recording_backend)
    jax.clear_caches()  # an earlier case's programs of the same shapes would skip tracing, and so the recording
    outputs, recording = run_on_mesh(model, prompts, 2, 1)
    assert outputs == expected
    for step, (got, want) in enumerate(zip(recording.step_logits, runner.step_logits, strict=True)):
        for request_id in want:
            np.testing.assert_allclose(got[request_id], want[request_id], rtol=2e-5, atol=2e-5, err_msg=f"{step}")
    # Every kernel call saw one device's shard: half of N (column-parallel) or half of K (row-parallel).
    shapes = {shape for impl, shape in local_ks if impl == "pallas_gpu_interpret"}
    hidden, heads = config.hidden_size, config.num_heads * config.head_dim
    assert (hidden, heads // 2) in shapes  # q_proj: [K, N/2]
    assert (heads // 2, hidden) in shapes  # o_proj: [K/2, N]
    assert (config.intermediate_size // 2, hidden) in shapes  # down_proj: [K/2, N]
    if lm_head:
        assert (hidden, config.vocab_size // 2) in shapes  # lm_head: [K, V/2]
    assert all(k < hidden or n < max(heads, config.intermediate_size, config.vocab_size) for k, n in shapes)
