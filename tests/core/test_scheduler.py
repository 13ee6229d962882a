"""Scheduler: token budget, chunked prefill, max_num_seqs, prefix caching, preemption, stop checks, rejection, abort.

Runs against ``ToyRunner`` (next token = last token + 1, with a fake paged KV cache that checks every block table),
so each request's output stream is known exactly whatever the batching.
"""

import random

import pytest

from jaxllm.core.block_manager import BlockManager
from jaxllm.core.scheduler import Scheduler
from jaxllm.core.scheduler_config import SchedulerConfig
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams
from tests.core.toy_runner import ToyRunner, expected_output, reference_schedule, run_to_completion, toy_logprobs

VOCAB = 50


def make_engine(**changes) -> tuple[Scheduler, ToyRunner]:
    settings = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=65)
    settings.update(changes)
    config = SchedulerConfig(**settings)
    manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
    return Scheduler(config, manager), ToyRunner(config.num_blocks, config.block_size, VOCAB)


def make_request(request_id: str, prompt: list[int], eos: int | None = None, **params) -> Request:
    eos_ids = frozenset() if eos is None else frozenset([eos])
    return Request(request_id, prompt, SamplingParams(**params), eos_token_ids=eos_ids)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def streamed_tokens(steps) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for step in steps:
        for output in step.outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    return tokens


def run_requests(scheduler, runner, prompts, max_tokens):
    for i, (prompt, num) in enumerate(zip(prompts, max_tokens, strict=True)):
        scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=num))
    return run_to_completion(scheduler, runner)


def test_token_budget_split_in_admission_order():
    scheduler, runner = make_engine(max_num_batched_tokens=10)
    rng = random.Random(0)
    steps = run_requests(scheduler, runner, [random_prompt(rng, 4) for _ in range(3)], [3, 3, 3])
    assert steps[0].scheduled == [("r0", 0, 4), ("r1", 0, 4), ("r2", 0, 2)]
    assert steps[1].scheduled == [("r0", 4, 1), ("r1", 4, 1), ("r2", 2, 2)]
    assert steps[2].scheduled == [("r0", 5, 1), ("r1", 5, 1), ("r2", 4, 1)]


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_schedule_matches_reference_rule(chunked, seed):
    rng = random.Random(seed)
    num_requests = 12
    budget, max_num_seqs = rng.choice([(16, 4), (24, 3), (40, 8)])
    prompt_lens = [rng.randrange(1, budget + 1) for _ in range(num_requests)]
    max_tokens = [rng.randrange(1, 9) for _ in range(num_requests)]
    scheduler, runner = make_engine(
        max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, enable_chunked_prefill=chunked
    )
    prompts = [random_prompt(rng, n) for n in prompt_lens]
    steps = run_requests(scheduler, runner, prompts, max_tokens)
    reference = reference_schedule(prompt_lens, max_tokens, budget, max_num_seqs, chunked)
    assert [s.scheduled for s in steps] == [[(f"r{r}", c, n) for r, c, n in step] for step in reference]
    tokens = streamed_tokens(steps)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == expected_output(prompt, max_tokens[i], VOCAB)


def test_chunked_prefill_exact_chunks():
    scheduler, runner = make_engine(max_num_batched_tokens=8)
    prompt = random_prompt(random.Random(4), 25)
    steps = run_requests(scheduler, runner, [prompt], [2])
    assert [s.scheduled for s in steps] == [[("r0", c, n)] for c, n in [(0, 8), (8, 8), (16, 8), (24, 1), (25, 1)]]
    assert [len(s.outputs) for s in steps] == [0, 0, 0, 1, 1]  # a sample only once the prompt is all computed
    assert streamed_tokens(steps)["r0"] == expected_output(prompt, 2, VOCAB)


def test_chunking_disabled_waits_for_room_and_rejects_long_prompts():
    scheduler, runner = make_engine(max_num_batched_tokens=10, enable_chunked_prefill=False)
    rng = random.Random(5)
    prompts = [random_prompt(rng, n) for n in (6, 6, 3)]
    steps = run_requests(scheduler, runner, prompts, [2, 2, 2])
    assert steps[0].scheduled == [("r0", 0, 6)]  # r1 does not fit the 4 tokens left and is not chunked
    assert steps[1].scheduled == [("r0", 6, 1), ("r1", 0, 6), ("r2", 0, 3)]
    with pytest.raises(ValueError) as error:
        scheduler.add_request(make_request("long", random_prompt(rng, 11), max_tokens=2))
    assert "11 tokens" in str(error.value) and "max_num_batched_tokens=10" in str(error.value)


def test_max_num_seqs_limits_running_requests():
    scheduler, runner = make_engine(max_num_seqs=2, max_num_batched_tokens=64)
    rng = random.Random(6)
    prompts = [random_prompt(rng, 5) for _ in range(5)]
    max_tokens = [4, 6, 3, 3, 3]
    steps = run_requests(scheduler, runner, prompts, max_tokens)
    assert max(len(s.scheduled) for s in steps) == 2
    first_step = {}
    for index, step in enumerate(steps):
        for request_id, _, _ in step.scheduled:
            first_step.setdefault(request_id, index)
    assert first_step["r2"] == 4  # r0 finishes in step 3 (4 tokens), r2 takes its place in step 4
    tokens = streamed_tokens(steps)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == expected_output(prompt, max_tokens[i], VOCAB)


def test_prefix_cache_hit_shares_blocks_of_running_request():
    scheduler, runner = make_engine(max_num_batched_tokens=32)
    rng = random.Random(7)
    prefix = random_prompt(rng, 17)
    first = make_request("first", prefix + random_prompt(rng, 1), max_tokens=6)
    scheduler.add_request(first)
    scheduler.update_from_output(output := scheduler.schedule(), runner.execute(output))
    second = make_request("second", prefix[:16] + random_prompt(rng, 3), max_tokens=6)
    scheduler.add_request(second)
    output = scheduler.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.num_scheduled_tokens) for s in output.scheduled] == [
        ("first", 18, 1),
        ("second", 16, 3),
    ]
    assert second.block_ids[:4] == first.block_ids[:4]
    assert [scheduler.block_manager.ref_counts[b] for b in second.block_ids[:5]] == [2, 2, 2, 2, 1]
    assert second.num_cached_prompt_tokens == 16
    scheduler.update_from_output(output, runner.execute(output))
    run_to_completion(scheduler, runner)
    assert first.output_token_ids == expected_output(first.prompt_token_ids, 6, VOCAB)
    assert second.output_token_ids == expected_output(second.prompt_token_ids, 6, VOCAB)
    assert scheduler.block_manager.num_prefix_cache_hits == 16
    assert scheduler.block_manager.num_free_blocks == scheduler.config.num_usable_blocks


def test_prefix_cache_disabled_recomputes():
    scheduler, runner = make_engine(enable_prefix_caching=False)
    prompt = random_prompt(random.Random(8), 13)
    scheduler.add_request(make_request("a", prompt, max_tokens=2))
    run_to_completion(scheduler, runner)
    scheduler.add_request(make_request("b", prompt, max_tokens=2))
    assert scheduler.schedule().scheduled[0].num_computed_tokens == 0


def test_lru_keeps_recently_freed_prefixes():
    # 6 usable blocks of 4 tokens. A 9-token request holds 3 blocks: 2 full ones get cached, the partial one is
    # reused first. After 4 such requests in turn, the 6 blocks hold one partial block and 5 cached ones: r3's and
    # r2's two each, and r1's first block (r1's deeper block and all of r0's were the least recently freed).
    scheduler, runner = make_engine(num_blocks=7, max_num_seqs=1)
    rng = random.Random(9)
    prompts = [random_prompt(rng, 9) for _ in range(4)]
    for i, prompt in enumerate(prompts):
        scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=1))
        run_to_completion(scheduler, runner)
    hits = [scheduler.block_manager.get_computed_blocks(make_request("probe", p))[1] for p in prompts]
    assert hits == [0, 4, 8, 8]


def check_victims_are_most_recent(steps):
    for step in steps:
        if step.preempted_request_ids:
            num = len(step.preempted_request_ids)
            assert step.preempted_request_ids == step.running_before[::-1][:num]


@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_when_blocks_run_out(chunked):
    # 10 usable blocks; each request ends holding ceil(17 / 4) = 5 blocks, so four cannot all grow.
    scheduler, runner = make_engine(num_blocks=11, max_num_batched_tokens=12, enable_chunked_prefill=chunked)
    rng = random.Random(10)
    prompts = [random_prompt(rng, 6) for _ in range(4)]
    steps = run_requests(scheduler, runner, prompts, [12] * 4)
    assert scheduler.num_preemptions > 0
    check_victims_are_most_recent(steps)
    tokens = streamed_tokens(steps)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == expected_output(prompt, 12, VOCAB)
    assert scheduler.block_manager.num_free_blocks == 10


def test_chunking_disabled_still_chunks_a_resumed_request_longer_than_budget():
    # 8 usable blocks; two requests of 6 + 12 tokens need 5 each: r1 is preempted holding 17 tokens, more than
    # the budget of 8, so without a forced chunk it could never run again. (No prefix cache: it would shorten this.)
    scheduler, runner = make_engine(
        num_blocks=9, max_num_batched_tokens=8, enable_chunked_prefill=False, enable_prefix_caching=False
    )
    rng = random.Random(22)
    prompts = [random_prompt(rng, 6) for _ in range(2)]
    steps = run_requests(scheduler, runner, prompts, [12, 12])
    assert scheduler.num_preemptions == 1
    check_victims_are_most_recent(steps)
    resumed = [(c, n) for s in steps for rid, c, n in s.scheduled if rid == "r1" and n > 1]
    assert resumed[0] == (0, 6)  # the prompt, whole
    assert resumed[1:] == [(0, 8), (8, 8)]  # recompute of 17 tokens, chunked
    tokens = streamed_tokens(steps)
    assert tokens["r0"] == expected_output(prompts[0], 12, VOCAB)
    assert tokens["r1"] == expected_output(prompts[1], 12, VOCAB)


def test_preempted_request_goes_to_front_of_waiting():
    scheduler, runner = make_engine(num_blocks=9, max_num_batched_tokens=32, max_num_seqs=2, max_model_len=32)
    rng = random.Random(11)
    requests = [make_request(f"r{i}", random_prompt(rng, 8), max_tokens=16) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    while not scheduler.num_preemptions:
        scheduler.update_from_output(output := scheduler.schedule(), runner.execute(output))
    assert output.preempted_request_ids == ["r1"]
    assert [r.request_id for r in scheduler.waiting] == ["r1", "r2"]
    assert requests[1].status == RequestStatus.PREEMPTED and requests[1].num_computed_tokens == 0
    assert requests[1].block_ids == [] and requests[1].num_preemptions == 1
    run_to_completion(scheduler, runner)
    for request in requests:
        assert request.output_token_ids == expected_output(request.prompt_token_ids, 16, VOCAB)


def test_many_requests_with_preemption_and_prefix_sharing():
    scheduler, runner = make_engine(num_blocks=60, max_num_batched_tokens=64, max_num_seqs=32, max_model_len=96)
    rng = random.Random(12)
    system = random_prompt(rng, 20)
    prompts = [system + random_prompt(rng, rng.randrange(1, 30)) for _ in range(256)]
    max_tokens = [rng.randrange(1, 24) for _ in range(256)]
    steps = run_requests(scheduler, runner, prompts, max_tokens)
    check_victims_are_most_recent(steps)
    tokens = streamed_tokens(steps)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == expected_output(prompt, max_tokens[i], VOCAB)
    assert scheduler.num_preemptions > 0 and scheduler.block_manager.num_prefix_cache_hits > 0
    assert scheduler.num_finished_requests == 256


def test_request_that_can_never_fit_is_rejected_alone():
    # 4 usable blocks of 4 tokens: a request may hold 16 K/V slots, i.e. reach 17 tokens (the last is never fed).
    scheduler, runner = make_engine(num_blocks=5, max_model_len=32)
    rng = random.Random(13)
    good = [
        make_request("a", random_prompt(rng, 5), max_tokens=6),
        make_request("b", random_prompt(rng, 10), max_tokens=7),
    ]
    for request in good:
        scheduler.add_request(request)
    bad = {
        "blocks": (make_request("blocks", random_prompt(rng, 10), max_tokens=8), ["5 KV blocks", "only 4"]),
        "open": (make_request("open", random_prompt(rng, 32), max_tokens=None), ["32 tokens", "max_model_len=32"]),
        "empty": (make_request("empty", [], max_tokens=2), ["empty prompt"]),
        "dup": (make_request("a", random_prompt(rng, 3), max_tokens=2), ["'a'", "already in use"]),
    }
    for request, fragments in bad.values():
        with pytest.raises(ValueError) as error:
            scheduler.add_request(request)
        assert all(f in str(error.value) for f in fragments), str(error.value)
    assert list(scheduler.requests) == ["a", "b"] and list(scheduler.waiting) == good
    run_to_completion(scheduler, runner)
    assert good[0].output_token_ids == expected_output(good[0].prompt_token_ids, 6, VOCAB)
    assert good[1].output_token_ids == expected_output(good[1].prompt_token_ids, 7, VOCAB)


def run_one(request: Request, **config) -> Request:
    scheduler, runner = make_engine(**config)
    scheduler.add_request(request)
    run_to_completion(scheduler, runner)
    return request


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos_and_ignore_eos(ignore_eos):
    prompt = random_prompt(random.Random(14), 7)
    eos = expected_output(prompt, 3, VOCAB)[2]
    request = run_one(make_request("a", prompt, eos=eos, max_tokens=10, ignore_eos=ignore_eos))
    num = 10 if ignore_eos else 3
    assert request.output_token_ids == expected_output(prompt, num, VOCAB)
    assert request.status == (RequestStatus.FINISHED_LENGTH if ignore_eos else RequestStatus.FINISHED_STOPPED)
    assert request.stop_reason is None


def test_stop_token_ids_set_stop_reason():
    prompt = random_prompt(random.Random(15), 7)
    stop_id = expected_output(prompt, 4, VOCAB)[3]
    request = run_one(make_request("a", prompt, max_tokens=10, stop_token_ids=[stop_id]))
    assert request.output_token_ids == expected_output(prompt, 4, VOCAB)
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == stop_id


@pytest.mark.parametrize("min_tokens, expected_len", [(3, 3), (4, 3 + VOCAB)])
def test_min_tokens_delays_eos(min_tokens, expected_len):
    # EOS comes as the 3rd output token and again VOCAB tokens later (the toy model counts modulo VOCAB).
    prompt = random_prompt(random.Random(16), 5)
    eos = expected_output(prompt, 3, VOCAB)[2]
    request = make_request("a", prompt, eos=eos, max_tokens=60, min_tokens=min_tokens)
    run_one(request, max_model_len=128, max_num_batched_tokens=64)
    assert request.output_token_ids == expected_output(prompt, expected_len, VOCAB)
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_eos_on_last_allowed_token_is_a_stop():
    prompt = random_prompt(random.Random(17), 5)
    eos = expected_output(prompt, 4, VOCAB)[3]
    request = run_one(make_request("a", prompt, eos=eos, max_tokens=4))
    assert request.num_output_tokens == 4 and request.status == RequestStatus.FINISHED_STOPPED


@pytest.mark.parametrize("max_tokens", [None, 30])  # 30: past max_model_len, which caps it as in vLLM
def test_max_tokens_none_or_too_many_runs_to_max_model_len(max_tokens):
    prompt = random_prompt(random.Random(18), 10)
    request = run_one(make_request("a", prompt, max_tokens=max_tokens), max_model_len=24)
    assert request.output_token_ids == expected_output(prompt, 14, VOCAB)
    assert request.status == RequestStatus.FINISHED_LENGTH


def test_logprobs_are_recorded():
    prompt = random_prompt(random.Random(19), 6)
    scheduler, runner = make_engine()
    request = make_request("a", prompt, max_tokens=5, logprobs=2)
    scheduler.add_request(request)
    steps = run_to_completion(scheduler, runner)
    tokens = expected_output(prompt, 5, VOCAB)
    expected = [toy_logprobs(t, 2, VOCAB) for t in tokens]
    assert request.output_logprobs == [
        dict(zip(e.top_token_ids, e.top_logprobs, strict=True)) | {t: e.sampled_logprob}
        for t, e in zip(tokens, expected, strict=True)
    ]
    assert request.cumulative_logprob == pytest.approx(sum(e.sampled_logprob for e in expected))
    assert [o.new_logprobs for s in steps for o in s.outputs] == [[e] for e in expected]


def test_abort_running_and_waiting_requests():
    scheduler, runner = make_engine(max_num_seqs=2)
    rng = random.Random(20)
    requests = [make_request(f"r{i}", random_prompt(rng, 9), max_tokens=8) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    for _ in range(3):
        scheduler.update_from_output(output := scheduler.schedule(), runner.execute(output))
    held = len(requests[0].block_ids)
    finished = scheduler.finish_requests(["r0", "r2", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in finished} == {"r0", "r2"}
    assert requests[0].status == requests[2].status == RequestStatus.FINISHED_ABORTED
    assert requests[0].block_ids == [] and held > 0
    assert [r.request_id for r in scheduler.running] == ["r1"] and not scheduler.waiting
    run_to_completion(scheduler, runner)
    assert requests[1].output_token_ids == expected_output(requests[1].prompt_token_ids, 8, VOCAB)
    assert scheduler.block_manager.num_free_blocks == scheduler.config.num_usable_blocks
    with pytest.raises(ValueError) as error:
        scheduler.finish_requests("r1", RequestStatus.RUNNING)
    assert "RUNNING" in str(error.value)


def test_abort_between_schedule_and_update():
    scheduler, runner = make_engine()
    rng = random.Random(21)
    a, b = (
        make_request("a", random_prompt(rng, 5), max_tokens=3),
        make_request("b", random_prompt(rng, 5), max_tokens=3),
    )
    scheduler.add_request(a)
    scheduler.add_request(b)
    output = scheduler.schedule()
    runner_output = runner.execute(output)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    outputs = scheduler.update_from_output(output, runner_output)
    assert [o.request_id for o in outputs] == ["b"] and a.num_output_tokens == 0
    run_to_completion(scheduler, runner)
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 3, VOCAB)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(num_blocks=1), "num_blocks must be at least 2, got 1"),
        (dict(block_size=0), "block_size must be at least 1, got 0"),
        (dict(max_num_seqs=-3), "max_num_seqs must be at least 1, got -3"),
        (dict(enable_prefix_caching="yes"), "enable_prefix_caching must be a bool, got 'yes'"),
    ],
)
def test_config_validation(changes, fragment):
    settings = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=65)
    with pytest.raises((ValueError, TypeError)) as error:
        SchedulerConfig(**(settings | changes))
    assert fragment in str(error.value)
