"""Splitting a step's ragged batch into microbatches by requests (host numpy only)."""

import numpy as np
import pytest

from jaxllm.config import ResolvedConfig, power_of_two_buckets
from jaxllm.core.step_io import ScheduledRequest, SchedulerOutput
from jaxllm.request import Request
from jaxllm.runner.step_batch import pack_step_batch
from jaxllm.sampling_params import SamplingParams
from sharding.microbatch import bubble_fraction, request_groups, split_step_batch

CONFIG = ResolvedConfig(
    max_model_len=64,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    block_size=4,
    num_blocks=40,
    token_buckets=power_of_two_buckets(4, 32),
)


def make_step(computed_and_scheduled: list[tuple[int, int]], seed: int = 0):
    rng = np.random.default_rng(seed)
    scheduled, next_block = [], 1
    for i, (computed, count) in enumerate(computed_and_scheduled):
        request = Request(f"r{i}", rng.integers(0, 100, computed + count).tolist(), SamplingParams())
        num_blocks = -(-(computed + count) // CONFIG.block_size)
        request.block_ids = list(rng.permutation(np.arange(next_block, next_block + num_blocks)))
        next_block += num_blocks
        scheduled.append(ScheduledRequest(request, computed, count, samples_token=True))
    output = SchedulerOutput(scheduled, sum(c for _, c in computed_and_scheduled))
    return output, pack_step_batch(output, CONFIG)


def test_request_groups_balance_tokens_and_keep_order():
    groups = request_groups(np.array([10, 1, 1, 1, 9, 2]), 2)
    assert groups == [range(0, 3), range(3, 6)]  # 12 + 12 tokens
    assert request_groups(np.array([1, 1, 1, 1]), 4) == [range(i, i + 1) for i in range(4)]
    assert request_groups(np.array([5, 5]), 4) == [range(0, 1), range(1, 2)]  # never more groups than requests
    assert request_groups(np.array([30]), 3) == [range(0, 1)]
    with pytest.raises(ValueError) as e:
        request_groups(np.array([1]), 0)
    assert "got 0" in str(e.value)


def test_microbatches_hold_the_same_tokens_and_rows():
    _, batch = make_step([(0, 7), (5, 1), (12, 6), (3, 1), (0, 2)])
    microbatches = split_step_batch(batch, 3, CONFIG)
    assert len(microbatches) == 3
    assert [mb.first_request for mb in microbatches] == [0, 1, 3]  # 7, 1 + 6, 1 + 2 tokens
    token_fields = ("input_ids", "positions", "slot_mapping", "context_lens")
    for name in token_fields:
        joined = np.concatenate([getattr(mb.batch, name)[: mb.batch.num_tokens] for mb in microbatches])
        np.testing.assert_array_equal(joined, getattr(batch, name)[: batch.num_tokens])
    for mb in microbatches:
        sub, rows = mb.batch, range(mb.first_request, mb.first_request + mb.batch.num_requests)
        assert sub.input_ids.shape[0] in CONFIG.token_buckets and sub.input_ids.shape[0] >= sub.num_tokens
        assert sub.seq_lens.shape[0] == CONFIG.request_rows_for(sub.input_ids.shape[0])
        np.testing.assert_array_equal(sub.seq_lens[: sub.num_requests], batch.seq_lens[rows.start : rows.stop])
        np.testing.assert_array_equal(sub.block_tables[: sub.num_requests], batch.block_tables[rows.start : rows.stop])
        assert not sub.seq_lens[sub.num_requests :].any()  # padding rows
        assert not sub.slot_mapping[sub.num_tokens :].any()  # padding tokens write the null block
        # each request's sampled token is the same token id before and after the split
        want = batch.input_ids[batch.logits_indices[rows.start : rows.stop]]
        np.testing.assert_array_equal(sub.input_ids[sub.logits_indices[: sub.num_requests]], want)
        starts = sub.query_start_loc
        assert starts[0] == 0 and starts[sub.num_requests] == sub.num_tokens
        assert (starts[sub.num_requests :] == sub.num_tokens).all()


def test_one_microbatch_is_the_batch_repacked():
    _, batch = make_step([(0, 3), (2, 2)])
    (only,) = split_step_batch(batch, 1, CONFIG)
    for name in ("input_ids", "positions", "slot_mapping", "context_lens", "seq_lens", "query_start_loc"):
        np.testing.assert_array_equal(getattr(only.batch, name), getattr(batch, name))


def test_bubble_fraction():
    assert bubble_fraction(1, 1) == 0.0
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
