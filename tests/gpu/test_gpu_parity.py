"""On the GPU machine (marker ``gpu``): the models with the default (Pallas GPU) attention against transformers'
fixtures in float32 and bfloat16, and end-to-end greedy outputs of the Pallas path against the reference path.

bfloat16 keeps 8 bits of mantissa, so its logits are compared on a scale: the errors are printed (``-s``) and
recorded in benchmarks/RESULTS.md; the assertions are top-1 agreement and an error bound relative to the logits'
spread.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from pallas_kernels.ragged_paged_attention import mosaic_gpu
from tests.models.harness import prompt_logits
from tests.models.test_parity import FIXTURES, TINY_MODELS, expected, fixture_prompts
from tests.sharding.helpers import random_hf_tensors, tiny_hf_config

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU to run the compiled model")]


def load(name: str, dtype):
    source = resolve_model_source(str(FIXTURES / "models" / name))
    config = ModelConfig.from_hf_config(source.hf_config)
    return load_weights(abstract_model(get_model_class(config.architecture), config, dtype), source.tensors())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_gpu_logits_match_transformers(name, dtype):
    model = load(name, jnp.dtype(dtype))
    data = expected(name)
    offsets = data["logit_offsets"]
    errors, agree, total = [], 0, 0  # errors: per token, max abs error / the prompt's logit std
    for i, prompt in enumerate(fixture_prompts(data)):
        reference = data["logits"][offsets[i] : offsets[i + 1]]
        got = prompt_logits(model, prompt, block_size=16, seed=i)
        errors += list(np.abs(got - reference).max(-1) / reference.std())
        agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        total += len(prompt)
    worst, median = max(errors), float(np.median(errors))
    print(f"gpu parity {name} {dtype}: max abs error / logit std {worst:.2e} (median {median:.2e}), top-1 agreement "
          f"{agree}/{total}")  # fmt: skip
    # float32 on GPU runs its matmuls in TF32 unless told otherwise (about 10 mantissa bits), bfloat16 in 8 bits.
    bound = 2e-2 if dtype == "float32" else 1e-1
    if model.config.moe is not None and dtype == "bfloat16":
        # bfloat16 moves router scores by ~1%, which re-routes the tokens whose k-th and (k+1)-th experts nearly tie
        # (H100: 3-8 of 94 tokens of the fixtures), and a re-routed token's logits differ by far more than rounding;
        # the bound holds for the typical token (float32 above holds every token to it, routing and all).
        assert median < bound, f"{name} {dtype}: median {median:.2e}"
    else:
        assert worst < bound, f"{name} {dtype}: {worst:.2e}"
    assert agree >= 0.95 * total


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])
def test_pallas_engine_greedy_equals_reference_engine(name):
    prompts = [{"prompt_token_ids": p} for p in fixture_prompts(expected(name))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for impl in ("pallas_gpu", "reference"):
        llm = LLM(
            model=str(FIXTURES / "models" / name),
            dtype="float32",
            skip_tokenizer_init=True,
            max_model_len=256,
            max_num_batched_tokens=64,
            num_gpu_blocks_override=64,
            attention_impl=impl,
        )
        tokens[impl] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["pallas_gpu"] == tokens["reference"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mosaic_prefill_logits_match_reference_attention(dtype):
    """The Hopper Mosaic GPU kernel (16-bit queries, head dim 64/128: the fixtures' head dim 16 falls back to Triton)
    in a whole model: a head-dim-64 Llama with random weights, prompts prefilled in chunks of 64 tokens over a
    shuffled paged cache (long-query tiles, chunks continuing a cached prefix), against the same weights with the
    pure-jnp reference attention."""
    hf_config = tiny_hf_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=512, vocab_size=512)  # fmt: skip
    config = ModelConfig.from_hf_config(hf_config)
    assert mosaic_gpu.supports(dtype, dtype, config.head_dim, 16, mosaic_gpu.MosaicConfig())
    models = {
        impl: load_weights(
            abstract_model(get_model_class(config.architecture), config, jnp.dtype(dtype), attention_impl=impl),
            random_hf_tensors(config, seed=3),
        )
        for impl in ("pallas_mosaic_gpu", "reference")
    }
    rng = np.random.default_rng(4)
    errors, agree, total = [], 0, 0
    for i, length in enumerate((40, 130, 300)):
        prompt = rng.integers(0, config.vocab_size, length).tolist()
        got, want = (prompt_logits(models[k], prompt, block_size=16, chunk_size=64, seed=i) for k in models)
        errors.append(np.abs(got - want).max() / want.std())
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += length
    print(f"mosaic prefill {dtype}: max abs error / logit std {max(errors):.2e}, top-1 agreement {agree}/{total}")
    # The parity test's bounds above: bfloat16's for its 8-bit rounding through 4 layers (H100: 5.0e-2 here; 4.9e-2
    # to 7.5e-2 against transformers), float32's for float16's 10 bits (H100: 6.4e-3 here).
    assert max(errors) < (1e-1 if dtype == "bfloat16" else 2e-2), f"{dtype}: {max(errors):.2e}"
    assert agree >= 0.95 * total


def test_gpu_prompt_logprobs_match_transformers():
    """``prompt_logprobs`` through the engine on the GPU (the forward program's prompt-logprob variant, chunked
    prefill under a 16-token budget) against transformers' log-softmax of the fixture logits; float32 runs its
    matmuls in TF32, so the bound is the logits test's, relative to the logits' spread."""
    data = expected("llama")
    prompts = fixture_prompts(data)
    llm = LLM(model=str(FIXTURES / "models" / "llama"), dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              max_num_batched_tokens=16, num_gpu_blocks_override=64)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    offsets, errors, agree, total = data["logit_offsets"], [], 0, 0
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        logits = data["logits"][offsets[i] : offsets[i + 1]].astype(np.float64)
        reference = logits - logits.max(-1, keepdims=True)
        reference -= np.log(np.exp(reference).sum(-1, keepdims=True))
        for position in range(1, len(prompt)):
            entry, row = output.prompt_logprobs[position], reference[position - 1]
            errors.append(abs(entry[prompt[position]].logprob - row[prompt[position]]) / logits.std())
            top_1 = next(token for token, logprob in entry.items() if logprob.rank == 1)
            agree += int(top_1 == row.argmax())
            total += 1
    print(f"gpu prompt logprobs: max abs error / logit std {max(errors):.2e}, top-1 agreement {agree}/{total}")
    assert max(errors) < 2e-2 and agree >= 0.95 * total
