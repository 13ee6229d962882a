"""End to end through LLM.generate: greedy generations equal transformers' greedy ``generate`` (fixtures)."""

import pathlib

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.models import moe
from tests.models.test_moe import record_expert_paths
from tests.models.test_parity import TINY_MODELS, expected, fixture_prompts

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def engine_for(model, **kwargs):
    options = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64, num_gpu_blocks_override=64)
    options.update(kwargs)
    return LLM(model=model, **options)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_greedy_matches_transformers(name):
    data = expected(name)
    # Dynamic NTK depends on how much of a prompt one forward pass sees: give every prompt one whole step.
    # Its max_position_embeddings is 32, stretched to 64 by the rope factor 2 (prompts reach 40 + 16 new tokens).
    options = dict(max_num_batched_tokens=128, max_model_len=64) if name == "llama_rope_dynamic" else {}
    llm = engine_for(str(FIXTURES / "models" / name), skip_tokenizer_init=True, **options)
    prompts = [{"prompt_token_ids": p} for p in fixture_prompts(data)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    got = np.array([o.outputs[0].token_ids for o in outputs])
    assert np.array_equal(got, data["greedy_token_ids"]), f"{name}: {got} != {data['greedy_token_ids']}"


@pytest.mark.parametrize(
    ("name", "impl"),
    [
        ("mixtral", "reference"),
        ("qwen2_moe", "reference"),
        ("qwen3_moe", "reference"),
        ("qwen3_moe", "pallas_gpu_interpret"),
    ],
)
def test_experts_on_the_gpu_paths_match_transformers(name, impl, monkeypatch):
    """The GPU paths (with pure-jnp products, or the Pallas kernels interpreted) through the engine: four prompts
    batched in padded token buckets, whose padding tokens run no expert; the decode steps (a bucket of 16) take the
    per-pair products, the prefill steps (32) the tile plan. (The fixtures' 6-8 experts are fewer than a 16-token
    bucket's pairs, so ``use_pairs`` would keep them on the plan: here buckets of 16 take the pairs regardless.)"""
    monkeypatch.setenv("JAXLLM_MOE_EXPERTS_IMPL", impl)
    monkeypatch.setattr(moe, "use_pairs", lambda bucket_tokens, top_k, num_experts: bucket_tokens <= 16)
    paths = record_expert_paths(monkeypatch)
    data = expected(name)
    llm = engine_for(str(FIXTURES / "models" / name), skip_tokenizer_init=True, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": p} for p in fixture_prompts(data)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    got = np.array([o.outputs[0].token_ids for o in outputs])
    assert np.array_equal(got, data["greedy_token_ids"]), f"{name} {impl}: {got} != {data['greedy_token_ids']}"
    assert set(paths) == {"tiles", "pairs"}


def test_max_tokens_past_max_model_len_stops_there_as_in_vllm():
    """No error for a prompt plus max_tokens beyond max_model_len: the request runs up to max_model_len and finishes
    with "length", its tokens the first ones of transformers' greedy generation."""
    data = expected("llama")
    prompts = fixture_prompts(data)
    max_model_len = max(len(p) for p in prompts) + 8  # the longest prompt gets 8 of its 16 tokens
    llm = engine_for(str(FIXTURES / "models" / "llama"), skip_tokenizer_init=True, max_model_len=max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    num_capped = 0
    for prompt, output, full in zip(prompts, outputs, data["greedy_token_ids"], strict=True):
        room = min(16, max_model_len - len(prompt))
        num_capped += room < 16
        assert output.outputs[0].token_ids == full[:room].tolist() and output.outputs[0].finish_reason == "length"
    assert num_capped > 0


def test_truncate_prompt_tokens_keeps_the_last_tokens_as_in_vllm():
    """Each fixture prompt behind 9 random tokens, cut back to its own length: transformers' greedy tokens of the
    prompt alone; a cut longer than the prompt keeps it whole."""
    data = expected("llama")
    prompts = fixture_prompts(data)
    llm = engine_for(str(FIXTURES / "models" / "llama"), skip_tokenizer_init=True)
    rng = np.random.default_rng(2)
    padded = [{"prompt_token_ids": rng.integers(0, 500, 9).tolist() + p} for p in prompts]
    params = [
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, truncate_prompt_tokens=len(p)) for p in prompts
    ]
    outputs = llm.generate(padded, params, use_tqdm=False)
    for prompt, output, want in zip(prompts, outputs, data["greedy_token_ids"], strict=True):
        assert output.prompt_token_ids == prompt and output.outputs[0].token_ids == want.tolist()
    whole = SamplingParams(temperature=0.0, max_tokens=2, truncate_prompt_tokens=1000)
    assert llm.generate(padded[:1], whole, use_tqdm=False)[0].prompt_token_ids == padded[0]["prompt_token_ids"]


def test_truncate_prompt_tokens_minus_one_keeps_what_max_model_len_allows():
    """vLLM's -1 ("the model's length"): a prompt longer than the engine takes keeps its last max_model_len - 1
    tokens (room for one output token) and generates; a shorter one stays whole."""
    llm = engine_for(str(FIXTURES / "models" / "llama"), skip_tokenizer_init=True)
    max_model_len = llm.llm_engine.resolved.max_model_len
    rng = np.random.default_rng(3)
    long_prompt = rng.integers(0, 500, max_model_len + 7).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4, truncate_prompt_tokens=-1)
    long_out, short_out = llm.generate(
        [{"prompt_token_ids": long_prompt}, {"prompt_token_ids": long_prompt[:9]}], params, use_tqdm=False
    )
    assert long_out.prompt_token_ids == long_prompt[-(max_model_len - 1) :]
    assert len(long_out.outputs[0].token_ids) == 1 and long_out.outputs[0].finish_reason == "length"
    assert short_out.prompt_token_ids == long_prompt[:9] and len(short_out.outputs[0].token_ids) == 4


def test_detokenize_false_returns_the_same_tokens_without_text():
    data = expected("llama")
    llm = engine_for(str(FIXTURES / "models" / "llama"))
    prompts = list(data["text_prompts"])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    with_text = llm.generate(prompts, params, use_tqdm=False)
    without = llm.generate(prompts, params.clone(detokenize=False), use_tqdm=False)
    for a, b in zip(with_text, without, strict=True):
        assert a.outputs[0].text and b.outputs[0].text == ""
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert all(lp.decoded_token is None for entry in b.outputs[0].logprobs for lp in entry.values())


def test_text_prompts_with_a_local_tokenizer_match_transformers():
    data = expected("llama")
    llm = engine_for(str(FIXTURES / "models" / "llama"))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, skip_special_tokens=False)
    outputs = llm.generate(list(data["text_prompts"]), params, use_tqdm=False)
    for i, output in enumerate(outputs):
        assert output.prompt_token_ids == data["text_prompt_token_ids"][i, : data["text_prompt_lens"][i]].tolist()
        assert output.outputs[0].token_ids == data["text_greedy_token_ids"][i].tolist()


@pytest.fixture(scope="module")
def smollm2():
    return LLM(max_model_len=512, max_num_batched_tokens=64, num_gpu_blocks_override=64)


def test_smollm2_default_model_greedy_text_matches_transformers(smollm2):
    data = expected("smollm2_gguf")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = smollm2.generate(list(data["text_prompts"]), params, use_tqdm=False)
    for i, output in enumerate(outputs):
        assert output.outputs[0].token_ids == data["text_greedy_token_ids"][i].tolist()
        assert output.outputs[0].text == str(data["text_greedy_text"][i])


def test_smollm2_chat_answers_paris(smollm2):
    data = expected("smollm2_gguf")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = smollm2.chat(messages, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert output.prompt_token_ids == data["chat_prompt_token_ids"].tolist()
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"  # stops at <|im_end|> from the GGUF's EOS
    expected_ids = data["chat_greedy_token_ids"].tolist()
    assert output.outputs[0].token_ids == expected_ids[: len(output.outputs[0].token_ids)]
