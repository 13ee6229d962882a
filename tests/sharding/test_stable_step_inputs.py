"""``JAXLLM_STABLE_STEP_INPUTS=1``: stage programs that read the step's arrays from a donated copy of the packed input
buffer give exactly the tokens, stops, logprobs and preemptions of the plain mesh run, on tensor parallelism (async
scheduling) and on TP x PP (microbatches); the copy is donated, so each step's copy replaces the last."""

import json

import pytest

from sharding.engine_runners import STABLE_STEP_INPUTS_ENV
from sharding.runner import padding_batch
from tests.engine.conftest import TINY_CONFIG, make_llm, random_token_prompts
from tests.engine.test_async_scheduling import LENGTHS, assert_same_outputs, mixed_params, outputs_of
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama_stable_inputs")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.mark.parametrize(
    "engine_options",
    [
        {"tensor_parallel_size": 2},
        {"tensor_parallel_size": 2, "num_gpu_blocks_override": 24, "block_size": 4},  # preempts requests
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
    ],
    ids=["tp2", "tp2-preempting", "tp2xpp2"],
)
def test_stable_step_inputs_equal_the_plain_mesh_run(model_dir, monkeypatch, engine_options):
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=6)
    params = mixed_params(stop_token=5)
    plain = make_llm(model_dir, **engine_options)
    monkeypatch.setenv(STABLE_STEP_INPUTS_ENV, "1")
    stable = make_llm(model_dir, **engine_options)
    pipeline = stable.llm_engine.runner.pipeline
    assert pipeline.stable_step_inputs and not plain.llm_engine.runner.pipeline.stable_step_inputs

    donated = []
    run_stage = pipeline._run_stage

    def recording_run_stage(stage, *args, **kwargs):
        before = dict(stage.staging)
        out = run_stage(stage, *args, **kwargs)
        donated.extend(buffer for size, buffer in before.items() if stage.staging[size] is not buffer)
        return out

    pipeline._run_stage = recording_run_stage
    assert_same_outputs(outputs_of(stable, prompts, params), outputs_of(plain, prompts, params))
    assert donated and all(buffer.is_deleted() for buffer in donated)  # each copy was donated to the next step
    assert all(stage.staging for stage in pipeline.stages)
    if "num_gpu_blocks_override" in engine_options:
        assert stable.llm_engine.scheduler.num_preemptions > 0
    # the stage program reads its step arrays from the copy (a barrier keeps XLA from reading the input instead)
    runner, bucket = stable.llm_engine.runner, stable.llm_engine.runner.config.token_buckets[0]
    rows = runner.config.request_rows_for(bucket)
    batch = padding_batch(bucket, rows, runner.config.max_blocks_per_request)
    program = pipeline.lower_stage(pipeline.num_stages - 1, batch, runner.build_head_args([], rows, 0, 0)).as_text()
    assert "optimization_barrier" in program and "dynamic_update_slice" in program
