"""Stable step outputs (mesh engines' default; ``JAXLLM_STABLE_STEP_OUTPUTS=0`` turns them off): a mesh engine whose
last stage writes its logits, and whose head its results, into donated buffers gives exactly the tokens, stops,
logprobs and preemptions of the plain run, on tensor parallelism and on TP x PP (microbatches), both scheduled ahead;
a buffer set is reused only after the runner released it, and two sets per shape and microbatch suffice; in the
compiled programs each result buffer is read by nothing but the write into it, so no intermediate value can share
its allocation."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.runner.stable_outputs import (
    ROW_SLACK,
    STABLE_STEP_OUTPUTS_ENV,
    ResultBuffers,
    stable_step_outputs_enabled,
    write_into,
)
from tests.engine.conftest import make_llm, random_token_prompts
from tests.engine.test_async_scheduling import LENGTHS, assert_same_outputs, mixed_params, outputs_of
from tests.sharding.compiled_stage import compiled_head, compiled_last_stage, parameter_readers
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


class BufferLog:
    """Records each taken buffer set (and whether it was a released one) and each release."""

    def __init__(self, monkeypatch):
        self.taken, self.released = [], []
        take, release = ResultBuffers.take, ResultBuffers.release

        def recording_take(pool, shapes, **kwargs):
            was_free = {id(b) for sets in pool.free.values() for s in sets for b in s.values()}
            buffers = take(pool, shapes, **kwargs)
            if buffers:
                self.taken.append((buffers, all(id(b) in was_free for b in buffers.values())))
            return buffers

        def recording_release(pool, results):
            self.released.append({k: v for k, v in results.items() if v.size > 0})
            release(pool, results)

        monkeypatch.setattr(ResultBuffers, "take", recording_take)
        monkeypatch.setattr(ResultBuffers, "release", recording_release)


def check_stable_outputs_match_plain(model_dir, monkeypatch, engine_options, all_donated=False):
    """The stable-outputs engine's outputs equal the plain engine's; released sets are reused, two per shape and
    microbatch, and every reused logits buffer was donated (deleted by the call it was taken for); with
    ``all_donated`` the head's result buffers too. (On CPU JAX keeps a zero-copy host view of an array it has
    fetched, and PJRT does not donate a buffer with such a view: the call then writes a new buffer. The logits are
    never fetched, so their donation is checked everywhere; tests/gpu/test_stable_step_outputs_gpu.py checks all.)"""
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=7)
    params = mixed_params(stop_token=5)
    monkeypatch.setenv(STABLE_STEP_OUTPUTS_ENV, "0")
    plain = make_llm(model_dir, **engine_options)
    monkeypatch.delenv(STABLE_STEP_OUTPUTS_ENV)  # the default
    log = BufferLog(monkeypatch)  # (before the build: its warm-up takes and releases sets too)
    stable = make_llm(model_dir, **engine_options)
    assert_same_outputs(outputs_of(stable, prompts, params), outputs_of(plain, prompts, params))
    if "num_gpu_blocks_override" in engine_options:
        assert stable.llm_engine.scheduler.num_preemptions > 0

    reused = [buffers for buffers, was_free in log.taken if was_free]
    assert reused, "no released buffer set was ever reused"
    for buffers in reused:  # a set is taken again only after it was released
        assert any(all(r.get(k) is b for k, b in buffers.items()) for r in log.released)
    checked = [(k, b) for buffers in reused for k, b in buffers.items() if all_donated or k == "logits"]
    kept = sorted({(k, b.shape) for k, b in checked if not b.is_deleted()})
    assert checked, "no reused buffer to check"
    assert not kept, f"reused buffers that no call donated: {kept}"
    runner = stable.llm_engine.runner
    for pool in (runner.pipeline.stages[-1].results, runner.pipeline.head_results):  # logits; the head's results
        # steady state: two steps' sets per shape alternate, one set per microbatch each
        assert 0 < pool.num_allocated <= 2 * runner.num_microbatches * len(pool.free)


@pytest.mark.parametrize(
    "engine_options",
    [
        {"tensor_parallel_size": 2},
        {"tensor_parallel_size": 2, "num_gpu_blocks_override": 24, "block_size": 4},  # preempts requests
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
    ],
    ids=["tp2", "tp2-preempting", "tp2xpp2"],
)
def test_stable_step_outputs_equal_the_plain_run(tiny_llama_dir, monkeypatch, engine_options):
    check_stable_outputs_match_plain(tiny_llama_dir, monkeypatch, engine_options)


def test_result_buffers_are_read_only_by_their_write(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv(STABLE_STEP_OUTPUTS_ENV, "0")
    plain = make_llm(tiny_llama_dir, tensor_parallel_size=2)
    monkeypatch.setenv(STABLE_STEP_OUTPUTS_ENV, "1")
    stable = make_llm(tiny_llama_dir, tensor_parallel_size=2)
    # (the logits are split over the vocabulary until the end: each device writes its shard in a fusion XLA names
    # after its first op, whose metadata still names the update)
    (write,) = parameter_readers(compiled_last_stage(stable.llm_engine.runner), "result_buffers['logits']")
    assert 'op_name="jit(program)/dynamic_update_slice"' in write, write
    head = compiled_head(stable.llm_engine.runner)
    for name in ("token_ids", "sampled_logprob"):
        (write,) = parameter_readers(head, f"result_buffers['{name}']")
        assert "dynamic-update-slice" in write, write
    assert "result_buffers" not in compiled_last_stage(plain.llm_engine.runner)
    assert "result_buffers" not in compiled_head(plain.llm_engine.runner)


def test_write_into_checks_the_buffer_shape():
    result = {"token_ids": jnp.arange(4, dtype=jnp.int32), "empty": jnp.zeros((4, 0), jnp.float32)}
    written = write_into({"token_ids": jnp.full(4 + ROW_SLACK, 9, jnp.int32)}, result)
    np.testing.assert_array_equal(written["token_ids"], [0, 1, 2, 3] + [9] * ROW_SLACK)
    assert written["empty"].shape == (4, 0)
    with pytest.raises(ValueError, match=r"result buffer 'token_ids' of int32\[4\] for a result of int32\[4\]"):
        write_into({"token_ids": jnp.zeros(4, jnp.int32)}, result)


def test_a_set_released_twice_is_pooled_once():
    pool = ResultBuffers(enabled=True)
    shapes = {"token_ids": jnp.zeros(4, jnp.int32), "empty": jnp.zeros((4, 0), jnp.float32)}
    buffers = pool.take(shapes)
    assert set(buffers) == {"token_ids"} and buffers["token_ids"].shape == (4 + ROW_SLACK,)
    pool.release(buffers)
    pool.release(buffers)
    assert pool.take(shapes) is not None and pool.num_allocated == 1
    assert pool.take(shapes)["token_ids"] is not buffers["token_ids"] and pool.num_allocated == 2


def test_a_set_holding_a_buffer_the_call_reads_is_not_taken():
    # (with the launch thread, the previous step's set can be free by the time the next step, which reads its token
    # ids as pending tokens, takes one: tests/sharding/test_launch_thread.py runs that engine)
    pool = ResultBuffers(enabled=True)
    shapes = {"token_ids": jnp.zeros(4, jnp.int32)}
    first, second = pool.take(shapes), pool.take(shapes)
    pool.release(first)
    pool.release(second)
    assert pool.take(shapes, read_by_call=(first["token_ids"],))["token_ids"] is second["token_ids"]
    assert pool.take(shapes, read_by_call=(first["token_ids"],))["token_ids"] is not first["token_ids"]
    assert pool.num_allocated == 3 and pool.take(shapes)["token_ids"] is first["token_ids"]


def test_switch_is_on_unless_set_to_0(monkeypatch):
    monkeypatch.delenv(STABLE_STEP_OUTPUTS_ENV, raising=False)
    assert stable_step_outputs_enabled()
    monkeypatch.setenv(STABLE_STEP_OUTPUTS_ENV, "0")
    assert not stable_step_outputs_enabled()
    monkeypatch.setenv(STABLE_STEP_OUTPUTS_ENV, "yes")
    with pytest.raises(ValueError, match="JAXLLM_STABLE_STEP_OUTPUTS must be 0 or 1.*'yes'"):
        stable_step_outputs_enabled()
