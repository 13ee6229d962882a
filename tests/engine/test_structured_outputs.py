"""``SamplingParams(structured_outputs=StructuredOutputsParams(...))`` as vLLM applies it: the output follows a grammar.

Units: the device-side bitmask against a numpy reference; the parameters' validation. Engine (the fixture Llama with
its byte-level BPE tokenizer, so a token's text is its bytes): with ``choice``, every step's finite logprobs are
exactly the tokens an independent reference allows (those whose text keeps the output a prefix of a choice, and EOS
once it is a choice) and greedy takes the best of them; sampled ``regex`` and ``json`` outputs match the regex and
the schema; ``n > 1`` samples each follow the grammar; a grammar row leaves its batch-mates' tokens unchanged; one
step at a time and scheduled ahead agree; bad grammars are ValueErrors and the engine serves on.
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from jaxllm.sampling.logits_processors import apply_token_bitmask
from tests.engine.conftest import LLAMA
from tests.sharding.helpers import NEEDS_8_DEVICES

PROMPTS = ["The capital of France is", "Hello, my name is", "One, two, three,"]
CHOICES = ["Paris", "London", "Berlin", "Par"]  # "Par" is a prefix of "Paris": EOS and more text both allowed there


def test_token_bitmask_keeps_exactly_the_set_bits():
    rng = np.random.default_rng(0)
    for vocab_size in (37, 64, 100):
        words = (vocab_size + 31) // 32
        bitmask = rng.integers(-(2**31), 2**31, size=(5, words), dtype=np.int64).astype(np.int32)
        bitmask[0] = -1  # a row without a grammar
        logits = rng.normal(size=(5, vocab_size)).astype(np.float32)
        bits = np.array([[(int(bitmask[s, t // 32]) >> (t % 32)) & 1 for t in range(vocab_size)] for s in range(5)])
        want = np.where(bits == 1, logits, -np.inf)
        np.testing.assert_array_equal(np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask))), want)
    with pytest.raises(ValueError, match="2 words cannot cover a vocabulary of 65"):
        apply_token_bitmask(jnp.zeros((1, 65)), jnp.zeros((1, 2), jnp.int32))


def test_structured_outputs_params_take_exactly_one_valid_kind():
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    assert StructuredOutputsParams(json='{"type": "object"}').grammar_spec() == ("json", '{"type": "object"}')
    assert (
        StructuredOutputsParams(json_object=True).grammar_spec()
        == StructuredOutputsParams(json={"type": "object"}).grammar_spec()
    )
    assert (
        StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True).grammar_spec()[0]
        == "json_compact"
    )
    assert GuidedDecodingParams is StructuredOutputsParams
    legacy = SamplingParams(guided_decoding=GuidedDecodingParams(regex="[a-z]+"))
    assert legacy.structured_outputs == StructuredOutputsParams(regex="[a-z]+") and legacy.guided_decoding is None
    bad = [
        ({}, ValueError, "exactly one of json, regex, choice, grammar, json_object, got none"),
        ({"regex": "a", "choice": ["a"]}, ValueError, r"got \['regex', 'choice'\]"),
        ({"json": "{not json"}, ValueError, "json is not valid JSON"),
        ({"json": 5}, TypeError, "json must be a dict or a JSON string, got 5"),
        ({"json": {"type": object}}, TypeError, "json is not JSON-serialisable"),
        ({"regex": ""}, ValueError, "regex must be a non-empty string, got ''"),
        ({"choice": "Paris"}, ValueError, "choice must be a non-empty list of strings, got 'Paris'"),
        ({"choice": ["a", ""]}, ValueError, "choice must hold non-empty strings"),
        ({"json_object": "yes"}, TypeError, "json_object must be a bool, got 'yes'"),
        ({"regex": "a", "disable_any_whitespace": 1}, TypeError, "disable_any_whitespace must be a bool, got 1"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs or guided_decoding"):
        SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a"), guided_decoding=GuidedDecodingParams(regex="b")
        )
    with pytest.raises(TypeError, match="must be a StructuredOutputsParams, got"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_many_rows_fill_in_parallel_as_one_by_one(llm):
    """From PARALLEL_MIN_ROWS grammar rows the masks come from llguidance's thread pool: the same bits as row by row."""
    from jaxllm.structured_output import PARALLEL_MIN_ROWS, StructuredOutputCompiler, fill_bitmasks

    tokenizer, vocab_size = llm.get_tokenizer(), llm.llm_engine.model_config.vocab_size
    compiler = StructuredOutputCompiler(tokenizer, vocab_size, frozenset({tokenizer.eos_token_id}))
    specs = [StructuredOutputsParams(choice=CHOICES), StructuredOutputsParams(regex="[a-z]{2,5}[0-9]?")]
    rows = []
    for row in range(2 * PARALLEL_MIN_ROWS):
        matcher = compiler.matcher(specs[row % 2])
        for token in tokenizer.encode(["Par", "Lon", "ab", "xyz1"][row % 4][: row % 3 + 1], add_special_tokens=False):
            matcher.accept(token)
        rows.append((row + 1, matcher))  # row 0 stays a row without a grammar
    serial = np.full((len(rows) + 1, rows[0][1].bitmask_width), -1, np.int32)
    for row, matcher in rows:
        matcher.fill_bitmask(serial[row])
    parallel = np.full_like(serial, -1)
    fill_bitmasks(rows, parallel)
    np.testing.assert_array_equal(parallel, serial)
    assert (serial[0] == -1).all() and len({serial[row].tobytes() for row, _ in rows}) > 2


@pytest.fixture(scope="module")
def llm():
    return LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=96, max_logprobs=-1)


def reference_allowed(tokenizer, output: list[int], vocab_size: int, eos: int) -> set[int]:
    """Tokens that keep the output's text a prefix of a choice (byte-level BPE: a token's text appends to the
    output's), and EOS once the text is a choice; computed from the tokenizer alone."""
    text = tokenizer.decode(output)
    allowed = {eos} if text in CHOICES else set()
    for token in range(vocab_size):
        piece = tokenizer.decode([token])
        if piece and token not in tokenizer.all_special_ids and any(c.startswith(text + piece) for c in CHOICES):
            allowed.add(token)
    return allowed


def masked_distributions(completion, vocab_size: int) -> np.ndarray:
    """[steps, V] logprobs of each step of ``completion`` (a full-vocabulary ``logprobs`` request); -inf where the
    grammar removed a token."""
    rows = np.full((len(completion.logprobs), vocab_size), np.nan)
    for step, entry in enumerate(completion.logprobs):
        for token, logprob in entry.items():
            rows[step, token] = logprob.logprob
    assert not np.isnan(rows).any()
    return rows


def test_greedy_choice_takes_the_best_token_the_grammar_allows(llm):
    tokenizer, vocab_size = llm.get_tokenizer(), llm.llm_engine.model_config.vocab_size
    eos = tokenizer.eos_token_id
    params = SamplingParams(
        temperature=0.0, max_tokens=12, logprobs=vocab_size, structured_outputs=StructuredOutputsParams(choice=CHOICES)
    )
    plain = llm.generate(PROMPTS, params.clone(structured_outputs=None), use_tqdm=False)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output, unconstrained in zip(outputs, plain, strict=True):
        completion = output.outputs[0]
        assert completion.text in CHOICES and completion.finish_reason == "stop"
        assert completion.text != unconstrained.outputs[0].text  # the grammar changed the greedy output
        logprobs = masked_distributions(completion, vocab_size)
        tokens = completion.token_ids
        for step, token in enumerate(tokens):
            allowed = reference_allowed(tokenizer, [t for t in tokens[:step]], vocab_size, eos)
            assert set(np.flatnonzero(np.isfinite(logprobs[step])).tolist()) == allowed, step
            assert token == int(np.argmax(logprobs[step])), step
        assert tokens[-1] == eos or eos not in tokens


def test_sampled_regex_json_and_n_samples_follow_their_grammars(llm):
    regex = r"[0-9]{2,4}-(yes|no)"
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    by_regex = SamplingParams(
        temperature=1.0, seed=1, max_tokens=24, structured_outputs=StructuredOutputsParams(regex=regex)
    )
    by_schema = SamplingParams(
        temperature=1.0,
        seed=2,
        max_tokens=40,
        structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
    )
    choices = SamplingParams(
        n=4, temperature=1.0, seed=3, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=CHOICES)
    )
    outputs = llm.generate(PROMPTS * 3, [by_regex] * 3 + [by_schema] * 3 + [choices] * 3, use_tqdm=False)
    for output in outputs[:3]:
        assert re.fullmatch(regex, output.outputs[0].text) and output.outputs[0].finish_reason == "stop"
    for output in outputs[3:6]:
        value = json.loads(output.outputs[0].text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
    texts = [c.text for output in outputs[6:] for c in output.outputs]
    assert len(texts) == 12 and set(texts) <= set(CHOICES) and len(set(texts)) > 1


def test_grammar_rows_leave_their_batch_mates_alone_and_ahead_equals_one_step_at_a_time(llm):
    plain = SamplingParams(temperature=0.8, seed=5, max_tokens=10, ignore_eos=True)
    structured = SamplingParams(
        temperature=0.8, seed=6, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=CHOICES)
    )
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    mixed = llm.generate(PROMPTS * 2, [plain] * 3 + [structured] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    sync = LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=96, async_scheduling=False)
    one_at_a_time = sync.generate(PROMPTS * 2, [plain] * 3 + [structured] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in one_at_a_time] == [o.outputs[0].token_ids for o in mixed]


def test_a_grammar_that_does_not_compile_is_rejected_and_the_engine_serves_on(llm):
    for spec, message in [
        (StructuredOutputsParams(regex="([a-z"), r"regex '\(\[a-z' does not compile"),
        (StructuredOutputsParams(json={"type": "objectx"}), "does not compile: .*objectx"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "does not compile"),
    ]:
        with pytest.raises(ValueError, match=message):
            llm.generate(PROMPTS, SamplingParams(max_tokens=4, structured_outputs=spec), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=12, structured_outputs=StructuredOutputsParams(choice=CHOICES))
    )
    assert out[0].outputs[0].text in CHOICES
    no_tokenizer = LLM(
        model=LLAMA, dtype="float32", max_model_len=64, num_gpu_blocks_override=8, skip_tokenizer_init=True
    )
    with pytest.raises(ValueError, match="structured_outputs=.* needs a tokenizer"):
        no_tokenizer.generate(
            [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]))
        )


@pytest.mark.parametrize(
    "mesh_options",
    [
        pytest.param({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, marks=NEEDS_8_DEVICES, id="tp2-pp2"),
        pytest.param({"data_parallel_size": 2}, marks=NEEDS_8_DEVICES, id="dp2"),
    ],
)
def test_mesh_engines_follow_grammars_as_one_device_does(llm, mesh_options):
    """TP 2 x PP 2 (two microbatches, each with its own bitmask rows) and two data-parallel replicas (each building
    its steps' masks on its own thread, 18 grammar rows: the thread pool) give the one-device engine's tokens."""
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=CHOICES)),
        SamplingParams(
            temperature=1.0, seed=7, max_tokens=16, structured_outputs=StructuredOutputsParams(regex="[a-z]{3,6}!")
        ),
        SamplingParams(temperature=0.8, seed=8, max_tokens=8, ignore_eos=True),
    ]
    mesh = LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=96, **mesh_options)
    prompts = PROMPTS * 9
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params * 9, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in mesh.generate(prompts, params * 9, use_tqdm=False)] == want
