"""Greedy outputs must not depend on batching, chunk size, prefix-cache state or preemption."""

import numpy as np
import pytest

from jaxllm import SamplingParams
from tests.engine.conftest import make_llm, random_token_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LENGTHS = np.random.default_rng(7).integers(1, 90, size=32)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts():
    return random_token_prompts(32, LENGTHS, seed=1)


@pytest.fixture(scope="module")
def alone(llm, prompts):
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_of_32_equals_alone(llm, prompts, alone):
    batched = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert batched == alone
    assert all(len(t) == 12 for t in batched)


def test_small_chunks_equal_alone(tiny_model_dir, prompts, alone):
    chunked = make_llm(tiny_model_dir, max_num_batched_tokens=8)
    assert token_ids(chunked.generate(prompts, GREEDY, use_tqdm=False)) == alone


def test_prefix_cache_hot_and_cold_agree(llm, tiny_model_dir, prompts, alone):
    shared = np.random.default_rng(3).integers(0, 250, 40).tolist()
    with_prefix = [{"prompt_token_ids": shared + p["prompt_token_ids"][:10]} for p in prompts[:8]]
    cold = make_llm(tiny_model_dir, enable_prefix_caching=False)
    expected = token_ids(cold.generate(with_prefix, GREEDY, use_tqdm=False))
    block_manager = llm.llm_engine.scheduler.block_manager
    hits_before = block_manager.num_prefix_cache_hits
    first = token_ids(llm.generate(with_prefix, GREEDY, use_tqdm=False))
    hot = token_ids(llm.generate(with_prefix, GREEDY, use_tqdm=False))
    assert first == expected and hot == expected
    assert block_manager.num_prefix_cache_hits > hits_before


def test_preemption_loses_no_request(tiny_model_dir, prompts, alone):
    small = make_llm(tiny_model_dir, num_gpu_blocks_override=12)
    outputs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == alone


def test_no_recompilation_after_warm_up(tiny_model_dir, prompts):
    fresh = make_llm(tiny_model_dir)
    runner = fresh.llm_engine.runner
    forward_traces = runner.num_traces
    sampler_traces = runner.num_sampler_traces
    assert forward_traces == len(fresh.llm_engine.resolved.step_variants())
    fresh.generate(prompts, GREEDY, use_tqdm=False)
    fresh.generate(prompts[:3], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    # A mix of greedy, random and top-k / top-p / min-p requests in the same batches: nothing new compiles.
    mixed = [
        GREEDY,
        SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=1),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_tokens=12, ignore_eos=True),
    ]
    fresh.generate(prompts, [mixed[i % 3] for i in range(len(prompts))], use_tqdm=False)
    assert (runner.num_traces, runner.num_sampler_traces) == (forward_traces, sampler_traces)
    # Penalties and logprobs compile sampler programs on first use, never the model again.
    penalised = SamplingParams(temperature=0.8, repetition_penalty=1.2, logprobs=3, max_tokens=12, ignore_eos=True)
    fresh.generate(prompts[:4], penalised, use_tqdm=False)
    assert runner.num_traces == forward_traces and runner.num_sampler_traces > sampler_traces
