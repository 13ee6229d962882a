"""Parity with transformers (an independent implementation): logits and greedy generations from committed fixtures.

The fixtures come from ``tests/fixtures/make_fixtures.py`` (transformers + torch); these tests need neither.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from tests.models.harness import prompt_logits

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TINY_MODELS = sorted(p.name for p in (FIXTURES / "models").iterdir() if (p / "config.json").exists())
MAX_ABS_ERROR_F32 = 1e-4


def load_model(model_dir: str):
    source = resolve_model_source(model_dir)
    config = ModelConfig.from_hf_config(source.hf_config)
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32)
    return load_weights(abstract, source.tensors())


def expected(name: str):
    return np.load(FIXTURES / "expected" / f"{name}.npz", allow_pickle=False)


def fixture_prompts(data, key="prompts", lens_key="prompt_lens"):
    return [data[key][i, : data[lens_key][i]].tolist() for i in range(len(data[lens_key]))]


def test_every_family_has_a_fixture():
    assert {"llama", "mistral", "qwen2", "qwen3", "llama_tied", "llama_rope_llama3"} <= set(TINY_MODELS)
    assert set(SHARED_CACHE_ARRAYS) <= set(TINY_MODELS)


# families whose logits are also checked with their layers sharing KV cache arrays (JAXLLM_KV_ARRAY_MAX_BYTES):
# plain, one KV head, sliding window, q/k norm, experts
SHARED_CACHE_ARRAYS = ["llama", "llama_mqa", "mistral", "qwen3", "mixtral"]


@pytest.mark.parametrize(
    "name, kv_array_max_bytes",
    [(name, None) for name in TINY_MODELS] + [(name, 2**40) for name in SHARED_CACHE_ARRAYS],
    ids=[*TINY_MODELS, *(f"{name}-layers-share-cache-arrays" for name in SHARED_CACHE_ARRAYS)],
)
def test_logits_match_transformers(name, kv_array_max_bytes):
    model = load_model(str(FIXTURES / "models" / name))
    data = expected(name)
    offsets = data["logit_offsets"]
    # Dynamic NTK (as transformers defines it) rescales by the length of each forward pass, so it is compared on
    # whole prompts; every other variant is also run in chunks of 7 tokens.
    chunkable = model.config.rope.rope_type != "dynamic"
    for i, prompt in enumerate(fixture_prompts(data)):
        reference = data["logits"][offsets[i] : offsets[i + 1]]
        chunk_size = 7 if i % 2 and chunkable else None
        got = prompt_logits(
            model, prompt, block_size=4, chunk_size=chunk_size, seed=i, kv_array_max_bytes=kv_array_max_bytes
        )
        error = np.abs(got - reference).max()
        assert error < MAX_ABS_ERROR_F32, f"{name} prompt {i}: max abs error {error:.2e}"


def test_smollm2_gguf_logits_match_transformers():
    from jaxllm.loading.default_model import default_model_path

    model = load_model(str(default_model_path()))
    data = expected("smollm2_gguf")
    offsets = data["logit_offsets"]
    prompts = fixture_prompts(data, "text_prompt_token_ids", "text_prompt_lens")
    for i, prompt in enumerate(prompts):
        got = prompt_logits(model, prompt, block_size=16, seed=i)
        np.testing.assert_allclose(got[-1], data["last_logits"][i], atol=2e-3, rtol=0)
        top_ids = data["top20_ids"][offsets[i] : offsets[i + 1]]
        got_top = np.take_along_axis(got, top_ids, axis=-1)
        np.testing.assert_allclose(got_top, data["top20_logits"][offsets[i] : offsets[i + 1]], atol=2e-3, rtol=0)
        assert np.array_equal(got.argmax(-1), top_ids[:, 0])
