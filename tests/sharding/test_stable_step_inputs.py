"""``JAXLLM_STABLE_STEP_INPUTS=1``: stage programs that read the step's arrays from a donated copy of the packed input
buffer give exactly the tokens, stops, logprobs and preemptions of the plain mesh run, on tensor parallelism (async
scheduling) and on TP x PP (microbatches); each step's copy is donated, so it replaces the last; the compiled programs
really read the copy (the moving input's only reader is the copy into the staging buffer)."""

import numpy as np
import pytest

from jaxllm.runner.stable_inputs import (
    STABLE_STEP_INPUTS_ENV,
    STAGING_SLACK,
    StagingBuffers,
    read_through_copy,
    stable_step_inputs_enabled,
)
from tests.engine.test_async_scheduling import assert_same_outputs, outputs_of
from tests.sharding.compiled_stage import compiled_last_stage, parameter_readers
from tests.sharding.helpers import NEEDS_8_DEVICES
from tests.sharding.switched_engines import plain_and_switched

pytestmark = NEEDS_8_DEVICES


@pytest.mark.parametrize(
    "engine_options",
    [
        {"tensor_parallel_size": 2},
        {"tensor_parallel_size": 2, "num_gpu_blocks_override": 24, "block_size": 4},  # preempts requests
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
    ],
    ids=["tp2", "tp2-preempting", "tp2xpp2"],
)
def test_stable_step_inputs_equal_the_plain_run(tiny_llama_dir, monkeypatch, engine_options):
    prompts, params, plain, stable = plain_and_switched(
        tiny_llama_dir, monkeypatch, STABLE_STEP_INPUTS_ENV, engine_options, seed=6
    )

    replaced, keep = [], StagingBuffers.keep

    def recording_keep(self, staging):
        old = self.buffers.get(staging.shape[0] - STAGING_SLACK) if staging is not None else None
        if old is not None and old is not staging:
            replaced.append(old)
        keep(self, staging)

    monkeypatch.setattr(StagingBuffers, "keep", recording_keep)
    assert_same_outputs(outputs_of(stable, prompts, params), outputs_of(plain, prompts, params))
    assert replaced and all(buffer.is_deleted() for buffer in replaced)  # each copy was donated to the next step
    if "num_gpu_blocks_override" in engine_options:
        assert stable.llm_engine.scheduler.num_preemptions > 0
    (copy,) = parameter_readers(compiled_last_stage(stable.llm_engine.runner), "packed")
    assert "dynamic-update-slice" in copy, copy
    assert len(parameter_readers(compiled_last_stage(plain.llm_engine.runner), "packed")) > 1  # read directly


def test_staging_buffer_of_another_size_is_rejected():
    packed = np.zeros(40, np.uint8)
    with pytest.raises(ValueError, match="staging buffer of 40 bytes for 40 packed bytes"):
        read_through_copy(packed, np.zeros(40, np.uint8))


def test_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(STABLE_STEP_INPUTS_ENV, "on")
    with pytest.raises(ValueError, match="JAXLLM_STABLE_STEP_INPUTS must be 0 or 1.*'on'"):
        stable_step_inputs_enabled()
