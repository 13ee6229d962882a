"""``LLM.beam_search(prompts, BeamSearchParams(...))`` as vLLM runs it.

With the fixture Llama: a width-1 search without EOS is greedy decoding; wider searches return exactly the beams of a
reference search written here over each beam's full next-token distribution (numpy, the 2 * width best tokens of a
beam as its candidates, scores by length-normalised logprob); every returned beam's cumulative logprob equals the sum
of its tokens' logprobs rescored through the prompt-logprob path; bad parameters are errors naming the value.
"""

import collections
import json
import shutil

import numpy as np
import pytest

from jaxllm import LLM, BeamSearchParams, SamplingParams
from jaxllm.beam_search import beam_score
from tests.engine.conftest import LLAMA

PROMPTS = ["The capital of France is", {"prompt_token_ids": [5, 6, 7, 8]}]


@pytest.fixture(scope="module")
def llm():
    return LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=128, max_logprobs=-1)


def next_token_logprobs(llm, sequences: list[list[int]]) -> np.ndarray:
    """[len(sequences), V] log-softmax of the model's next-token logits after each sequence."""
    vocab_size = llm.llm_engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=vocab_size)
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    rows = np.full((len(sequences), vocab_size), np.nan)
    for row, output in enumerate(outputs):
        for token, logprob in output.outputs[0].logprobs[0].items():
            rows[row, token] = logprob.logprob
    assert not np.isnan(rows).any()
    return rows


def reference_beam_search(llm, prompt_ids, width, max_tokens, length_penalty, ignore_eos):
    """Beams as (tokens, cum_logprob), best first: each round a beam's children are its 2 * width most likely tokens
    (ties aside, the sampled greedy token is one of them); EOS children complete."""
    eos = llm.llm_engine.eos_token_ids

    def score(beam):
        tokens, cum = beam
        return cum / (len(tokens) - (tokens[-1] in eos)) ** length_penalty  # a final EOS does not count

    live, done = [(list(prompt_ids), 0.0)], []
    for _ in range(max_tokens):
        if not live:
            break
        logprobs = next_token_logprobs(llm, [tokens for tokens, _ in live])
        children = []
        for (tokens, cum), row in zip(live, logprobs, strict=True):
            for token in np.argsort(-row, kind="stable")[: 2 * width]:
                child = (tokens + [int(token)], cum + float(row[token]))
                (done if int(token) in eos and not ignore_eos else children).append(child)
        live = sorted(children, key=score, reverse=True)[:width]
    return sorted(done + live, key=score, reverse=True)[:width]


@pytest.fixture(scope="module")
def eos_llm(llm, tmp_path_factory):
    """The fixture Llama with the token its beams generate most often as a second EOS id (generation_config.json),
    so beams complete within a few rounds and compete with longer ones in the final ranking, where the length
    penalty matters (the fixture's own EOS never ranks high enough)."""
    searched = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))
    generated = [t for output in searched for beam in output.sequences for t in beam.tokens[-5:]]
    frequent = collections.Counter(generated).most_common(1)[0][0]
    directory = tmp_path_factory.mktemp("eos-llama")
    shutil.copytree(LLAMA, directory, dirs_exist_ok=True)
    config = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [1, frequent]}))
    eos_llm = LLM(
        model=str(directory), dtype="float32", max_model_len=256, num_gpu_blocks_override=128, max_logprobs=-1
    )
    assert eos_llm.llm_engine.eos_token_ids == {1, frequent}
    return eos_llm


def test_width_one_without_eos_is_greedy_decoding(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=7, ignore_eos=True))
    for output, searched in zip(greedy, beams, strict=True):
        (beam,) = searched.sequences
        assert beam.tokens == output.prompt_token_ids + output.outputs[0].token_ids
        assert beam.text == output.outputs[0].text and beam.finish_reason == "length"


@pytest.mark.parametrize(
    "width, length_penalty, ignore_eos", [(3, 1.0, False), (2, 0.0, True), (4, 2.0, False), (3, 0.0, False)]
)
def test_beams_equal_a_full_distribution_reference(eos_llm, width, length_penalty, ignore_eos):
    params = BeamSearchParams(beam_width=width, max_tokens=5, length_penalty=length_penalty, ignore_eos=ignore_eos)
    tokenizer, eos = eos_llm.get_tokenizer(), eos_llm.llm_engine.eos_token_ids
    results = eos_llm.beam_search(PROMPTS, params)
    if not ignore_eos and length_penalty <= 1.0:  # completed (shorter) beams are among the best
        assert any(b.tokens[-1] in eos and b.finish_reason == "stop" for r in results for b in r.sequences)
    for prompt, searched in zip(PROMPTS, results, strict=True):
        prompt_ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else tokenizer.encode(prompt)
        want = reference_beam_search(eos_llm, prompt_ids, width, 5, length_penalty, ignore_eos)
        assert [b.tokens for b in searched.sequences] == [tokens for tokens, _ in want]
        # float32 logprobs of the same tokens from batches of other shapes: equal to ~1e-6 per token
        np.testing.assert_allclose([b.cum_logprob for b in searched.sequences], [c for _, c in want], atol=1e-4)
        assert len({tuple(b.tokens) for b in searched.sequences}) == width


def test_concurrency_limit_searches_prompts_in_groups_with_the_same_beams(llm):
    """vLLM's ``concurrency_limit``: the prompts go through the search a group at a time, in order; each prompt's
    beams are those of one search over all of them."""
    prompts = [*PROMPTS, "Paris is the capital of"]
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    together = llm.beam_search(prompts, params)
    one_at_a_time = llm.beam_search(prompts, params, concurrency_limit=1)
    in_twos = llm.beam_search(prompts, params, use_tqdm=False, concurrency_limit=2)
    for grouped in (one_at_a_time, in_twos):
        assert [[b.tokens for b in o.sequences] for o in grouped] == [[b.tokens for b in o.sequences] for o in together]
    for bad, error_type in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error_type, match=f"concurrency_limit must be a positive int or None, got {bad!r}"):
            llm.beam_search(prompts, params, concurrency_limit=bad)
    with pytest.raises(ValueError, match="LoRA adapters are not supported"):
        llm.beam_search(prompts, params, lora_request=object())


def test_cumulative_logprobs_equal_the_rescored_sequences(llm):
    searched = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6))
    for prompt, output in zip(PROMPTS, searched, strict=True):
        num_prompt = len(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else None
        for beam in output.sequences:
            start = num_prompt or len(beam.tokens) - len(beam.logprobs)
            rescored = llm.generate(
                [{"prompt_token_ids": beam.tokens}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
            )[0].prompt_logprobs
            total = sum(rescored[i][beam.tokens[i]].logprob for i in range(start, len(beam.tokens)))
            assert beam.cum_logprob == pytest.approx(total, abs=1e-4)
            assert len(beam.logprobs) == len(beam.tokens) - start


def test_beams_end_at_max_model_len():
    short = LLM(model=LLAMA, dtype="float32", max_model_len=12, num_gpu_blocks_override=32)
    (output,) = short.beam_search(
        [{"prompt_token_ids": list(range(5, 14))}], BeamSearchParams(beam_width=3, max_tokens=8)
    )
    assert len(output.sequences) == 3
    assert all(len(b.tokens) <= 12 and (b.finish_reason == "length") == (len(b.tokens) == 12) for b in output.sequences)
    assert any(len(b.tokens) == 12 for b in output.sequences)


def test_score_is_the_cumulative_logprob_over_the_length_without_a_final_eos():
    assert beam_score([5, 6, 7, 1], -3.0, {1}, 1.0) == pytest.approx(-1.0)  # vLLM's get_beam_search_score
    assert beam_score([5, 6, 1, 7], -3.0, {1}, 1.0) == pytest.approx(-0.75)
    assert (
        beam_score([5, 6, 7, 1], -3.0, {1}, 2.0) == pytest.approx(-3.0 / 9)
        and beam_score([5, 1], -3.0, {1}, 0.0) == -3.0
    )


def test_bad_beam_search_parameters_are_rejected():
    for kwargs, error, message in [
        ({"beam_width": 0, "max_tokens": 4}, ValueError, "beam_width must be an int of at least 1, got 0"),
        ({"beam_width": 2, "max_tokens": 2.5}, TypeError, "max_tokens must be an int of at least 1, got 2.5"),
        ({"beam_width": "2", "max_tokens": 4}, TypeError, "beam_width must be an int of at least 1, got '2'"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": "1"}, TypeError, "length_penalty must be"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, ValueError, "temperature must be non-negative"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, ValueError, "length_penalty must be"),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": "no"}, TypeError, "ignore_eos must be a bool, got 'no'"),
    ]:
        with pytest.raises(error, match=message) as info:
            BeamSearchParams(**kwargs)
        assert type(info.value) is error


def test_a_width_past_max_logprobs_is_rejected_and_the_engine_serves_on():
    capped = LLM(model=LLAMA, dtype="float32", max_model_len=64, num_gpu_blocks_override=32)  # max_logprobs 20
    with pytest.raises(ValueError, match="beam_width=11 needs each round's top 22 logprobs, more than the engine's "
                       "max_logprobs=20"):  # fmt: skip
        capped.beam_search(PROMPTS, BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="prompt 1: 64 tokens leave no room to generate under max_model_len=64"):
        capped.beam_search([PROMPTS[1], {"prompt_token_ids": [3] * 64}], BeamSearchParams(beam_width=2, max_tokens=2))
    with pytest.raises(TypeError, match="params must be BeamSearchParams, got SamplingParams"):
        capped.beam_search(PROMPTS, SamplingParams())
    assert len(capped.beam_search(PROMPTS, BeamSearchParams(beam_width=10, max_tokens=2))[0].sequences) == 10
