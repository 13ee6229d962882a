"""A vLLM script runs unchanged: vLLM's engine arguments without a counterpart here are accepted (and checked),
those jaxllm cannot honour are ValueErrors naming them, ``enforce_eager`` turns CUDA graphs off, ``generate`` takes
``lora_request`` / ``priority`` and ``chat`` vLLM's template options; ``SamplingParams.output_kind`` streams as in
vLLM."""

import itertools
import logging

import pytest

from jaxllm import LLM, RequestOutputKind, SamplingParams, TextPrompt, TokensPrompt
from jaxllm.config import EngineConfig
from jaxllm.engine.vllm_arguments import DEFAULT_ONLY, NO_EFFECT, engine_arguments
from jaxllm.runner.xla_options import (
    EAGER_GPU_OPTIONS,
    NARROW_STEP_GPU_OPTIONS,
    NARROW_STEP_MAX_TOKENS,
    StepCompilerOptions,
    sampler_options,
)
from tests.engine.conftest import LLAMA, make_llm, random_token_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# What vLLM scripts pass beside the options jaxllm implements, each at a valid non-default value where one exists.
VLLM_SCRIPT_ARGUMENTS = dict(
    trust_remote_code=True,
    swap_space=8,
    download_dir="/tmp/unused",
    hf_token="unused",
    disable_custom_all_reduce=True,
    max_seq_len_to_capture=8192,
    compilation_config={"level": 3},
    distributed_executor_backend="mp",
    cpu_offload_gb=0,
    revision=None,
    tokenizer_revision=None,
    code_revision=None,
    tokenizer_mode="auto",
    hf_overrides={},
    disable_async_output_proc=True,
    max_parallel_loading_workers=4,
    tokenizer_pool_size=0,
    use_v2_block_manager=True,
    max_loras=2,
    max_lora_rank=32,
    task="generate",
    runner="generate",
    convert="none",
    model_impl="vllm",
    enable_lora=False,
    speculative_config=None,
    kv_transfer_config=None,
    limit_mm_per_prompt={},
    mm_processor_kwargs=None,
    scheduling_policy="fcfs",
    num_scheduler_steps=1,
    preemption_mode="recompute",
)


def test_a_vllm_scripts_engine_arguments_are_accepted_and_change_nothing(tiny_model_dir):
    prompts = random_token_prompts(3, [5, 9, 30], seed=4)
    plain = make_llm(tiny_model_dir).generate(prompts, GREEDY, use_tqdm=False)
    vllm_style = make_llm(tiny_model_dir, enforce_eager=True, disable_log_stats=False, **VLLM_SCRIPT_ARGUMENTS)
    assert vllm_style.llm_engine.config.enforce_eager
    outputs = vllm_style.generate(prompts, GREEDY, use_tqdm=False, lora_request=None, priority=[0, 0, 0])
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]


def test_vllm_prompt_types_are_the_dicts_generate_takes(llama):
    tokenizer = llama.get_tokenizer()
    ids = tokenizer.encode("the capital of", add_special_tokens=False)
    typed = [TextPrompt(prompt="the capital of"), TokensPrompt(prompt_token_ids=ids, prompt="the capital of")]
    assert typed[1] == {"prompt_token_ids": ids, "prompt": "the capital of"}
    outputs = llama.generate(typed, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert [o.prompt for o in outputs] == ["the capital of"] * 2
    assert outputs[1].prompt_token_ids == ids
    assert outputs[0].prompt_token_ids == tokenizer.encode("the capital of")  # the engine's tokenization


def test_every_vllm_argument_is_known_and_none_is_an_engine_option():
    assert set(VLLM_SCRIPT_ARGUMENTS) == set(NO_EFFECT) | set(DEFAULT_ONLY)
    fields = {field.name for field in EngineConfig.__dataclass_fields__.values()}
    assert not fields & (set(NO_EFFECT) | set(DEFAULT_ONLY))
    assert engine_arguments({**VLLM_SCRIPT_ARGUMENTS, "max_num_seqs": 3}) == {"max_num_seqs": 3}


@pytest.mark.parametrize(
    "name, value, error_type",
    [
        ("trust_remote_code", "yes", TypeError),
        ("swap_space", "4", TypeError),
        ("swap_space", True, TypeError),
        ("swap_space", -1, ValueError),
        ("swap_space", -0.5, ValueError),
        ("hf_token", 3, TypeError),
        ("download_dir", 3, TypeError),
        ("max_seq_len_to_capture", 0, ValueError),
        ("max_seq_len_to_capture", 8192.0, TypeError),
        ("compilation_config", "O3", TypeError),
        ("distributed_executor_backend", "external_launcher", ValueError),
        ("distributed_executor_backend", 2, TypeError),
        ("disable_async_output_proc", 1, TypeError),
        ("tokenizer_pool_size", -1, ValueError),
        ("max_loras", 0, ValueError),
        ("max_lora_rank", "16", TypeError),
    ],
)
def test_a_bad_accepted_argument_is_a_type_error_or_a_value_error_naming_it(name, value, error_type):
    """A value of the wrong type is a ``TypeError``; one of the right type out of range or not a choice, a
    ``ValueError``."""
    with pytest.raises(error_type) as error:
        engine_arguments({name: value})
    assert type(error.value) is error_type
    assert name in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("cpu_offload_gb", 4),
        ("cpu_offload_gb", False),
        ("revision", "main"),
        ("tokenizer_revision", "v2"),
        ("code_revision", "abc123"),
        ("tokenizer_mode", "mistral"),
        ("hf_overrides", {"num_hidden_layers": 1}),
        ("task", "embed"),
        ("model_impl", "transformers"),
        ("enable_lora", True),
        ("speculative_config", {"method": "ngram", "num_speculative_tokens": 3}),
        ("scheduling_policy", "priority"),
        ("num_scheduler_steps", 8),
        ("num_scheduler_steps", True),
        ("preemption_mode", "swap"),
    ],
)
def test_an_argument_jaxllm_cannot_honour_is_a_value_error_before_anything_loads(name, value):
    with pytest.raises(ValueError) as error:
        LLM(model="/no/such/checkpoint", **{name: value})  # raises before the path is looked at
    assert f"{name}={value!r}" in str(error.value)


def test_chunked_prefill_off_needs_a_step_that_holds_the_longest_prompt(tiny_model_dir):
    """As vLLM: ``enable_chunked_prefill=False`` with ``max_num_batched_tokens`` below ``max_model_len`` is a
    ``ValueError`` naming both; left unset the budget is ``max_model_len``, and long prompts, prefilled whole, give
    the chunking engine's tokens."""
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=64 is smaller than max_model_len=256 with "):
        make_llm(tiny_model_dir, enable_chunked_prefill=False)  # make_llm's budget: 64 tokens
    prompts = random_token_prompts(3, [150, 9, 70], seed=4)
    whole = make_llm(tiny_model_dir, enable_chunked_prefill=False, max_num_batched_tokens=None)
    assert whole.llm_engine.resolved.max_num_batched_tokens == 256
    chunking = make_llm(tiny_model_dir)
    tokens = [
        [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] for llm in (whole, chunking)
    ]
    assert tokens[0] == tokens[1]


def test_served_model_name_names_the_metrics():
    assert EngineConfig(model="/m", served_model_name=["llama", "alias"]).model_name == "llama"
    assert EngineConfig(model="/m", served_model_name="llama").model_name == "llama"
    assert EngineConfig(model="/m").model_name == "/m"
    for bad, error_type in (("", ValueError), ([], ValueError), (["ok", ""], ValueError), (["ok", 3], TypeError)):
        with pytest.raises(error_type) as error:
            EngineConfig(model="/m", served_model_name=bad)
        assert f"served_model_name must be a non-empty str, a list of them or None, got {bad!r}" in str(error.value)


def test_enforce_eager_turns_off_cuda_graphs_on_gpu_only():
    eager = StepCompilerOptions.for_engine(EngineConfig(enforce_eager=True), "gpu")
    for num_tokens in (16, NARROW_STEP_MAX_TOKENS + 1):
        assert eager(num_tokens) == {**(StepCompilerOptions("gpu")(num_tokens) or {}), **EAGER_GPU_OPTIONS}
    assert sampler_options(eager) == EAGER_GPU_OPTIONS  # the sampler's (and a mesh head's) program too
    assert StepCompilerOptions.for_engine(EngineConfig(), "gpu")(16) == NARROW_STEP_GPU_OPTIONS
    assert sampler_options(StepCompilerOptions.for_engine(EngineConfig(), "gpu")) is None
    assert StepCompilerOptions.for_engine(EngineConfig(enforce_eager=True), "cpu")(16) is None
    assert sampler_options(StepCompilerOptions.for_engine(EngineConfig(enforce_eager=True), "cpu")) is None
    overridden = EngineConfig(enforce_eager=True, xla_compiler_options={"xla_gpu_enable_command_buffer": "FUSION"})
    assert StepCompilerOptions.for_engine(overridden, "gpu")(16) == {
        **NARROW_STEP_GPU_OPTIONS,
        "xla_gpu_enable_command_buffer": "FUSION",
    }
    with pytest.raises(TypeError) as error:
        EngineConfig(enforce_eager="yes")
    assert "enforce_eager" in str(error.value)


def test_expert_parallel_on_a_dense_model_or_one_device_changes_nothing(tiny_model_dir, caplog):
    """vLLM's ``enable_expert_parallel``: a dense model has no experts to split (a warning says so) and its tokens
    are the plain engine's; a non-bool is a ``TypeError`` naming it. (On a mesh: tests/sharding/test_moe_parallel.)"""
    prompts = random_token_prompts(2, [5, 9], seed=6)
    plain = make_llm(tiny_model_dir).generate(prompts, GREEDY, use_tqdm=False)
    with caplog.at_level(logging.WARNING, logger="jaxllm.engine.llm_engine"):
        expert_parallel = make_llm(tiny_model_dir, enable_expert_parallel=True)
    assert "enable_expert_parallel=True has no effect" in caplog.text
    assert expert_parallel.llm_engine.model_config.moe is None
    outputs = expert_parallel.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]
    with pytest.raises(TypeError, match="enable_expert_parallel must be a bool, got 'yes'"):
        EngineConfig(enable_expert_parallel="yes")


def test_lora_and_priority_requests_are_refused_and_the_engine_keeps_serving(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    prompts = random_token_prompts(2, [5, 9], seed=5)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with pytest.raises(ValueError) as error:
        llm.generate(prompts, GREEDY, use_tqdm=False, lora_request="adapter")
    assert "lora_request='adapter'" in str(error.value)
    with pytest.raises(ValueError) as error:
        llm.generate(prompts, GREEDY, use_tqdm=False, priority=[0, 1])
    assert "priority=1" in str(error.value)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected


@pytest.fixture(scope="module")
def llama():
    # test_bad_words.py's engine shape: its step programs are in the test cache by now
    return LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=64)


def test_chat_template_kwargs_and_tools_reach_the_template(llama):
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if tools %}tools: {{ tools | length }}\n{% endif %}{% if style %}style: {{ style }}\n{% endif %}"
    )
    messages = [{"role": "user", "content": "the capital"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    output = llama.chat(
        messages,
        SamplingParams(max_tokens=1),
        use_tqdm=False,
        chat_template=template,
        add_generation_prompt=False,
        tools=tools,
        chat_template_kwargs={"style": "terse"},
    )[0]
    tokenizer = llama.get_tokenizer()
    rendered = "<|begin_of_text|>user: the capital\ntools: 1\nstyle: terse\n"
    assert output.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert output.prompt == rendered  # vLLM's chat outputs carry the rendered prompt


def test_continue_final_message_extends_the_last_message(llama):
    messages = [{"role": "user", "content": "Name a city"}, {"role": "assistant", "content": "The city of"}]
    output = llama.chat(
        messages, SamplingParams(max_tokens=1), use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )[0]
    tokenizer = llama.get_tokenizer()
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert opened.endswith("The city of<|im_end|>\n")  # the fixture's template closes every message
    assert output.prompt_token_ids == tokenizer.encode(opened[: -len("<|im_end|>\n")], add_special_tokens=False)
    assert output.prompt == opened[: -len("<|im_end|>\n")]
    with pytest.raises(ValueError) as error:
        llama.chat(messages, use_tqdm=False, continue_final_message=True)  # add_generation_prompt defaults to True
    assert "continue_final_message" in str(error.value)
    with pytest.raises(TypeError) as error:
        llama.chat(messages, use_tqdm=False, add_generation_prompt=False, chat_template_kwargs=["style"])
    assert "chat_template_kwargs" in str(error.value)


def test_malformed_chat_messages_are_errors_naming_them(llama):
    with pytest.raises(TypeError, match="messages must be one conversation .* got \\['hello'\\]"):
        llama.chat(["hello"], use_tqdm=False)
    with pytest.raises(TypeError, match="messages must be one conversation"):
        llama.chat("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="a 'user' chat message needs a 'content'"):
        llama.chat([{"role": "user"}], use_tqdm=False)
    with pytest.raises(TypeError, match="a chat message must be a dict with a 'role'"):
        llama.chat([[{"content": "hi"}]], use_tqdm=False)


def test_the_token_that_stops_a_request_is_in_its_token_ids_not_its_text(llama):
    """vLLM's rule for an EOS or stop token: in ``token_ids``, in the text only with ``include_stop_str_in_output``."""
    tokenizer = llama.get_tokenizer()
    token = tokenizer.encode(" the", add_special_tokens=False)[-1]
    forced = dict(max_tokens=5, logit_bias={token: 100.0}, stop_token_ids=[token])
    prompts = ["Hello", "The capital of France is"]
    for include in (False, True):
        outputs = llama.generate(prompts, SamplingParams(**forced, include_stop_str_in_output=include), use_tqdm=False)
        for output in outputs:
            completion = output.outputs[0]
            assert completion.token_ids == [token] and completion.finish_reason == "stop"
            assert completion.stop_reason == token
            assert completion.text == (tokenizer.decode([token]) if include else "")
    eos = llama.llm_engine.eos_token_ids
    eos_token = min(eos)
    params = SamplingParams(max_tokens=5, logit_bias={eos_token: 100.0}, skip_special_tokens=False)
    completion = llama.generate("Hello", params, use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == [eos_token] and completion.finish_reason == "stop" and completion.text == ""


def test_a_sampled_token_rank_is_its_rank_in_the_vocabulary(llama):
    """Greedy tokens rank 1. Drawn at a high temperature, a token keeps its own rank beside the top 3 returned: ranks
    1-3 are one token each, most likely first, and a token ranked past them is less likely than the third (the rank
    counts the whole vocabulary, not only the returned top)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)
    completion = llama.generate("Hello", greedy, use_tqdm=False)[0].outputs[0]
    assert [entry[t].rank for entry, t in zip(completion.logprobs, completion.token_ids, strict=True)] == [1] * 6
    drawn = SamplingParams(temperature=5.0, seed=11, max_tokens=12, logprobs=3, ignore_eos=True)
    completion = llama.generate("Hello", drawn, use_tqdm=False)[0].outputs[0]
    outside_top = 0
    for entry, token in zip(completion.logprobs, completion.token_ids, strict=True):
        rank = entry[token].rank
        by_rank = {v.rank: t for t, v in entry.items() if t != token}  # the top 3, less the token if among them
        if rank <= 3:
            by_rank[rank] = token
        assert sorted(by_rank) == [1, 2, 3]
        top_logprobs = [entry[by_rank[r]].logprob for r in (1, 2, 3)]
        assert top_logprobs == sorted(top_logprobs, reverse=True)
        if rank > 3:  # outside the returned top 3: less likely than each of them
            outside_top += 1
            assert entry[token].logprob <= top_logprobs[-1]
    assert outside_top >= 3  # the temperature drew most tokens from outside the top 3


def test_openai_style_content_parts_in_either_content_format(llama):
    parts = [{"type": "text", "text": "the"}, {"type": "text", "text": "capital"}]
    tokenizer = llama.get_tokenizer()
    one_token = SamplingParams(max_tokens=1)
    as_parts = llama.chat([{"role": "user", "content": parts}], one_token, use_tqdm=False)[0]
    as_string = llama.chat([{"role": "user", "content": "the\ncapital"}], one_token, use_tqdm=False)[0]
    assert as_parts.prompt_token_ids == as_string.prompt_token_ids  # "auto" / "string": parts joined by newlines
    template = "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endfor %}"
    openai = llama.chat(
        [{"role": "user", "content": parts}, {"role": "user", "content": "city"}],
        one_token,
        use_tqdm=False,
        chat_template=template,
        chat_template_content_format="openai",
        add_generation_prompt=False,
    )[0]
    assert openai.prompt_token_ids == tokenizer.encode("[the][capital][city]", add_special_tokens=False)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]
    with pytest.raises(ValueError) as error:
        llama.chat(image, use_tqdm=False)
    assert "image_url" in str(error.value)
    with pytest.raises(ValueError) as error:
        llama.chat([{"role": "user", "content": "hi"}], use_tqdm=False, chat_template_content_format="html")
    assert "'html'" in str(error.value)
    with pytest.raises(TypeError) as error:
        llama.chat([{"content": "no role"}], use_tqdm=False)
    assert "role" in str(error.value)
    assert not llama.llm_engine.has_unfinished_requests()


def test_output_kinds_stream_as_in_vllm_and_generate_returns_whole_outputs(llama):
    prompts = ["The capital of France is", "One, two, three,"]
    delta = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    final = llama.generate(prompts, delta, use_tqdm=False)
    assert delta.output_kind is RequestOutputKind.DELTA  # generate works on a copy: the user's params stay as given
    assert [len(o.outputs[0].token_ids) for o in final] == [12, 12] and all(o.finished for o in final)
    engine = llama.llm_engine
    for kind in RequestOutputKind:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{kind.name}-{i}", prompt, delta.clone(output_kind=kind))
    seen = {f"{kind.name}-{i}": [] for kind in RequestOutputKind for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    for i, whole in enumerate(final):
        want = whole.outputs[0]
        pieces = seen[f"DELTA-{i}"]
        assert "".join(o.outputs[0].text for o in pieces) == want.text
        assert sum((o.outputs[0].token_ids for o in pieces), []) == want.token_ids
        assert len(pieces) > 1 and [o.finished for o in pieces].index(True) == len(pieces) - 1
        cumulative = seen[f"CUMULATIVE-{i}"]
        assert len(cumulative) == len(pieces) and cumulative[-1].outputs[0].text == want.text
        assert [len(o.outputs[0].token_ids) for o in cumulative] == list(
            itertools.accumulate(len(o.outputs[0].token_ids) for o in pieces)
        )
        (only,) = seen[f"FINAL_ONLY-{i}"]
        assert only.finished and only.outputs[0].token_ids == want.token_ids


def test_a_tqdm_class_builds_the_progress_bar_and_engine_requests_take_vllms_options(tiny_model_dir):
    from tqdm import tqdm

    built = []

    class CountingBar(tqdm):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["total"])
            super().__init__(*args, **kwargs)

    llm = make_llm(tiny_model_dir)
    prompts = random_token_prompts(2, [5, 9], seed=7)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=CountingBar)
    assert built == [2] and len(outputs) == 2
    engine = llm.llm_engine
    engine.add_request("vllm-style", prompts[0], GREEDY, lora_request=None, priority=0)
    for bad in (dict(lora_request="adapter"), dict(priority=1)):
        with pytest.raises(ValueError) as error:
            engine.add_request("refused", prompts[0], GREEDY, **bad)
        assert repr(next(iter(bad.values()))) in str(error.value)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["vllm-style"]


def test_reset_prefix_cache_makes_the_next_prompts_compute_in_full(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    prompts = random_token_prompts(2, [40, 56], seed=9)  # several full 16-token blocks each
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    cached = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens >= 32 for o in cached)
    assert llm.reset_prefix_cache()
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens == 0 for o in again)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    llm.llm_engine.add_request("in-flight", prompts[0], GREEDY)
    assert not llm.reset_prefix_cache()  # a request holds blocks
    llm.llm_engine.abort_request("in-flight")
    with pytest.raises(ValueError) as error:
        llm.reset_prefix_cache(device="cpu")
    assert "device='cpu'" in str(error.value)
