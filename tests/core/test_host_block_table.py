"""HostBlockTable: the block table kept between steps equals the one built from the requests' lists, every step.

Drives the real scheduler and block manager (``ToyRunner`` samples) through prefix sharing, preemption (a small block
pool), finished requests, request ids reused by new requests and more requests over time than the table has rows.
"""

import random

import numpy as np
import pytest

from jaxllm.config import ResolvedConfig, power_of_two_buckets
from jaxllm.core.block_manager import BlockManager
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.request import Request
from jaxllm.runner.host_block_table import HostBlockTable
from jaxllm.runner.step_batch import pack_step_batch
from jaxllm.sampling_params import SamplingParams
from tests.core.toy_runner import ToyRunner

VOCAB = 50


def _engine(num_blocks: int):
    config = SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=64, max_model_len=96, block_size=4, num_blocks=num_blocks
    )
    resolved = ResolvedConfig(
        max_model_len=96,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        block_size=4,
        num_blocks=num_blocks,
        token_buckets=power_of_two_buckets(16, 64),
    )
    scheduler = Scheduler(config, BlockManager(num_blocks, 4, enable_prefix_caching=True))
    return scheduler, ToyRunner(num_blocks, 4, VOCAB), resolved


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_rows_equal_the_lists_every_step(seed):
    rng = random.Random(seed)
    scheduler, runner, resolved = _engine(num_blocks=48)  # few blocks: requests get preempted and come back
    table = HostBlockTable(resolved.max_blocks_per_request, num_rows=20)  # fewer rows than requests over time
    system = [rng.randrange(VOCAB) for _ in range(12)]
    num_added = num_steps = 0
    while num_added < 120 or scheduler.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4) if num_added < 120 else 0):
            prompt = system[: rng.randrange(0, 13)] + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(max_tokens=rng.randrange(1, 40), ignore_eos=True)
            request_id = f"r{rng.randrange(0, 200)}"  # ids come back once their request has finished
            if request_id not in scheduler.requests:
                scheduler.add_request(Request(request_id, prompt, params))
                num_added += 1
        output = scheduler.schedule()
        if output.is_empty:
            continue
        kept = pack_step_batch(output, resolved, block_table=table)
        built = pack_step_batch(output, resolved)
        np.testing.assert_array_equal(kept.block_tables, built.block_tables)
        scheduler.update_from_output(output, runner.execute(output))
        num_steps += 1
    assert scheduler.num_preemptions > 0 and scheduler.block_manager.num_prefix_cache_hits > 0
    assert num_steps > 100


def test_a_step_larger_than_the_table_is_an_error():
    table = HostBlockTable(max_blocks_per_request=4, num_rows=2)
    requests = [Request(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(3)]
    for request in requests:
        request.block_ids = [1, 2]
    with pytest.raises(RuntimeError, match="needs more than 2 rows"):
        table.gather(requests, np.zeros((3, 4), np.int32))
