"""``LLM(logprobs_mode=...)`` (vLLM's) through the engine: ``raw_logits`` returns the logits the default's logprobs are
the log-softmax of (same tokens, same top ids, a per-step constant apart); ``processed_logprobs`` returns the
distribution a top-k row drew from (its k tokens' logprobs sum to one, the rest -inf); on a TP 2 mesh each mode gives
the one-device values; beam search, which scores by logprobs, rejects the logits modes; a bad mode is a ValueError."""

import numpy as np
import pytest

from jaxllm import BeamSearchParams, SamplingParams
from tests.engine.conftest import make_llm, random_token_prompts
from tests.sharding.helpers import NEEDS_8_DEVICES

LENGTHS = (5, 17, 3, 30)


def step_values(completion) -> list[dict[int, float]]:
    return [{token: entry.logprob for token, entry in step.items()} for step in completion.logprobs]


def run(llm, params):
    return [o.outputs[0] for o in llm.generate(random_token_prompts(4, LENGTHS, seed=9), params, use_tqdm=False)]


def test_raw_logits_are_what_the_raw_logprobs_are_the_log_softmax_of(tiny_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, repetition_penalty=1.4)
    logprobs = run(make_llm(tiny_model_dir), params)
    logits = run(make_llm(tiny_model_dir, logprobs_mode="raw_logits"), params)
    for by_logprob, by_logit in zip(logprobs, logits, strict=True):
        assert by_logit.token_ids == by_logprob.token_ids
        for lp_step, logit_step in zip(step_values(by_logprob), step_values(by_logit), strict=True):
            assert lp_step.keys() == logit_step.keys()  # the top 5 and the sampled token
            offsets = [logit_step[t] - lp_step[t] for t in lp_step]  # logsumexp of the step's logits
            np.testing.assert_allclose(offsets, offsets[0], atol=1e-4)
            assert offsets[0] > 0  # logits are not logprobs


def test_processed_logprobs_are_the_distribution_drawn_from(tiny_model_dir):
    params = SamplingParams(temperature=0.8, top_k=3, seed=5, max_tokens=6, logprobs=5)
    for completion in run(make_llm(tiny_model_dir, logprobs_mode="processed_logprobs"), params):
        for token, step in zip(completion.token_ids, step_values(completion), strict=True):
            finite = {t: v for t, v in step.items() if np.isfinite(v)}
            assert len(finite) == 3 and token in finite  # top-k left three tokens, the sampled one among them
            np.testing.assert_allclose(np.logaddexp.reduce(list(finite.values())), 0.0, atol=1e-5)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=NEEDS_8_DEVICES) for m in ("raw_logits", "processed_logprobs")])
def test_a_mesh_returns_the_one_device_values(tiny_model_dir, mode):
    params = SamplingParams(temperature=0.7, top_p=0.8, seed=2, max_tokens=5, logprobs=3, frequency_penalty=0.5)
    one = run(make_llm(tiny_model_dir, logprobs_mode=mode), params)
    mesh = run(make_llm(tiny_model_dir, logprobs_mode=mode, tensor_parallel_size=2), params)
    for a, b in zip(one, mesh, strict=True):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(step_values(a), step_values(b), strict=True):
            assert step_a.keys() == step_b.keys()
            np.testing.assert_allclose([step_b[t] for t in step_a], list(step_a.values()), atol=1e-4)


def test_beam_search_rejects_the_logits_modes(tiny_model_dir):
    llm = make_llm(tiny_model_dir, logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="raw_logits"):
        llm.beam_search([{"prompt_token_ids": [1, 2, 3]}], BeamSearchParams(beam_width=2, max_tokens=3))


def test_an_unknown_mode_is_a_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match="logprobs_mode"):
        make_llm(tiny_model_dir, logprobs_mode="logits")
