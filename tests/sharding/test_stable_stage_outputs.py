"""``JAXLLM_STABLE_STAGE_OUTPUTS=1``: a pipelined engine whose earlier stages write their hidden states into donated
buffers gives exactly the tokens, stops, logprobs and preemptions of the plain run (microbatches in flight, TP x PP
too); each stage's sets are reused once the next stage has read them; in the compiled first stage the hidden-state
buffer is read by nothing but the write into it, and the next stage drops the slack row."""

import pytest

from jaxllm.runner.stable_outputs import (
    STABLE_STAGE_OUTPUTS_ENV,
    STABLE_STEP_OUTPUTS_ENV,
    stable_stage_outputs_enabled,
)
from tests.engine.conftest import make_llm, random_token_prompts
from tests.engine.test_async_scheduling import LENGTHS, assert_same_outputs, mixed_params, outputs_of
from tests.sharding.compiled_stage import compiled_stage, parameter_readers
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


@pytest.mark.parametrize(
    "engine_options",
    [
        {"pipeline_parallel_size": 2},
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "num_gpu_blocks_override": 24, "block_size": 4},
    ],
    ids=["pp2", "tp2xpp2-preempting"],
)
def test_stable_stage_outputs_equal_the_plain_run(tiny_llama_dir, monkeypatch, engine_options):
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=11)
    params = mixed_params(stop_token=5)
    plain = make_llm(tiny_llama_dir, **engine_options)
    monkeypatch.setenv(STABLE_STAGE_OUTPUTS_ENV, "1")
    stable = make_llm(tiny_llama_dir, **engine_options)
    pipeline = stable.llm_engine.runner.pipeline
    assert all(stage.results.enabled for stage in pipeline.stages)
    assert not any(stage.results.enabled for stage in plain.llm_engine.runner.pipeline.stages[:-1])

    allocated_after_warm_up = [stage.results.num_allocated for stage in pipeline.stages[:-1]]
    assert_same_outputs(outputs_of(stable, prompts, params), outputs_of(plain, prompts, params))
    if "num_gpu_blocks_override" in engine_options:
        assert stable.llm_engine.scheduler.num_preemptions > 0
    num_buckets = len(stable.llm_engine.runner.config.token_buckets)
    for stage, allocated in zip(pipeline.stages[:-1], allocated_after_warm_up, strict=True):
        # the warm-up made a set per bucket; the run's microbatches reused them (a microbatch's own bucket may add a
        # shape, not a set per call)
        assert stage.results.free and stage.results.num_allocated <= allocated + num_buckets


def test_hidden_buffer_is_read_only_by_its_write(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv(STABLE_STEP_OUTPUTS_ENV, "0")  # (the last stage's own results: not what this checks)
    monkeypatch.setenv(STABLE_STAGE_OUTPUTS_ENV, "1")
    stable = make_llm(tiny_llama_dir, pipeline_parallel_size=2)
    runner = stable.llm_engine.runner
    (write,) = parameter_readers(compiled_stage(runner, 0), "result_buffers['hidden']")
    assert "dynamic-update-slice" in write, write
    rows = runner.config.token_buckets[0] + 1
    assert f"[{rows},{runner.pipeline.config.hidden_size}]" in compiled_stage(runner, 1)  # reads the slack row too


def test_stage_switch_is_off_unless_set_to_1(monkeypatch):
    monkeypatch.delenv(STABLE_STAGE_OUTPUTS_ENV, raising=False)
    assert not stable_stage_outputs_enabled()
    monkeypatch.setenv(STABLE_STAGE_OUTPUTS_ENV, "1")
    assert stable_stage_outputs_enabled()
    monkeypatch.setenv(STABLE_STAGE_OUTPUTS_ENV, "on")
    with pytest.raises(ValueError, match="JAXLLM_STABLE_STAGE_OUTPUTS must be 0 or 1.*'on'"):
        stable_stage_outputs_enabled()
