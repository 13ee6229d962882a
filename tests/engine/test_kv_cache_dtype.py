"""``LLM(kv_cache_dtype="fp8")``: the paged KV cache is float8_e4m3fn, the same memory holds 2x (bf16) or 4x (float32)
the blocks, generation works and stays invariant to batching and prefix caching, and greedy tokens follow the
float32 cache's. Any other value is a ValueError naming it.

On this fixture (random weights, near-tied logits) every rounding change forks greedy paths: fp8 keeps 3 mantissa
bits, so first tokens almost always agree but whole 32-token continuations diverge early in about half the prompts.
For calibration, bf16 *weights* against float32 agree on 61% of the same job's tokens. The accuracy claim on a real
model is in ``tests/quantization/test_accuracy.py`` (SmolLM2: perplexity ratio 1.0033, greedy tokens 95.8% equal).
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.runner.kv_cache import resolve_kv_cache_dtype

MODEL = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models" / "llama"
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 3, 2, 16, 16  # the fixture's config.json
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def make_llm(**options) -> LLM:
    defaults = dict(
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        num_gpu_blocks_override=256,
        skip_tokenizer_init=True,
    )
    return LLM(model=str(MODEL), **{**defaults, **options})


def prompts() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"prompt_token_ids": rng.integers(0, 512, int(n)).tolist()} for n in rng.integers(1, 120, 16)]


def generate(llm: LLM, batch: list[dict]) -> np.ndarray:
    return np.array([o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)])


@pytest.fixture(scope="module")
def fp8_llm() -> LLM:
    return make_llm(kv_cache_dtype="fp8")


@pytest.mark.parametrize(("dtype", "itemsize"), [("bfloat16", 2), ("float32", 4)])
def test_fp8_cache_holds_more_blocks_in_the_same_memory(dtype, itemsize):
    auto_bytes_per_block = 2 * NUM_LAYERS * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * itemsize  # K and V, every layer
    budget = 100 * auto_bytes_per_block
    sizes = dict(dtype=dtype, num_gpu_blocks_override=None, kv_cache_memory_bytes=budget, block_size=BLOCK_SIZE)
    auto, fp8 = make_llm(**sizes), make_llm(kv_cache_dtype="fp8", **sizes)
    assert auto.llm_engine.resolved.num_blocks == 100
    assert fp8.llm_engine.resolved.num_blocks == 100 * itemsize  # one byte per value
    assert {k.dtype for pair in fp8.llm_engine.runner.kv_caches for k in pair} == {jnp.dtype(jnp.float8_e4m3fn)}
    assert len(generate(fp8, prompts()[:2])[0]) == GREEDY.max_tokens


def test_fp8_cache_greedy_tokens_follow_the_float32_cache(fp8_llm):
    expected, got = generate(make_llm(), prompts()), generate(fp8_llm, prompts())
    agreement, first_tokens = np.mean(got == expected), np.mean(got[:, 0] == expected[:, 0])
    print(f"\nfp8 KV cache greedy: {agreement:.1%} of tokens equal, first token equal in {first_tokens:.0%} of prompts")
    assert first_tokens >= 14 / 16  # measured 15 / 16
    assert agreement >= 0.4  # measured 50.2% (see the module docstring)


def test_fp8_cache_tokens_are_the_same_alone_batched_and_prefix_cached(fp8_llm):
    batch = prompts()[:6]
    together = generate(fp8_llm, batch)
    again = generate(fp8_llm, batch)  # prompts' full blocks now come from the (fp8) prefix cache
    alone = np.concatenate([generate(fp8_llm, [prompt]) for prompt in batch[:3]])
    np.testing.assert_array_equal(again, together)
    np.testing.assert_array_equal(alone, together[:3])


def test_kv_cache_dtype_names():
    assert resolve_kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert resolve_kv_cache_dtype("fp8", jnp.float32) == resolve_kv_cache_dtype("fp8_e4m3", jnp.bfloat16)
    assert resolve_kv_cache_dtype("fp8", jnp.float32) == jnp.float8_e4m3fn


def test_checkpoint_kv_cache_scales_are_skipped():
    """vLLM-style ``self_attn.k_scale`` / ``v_scale`` tensors load (and are not applied: the scales stay 1.0)."""
    source = resolve_model_source(str(MODEL))
    config = ModelConfig.from_hf_config(source.hf_config)
    scales = [(f"model.layers.{i}.self_attn.{kind}_scale", np.float32(0.02)) for i in range(3) for kind in "kv"]
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32)
    model = load_weights(abstract, [*source.tensors(), *scales])
    assert all(layer.self_attn.k_scale == layer.self_attn.v_scale == 1.0 for layer in model.model.layers)


@pytest.mark.parametrize("bad", ["fp8_e5m2", "int8", "bfloat16", None])
def test_unknown_kv_cache_dtype_is_rejected_with_its_name(bad):
    with pytest.raises(ValueError) as error:
        EngineConfig(kv_cache_dtype=bad)
    assert repr(bad) in str(error.value)
    with pytest.raises(ValueError) as error:
        make_llm(kv_cache_dtype=bad)
    assert repr(bad) in str(error.value)
