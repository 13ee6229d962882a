"""Tensor, pipeline and data parallelism produce one device's greedy tokens and logits on a mixed job.

The job (``helpers.mixed_prompts``) mixes prompt lengths 1..21 under a 16-token budget, so long prompts are prefilled
in chunks across steps while others decode. Each mesh runs it through the real scheduler; the reference runs the
model's own forward on one device. f32 logits of every step must match tightly; greedy ids exactly.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.kv_cache_layout import ARRAY_MAX_BYTES_ENV
from jaxllm.runner.step_batch import padding_step_batch
from sharding import DataParallelEngine, ShardedEngine, make_mesh, shard_model
from sharding.engine import generate
from sharding.runner import PipelineRunner
from tests.sharding.helpers import (
    FAST_COMPILE,
    GREEDY,
    NEEDS_8_DEVICES,
    RecordingRunner,
    logits_head,
    no_head_args,
    resolved_config,
)

pytestmark = NEEDS_8_DEVICES

LOGITS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # float32; sharded sums only reorder additions


def run_on_mesh(model, prompts, tensor: int, pipe: int, num_microbatches: int | None = None, prepare=None):
    """Greedy run of ``prompts`` on a (tensor x pipe) mesh; ``prepare(sharded_model, mesh)`` may adjust the model."""
    mesh = make_mesh(tensor_parallel_size=tensor, pipeline_parallel_size=pipe)
    config = resolved_config()
    sharded = shard_model(model, mesh)
    if prepare is not None:
        sharded = prepare(sharded, mesh)
    runner = PipelineRunner(
        sharded,
        mesh,
        config,
        jnp.float32,
        head_fn=logits_head,
        build_head_args=no_head_args,
        num_microbatches=num_microbatches,
        compiler_options=FAST_COMPILE,
    )
    recording = RecordingRunner(runner)
    outputs = generate(ShardedEngine(recording, config), prompts, GREEDY)
    return outputs, recording


def assert_matches(reference, outputs, recording) -> None:
    assert outputs == reference.outputs
    assert len(recording.step_logits) == len(reference.step_logits)
    for step, (got, want) in enumerate(zip(recording.step_logits, reference.step_logits, strict=True)):
        assert got.keys() == want.keys(), step
        for request_id in want:
            np.testing.assert_allclose(got[request_id], want[request_id], **LOGITS_TOLERANCE, err_msg=f"step {step}")


def test_reference_job_mixes_chunked_prefill_and_decode(reference):
    """The job really exercises chunked prefill: some step schedules a prompt's middle chunk."""
    assert max(len(p) for p in reference.prompts.values()) > 16
    assert all(len(tokens) == GREEDY.max_tokens for tokens in reference.outputs.values())
    assert len({tuple(t) for t in reference.outputs.values()}) == len(reference.outputs)


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_tensor_parallel(reference, tensor):
    outputs, recording = run_on_mesh(reference.model, reference.prompts, tensor, 1)
    assert_matches(reference, outputs, recording)
    assert recording.runner.num_traces == 1  # one bucket, one stage: compiled once, never again
    assert_megatron_collectives(recording.runner, reference.model.config)


def assert_megatron_collectives(runner, model_config) -> None:
    """Per layer one all-reduce after o_proj and one after down_proj, plus one for the vocab-split embedding lookup;
    otherwise only all-gathers of per-request rows [S, ...] (logits, argmax partials): the KV cache and the weights
    never move."""
    bucket = runner.config.token_buckets[0]
    rows = runner.config.request_rows_for(bucket)
    batch = padding_step_batch(bucket, rows, runner.config.max_blocks_per_request)
    hlo = runner.pipeline.lower_stage(0, batch).compile().as_text()  # cached: the program already ran
    collectives = re.findall(
        r"= (\w+)\[([\d,]*)\]\S* (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\(", hlo
    )
    all_reduces = [(dtype, shape) for dtype, shape, kind in collectives if kind == "all-reduce"]
    assert all_reduces == [("f32", f"{bucket},{model_config.hidden_size}")] * (2 * model_config.num_layers + 1)
    others = [(shape, kind) for _, shape, kind in collectives if kind != "all-reduce"]
    assert others and all(kind == "all-gather" and shape.split(",")[0] == str(rows) for shape, kind in others)


@pytest.mark.parametrize(("tensor", "pipe"), [(1, 2), (1, 4), (2, 2), (2, 4)])
def test_pipeline_parallel(reference, tensor, pipe):
    outputs, recording = run_on_mesh(reference.model, reference.prompts, tensor, pipe)
    assert_matches(reference, outputs, recording)
    assert recording.runner.num_traces == pipe  # each stage compiled once; microbatches reuse the bucket


@pytest.mark.parametrize(("tensor", "pipe"), [(2, 1), (2, 2)])
def test_layers_sharing_kv_cache_arrays(reference, monkeypatch, tensor, pipe):
    """With JAXLLM_KV_ARRAY_MAX_BYTES each stage's layers share one K and one V array (the reference keeps one per
    layer); tokens and every step's logits stay one device's."""
    monkeypatch.setenv(ARRAY_MAX_BYTES_ENV, str(2**40))
    outputs, recording = run_on_mesh(reference.model, reference.prompts, tensor, pipe)
    assert_matches(reference, outputs, recording)
    stages = recording.runner.pipeline.stages
    assert [len(stage.kv_caches) for stage in stages] == [1] * pipe
    assert sum(stage.kv_caches[0][0].shape[0] for stage in stages) == reference.model.config.num_layers * 64


def test_fewer_kv_heads_than_tensor_devices_with_tied_embeddings(reference_few_kv_heads):
    """2 KV heads at T=4 (each replicated twice) and a tied lm_head on the last of 2 stages."""
    reference = reference_few_kv_heads
    outputs, recording = run_on_mesh(reference.model, reference.prompts, 4, 2)
    assert_matches(reference, outputs, recording)
    last_stage = recording.runner.pipeline.stages[-1]
    assert last_stage.kv_caches[0][0].shape[2] == 4  # the cache holds the expanded 4 KV heads, one per device


def test_data_parallel_replicas_share_the_queue(reference):
    mesh = make_mesh(tensor_parallel_size=2, data_parallel_size=2)
    config = resolved_config()

    def make_replica(replica_mesh, index):
        model = shard_model(reference.model, replica_mesh)
        runner_kwargs = {"compiler_options": FAST_COMPILE}
        return ShardedEngine.from_model(model, replica_mesh, config, jnp.float32, runner_kwargs=runner_kwargs)

    engine = DataParallelEngine.build(mesh, make_replica)
    try:
        outputs = generate(engine, reference.prompts, GREEDY)
    finally:
        engine.close()
    assert outputs == reference.outputs
    devices = [{d.id for d in r.runner.pipeline.stages[0].mesh.devices.flat} for r in engine.replicas]
    assert devices == [{0, 1}, {2, 3}]
    assert [r.scheduler.num_finished_requests for r in engine.replicas] == [3, 2]  # 5 requests, round-robin fill
