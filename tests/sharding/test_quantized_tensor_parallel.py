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
from jaxllm.models.layers import FUSED_PROJECTIONS_ENV, QuantizedLinear
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


def use_pallas_kernel(model, impl: str = "pallas_gpu_interpret"):
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.matmul_impl = impl
    return model, layers


@pytest.mark.parametrize(
    ("method", "group_size", "lm_head"),
    [("int8", 128, False), ("int4", 32, False), ("int4", 32, True)],
    ids=["int8", "int4", "int4-tied-lm_head"],
)
def test_pallas_quantized_matmul_per_shard_matches_one_device(method, group_size, lm_head, monkeypatch):
    """Each projection its own launch (``JAXLLM_FUSED_PROJECTIONS=0``). The last case also quantizes a tied lm_head
    (column-parallel over the vocabulary, from the embedding)."""
    from tests.sharding.test_parallel_generation import run_on_mesh

    monkeypatch.setenv(FUSED_PROJECTIONS_ENV, "0")
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


def record_fused_launches(monkeypatch) -> list:
    """Leaves fused projections at their default (on) and records each Pallas launch's weight shapes (one tuple per
    launch)."""
    from pallas_kernels.quantized_matmul import triton_gpu

    launches, launch = [], triton_gpu.quantized_matmul_triton_fused

    def recording(x, weights, **kwargs):
        launches.append(tuple(w.shape for w in weights))
        return launch(x, weights, **kwargs)

    monkeypatch.setattr(triton_gpu, "quantized_matmul_triton_fused", recording)
    monkeypatch.delenv(FUSED_PROJECTIONS_ENV, raising=False)
    jax.clear_caches()  # programs traced with the switch off would be reused
    return launches


def tiny_quantized_model(method: str, group_size: int, impl: str = "pallas_gpu_interpret"):
    config = ModelConfig.from_hf_config(tiny_hf_config())
    quantization = QuantizationConfig(method, group_size)
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32, quantization=quantization)
    model, _ = use_pallas_kernel(load_weights(abstract, random_hf_tensors(config)), impl)
    return config, model


def assert_same_greedy_run(got, want, got_logits, want_logits) -> None:
    assert got == want
    for step, (got_step, want_step) in enumerate(zip(got_logits, want_logits, strict=True)):
        for request_id in want_step:
            np.testing.assert_allclose(
                got_step[request_id], want_step[request_id], rtol=2e-5, atol=2e-5, err_msg=f"{step}"
            )


def projection_launches(config, tensor: int) -> list[tuple]:
    """The weight shapes of each device's q/k/v launch and gate/up launch at tensor parallelism ``tensor``."""
    hidden, q_cols = config.hidden_size, config.num_heads * config.head_dim
    kv_cols, mlp_cols = config.num_kv_heads * config.head_dim, config.intermediate_size
    qkv = ((hidden, q_cols // tensor), (hidden, kv_cols // tensor), (hidden, kv_cols // tensor))
    return [qkv, ((hidden, mlp_cols // tensor),) * 2]


def check_fused_tp2_matches_separate_one_device(method: str, group_size: int, impl: str, monkeypatch) -> None:
    """The tiny quantized model with kernel ``impl``: its greedy run at T = 2 with fused launches (the default) per
    device equals its run on one device with separate launches (``JAXLLM_FUSED_PROJECTIONS=0``), tokens and step
    logits; each device launched its own q/k/v and gate/up shards together."""
    from tests.sharding.test_parallel_generation import run_on_mesh

    monkeypatch.setenv(FUSED_PROJECTIONS_ENV, "0")
    config, model = tiny_quantized_model(method, group_size, impl)
    prompts = mixed_prompts(config.vocab_size)
    runner = ReferenceRunner(model, resolved_config())
    expected = generate(ShardedEngine(runner, resolved_config()), prompts, GREEDY)

    launches = record_fused_launches(monkeypatch)
    outputs, recording = run_on_mesh(model, prompts, 2, 1)
    assert_same_greedy_run(outputs, expected, recording.step_logits, runner.step_logits)
    assert all(shapes in launches for shapes in projection_launches(config, 2))


@pytest.mark.parametrize(("method", "group_size"), [("int8", 128), ("int4", 32)])
def test_fused_projections_per_shard_match_separate_launches(method, group_size, monkeypatch):
    check_fused_tp2_matches_separate_one_device(method, group_size, "pallas_gpu_interpret", monkeypatch)


def test_fused_fp8_projections_match_separate_launches(monkeypatch):
    """fp8 on one device (on a mesh its row-parallel shards scale their activations apart, so a mesh run is not the
    one-device run): the fused launch quantizes the shared activations once, as each separate launch does."""
    monkeypatch.setenv(FUSED_PROJECTIONS_ENV, "0")
    config, model = tiny_quantized_model("fp8", 128)
    prompts = mixed_prompts(config.vocab_size)
    separate = ReferenceRunner(model, resolved_config())
    expected = generate(ShardedEngine(separate, resolved_config()), prompts, GREEDY)

    launches = record_fused_launches(monkeypatch)
    fused = ReferenceRunner(model, resolved_config())
    outputs = generate(ShardedEngine(fused, resolved_config()), prompts, GREEDY)
    assert_same_greedy_run(outputs, expected, fused.step_logits, separate.step_logits)
    assert all(shapes in launches for shapes in projection_launches(config, 1))


@pytest.mark.parametrize(("method", "group_size"), [("int8", 128), ("int4", 32), ("fp8", 128)])
def test_quantized_kv_heads_expand_with_their_scales(method, group_size):
    """One KV head at T = 2: the expanded k/v_proj repeat their codes and scales along the heads axis wherever the
    scheme stores it (fp8 values are ``[N, K]``), so both devices' heads give the original head's product."""
    from sharding.mesh import make_mesh
    from sharding.model_sharding import shard_model

    config = ModelConfig.from_hf_config(tiny_hf_config(num_key_value_heads=1))
    quantization = QuantizationConfig(method, group_size)
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32, quantization=quantization)
    model, _ = use_pallas_kernel(load_weights(abstract, random_hf_tensors(config)), "reference")
    expanded = shard_model(model, make_mesh(tensor_parallel_size=2))
    assert expanded.config.num_kv_heads == 2
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, config.hidden_size)), jnp.float32)
    for old, new in zip(model.model.layers, expanded.model.layers, strict=True):
        for name in ("k_proj", "v_proj"):
            old_layer, new_layer = getattr(old.self_attn, name), getattr(new.self_attn, name)
            assert new_layer.values.get_value().dtype == old_layer.values.get_value().dtype
            assert new_layer.matmul_impl == "reference"  # kept from the model it was expanded from
            want = np.asarray(old_layer(x))  # [5, H]: the one KV head
            np.testing.assert_allclose(np.asarray(new_layer(x)), np.concatenate([want, want], -1), rtol=1e-6)
