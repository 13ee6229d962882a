"""``quantize_lm_head=True``: lm_head quantized with the decoder's scheme (a tied lm_head from the embedding table,
which the token lookup keeps reading unquantized), logits against a numpy product with the dequantized weight, dummy
weights, the engine end to end, and the Orbax checkpoint's metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import EngineConfig
from jaxllm.loading.model_loader import abstract_model, init_dummy_weights
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.models.layers import QuantizedLinear
from jaxllm.quantization import quantize_weight
from jaxllm.quantization.config import QuantizationConfig
from jaxllm.quantization.schemes import QuantizedWeight, dequantize_weight
from tests.models.test_parity import expected, fixture_prompts
from tests.quantization.test_quantized_model import FIXTURES, GREEDY, TINY_LLAMA, engine, load

TINY_LLAMA_TIED = FIXTURES / "models" / "llama_tied"
METHODS = ("int8", "int4", "fp8")


def head_quantization(method: str) -> QuantizationConfig:
    return QuantizationConfig(method, group_size=4, lm_head=True)


def checkpoint_head(model_dir) -> np.ndarray:
    """The lm_head kernel ``[D, V]`` the checkpoint defines: its lm_head, or its embedding table when tied."""
    tensors = dict(resolve_model_source(str(model_dir)).tensors())
    weight = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])  # torch layout [V, D]
    return np.asarray(weight, np.float32).T


def head_weight(model) -> QuantizedWeight:
    head = model.lm_head
    return QuantizedWeight(head.values.get_value(), head.scales.get_value(), head.method, head.group_size, head.shape)


def test_quantize_lm_head_needs_a_bool_and_a_quantization():
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantization set"):
        EngineConfig(quantize_lm_head=True)
    with pytest.raises(TypeError, match="quantize_lm_head must be a bool, got 'yes'"):
        EngineConfig(quantization="int8", quantize_lm_head="yes")
    with pytest.raises(TypeError, match="quantize_lm_head must be a bool, got 1"):
        QuantizationConfig("int8", lm_head=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_dir", [TINY_LLAMA, TINY_LLAMA_TIED], ids=lambda p: p.name)
def test_lm_head_holds_the_quantized_checkpoint_head(model_dir, method):
    model = load(model_dir, head_quantization(method))
    assert isinstance(model.lm_head, QuantizedLinear)
    want = quantize_weight(jnp.asarray(checkpoint_head(model_dir)), method, 4)
    np.testing.assert_array_equal(model.lm_head.values.get_value(), want.values)
    np.testing.assert_array_equal(model.lm_head.scales.get_value(), want.scales)
    plain = load(model_dir)  # the embedding table stays as the checkpoint has it
    np.testing.assert_array_equal(
        model.model.embed_tokens.embedding.get_value(), plain.model.embed_tokens.embedding.get_value()
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_dir", [TINY_LLAMA, TINY_LLAMA_TIED], ids=lambda p: p.name)
def test_logits_are_the_product_with_the_dequantized_head(model_dir, method):
    """Float32 logits; int8/int4 multiply the activations exactly, fp8 rounds them per token to e4m3 first."""
    model = load(model_dir, head_quantization(method))
    hidden = jax.random.normal(jax.random.key(7), (5, model.config.hidden_size), jnp.float32)
    logits = model.compute_logits(hidden)
    assert logits.dtype == jnp.float32 and logits.shape == (5, model.config.vocab_size)
    weight = np.asarray(dequantize_weight(head_weight(model)), np.float64)  # [D, V]
    reference = np.asarray(hidden, np.float64) @ weight
    scale = np.abs(reference).max()
    max_error = {"int8": 1e-5, "int4": 1e-5, "fp8": 0.1}[method]  # fp8: e4m3's 2^-4 relative step in x
    assert np.abs(np.asarray(logits) - reference).max() / scale < max_error
    unquantized = np.asarray(hidden, np.float64) @ checkpoint_head(model_dir).astype(np.float64)
    assert np.abs(reference - unquantized).max() > 0  # the head really is the quantized one


def test_dummy_tied_head_is_the_quantized_dummy_embedding():
    source = resolve_model_source(str(TINY_LLAMA_TIED))
    config = ModelConfig.from_hf_config(source.hf_config)
    model_cls = get_model_class(config.architecture)
    plain = init_dummy_weights(model_cls, config, jnp.float32, seed=5)
    quantized = init_dummy_weights(model_cls, config, jnp.float32, seed=5, quantization=head_quantization("int8"))
    embedding = plain.model.embed_tokens.embedding.get_value()
    np.testing.assert_array_equal(quantized.model.embed_tokens.embedding.get_value(), embedding)
    np.testing.assert_array_equal(quantized.lm_head.values.get_value(), quantize_weight(embedding.T, "int8").values)


@pytest.mark.parametrize("model_dir", [TINY_LLAMA, TINY_LLAMA_TIED], ids=lambda p: p.name)
def test_engine_generates_with_a_quantized_head(model_dir):
    data = expected(model_dir.name)
    llm = engine(model_dir, quantization="int8", quantize_lm_head=True)
    runner = llm.llm_engine.runner
    assert isinstance(nnx.merge(runner.graphdef, runner.params).lm_head, QuantizedLinear)
    traces_after_warm_up = runner.num_traces
    outputs = llm.generate([{"prompt_token_ids": p} for p in fixture_prompts(data)], GREEDY, use_tqdm=False)
    got = np.array([o.outputs[0].token_ids for o in outputs])
    agreement = np.mean(got == data["greedy_token_ids"])
    print(f"int8 with lm_head: {agreement:.1%} of greedy tokens equal the unquantized model's")
    assert agreement >= 0.75  # as int8 without the head (tests/quantization/test_quantized_model.py)
    assert runner.num_traces == traces_after_warm_up


def test_checkpoint_records_whether_the_head_is_quantized(tmp_path):
    from jaxllm.quantization.checkpoint import restore_quantized, save_quantized

    quantization = head_quantization("int8")
    model = load(TINY_LLAMA_TIED, quantization)
    save_quantized(model, tmp_path / "ckpt", quantization)
    config = ModelConfig.from_hf_config(resolve_model_source(str(TINY_LLAMA_TIED)).hf_config)
    model_cls = get_model_class(config.architecture)
    abstract = abstract_model(model_cls, config, jnp.float32, quantization=quantization)
    restored = restore_quantized(abstract, tmp_path / "ckpt", quantization)
    np.testing.assert_array_equal(restored.lm_head.values.get_value(), model.lm_head.values.get_value())
    without_head = QuantizationConfig("int8", group_size=4)
    abstract = abstract_model(model_cls, config, jnp.float32, quantization=without_head)
    with pytest.raises(ValueError, match="'lm_head': True"):
        restore_quantized(abstract, tmp_path / "ckpt", without_head)


@pytest.mark.parametrize(
    "group_size, error", [(0, ValueError), (3, ValueError), (-4, ValueError), (4.0, TypeError), (True, TypeError)]
)
def test_int4_group_size_must_be_a_positive_even_int(group_size, error):
    with pytest.raises(error, match=f"int4 group_size must be a positive even int, got {group_size!r}"):
        QuantizationConfig("int4", group_size=group_size)
