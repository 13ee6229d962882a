"""Bad input gets a clear ValueError/TypeError naming the value, and the engine then serves other requests."""

import pathlib

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from tests.engine.conftest import TINY_CONFIG, make_llm, random_token_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(llm):
    prompts = random_token_prompts(3, [5, 9, 30], seed=11)
    return prompts, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def still_serves(llm, reference):
    prompts, expected = reference
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "bad_prompt, error, fragment",
    [
        ({"prompt_token_ids": []}, ValueError, "empty"),
        ({"prompt_token_ids": [1, 2, 999]}, ValueError, "999"),
        ({"prompt_token_ids": [1, -4]}, ValueError, "-4"),
        ({"prompt_token_ids": [1] * 300}, ValueError, "300"),
        ({"prompt_token_ids": "abc"}, TypeError, "str"),
        (42, TypeError, "int"),
        ("text without a tokenizer", ValueError, "tokenizer"),
    ],
)
def test_bad_prompt_in_a_batch_is_rejected_and_engine_recovers(llm, reference, bad_prompt, error, fragment):
    good = random_token_prompts(2, [4, 7], seed=5)
    with pytest.raises(error) as info:
        llm.generate([good[0], bad_prompt, good[1]], GREEDY, use_tqdm=False)
    assert fragment in str(info.value)
    still_serves(llm, reference)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -3, "top_k"),
        ("min_p", 1.2, "min_p"),
        ("max_tokens", 0, "max_tokens"),
        ("min_tokens", -1, "min_tokens"),
        ("n", 0, "n"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("logprobs", -2, "logprobs"),
        ("prompt_logprobs", -2, "prompt_logprobs"),
        ("stop", [""], "stop"),
        ("stop_token_ids", [-2], "stop_token_ids"),
        ("truncate_prompt_tokens", 0, "truncate_prompt_tokens"),
        ("truncate_prompt_tokens", -2, "truncate_prompt_tokens"),
        ("seed", 2**64, "seed"),
        ("seed", -(2**63) - 1, "seed"),
    ],
)
def test_invalid_sampling_params_name_field_and_value(field, value, fragment):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    offending = repr(value[0]) if isinstance(value, list) else str(value)
    assert fragment in message and offending in message


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprob_counts_that_are_not_ints_are_a_type_error_naming_them(field):
    with pytest.raises(TypeError, match=rf"SamplingParams.{field} must be an int, got '3'"):
        SamplingParams(**{field: "3"})


@pytest.mark.parametrize("field, value", [("stop", 5), ("stop_token_ids", 7), ("stop_token_ids", "12")])
def test_stop_fields_that_are_not_lists_are_a_type_error_naming_them(field, value):
    with pytest.raises(TypeError, match=rf"SamplingParams.{field} must be a list, got {value!r}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sampling_numbers_are_rejected_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams.{field} must be finite, got {value!r}"):
        SamplingParams(**{field: value})


def test_numpy_scalars_are_taken_as_the_numbers_they_hold():
    """As vLLM accepts them: numpy ints and floats (also inside the token-id lists and logit_bias) become Python
    numbers, so a params object built from numpy values equals one built from Python values; numpy bools do not."""
    from_numpy = SamplingParams(
        n=np.int64(2),
        temperature=np.float32(0.5),
        top_k=np.int32(7),
        max_tokens=np.int64(5),
        seed=np.uint32(9),
        logprobs=np.int16(1),
        stop_token_ids=[np.int64(3)],
        allowed_token_ids=(np.int32(4), np.int32(5)),
        logit_bias={np.int64(4): np.float64(1.5)},
    )
    plain = SamplingParams(
        n=2,
        temperature=0.5,
        top_k=7,
        max_tokens=5,
        seed=9,
        logprobs=1,
        stop_token_ids=[3],
        allowed_token_ids=[4, 5],
        logit_bias={4: 1.5},
    )
    assert from_numpy == plain
    assert type(from_numpy.max_tokens) is int and type(from_numpy.temperature) is float
    assert all(type(t) is int for t in from_numpy.stop_token_ids + from_numpy.allowed_token_ids)
    with pytest.raises(TypeError, match="max_tokens must be an int, got np.True_"):
        SamplingParams(max_tokens=np.bool_(True))


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError) as info:
        SamplingParams(min_tokens=9, max_tokens=3)
    assert "9" in str(info.value) and "3" in str(info.value)


def test_non_numeric_sampling_field_is_type_error():
    with pytest.raises(TypeError) as info:
        SamplingParams(temperature="hot")
    assert "hot" in str(info.value)


def test_prompt_that_fills_max_model_len_is_rejected(llm, reference):
    with pytest.raises(ValueError) as info:  # max_model_len=256: no room for a token (past it, max_tokens is capped)
        llm.generate({"prompt_token_ids": [3] * 256}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert "256 tokens" in str(info.value) and "max_model_len=256" in str(info.value)
    still_serves(llm, reference)


def test_wrong_number_of_sampling_params(llm, reference):
    with pytest.raises(ValueError) as info:
        llm.generate(random_token_prompts(2, [3, 4]), [GREEDY] * 3, use_tqdm=False)
    assert "3" in str(info.value) and "2" in str(info.value)
    still_serves(llm, reference)


def test_sampling_params_that_are_not_params_or_a_list_are_a_type_error(llm, reference):
    with pytest.raises(TypeError, match="sampling_params must be SamplingParams or a list of them.*dict"):
        llm.generate(random_token_prompts(1, [3]), {"max_tokens": 3}, use_tqdm=False)
    still_serves(llm, reference)


def test_priority_needs_one_value_per_prompt(llm, reference):
    with pytest.raises(ValueError, match="priority has 1 values for 2 prompts"):
        llm.generate(random_token_prompts(2, [3, 4]), GREEDY, use_tqdm=False, priority=[0])
    still_serves(llm, reference)


def test_missing_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError) as info:
        LLM(model=missing)
    assert missing in str(info.value)


def test_a_pathlib_model_path_is_a_path_and_a_number_is_a_type_error(tiny_model_dir):
    """``LLM(model=pathlib.Path(...))`` loads as its string does; a model that is no path is a TypeError naming it."""
    engine = make_llm(pathlib.Path(tiny_model_dir)).llm_engine
    assert engine.config.model == str(tiny_model_dir)
    with pytest.raises(TypeError, match="model must be a path string or None, got int"):
        make_llm(5)


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}')
    with pytest.raises(ValueError) as info:
        LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message


def test_invalid_engine_option_names_it(tiny_model_dir):
    with pytest.raises(ValueError) as info:
        make_llm(tiny_model_dir, gpu_memory_utilization=1.5)
    assert "gpu_memory_utilization" in str(info.value) and "1.5" in str(info.value)


@pytest.mark.parametrize(
    "field, value, error_type",
    [
        ("max_num_seqs", "8", TypeError),
        ("max_num_seqs", 0, ValueError),
        ("block_size", 16.0, TypeError),
        ("tensor_parallel_size", -2, ValueError),
        ("gpu_memory_utilization", "0.9", TypeError),
        ("gpu_memory_utilization", 0.0, ValueError),
        ("seed", "7", TypeError),
        ("max_logprobs", 2.5, TypeError),
        ("max_logprobs", -3, ValueError),
        ("quantization_group_size", "64", TypeError),
    ],
)
def test_engine_options_of_a_wrong_type_are_type_errors_and_out_of_range_ones_value_errors(field, value, error_type):
    """Checked as ``EngineConfig`` is built, before anything loads; the message names the option and the value."""
    with pytest.raises(error_type) as info:
        EngineConfig(model="/m", **{field: value})
    assert type(info.value) is error_type
    assert field in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("field, value", [("logprobs", 21), ("prompt_logprobs", 64)])
def test_more_logprobs_than_max_logprobs_are_rejected_and_engine_recovers(llm, reference, field, value):
    """vLLM's cap (``max_logprobs``, default 20) on the top-k a request may ask for."""
    good = random_token_prompts(2, [4, 7], seed=5)
    params = [GREEDY, SamplingParams(max_tokens=2, **{field: value})]
    with pytest.raises(ValueError, match=rf"SamplingParams.{field}={value} is more than the engine's max_logprobs=20"):
        llm.generate(good, params, use_tqdm=False)
    still_serves(llm, reference)


def test_max_logprobs_minus_one_lifts_the_cap_and_bad_values_are_rejected(tiny_model_dir):
    uncapped = make_llm(tiny_model_dir, max_logprobs=-1)
    params = SamplingParams(max_tokens=1, logprobs=40, prompt_logprobs=30)
    output = uncapped.generate(random_token_prompts(1, [5], seed=2), params, use_tqdm=False)[0]
    assert len(output.outputs[0].logprobs[0]) >= 40 and all(len(e) >= 30 for e in output.prompt_logprobs[1:])
    with pytest.raises(ValueError, match="max_logprobs must be an int >= 0, or -1 for no cap, got -2"):
        make_llm(tiny_model_dir, max_logprobs=-2)


def test_minus_one_logprobs_are_the_whole_vocabulary_and_need_the_cap_lifted(tiny_model_dir, llm, reference):
    prompts = random_token_prompts(2, [5, 9], seed=3)
    every = SamplingParams(temperature=0.0, max_tokens=3, logprobs=-1, prompt_logprobs=-1)
    uncapped = make_llm(tiny_model_dir, max_logprobs=-1)
    got = uncapped.generate(prompts, every, use_tqdm=False)
    assert every.logprobs == every.prompt_logprobs == -1  # the engine resolved a copy
    vocab = TINY_CONFIG["vocab_size"]
    want = uncapped.generate(prompts, every.clone(logprobs=vocab, prompt_logprobs=vocab), use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == w.outputs[0].logprobs and g.prompt_logprobs == w.prompt_logprobs
        assert all(len(entry) == vocab for entry in g.outputs[0].logprobs)
    with pytest.raises(ValueError, match=f"logprobs=-1 asks for all {vocab} tokens' logprobs, more than .*=20"):
        llm.generate(prompts, SamplingParams(logprobs=-1), use_tqdm=False)
    still_serves(llm, reference)


@pytest.mark.parametrize(
    "params, error, fragment",
    [
        (dict(allowed_token_ids=[]), ValueError, "must not be empty"),
        (dict(allowed_token_ids=[3, -1]), ValueError, "-1"),
        (dict(allowed_token_ids=5), TypeError, "allowed_token_ids must be a list, got 5"),
        (dict(logit_bias={4: float("inf")}), ValueError, "logit_bias[4]"),
        (dict(logit_bias={"4": 1.0}), TypeError, "'4'"),
        (dict(logit_bias={-4: 1.0}), ValueError, "-4"),
        (dict(logit_bias={4: "1"}), TypeError, "logit_bias[4] must be a finite number, got '1'"),
        (dict(logit_bias=[(4, 1.0)]), TypeError, "logit_bias must be a dict"),
        (dict(bad_words="word"), TypeError, "bad_words must be a list, got 'word'"),
        (dict(bad_words=["ok", "  "]), ValueError, "bad_words must hold non-blank strings, got '  '"),
        (dict(bad_words=[7]), TypeError, "got 7"),
        (dict(allowed_token_ids=[3, 1.5]), TypeError, "got 1.5"),
        (dict(stop=["ok", 7]), TypeError, "stop must hold non-empty strings, got 7"),
        (dict(stop=[" "]), None, None),
        (dict(stop_token_ids=[2, "3"]), TypeError, "stop_token_ids must hold non-negative ints, got '3'"),
        (dict(ignore_eos=None), TypeError, "ignore_eos must be a bool, got None"),
        (dict(include_stop_str_in_output=1), TypeError, "include_stop_str_in_output must be a bool, got 1"),
    ],
)
def test_invalid_token_lists_and_words_name_the_value(params, error, fragment):
    """A list element of the wrong type is a ``TypeError``, one of the right type out of range a ``ValueError``
    (``None``: a valid value, here to show where the line runs)."""
    if error is None:
        SamplingParams(**params)
        return
    with pytest.raises(error) as info:
        SamplingParams(**params)
    assert type(info.value) is error
    assert fragment in str(info.value)


@pytest.mark.parametrize("field, value", [("allowed_token_ids", [1, 300]), ("logit_bias", {2: 1.0, 256: -1.0})])
def test_token_ids_outside_the_vocabulary_are_rejected_and_engine_recovers(llm, reference, field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams.{field} names token id {max(value)}, outside the vocab"):
        llm.generate(random_token_prompts(1, [4]), SamplingParams(max_tokens=2, **{field: value}), use_tqdm=False)
    still_serves(llm, reference)


def test_bad_words_without_a_tokenizer_are_rejected_and_engine_recovers(llm, reference):
    with pytest.raises(ValueError, match=r"SamplingParams.bad_words=\['word'\] needs a tokenizer"):
        llm.generate(random_token_prompts(1, [4]), SamplingParams(max_tokens=2, bad_words=["word"]), use_tqdm=False)
    still_serves(llm, reference)


def test_detokenize_must_be_a_bool_and_stop_strings_need_it():
    with pytest.raises(TypeError, match="SamplingParams.detokenize must be a bool, got 'no'"):
        SamplingParams(detokenize="no")
    with pytest.raises(ValueError, match=r"SamplingParams.stop=\['END'\] needs detokenize=True"):
        SamplingParams(stop="END", detokenize=False)


@pytest.mark.parametrize(
    "method, args",
    [
        ("embed", (["a prompt"],)),
        ("encode", ([{"prompt_token_ids": [1, 2, 3]}],)),
        ("classify", (["a prompt"],)),
        ("score", ("a query", ["a document"])),
        ("reward", (["a prompt"],)),
    ],
)
def test_pooling_methods_are_a_value_error_naming_the_method(llm, reference, method, args):
    """vLLM raises ValueError when a generative model is asked to pool; a vLLM script gets that here too, not an
    AttributeError, and the engine keeps serving."""
    with pytest.raises(ValueError, match=rf"LLM\.{method}\(\) needs a pooling model"):
        getattr(llm, method)(*args, use_tqdm=False)
    still_serves(llm, reference)
