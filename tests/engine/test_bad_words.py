"""``SamplingParams(bad_words=[...])`` as vLLM applies them: a word's token sequence is never completed.

Units: the ids banned at a step against a brute-force reference (a token is banned exactly when appending it makes the
output end with one of the sequences); a word's sequences against the tokenizer's own encodings.
Engine (the fixture Llama with its tokenizer; greedy with every token's raw logprob, ``max_logprobs=-1``): each
step's token is the argmax of that step's raw distribution over the ids the reference leaves, given the tokens before
it; no output holds a banned sequence; the ban changes the greedy tokens; scheduled ahead (a batch, the default) and
one step at a time give the same tokens.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.bad_words import bad_words_token_ids, banned_token_ids
from tests.engine.conftest import LLAMA, raw_distributions
from tests.models.test_parity import expected


def reference_banned(sequences, output, vocab_size) -> set[int]:
    """Every token whose appending makes ``output`` end with one of ``sequences``."""
    return {
        t for t in range(vocab_size) for s in sequences if len(output) + 1 >= len(s) and (output + [t])[-len(s) :] == s
    }


def test_banned_ids_equal_a_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):  # a 6-token alphabet, so outputs often end with a sequence's prefix
        sequences = [tuple(rng.integers(0, 6, rng.integers(1, 4)).tolist()) for _ in range(rng.integers(1, 4))]
        output = rng.integers(0, 6, rng.integers(0, 6)).tolist()
        got = banned_token_ids(sequences, output)
        assert len(got) == len(set(got))
        assert set(got) == reference_banned([list(s) for s in sequences], output, 6)
        prompt = rng.integers(0, 6, rng.integers(1, 4)).tolist()  # prompt tokens never count as outputs
        assert set(banned_token_ids(sequences, prompt + output, len(prompt))) == set(got)


def test_a_word_becomes_its_tokens_with_and_without_a_leading_space():
    tokenizer = LLM(model=LLAMA, dtype="float32", max_model_len=64, num_gpu_blocks_override=8).get_tokenizer()
    for word in ["the", "  the", "Paris", "capital", "hello world"]:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        want = [bare] + ([spaced] if len(spaced) == len(bare) and spaced[0] != bare[0] else [])
        assert bad_words_token_ids([word], tokenizer) == want
    assert bad_words_token_ids(["the"], tokenizer) == [(348,), (263,)]  # both single tokens: both banned always


@pytest.fixture(scope="module")
def llm():
    return LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=64, max_logprobs=-1)


def contains(tokens: list[int], sequence: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i : i + len(sequence)]) == sequence for i in range(len(tokens) - len(sequence) + 1))


def biting_words(tokenizer, greedy: list[list[int]]) -> tuple[str, str]:
    """A word of several tokens and one of a single token, each of which a greedy output contains (after its first
    token, so the engine must ban it mid-generation)."""
    multi = single = None
    for tokens in greedy:
        for start in range(1, len(tokens) - 1):
            for length in (1, 2, 3):
                word = tokenizer.decode(tokens[start : start + length])
                if not word.strip():
                    continue
                sequences = bad_words_token_ids([word], tokenizer)
                if not any(contains(tokens[1:], s) for s in sequences):
                    continue
                if length == 1 and all(len(s) == 1 for s in sequences):
                    single = single or word
                elif length > 1 and all(len(s) > 1 for s in sequences):
                    multi = multi or word
    assert multi and single, "no word of the greedy outputs re-encodes to its own tokens"
    return multi, single


def test_greedy_with_bad_words_takes_the_best_token_not_completing_one(llm):
    tokenizer, vocab_size = llm.get_tokenizer(), llm.llm_engine.model_config.vocab_size
    prompts = list(expected("llama")["text_prompts"])
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=vocab_size)
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    multi, single = biting_words(tokenizer, greedy)
    for words in ([multi], [single], [multi, single]):
        sequences = bad_words_token_ids(words, tokenizer)
        outputs = llm.generate(prompts, plain.clone(bad_words=words), use_tqdm=False)  # a batch: scheduled ahead
        changed = 0
        for output, plain_tokens in zip(outputs, greedy, strict=True):
            completion = output.outputs[0]
            tokens, raw = completion.token_ids, raw_distributions(completion, vocab_size)
            for step, token in enumerate(tokens):
                allowed = raw[step].copy()
                allowed[list(reference_banned([list(s) for s in sequences], tokens[:step], vocab_size))] = -np.inf
                assert token == int(allowed.argmax()), (words, step)
            assert not any(contains(tokens, s) for s in sequences)
            changed += tokens != plain_tokens
        assert changed, f"bad_words={words} changed no greedy output"


def test_bad_words_scheduled_ahead_equal_one_step_at_a_time(llm):
    prompts = list(expected("llama")["text_prompts"])
    tokenizer = llm.get_tokenizer()
    multi, single = biting_words(tokenizer, [o.outputs[0].token_ids for o in llm.generate(prompts, use_tqdm=False)])
    sampled = SamplingParams(temperature=0.9, seed=3, max_tokens=16, ignore_eos=True)
    params = [sampled.clone(bad_words=[multi]), sampled, sampled.clone(bad_words=[single], seed=4)]
    params = (params * len(prompts))[: len(prompts)]
    sync = LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=64, async_scheduling=False)
    ahead = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert ahead == [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)]


def test_a_word_encoding_outside_the_vocabulary_is_rejected_and_engine_recovers(llm, monkeypatch):
    """A tokenizer with more ids than the model (added tokens) could encode a word past the vocabulary."""
    monkeypatch.setattr("jaxllm.engine.llm_engine.bad_words_token_ids", lambda words, tokenizer: [(5, 600)])
    params = SamplingParams(temperature=0.0, max_tokens=3, bad_words=["word"])
    with pytest.raises(ValueError, match="SamplingParams.bad_words encodes to token id 600, outside the vocabulary"):
        llm.generate(["Hello"], params, use_tqdm=False)
    monkeypatch.undo()
    assert len(llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0].token_ids) == 3
