"""Sleep mode on a device mesh: every stage's (and every data-parallel replica's) parameter and KV-cache arrays leave
all their devices at ``sleep`` and come back with the same shardings at ``wake_up``: level 1 from the host copy of
each distinct shard, level 2 by loading the checkpoint into its shards again. Greedy tokens equal the one-device
engine's after each."""

import jax
import pytest

from sharding import DataParallelEngine
from tests.sharding.helpers import NEEDS_8_DEVICES
from tests.sharding.test_llm_parallel_options import generate, make_llm

pytestmark = NEEDS_8_DEVICES


def replica_runners(llm) -> list:
    core = llm.llm_engine.core
    return [replica.runner for replica in core.replicas] if isinstance(core, DataParallelEngine) else [core.runner]


def device_arrays(llm) -> list[jax.Array]:
    arrays = []
    for runner in replica_runners(llm):
        arrays += runner.param_arrays()
        arrays += [a for stage in runner.pipeline.stages for a in jax.tree.leaves(stage.kv_caches)]
    return arrays


@pytest.mark.parametrize(("tensor", "pipe", "data", "launch_thread"), [(2, 1, 1, "1"), (2, 2, 1, "0"), (1, 1, 2, "0")])
def test_sleep_and_wake_up_on_a_mesh(monkeypatch, tensor, pipe, data, launch_thread):
    """TP 2 launching its steps from the worker thread (the GPU default), TP 2 x PP 2 and DP 2."""
    monkeypatch.setenv("JAXLLM_MESH_LAUNCH_THREAD", launch_thread)
    expected = generate(make_llm("llama"))
    llm = make_llm(
        "llama",
        tensor_parallel_size=tensor,
        pipeline_parallel_size=pipe,
        data_parallel_size=data,
        enable_sleep_mode=True,
    )
    assert generate(llm) == expected
    shardings = [array.sharding for array in device_arrays(llm)]
    for level in (1, 2):
        before = device_arrays(llm)
        llm.sleep(level)
        assert all(array.is_deleted() for array in before)
        assert all(stage.kv_caches is None for runner in replica_runners(llm) for stage in runner.pipeline.stages)
        llm.wake_up()
        assert [array.sharding for array in device_arrays(llm)] == shardings
        assert generate(llm) == expected, f"level {level}"
