"""Async scheduling on pipelines: a PP 2 and a TP 2 x PP 2 engine scheduling ahead (two microbatches per step, each
fed its pending tokens from the in-flight step's microbatch results) give exactly the tokens, stops, logprobs and
preemptions of the same mesh run one step at a time; both feeds occur (one result read alone, several merged), and in
steady decode each microbatch reads only its own predecessor, which is what lets the stages overlap across steps.
Penalties are scheduled ahead on PP 2 and TP 2 with the same tokens as one step at a time.
The feed planning and merge against a numpy gather."""

import jax
import numpy as np
import pytest

import sharding.runner
from jaxllm import SamplingParams
from sharding.pending import fed_tokens, merge_pending, plan_feed
from tests.engine.conftest import make_llm, random_token_prompts
from tests.engine.test_async_scheduling import (
    LENGTHS,
    StepLog,
    assert_same_outputs,
    mixed_params,
    outputs_of,
    penalty_params,
)
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


def random_results(rng, num_results: int, rows: int) -> list[dict]:
    return [{"token_ids": jax.numpy.asarray(rng.integers(1, 1000, rows, dtype=np.int32))} for _ in range(num_results)]


def feed_values(feed, results, input_ids):
    """The token ids a stage program sees: ``input_ids`` with each pending token read from the fed array."""
    fed = fed_tokens(feed, results)
    if fed is None:
        return input_ids
    fed = np.asarray(fed)
    return np.where(feed.prev_index >= 0, fed[np.maximum(feed.prev_index, 0)], input_ids)


@pytest.mark.parametrize("num_sources", [0, 1, 2, 3])
def test_fed_tokens_equal_a_gather_over_the_results(num_sources):
    rng = np.random.default_rng(num_sources)
    rows, num_results, num_tokens = 17, 3, 40
    results = random_results(rng, num_results, rows)
    flat_tokens = np.concatenate([np.asarray(r["token_ids"]) for r in results])
    input_ids = rng.integers(1, 1000, num_tokens, dtype=np.int32)
    prev_index = np.full(num_tokens, -1, np.int32)
    sources = rng.choice(num_results, num_sources, replace=False)
    if num_sources:
        pending = rng.choice(num_tokens, 12, replace=False)  # one pending token per request: distinct rows
        flat = [j * rows + r for j in sources for r in rng.choice(rows, 12, replace=False)]
        prev_index[pending] = rng.choice(flat, 12, replace=False)
    feed = plan_feed(prev_index, rows)
    assert feed.sources == tuple(sorted({int(i) // rows for i in prev_index[prev_index >= 0]}))
    assert (feed.merge_index is not None) == (len(feed.sources) > 1)
    want = np.where(prev_index >= 0, flat_tokens[np.maximum(prev_index, 0)], input_ids)
    np.testing.assert_array_equal(feed_values(feed, results, input_ids), want)


def test_no_pending_tokens_plan_no_feed():
    assert plan_feed(None, 8).sources == ()
    feed = plan_feed(np.full(5, -1, np.int32), 8)
    assert feed.sources == () and feed.prev_index is None


def test_more_pending_tokens_than_a_result_holds_is_an_error():
    with pytest.raises(ValueError, match="9 pending tokens"):
        plan_feed(np.array([0, 1, 2, 3, 4, 10, 11, 12, 13], np.int32), 8)


class FeedLog:
    """Records every microbatch feed ``runner`` plans, with the microbatch's index within its step."""

    def __init__(self, monkeypatch, runner):
        self.feeds: list[tuple[int, object]] = []
        plan, dispatch, index = sharding.runner.plan_feed, runner.dispatch, [0]

        def recording_plan(prev_index, rows):
            feed = plan(prev_index, rows)
            self.feeds.append((index[0], feed))
            index[0] += 1
            return feed

        def recording_dispatch(*args, **kwargs):
            index[0] = 0
            return dispatch(*args, **kwargs)

        monkeypatch.setattr(sharding.runner, "plan_feed", recording_plan)
        monkeypatch.setattr(runner, "dispatch", recording_dispatch)


@pytest.mark.parametrize(
    "mesh, engine_options",
    [
        ({"pipeline_parallel_size": 2}, {}),
        ({"pipeline_parallel_size": 2}, {"max_num_batched_tokens": 16}),  # prompts prefilled in chunks
        ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, {}),
        ({"pipeline_parallel_size": 2}, {"num_gpu_blocks_override": 24, "block_size": 4}),  # preempts requests
    ],
    ids=["pp2", "pp2-chunked", "tp2xpp2", "pp2-preempting"],
)
def test_pipeline_scheduled_ahead_equals_one_step_at_a_time(tiny_llama_dir, monkeypatch, mesh, engine_options):
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=4)
    params = mixed_params(stop_token=5)
    sync = make_llm(tiny_llama_dir, async_scheduling=False, **mesh, **engine_options)
    ahead = make_llm(tiny_llama_dir, **mesh, **engine_options)
    assert ahead.llm_engine.core.async_scheduling and not sync.llm_engine.core.async_scheduling
    runner = ahead.llm_engine.runner
    assert runner.num_microbatches == 2
    log = FeedLog(monkeypatch, runner)
    expected = outputs_of(sync, prompts, params)
    assert_same_outputs(outputs_of(ahead, prompts, params), expected)
    sources = [feed.sources for _, feed in log.feeds]
    assert any(len(s) == 1 for s in sources), "no microbatch read one result alone"
    assert any(len(s) > 1 for s in sources), "no microbatch merged several results"
    if "num_gpu_blocks_override" in engine_options:
        assert ahead.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("mesh", [{"pipeline_parallel_size": 2}, {"tensor_parallel_size": 2}], ids=["pp2", "tp2"])
def test_penalties_scheduled_ahead_on_a_mesh_equal_one_step_at_a_time(tiny_llama_dir, mesh):
    """The mesh's head counts each penalised row's output token still in flight (read from the vector its microbatch's
    pending tokens came from), so penalties need not wait for the host here either."""
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=4)
    params = penalty_params()
    sync = make_llm(tiny_llama_dir, async_scheduling=False, **mesh)
    ahead = make_llm(tiny_llama_dir, **mesh)
    log = StepLog(ahead.llm_engine.runner)
    assert_same_outputs(outputs_of(ahead, prompts, params), outputs_of(sync, prompts, params))
    assert log.num_ahead >= log.kinds.count("collect") // 2


def test_merges_compile_at_warm_up_not_while_serving(tiny_llama_dir, monkeypatch):
    merge_pending.clear_cache()
    llm = make_llm(tiny_llama_dir, pipeline_parallel_size=2)
    compiled = merge_pending._cache_size()
    assert compiled == 1  # two microbatches: one way to merge (both results)
    log = FeedLog(monkeypatch, llm.llm_engine.runner)
    outputs_of(llm, random_token_prompts(len(LENGTHS), LENGTHS, seed=4), mixed_params(stop_token=5))
    assert any(len(feed.sources) > 1 for _, feed in log.feeds)
    assert merge_pending._cache_size() == compiled


def test_steady_decode_feeds_each_microbatch_from_its_own_predecessor(tiny_llama_dir, monkeypatch):
    """Eight prompts prefilled in one step, then decoding together for 11 steps: every microbatch k reads the previous
    step's microbatch k alone (so stage 0 can take microbatch 0 of the next step while microbatch 1 is on stage 1)."""
    llm = make_llm(tiny_llama_dir, pipeline_parallel_size=2, max_num_batched_tokens=128)
    runner = llm.llm_engine.runner
    log = FeedLog(monkeypatch, runner)
    prompts = random_token_prompts(8, [9] * 8, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs)
    fed = [(index, feed.sources) for index, feed in log.feeds if feed.sources]
    assert len(fed) >= 2 * 10  # both microbatches of the decode steps scheduled ahead
    assert all(sources == (index,) for index, sources in fed), fed
