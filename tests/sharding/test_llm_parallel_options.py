"""``LLM(tensor_parallel_size=T, pipeline_parallel_size=P, data_parallel_size=D)`` through the public API.

Greedy tokens on every mesh equal the one-device ``LLM``'s on a job of mixed prompt lengths under a 16-token budget
(the long prompts are prefilled in chunks while others decode), for the fixture Llama (4 heads, 2 KV heads, 3 layers:
stages of 2 and 1 layers) and an MQA model (1 KV head, replicated to T heads). Weights come from the checkpoint
straight into their shards, or as dummy weights equal to the one-device ones.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import LLM, RequestOutputKind, SamplingParams
from sharding import DataParallelEngine
from sharding import runner as runner_module
from sharding.runner import PipelineRunner
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES

MODELS = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BLOCK_SIZE, HEAD_DIM = 4, 16


def make_llm(name: str, **options) -> LLM:
    defaults = dict(
        dtype="float32",
        max_model_len=64,
        max_num_batched_tokens=16,
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=64,
        skip_tokenizer_init=True,
    )
    return LLM(model=str(MODELS / name), **{**defaults, **options})


def prompts() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"prompt_token_ids": rng.integers(0, 512, n).tolist()} for n in (3, 9, 21, 14, 1, 33)]


def generate(llm: LLM) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(prompts(), GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def one_device():
    cache = {}

    def outputs(name: str, **options) -> list[list[int]]:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = generate(make_llm(name, **options))
        return cache[key]

    return outputs


@pytest.mark.parametrize(
    "name, tensor, pipe",
    [("llama", 2, 1), ("llama", 1, 2), ("llama", 2, 2), ("llama_mqa", 2, 1), ("llama_mqa", 2, 2)],
)
def test_tensor_and_pipeline_parallel_match_one_device(one_device, name, tensor, pipe):
    llm = make_llm(name, tensor_parallel_size=tensor, pipeline_parallel_size=pipe)
    engine = llm.llm_engine
    runner = engine.runner
    assert isinstance(runner, PipelineRunner) and runner.pipeline.num_stages == pipe
    assert runner.pipeline.config.num_kv_heads % tensor == 0  # MQA: its one KV head replicated to T heads
    assert engine.core.async_scheduling  # every mesh schedules ahead, as one device does
    traces_after_warm_up = runner.num_traces
    assert traces_after_warm_up == len(engine.resolved.token_buckets) * pipe
    assert generate(llm) == one_device(name)
    assert runner.num_traces == traces_after_warm_up  # no recompiles
    assert engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize(
    "options",
    [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, pipeline_parallel_size=2)],
    ids=["tp2", "tp2xpp2"],
)
def test_sampling_variants_compile_the_head_never_a_stage(options):
    """As on one device (tests/engine/test_invariance.py): after warm-up, greedy, random and top-k/top-p requests in
    one batch compile nothing; penalties, logprobs, a logit bias, allowed ids and min_tokens compile head programs,
    never a stage (they once recompiled every stage, the whole model); the sampled tokens and logprobs equal the one
    device's."""
    llm = make_llm("llama", **options)
    runner = llm.llm_engine.runner
    stage_traces, head_traces = runner.num_traces, runner.num_head_traces
    mixed = [
        GREEDY,
        SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=1),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_tokens=6, ignore_eos=True, seed=2),
    ]
    job = prompts()
    llm.generate(job, [mixed[i % 3] for i in range(len(job))], use_tqdm=False)
    assert (runner.num_traces, runner.num_head_traces) == (stage_traces, head_traces)
    variants = [
        SamplingParams(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5, logprobs=3, seed=3, max_tokens=6),
        SamplingParams(temperature=0.0, logit_bias={7: 5.0, 11: -3.0}, allowed_token_ids=list(range(5, 300))),
        SamplingParams(temperature=0.9, min_tokens=4, stop_token_ids=[9], seed=4, max_tokens=6),
    ]
    params = [variants[i % 3] for i in range(len(job))]
    got = llm.generate(job, params, use_tqdm=False)
    assert runner.num_traces == stage_traces and runner.num_head_traces > head_traces
    want = make_llm("llama").generate(job, params, use_tqdm=False)
    for got_output, want_output in zip(got, want, strict=True):
        got_sample, want_sample = got_output.outputs[0], want_output.outputs[0]
        assert got_sample.token_ids == want_sample.token_ids
    got_logprobs, want_logprobs = got[0].outputs[0].logprobs, want[0].outputs[0].logprobs
    assert len(got_logprobs) == len(want_logprobs) == 6  # (the first prompt's request: penalties and logprobs)
    for got_step, want_step in zip(got_logprobs, want_logprobs, strict=True):
        assert got_step.keys() == want_step.keys()
        np.testing.assert_allclose(
            [got_step[t].logprob for t in want_step], [want_step[t].logprob for t in want_step], rtol=1e-5, atol=1e-5
        )


def test_preemption_on_a_mesh_matches_one_device(one_device):
    # 12 blocks of 4 tokens hold the longest request (33 + 6 tokens) but not the whole job: requests get preempted
    # and recomputed, on the mesh exactly as on one device.
    llm = make_llm("llama", tensor_parallel_size=2, pipeline_parallel_size=2, num_gpu_blocks_override=12)
    assert generate(llm) == one_device("llama", num_gpu_blocks_override=12) == one_device("llama")
    assert llm.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize(
    "options",
    [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, pipeline_parallel_size=2), dict(data_parallel_size=2)],
    ids=["tp2", "tp2xpp2", "dp2"],
)
def test_prompt_logprobs_on_a_mesh_equal_one_device(options):
    """The last stage's prompt-logprob variant: scheduled ahead (TP alone), in two microbatches (PP 2), per replica
    (DP 2); prompts prefilled in chunks under the 16-token budget. Values to float32 noise, ranks and ids exact."""
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    want = make_llm("llama").generate(prompts(), params, use_tqdm=False)
    got = make_llm("llama", **options).generate(prompts(), params, use_tqdm=False)
    for got_output, want_output in zip(got, want, strict=True):
        assert got_output.outputs[0].token_ids == want_output.outputs[0].token_ids
        assert len(got_output.prompt_logprobs) == len(got_output.prompt_token_ids)
        for got_entry, want_entry in zip(got_output.prompt_logprobs[1:], want_output.prompt_logprobs[1:], strict=True):
            assert list(got_entry) == list(want_entry)
            for token, logprob in want_entry.items():
                assert got_entry[token].rank == logprob.rank and abs(got_entry[token].logprob - logprob.logprob) < 1e-5


def test_dummy_weights_on_a_mesh_equal_one_device_dummy_weights(one_device):
    llm = make_llm("llama", load_format="dummy", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert generate(llm) == one_device("llama", load_format="dummy")


def test_data_parallel_replicas_share_one_queue(one_device):
    llm = make_llm("llama", tensor_parallel_size=2, data_parallel_size=2)
    engine = llm.llm_engine
    assert isinstance(engine.core, DataParallelEngine) and engine.core.num_replicas == 2
    assert generate(llm) == one_device("llama")
    assert all(replica.runner.num_steps > 0 for replica in engine.core.replicas)  # both replicas served requests
    assert not engine.has_unfinished_requests() and engine.core.replica_of == {}


def test_siblings_of_one_prompt_stay_on_one_replica():
    llm = make_llm("llama", data_parallel_size=2)
    engine = llm.llm_engine
    engine.add_request("other", prompts()[0], GREEDY)  # replica 0 is now the busier one
    engine.add_request("fan-out", prompts()[2], SamplingParams(n=3, temperature=0.8, max_tokens=4, seed=5))
    siblings = {rid: index for rid, index in engine.core.replica_of.items() if rid != "other"}
    assert len(siblings) == 3 and set(siblings.values()) == {1}
    while engine.has_unfinished_requests():
        engine.step()
    with pytest.raises(ValueError, match=r"replica must be in \[0, 2\), got 2"):
        engine.core.add_request("x", None, None, replica=2)


@pytest.mark.parametrize(("kv_cache_dtype", "itemsize"), [("auto", 4), ("fp8", 1)])
def test_kv_cache_is_sized_for_the_most_loaded_device(kv_cache_dtype, itemsize):
    budget = 1 << 20
    llm = make_llm(
        "llama",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        num_gpu_blocks_override=None,
        kv_cache_memory_bytes=budget,
        kv_cache_dtype=kv_cache_dtype,
    )
    # stage 0 holds 2 of the 3 layers; each device 1 of the 2 KV heads; K and V; float32 or fp8
    per_block = 2 * 2 * BLOCK_SIZE * 1 * HEAD_DIM * itemsize
    assert llm.llm_engine.resolved.num_blocks == budget // per_block


@pytest.mark.parametrize(
    "name, tensor, pipe, impl",
    [
        ("llama", 2, 1, None),
        ("llama", 1, 2, None),
        ("llama_mqa", 2, 2, None),
        ("llama", 2, 1, "pallas_gpu_interpret"),
    ],
    ids=["tp2", "pp2", "mqa-tp2xpp2", "tp2-pallas-interpret"],
)
def test_fp8_kv_cache_on_a_mesh_matches_one_device(one_device, name, tensor, pipe, impl):
    """The fp8 cache shards over KV heads like any other; each shard quantizes and reads back its own heads."""
    options = dict(kv_cache_dtype="fp8", attention_impl=impl)
    llm = make_llm(name, tensor_parallel_size=tensor, pipeline_parallel_size=pipe, **options)
    stages = llm.llm_engine.runner.pipeline.stages
    assert {array.dtype for stage in stages for pair in stage.kv_caches for array in pair} == {
        jnp.dtype(jnp.float8_e4m3fn)
    }
    assert generate(llm) == one_device(name, **options)


def test_decode_only_programs_on_a_mesh(monkeypatch):
    """On a TP 2 x PP 2 mesh decode-only steps take stage programs of their own (the Triton kernel, interpreted,
    leaves out its long launch there) compiled at warm-up, and the tokens are one device's without them."""
    monkeypatch.setenv("JAXLLM_DECODE_PROGRAMS", "0")
    expected = generate(make_llm("llama", attention_impl="pallas_gpu_interpret"))
    parts = []  # (tokens, requests, max_query_len, microbatches of its step) of each microbatch
    split = runner_module.split_step_batch

    def recording_split(*args):
        microbatches = split(*args)
        parts.extend(
            (mb.batch.num_tokens, mb.batch.num_requests, mb.batch.max_query_len, len(microbatches))
            for mb in microbatches
        )
        return microbatches

    monkeypatch.setattr(runner_module, "split_step_batch", recording_split)
    monkeypatch.setenv("JAXLLM_DECODE_PROGRAMS", "1")
    llm = make_llm("llama", tensor_parallel_size=2, pipeline_parallel_size=2, attention_impl="pallas_gpu_interpret")
    pipeline, resolved = llm.llm_engine.runner.pipeline, llm.llm_engine.resolved
    assert pipeline.num_traces == 2 * len(resolved.step_variants()) > 2 * len(resolved.token_buckets)
    assert generate(llm) == expected
    assert pipeline.num_traces == 2 * len(resolved.step_variants())
    assert any(bound == 1 and split > 1 for *_, bound, split in parts)  # a decode-only step's parts keep its bound
    assert all(tokens == requests for tokens, requests, bound, _ in parts if bound == 1)


@pytest.mark.parametrize(
    "options", [{"tensor_parallel_size": 3}, {"pipeline_parallel_size": 2, "data_parallel_size": 8}]
)
def test_parallel_sizes_that_do_not_divide_the_devices_are_rejected(options):
    with pytest.raises(ValueError) as error:
        make_llm("llama", **options)
    message = str(error.value)
    assert all(f"{name}={value}" in message for name, value in options.items())
    assert "8 available" in message


def test_stop_strings_and_aborts_reach_the_owning_replica():
    """A stop string is seen after the step, by the detokenizer: the replica holding the request must finish it."""
    text_prompts = ["The capital of France is", "One, two, three,", "Hello", "def main():"]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    one_device = make_llm("llama", skip_tokenizer_init=False).generate(text_prompts, free, use_tqdm=False)
    texts = [output.outputs[0].text for output in one_device]
    stops = [text[len(text) // 2 :][:3] for text in texts]  # a piece from the middle of each generation
    assert all(stops)
    engine = make_llm("llama", skip_tokenizer_init=False, data_parallel_size=2).llm_engine
    for i, (prompt, stop) in enumerate(zip(text_prompts, stops, strict=True)):
        final_only = RequestOutputKind.FINAL_ONLY
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop], output_kind=final_only)
        engine.add_request(f"r{i}", prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output.outputs[0]
            # finished in its replica at once: it takes no further step there
            assert all(output.request_id not in replica.scheduler.requests for replica in engine.core.replicas)
    for i, (text, stop) in enumerate(zip(texts, stops, strict=True)):
        assert finished[f"r{i}"].finish_reason == "stop" and finished[f"r{i}"].text == text[: text.index(stop)]
    assert engine.core.replica_of == {}
    engine.add_request("a", text_prompts[0], free)
    engine.add_request("b", text_prompts[1], free)
    engine.step()
    engine.abort_request("a")
    assert engine.get_num_unfinished_requests() == 1 and list(engine.core.replica_of) == ["b"]


@pytest.mark.parametrize(
    "quantization, tensor, pipe",
    [
        (dict(quantization="int8"), 2, 1),
        (dict(quantization="fp8"), 1, 2),
        # group 2: the fixture's in_features (64, 172) then split into whole groups on each of 2 shards
        (dict(quantization="int4", quantization_group_size=2), 2, 2),
    ],
    ids=["int8-tp2", "fp8-pp2", "int4-tp2xpp2"],
)
def test_quantized_weights_on_a_mesh_match_one_device(quantization, tensor, pipe):
    expected = generate(make_llm("llama", **quantization))
    llm = make_llm("llama", tensor_parallel_size=tensor, pipeline_parallel_size=pipe, **quantization)
    assert generate(llm) == expected
    scales = [
        v.get_value()
        for stage in llm.llm_engine.runner.pipeline.stages
        for path, v in nnx.to_flat_state(stage.state)
        if path[-1] == "scales" and "down_proj" in path
    ]
    assert scales and all(len(s.sharding.device_set) == tensor for s in scales)
    if tensor > 1:  # row-parallel down_proj: int4 group scales split with the weight rows; per-channel ones replicate
        int4 = quantization["quantization"] == "int4"
        assert all(s.sharding.spec[0] == ("tensor" if int4 else None) for s in scales)


def test_quantized_tied_lm_head_on_a_mesh_matches_one_device():
    """``quantize_lm_head`` on a tied model: the last stage's quantized head splits over the vocabulary."""
    options = dict(quantization="int8", quantize_lm_head=True)
    expected = generate(make_llm("llama_tied", **options))
    llm = make_llm("llama_tied", tensor_parallel_size=2, pipeline_parallel_size=2, **options)
    assert generate(llm) == expected
    last = llm.llm_engine.runner.pipeline.stages[-1]
    head = {path[-1]: v.get_value() for path, v in nnx.to_flat_state(last.state) if path[0] == "lm_head"}
    assert head["values"].dtype == jnp.int8 and tuple(head["values"].sharding.spec) == (None, "tensor")
    assert tuple(head["scales"].sharding.spec) == ("tensor",)


@pytest.mark.parametrize(
    "quantization",
    [dict(quantization="int8"), dict(quantization="int4", quantization_group_size=2)],
    ids=["int8", "int4"],
)
def test_quantized_kv_heads_replicated_across_the_tensor_axis(quantization):
    """1 KV head at T = 2: the quantized k/v_proj are expanded to one head per device (codes and scales repeated),
    and the tokens equal the one-device model's."""
    expected = generate(make_llm("llama_mqa", **quantization))
    llm = make_llm("llama_mqa", tensor_parallel_size=2, **quantization)
    assert generate(llm) == expected
    stage = llm.llm_engine.runner.pipeline.stages[0]
    k_scales = [v.get_value() for path, v in nnx.to_flat_state(stage.state) if path[-2:] == ("k_proj", "scales")]
    assert k_scales and all(s.shape[-1] == 2 * HEAD_DIM and s.sharding.spec[-1] == "tensor" for s in k_scales)


def test_one_kv_head_per_device_writes_the_cache_in_place():
    """TP 2 of a 2-KV-head model leaves each device one KV head; the compiled step must not copy the cache."""
    import re

    from jaxllm.runner.step_batch import padding_step_batch

    llm = make_llm("llama", tensor_parallel_size=2, num_gpu_blocks_override=2048)
    runner = llm.llm_engine.runner
    bucket = runner.config.token_buckets[0]
    rows = runner.config.request_rows_for(bucket)
    batch = padding_step_batch(bucket, rows, runner.config.max_blocks_per_request)
    compiled = runner.pipeline.lower_stage(0, batch).compile()
    k_cache = runner.pipeline.stages[0].kv_caches[0][0]
    local_shape = k_cache.addressable_shards[0].data.shape
    assert local_shape[2] == 1
    shape_text = ",".join(map(str, local_shape))
    copies = [  # copy ops, or loop fusions XLA names after the copy they wrap, of a cache-shaped buffer
        line
        for line in compiled.as_text().splitlines()
        if f"[{shape_text}]" in line and re.search(r"^\s*(ROOT )?%\S*copy\S* = |\bcopy\(", line)
    ]
    assert copies == []
    assert compiled.memory_analysis().temp_size_in_bytes < k_cache.addressable_shards[0].data.nbytes


def test_xla_compiler_options_reach_every_stage_program():
    """A mesh engine's stage programs get ``xla_compiler_options`` too (the fusion pass off changes their HLO)."""
    from jaxllm.runner.step_batch import padding_step_batch

    def stage_fusions(llm: LLM) -> int:
        runner = llm.llm_engine.runner
        bucket = runner.config.token_buckets[0]
        rows = runner.config.request_rows_for(bucket)
        batch = padding_step_batch(bucket, rows, runner.config.max_blocks_per_request)
        text = runner.pipeline.lower_stage(0, batch).compile().as_text()
        return sum(" fusion(" in line for line in text.splitlines())

    options = {"xla_disable_hlo_passes": "fusion"}
    plain = make_llm("llama", tensor_parallel_size=2, pipeline_parallel_size=2)
    unfused = make_llm("llama", tensor_parallel_size=2, pipeline_parallel_size=2, xla_compiler_options=options)
    assert unfused.llm_engine.runner.pipeline.compiler_options(16) == options
    assert stage_fusions(unfused) != stage_fusions(plain)
    assert generate(unfused) == generate(plain)
