"""Async scheduling (step N+1 dispatched before step N's tokens reach the host) gives the synchronous engine's tokens
exactly (logprob values to float32 noise where the step composition differs): greedy and seeded sampling, logprobs,
min_tokens, stops on EOS / stop tokens mid-flight, chunked prefill, prefix caching, preemption, penalties (scheduled
ahead too: they count the output token still in flight) and aborts between steps."""

import time

import numpy as np
import pytest

from jaxllm import RequestOutputKind, SamplingParams
from tests.engine.conftest import make_llm, random_token_prompts

LENGTHS = np.random.default_rng(11).integers(1, 70, size=24)


def outputs_of(llm, prompts, params):
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
        for o in llm.generate(prompts, params, use_tqdm=False)
    ]


def assert_same_outputs(got, want):
    """Tokens, finish and stop reasons exactly; logprobs with the same ids and ranks, values to float32 noise (a
    different step composition, e.g. after other preemptions, may sum attention in another order)."""
    assert len(got) == len(want)
    for got_request, want_request in zip(got, want, strict=True):
        assert [c[:3] for c in got_request] == [c[:3] for c in want_request]
        for (*_, got_logprobs), (*_, want_logprobs) in zip(got_request, want_request, strict=True):
            if want_logprobs is None:
                assert got_logprobs is None
                continue
            for got_step, want_step in zip(got_logprobs, want_logprobs, strict=True):
                assert {t: lp.rank for t, lp in got_step.items()} == {t: lp.rank for t, lp in want_step.items()}
                for token, want_lp in want_step.items():
                    assert abs(got_step[token].logprob - want_lp.logprob) < 1e-5


def mixed_params(stop_token: int) -> list[SamplingParams]:
    """One per prompt: greedy, seeded random with top-k/top-p (n=2), logprobs, min_tokens, stop tokens, lengths."""
    rng = np.random.default_rng(5)
    params = []
    for i in range(len(LENGTHS)):
        kind = i % 5
        max_tokens = int(rng.integers(1, 14))
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens))
        elif kind == 1:  # two seeded samples of one prompt (sibling requests sharing its cached blocks)
            params.append(SamplingParams(n=2, temperature=0.9, top_k=20, top_p=0.9, seed=i, max_tokens=max_tokens))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=3))
        elif kind == 3:
            params.append(SamplingParams(temperature=0.8, seed=i, min_tokens=3, max_tokens=12, stop_token_ids=[7]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=14, stop_token_ids=[stop_token]))
    return params


@pytest.fixture(scope="module")
def prompts():
    return random_token_prompts(len(LENGTHS), LENGTHS, seed=4)


@pytest.fixture(scope="module")
def stop_token(tiny_model_dir, prompts):
    """A token the greedy run of the last prompt produces at its 4th step: that request stops mid-flight."""
    llm = make_llm(tiny_model_dir, async_scheduling=False)
    tokens = llm.generate(prompts[-1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    return tokens[0].outputs[0].token_ids[3]


@pytest.mark.parametrize(
    "engine_options",
    [
        {},
        {"max_num_batched_tokens": 16},  # long prompts prefill in chunks across steps
        {"num_gpu_blocks_override": 24, "block_size": 4},  # too few blocks: requests are preempted
    ],
    ids=["default", "chunked", "preempting"],
)
def test_async_equals_sync(tiny_model_dir, prompts, stop_token, engine_options):
    params = mixed_params(stop_token)
    sync = make_llm(tiny_model_dir, async_scheduling=False, **engine_options)
    fast = make_llm(tiny_model_dir, **engine_options)
    assert fast.llm_engine.core.async_scheduling and not sync.llm_engine.core.async_scheduling
    expected = outputs_of(sync, prompts, params)
    assert_same_outputs(outputs_of(fast, prompts, params), expected)
    assert any(o[0][1] == "stop" for o in expected)  # stop tokens really ended some requests early
    if "num_gpu_blocks_override" in engine_options:
        assert fast.llm_engine.scheduler.num_preemptions > 0
    # Second pass: prefix-cache hits while scheduling ahead (hits change float sums slightly, so compare with the
    # synchronous engine's own second pass).
    assert_same_outputs(outputs_of(fast, prompts, params), outputs_of(sync, prompts, params))


class StepLog:
    """Records ``runner``'s dispatches and collects in order."""

    def __init__(self, runner):
        self.kinds: list[str] = []
        dispatch, collect = runner.dispatch, runner.collect

        def recording_dispatch(scheduler_output, prev=None):
            self.kinds.append("dispatch")
            return dispatch(scheduler_output, prev)

        def recording_collect(step):
            self.kinds.append("collect")
            return collect(step)

        runner.dispatch, runner.collect = recording_dispatch, recording_collect

    @property
    def num_ahead(self) -> int:
        """Dispatches made while another step was in flight (not yet collected)."""
        in_flight, ahead = 0, 0
        for kind in self.kinds:
            if kind == "dispatch":
                ahead += in_flight > 0
                in_flight += 1
            else:
                in_flight -= 1
        return ahead


def test_steps_overlap(tiny_model_dir, prompts):
    """The next step is dispatched before the previous one is collected (that is the point)."""
    llm = make_llm(tiny_model_dir)
    log = StepLog(llm.llm_engine.runner)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    kinds = log.kinds
    assert kinds[:3] == ["dispatch", "dispatch", "collect"]
    assert kinds.count("collect") == 6 + 1  # 1 prefill step + 5 decode steps
    assert kinds.count("dispatch") >= kinds.count("collect")


def test_step_times_split_host_work_from_device_wait(tiny_model_dir, prompts):
    """Every step is counted; host work slowed by 20 ms per collect shows as host time, not as device wait."""
    llm = make_llm(tiny_model_dir)
    runner, collect = llm.llm_engine.runner, llm.llm_engine.runner.collect
    collects = []

    def slow_collect(step):
        collects.append(step)
        time.sleep(0.02)
        return collect(step)

    runner.collect = slow_collect
    llm.llm_engine.step_times.reset()
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    times = llm.llm_engine.step_times.summary()
    assert times["num_steps"] == len(collects) > 0
    assert times["host_ms"] >= 20.0 and times["device_wait_ms"] >= 0.0
    assert times["host_ms"] + times["device_wait_ms"] == pytest.approx(times["step_ms"])

    sync = make_llm(tiny_model_dir, async_scheduling=False)
    sync.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    times = sync.llm_engine.step_times.summary()
    assert times["num_steps"] == 3 and times["step_ms"] > 0  # one prefill step, two decode steps
    assert times["host_ms"] is None and times["device_wait_ms"] is None  # a synchronous step cannot tell them apart


def penalty_params() -> list[SamplingParams]:
    """One per prompt: frequency, presence and repetition penalties on greedy and seeded random rows (one with
    logprobs), beside greedy rows without any."""
    params = []
    for i in range(len(LENGTHS)):
        kind, max_tokens = i % 4, 6 + i % 7
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, frequency_penalty=0.8))
        elif kind == 1:
            params.append(
                SamplingParams(
                    temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.5, presence_penalty=0.6, logprobs=2
                )
            )
        elif kind == 2:
            params.append(
                SamplingParams(
                    temperature=0.9, seed=i, max_tokens=max_tokens, frequency_penalty=0.5, repetition_penalty=1.2
                )
            )
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return params


@pytest.mark.parametrize(
    "engine_options",
    [{}, {"num_gpu_blocks_override": 24, "block_size": 4}],
    ids=["default", "preempting"],
)
def test_penalties_schedule_ahead_and_match(tiny_model_dir, prompts, engine_options):
    """Penalised requests are scheduled ahead: the penalties count the output token still in flight on the device,
    so the tokens equal one step at a time's."""
    params = penalty_params()
    sync = make_llm(tiny_model_dir, async_scheduling=False, **engine_options)
    fast = make_llm(tiny_model_dir, **engine_options)
    log = StepLog(fast.llm_engine.runner)
    assert_same_outputs(outputs_of(fast, prompts, params), outputs_of(sync, prompts, params))
    assert log.num_ahead >= log.kinds.count("collect") // 2  # most steps were dispatched ahead
    if "num_gpu_blocks_override" in engine_options:
        assert fast.llm_engine.scheduler.num_preemptions > 0


def test_abort_between_steps_keeps_others(tiny_model_dir, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = outputs_of(make_llm(tiny_model_dir, async_scheduling=False), prompts[:5], greedy)
    engine = make_llm(tiny_model_dir).llm_engine
    for i, prompt in enumerate(prompts[:6]):
        engine.add_request(f"r{i}", prompt, greedy.clone(output_kind=RequestOutputKind.FINAL_ONLY))
    engine.step()
    engine.step()  # r5 now has a step in flight
    engine.abort_request("r5")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert sorted(finished) == [f"r{i}" for i in range(5)]
    got = [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in finished[f"r{i}"].outputs] for i in range(5)
    ]
    assert got == expected
