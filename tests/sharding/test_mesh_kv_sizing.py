"""A mesh engine sizing its KV cache from device memory after one run of the largest bucket: by the allocator's peak
where that run raised it; else, where the allocator keeps no statistics (XLA's VMM allocator, which
``--xla_gpu_command_buffer_update_mode=SKIP_TEMP`` selects) or the peak is an earlier engine's (JAX never resets it),
by each device's memory in use plus the compiled largest step's temporaries."""

import dataclasses

import pytest

from jaxllm.runner import kv_cache
from jaxllm.runner.device_memory import DeviceMemory
from jaxllm.runner.step_batch import padding_step_batch
from sharding import engine_runners, make_mesh
from tests.engine.conftest import make_llm
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES

MIB = 1 << 20


@pytest.fixture(scope="module")
def tp2_pp2_llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, tensor_parallel_size=2, pipeline_parallel_size=2)


def stage_temp_bytes(runner, bucket: int) -> list[int]:
    rows = runner.config.request_rows_for(bucket)
    batch = padding_step_batch(bucket, rows, runner.config.max_blocks_per_request)
    pipeline = runner.pipeline
    return [
        pipeline.lower_stage(index, batch).compile().memory_analysis().temp_size_in_bytes
        for index in range(pipeline.num_stages)
    ]


def head_bytes(runner, bucket: int) -> int:
    """The top-k/top-p head's temporaries and its logits input, for ``bucket``'s rows."""
    rows = runner.config.request_rows_for(bucket)
    batch = padding_step_batch(bucket, rows, runner.config.max_blocks_per_request)
    _, _, top_k_top_p = runner.build_head_args.warm_up_variants(rows)
    compiled = runner.pipeline.lower_head(batch, top_k_top_p).compile()
    return compiled.memory_analysis().temp_size_in_bytes + rows * runner.pipeline.config.vocab_size * 4


def test_largest_step_temporaries_are_the_largest_buckets_most_costly_stage(tp2_pp2_llm):
    runner = tp2_pp2_llm.llm_engine.runner
    buckets = runner.config.token_buckets
    largest = stage_temp_bytes(runner, buckets[-1])
    assert len(largest) == 2
    assert runner.largest_step_temp_bytes() == max(*largest, head_bytes(runner, buckets[-1]))
    assert max(largest) > max(stage_temp_bytes(runner, buckets[0]))  # activations grow with the step's tokens


def test_mesh_budget_without_a_peak_adds_the_compiled_step(tp2_pp2_llm, monkeypatch):
    engine = tp2_pp2_llm.llm_engine
    runner = engine.runner
    mesh = make_mesh(2, 2, 1)
    devices = list(mesh.devices.flat)
    in_use = {device: (40 + 3 * i) * MIB for i, device in enumerate(devices)}  # the last device holds the most
    limit, per_block = 1 << 30, 64 * 1024
    monkeypatch.setattr(
        kv_cache, "device_memory", lambda device: DeviceMemory(limit, in_use[device], None, "cuda driver")
    )
    config = dataclasses.replace(engine.config, gpu_memory_utilization=0.5)
    blocks = engine_runners._measured_num_blocks(config, mesh, per_block, [runner], {})
    step_temp = runner.largest_step_temp_bytes()
    assert step_temp > 0
    assert blocks == (limit // 2 - max(in_use.values()) - step_temp) // per_block

    # Where the profile run raised the allocator's peak, the peak is the measure and nothing is compiled
    monkeypatch.setattr(runner, "largest_step_temp_bytes", lambda: pytest.fail("compiled despite a fresh peak"))
    monkeypatch.setattr(kv_cache, "device_memory", lambda device: DeviceMemory(limit, MIB, 300 * MIB, "jax"))
    before = {device: 200 * MIB for device in devices}
    with_peak = engine_runners._measured_num_blocks(config, mesh, per_block, [runner], before)
    assert with_peak == (limit // 2 - 300 * MIB) // per_block


def test_a_peak_the_profile_run_did_not_raise_is_not_this_engines(tp2_pp2_llm, monkeypatch):
    """An earlier engine of the process left JAX's peak at 450 MiB on three devices, and this engine's profile run
    stayed below it there: those are sized by memory in use plus the compiled step. On the fourth the run raised the
    peak (100 -> 300 MiB), which is the measure there."""
    engine = tp2_pp2_llm.llm_engine
    runner = engine.runner
    mesh = make_mesh(2, 2, 1)
    devices = list(mesh.devices.flat)
    limit, per_block, stale = 1 << 30, 64 * 1024, 450 * MIB
    before = {device: stale for device in devices}
    after = {device: DeviceMemory(limit, 40 * MIB, stale, "jax") for device in devices}
    before[devices[0]], after[devices[0]] = 100 * MIB, DeviceMemory(limit, 40 * MIB, 300 * MIB, "jax")
    monkeypatch.setattr(kv_cache, "device_memory", lambda device: after[device])
    config = dataclasses.replace(engine.config, gpu_memory_utilization=0.5)
    blocks = engine_runners._measured_num_blocks(config, mesh, per_block, [runner], before)
    step_temp = runner.largest_step_temp_bytes()
    assert 0 < step_temp < 260 * MIB
    assert blocks == (limit // 2 - 300 * MIB) // per_block  # the fresh peak binds: in use + step is smaller
    after[devices[0]] = DeviceMemory(limit, 40 * MIB, stale, "jax")  # no device's peak rose
    before[devices[0]] = stale
    blocks = engine_runners._measured_num_blocks(config, mesh, per_block, [runner], before)
    assert blocks == (limit // 2 - 40 * MIB - step_temp) // per_block
    assert blocks > (limit // 2 - stale) // per_block  # more than the stale peak would have left


def test_mesh_budget_without_any_figures_names_the_way_out(tp2_pp2_llm, monkeypatch):
    engine = tp2_pp2_llm.llm_engine
    monkeypatch.setattr(kv_cache, "device_memory", lambda device: None)
    with pytest.raises(ValueError, match="reports no memory limit.*kv_cache_memory_bytes or num_gpu_blocks_override"):
        engine_runners._measured_num_blocks(engine.config, make_mesh(2, 2, 1), 4096, [engine.runner], {})
