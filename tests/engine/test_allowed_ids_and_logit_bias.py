"""``SamplingParams(allowed_token_ids=..., logit_bias=...)`` through the engine, as vLLM applies them.

Each step's greedy choice is checked against that step's full raw distribution (``logprobs`` over the whole tiny
vocabulary, ``max_logprobs=-1``): with an allow-list the most likely allowed token, with a bias the argmax of the
biased logprobs (a log-softmax shifts a row by one constant, so its argmax under a bias is the biased logits').
"""

import numpy as np
import pytest

from jaxllm import SamplingParams
from tests.engine.conftest import TINY_CONFIG, make_llm, random_token_prompts, raw_distributions

VOCAB = TINY_CONFIG["vocab_size"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir, max_logprobs=-1)


def test_greedy_with_an_allow_list_takes_the_most_likely_allowed_token(llm):
    rng = np.random.default_rng(3)
    allowed = rng.choice(VOCAB - 1, 6, replace=False).tolist()
    prompts = random_token_prompts(3, [5, 12, 30], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=VOCAB, allowed_token_ids=allowed)
    for output in llm.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        raw = raw_distributions(completion, VOCAB)
        assert completion.token_ids == [allowed[i] for i in raw[:, allowed].argmax(-1)]


def test_greedy_with_a_logit_bias_takes_the_argmax_of_the_biased_logits(llm):
    rng = np.random.default_rng(5)
    tokens, values = rng.choice(VOCAB - 1, 40, replace=False), rng.uniform(-3, 3, 40)
    bias = {int(t): float(b) for t, b in zip(tokens, values, strict=True)}
    prompts = random_token_prompts(3, [6, 14, 25], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=VOCAB, logit_bias=bias)
    changed = 0
    for output in llm.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        raw = raw_distributions(completion, VOCAB)
        biased = raw.copy()
        for token, value in bias.items():
            biased[:, token] += value
        assert completion.token_ids == biased.argmax(-1).tolist()
        changed += int((raw.argmax(-1) != biased.argmax(-1)).sum())
    assert changed > 0, "the bias should change some greedy choice"


def test_a_batch_mate_with_an_allow_list_or_bias_leaves_other_requests_unchanged(llm):
    prompts = random_token_prompts(3, [9, 17, 4], seed=8)
    plain = SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompts[:1], plain, use_tqdm=False)[0].outputs[0].token_ids
    mixed = [plain, plain.clone(allowed_token_ids=[1, 2, 3]), plain.clone(logit_bias={alone[0]: -50.0})]
    outputs = llm.generate(prompts, mixed, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == alone
    assert set(outputs[1].outputs[0].token_ids) <= {1, 2, 3}
