"""``SamplingParams(prompt_logprobs=k)``: each prompt token's logprob and rank plus the top k, as vLLM returns them.

References are independent: transformers' logits at every prompt position (the committed parity fixtures, made by
``tests/fixtures/make_fixtures.py``) through a float64 numpy log-softmax, and a pure-jnp log-softmax of the whole
logits matrix for the chunked device reduction.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.core.step_io import ScheduledRequest
from jaxllm.request import Request
from jaxllm.runner.prompt_logprobs import PROMPT_LOGPROB_CHUNK, compute_prompt_logprobs, prompt_logprob_width
from tests.models.test_parity import expected, fixture_prompts

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
MAX_ABS_ERROR = 1e-4  # the parity tests' float32 logit tolerance
NUM_TOP = 3


def reference_logprobs(data, index: int) -> np.ndarray:
    """transformers' log-softmax ``[L, V]`` of prompt ``index`` (row j: the distribution of token j + 1)."""
    offsets = data["logit_offsets"]
    logits = data["logits"][offsets[index] : offsets[index + 1]].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def check_against_transformers(prompt, prompt_logprobs, reference, num_top):
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        token, row, entry = prompt[position], reference[position - 1], prompt_logprobs[position]
        assert next(iter(entry)) == token, "the prompt token comes first"
        assert abs(entry[token].logprob - row[token]) < MAX_ABS_ERROR
        assert entry[token].rank == 1 + int((row > row[token]).sum())
        top = np.argsort(-row)[:num_top]
        assert set(entry) == set(top.tolist()) | {token}
        for rank, top_id in enumerate(top, start=1):
            assert entry[top_id].rank == rank and abs(entry[top_id].logprob - row[top_id]) < MAX_ABS_ERROR


def engine(**options) -> LLM:
    defaults = dict(dtype="float32", max_model_len=256, num_gpu_blocks_override=64, skip_tokenizer_init=True)
    return LLM(model=str(FIXTURES / "models" / "llama"), **{**defaults, **options})


@pytest.fixture(scope="module")
def chunked():
    """Prompts of up to 40 tokens under a 16-token step budget: most are prefilled over several steps."""
    return engine(max_num_batched_tokens=16)


@pytest.mark.parametrize("budget", [16, 64])
def test_prompt_logprobs_match_transformers_whole_or_chunked(chunked, budget):
    data = expected("llama")
    prompts = fixture_prompts(data)
    llm = chunked if budget == 16 else engine(max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=NUM_TOP)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        check_against_transformers(prompt, output.prompt_logprobs, reference_logprobs(data, index), NUM_TOP)
        assert output.outputs[0].token_ids == data["greedy_token_ids"][index, :4].tolist()  # sampling unchanged


def test_only_requests_that_ask_get_them_and_zero_means_the_prompt_token_alone(chunked):
    data = expected("llama")
    prompts = fixture_prompts(data)[:2]
    asks = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    first, second = chunked.generate([{"prompt_token_ids": p} for p in prompts], [asks, plain], use_tqdm=False)
    assert second.prompt_logprobs is None
    assert [list(entry) for entry in first.prompt_logprobs[1:]] == [[token] for token in prompts[0][1:]]
    reference = reference_logprobs(data, 0)
    for position in range(1, len(prompts[0])):
        got = first.prompt_logprobs[position][prompts[0][position]]
        assert abs(got.logprob - reference[position - 1, prompts[0][position]]) < MAX_ABS_ERROR


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs_as_in_vllm(chunked):
    data = expected("llama")
    prompt = fixture_prompts(data)[3]  # 40 tokens: several full blocks to cache
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    chunked.generate([{"prompt_token_ids": prompt}], plain, use_tqdm=False)
    assert chunked.generate([{"prompt_token_ids": prompt}], plain, use_tqdm=False)[0].num_cached_tokens > 0
    asks = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=NUM_TOP, n=2)
    output = chunked.generate([{"prompt_token_ids": prompt}], asks, use_tqdm=False)[0]
    assert output.num_cached_tokens == 0 and len(output.outputs) == 2
    check_against_transformers(prompt, output.prompt_logprobs, reference_logprobs(data, 3), NUM_TOP)


def test_preempted_requests_and_a_one_token_prompt_get_complete_prompt_logprobs():
    """Too few blocks: requests are preempted and recomputed from the start, rewriting their prompt logprobs."""
    data = expected("llama")
    prompts = fixture_prompts(data)
    llm = engine(max_num_batched_tokens=16, num_gpu_blocks_override=24, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=NUM_TOP)
    outputs = llm.generate([{"prompt_token_ids": p} for p in [*prompts, prompts[0][:1]]], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=False)):
        check_against_transformers(prompt, output.prompt_logprobs, reference_logprobs(data, index), NUM_TOP)
        assert output.outputs[0].token_ids[:16] == data["greedy_token_ids"][index].tolist()  # transformers' 16
    assert outputs[-1].prompt_logprobs == [None] and len(outputs[-1].outputs[0].token_ids) == 20


def test_decoded_tokens_come_from_the_tokenizer():
    data = expected("llama")
    llm = engine(max_num_batched_tokens=64, skip_tokenizer_init=False)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    output = llm.generate([str(data["text_prompts"][0])], params, use_tqdm=False)[0]
    assert len(output.prompt_logprobs) == len(output.prompt_token_ids) > 2
    for entry in output.prompt_logprobs[1:]:
        for token_id, logprob in entry.items():
            assert logprob.decoded_token == tokenizer.decode([token_id])


def test_chunked_device_reduction_matches_a_whole_log_softmax():
    """More tokens than one lm_head chunk and not a multiple of it; targets of -1 (none wanted) mixed in."""
    num_tokens, hidden_size, vocab, num_top = 2 * PROMPT_LOGPROB_CHUNK + 88, 16, 300, 5
    keys = jax.random.split(jax.random.key(7), 3)
    hidden = jax.random.normal(keys[0], (num_tokens, hidden_size), jnp.float32)
    head = jax.random.normal(keys[1], (hidden_size, vocab), jnp.float32)
    targets = jax.random.randint(keys[2], (num_tokens,), -1, vocab)
    got = jax.jit(compute_prompt_logprobs, static_argnums=(0, 3))(lambda h: h @ head, hidden, targets, num_top)
    logprobs = np.asarray(jax.nn.log_softmax(hidden @ head, axis=-1))
    wanted = np.asarray(targets) >= 0
    rows = np.arange(num_tokens)[wanted]
    target_logprob = logprobs[rows, np.asarray(targets)[wanted]]
    np.testing.assert_allclose(np.asarray(got.target_logprob)[wanted], target_logprob, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(got.target_rank)[wanted], 1 + (logprobs[rows] > target_logprob[:, None]).sum(-1)
    )
    np.testing.assert_array_equal(np.asarray(got.top_token_ids), np.argsort(-logprobs, axis=-1)[:, :num_top])
    np.testing.assert_allclose(np.asarray(got.top_logprobs), -np.sort(-logprobs, axis=-1)[:, :num_top], atol=1e-5)


def test_only_prompt_chunks_run_the_prompt_logprob_program():
    """A request's decode steps (and the chunk holding only its last prompt token) need no prompt logprob: the step
    runs the plain forward program; a mid-prompt chunk asks for the bucketed top-k width."""
    request = Request("r", list(range(10)), SamplingParams(prompt_logprobs=3))
    plain = Request("p", list(range(10)), SamplingParams())
    assert prompt_logprob_width([ScheduledRequest(request, 4, 4, False)]) == 5
    assert prompt_logprob_width([ScheduledRequest(request, 9, 1, True), ScheduledRequest(plain, 0, 8, False)]) is None
    assert prompt_logprob_width([ScheduledRequest(request, 12, 1, True)]) is None
    two_tokens = Request("z", [1, 2], SamplingParams(prompt_logprobs=0))
    assert prompt_logprob_width([ScheduledRequest(two_tokens, 0, 2, True)]) == 0  # the prompt token's logprob only
