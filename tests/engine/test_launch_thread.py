"""The one-device runner's launch thread (``JAXLLM_LAUNCH_THREAD``; on by default on GPUs): launching each step's
programs on a worker thread, while scheduling ahead, gives exactly the tokens, stops, logprobs, prompt logprobs and
preemptions of the same engine run one step at a time (``async_scheduling=False``); the programs are called on the
worker and the step's host work (packing, sampling metadata) stays on the engine's thread, as numpy; the KV cache
read from outside waits for the launches queued; sleep mode frees and rebuilds it. The switches (this one and the mesh
engines' ``JAXLLM_MESH_LAUNCH_THREAD``): on for GPUs unless set to 0, elsewhere only when set to 1; another value is
a ValueError naming the variable."""

import threading

import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.runner import model_runner
from jaxllm.runner.launch_thread import LAUNCH_THREAD_ENV, LaunchedResult, launch_thread_enabled
from sharding.engine_runners import LAUNCH_THREAD_ENV as MESH_LAUNCH_THREAD_ENV
from sharding.engine_runners import launch_thread_enabled as mesh_launch_thread_enabled
from tests.engine.conftest import make_llm, random_token_prompts
from tests.engine.test_async_scheduling import LENGTHS, assert_same_outputs, mixed_params, outputs_of

SWITCHES = [(LAUNCH_THREAD_ENV, launch_thread_enabled), (MESH_LAUNCH_THREAD_ENV, mesh_launch_thread_enabled)]


@pytest.mark.parametrize("env_name, enabled_on", SWITCHES, ids=["one-device", "mesh"])
@pytest.mark.parametrize(
    "setting, backend, enabled",
    [(None, "gpu", True), (None, "cpu", False), (None, "tpu", False), ("0", "gpu", False), ("1", "cpu", True)],
)
def test_launch_thread_switches(monkeypatch, env_name, enabled_on, setting, backend, enabled):
    if setting is None:
        monkeypatch.delenv(env_name, raising=False)
    else:
        monkeypatch.setenv(env_name, setting)
    assert enabled_on(backend) is enabled


@pytest.mark.parametrize("env_name, enabled_on", SWITCHES, ids=["one-device", "mesh"])
def test_launch_thread_switch_names_a_bad_value(monkeypatch, env_name, enabled_on):
    monkeypatch.setenv(env_name, "on")
    with pytest.raises(ValueError, match=f"{env_name} must be 0 or 1.*'on'"):
        enabled_on("gpu")


@pytest.mark.parametrize(
    "engine_options",
    [{}, {"num_gpu_blocks_override": 24, "block_size": 4}],  # the second preempts requests
    ids=["plain", "preempting"],
)
def test_launch_thread_equals_one_step_at_a_time(tiny_model_dir, monkeypatch, engine_options):
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=8)
    params = mixed_params(stop_token=5)
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "0")
    sync = make_llm(tiny_model_dir, async_scheduling=False, **engine_options)
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "1")
    threaded = make_llm(tiny_model_dir, **engine_options)
    runner = threaded.llm_engine.runner
    assert runner._launcher is not None and threaded.llm_engine.core.async_scheduling

    launch_threads, prepare_threads, host_inputs, results = set(), set(), [], []
    launch, prepare, dispatch = model_runner.launch_step, runner._prepare, runner.dispatch

    def recording_launch(*args, **kwargs):
        launch_threads.add(threading.current_thread().name)
        return launch(*args, **kwargs)

    def recording_prepare(*args, **kwargs):
        prepare_threads.add(threading.current_thread().name)
        bound = prepare(*args, **kwargs)
        forward_input, sampler_input, _ = bound.args[4]
        host_inputs.extend([forward_input.buffer, sampler_input.buffer])
        return bound

    def recording_dispatch(*args, **kwargs):
        step = dispatch(*args, **kwargs)
        results.append(step.result)
        return step

    expected = outputs_of(sync, prompts, params)
    monkeypatch.setattr(model_runner, "launch_step", recording_launch)
    runner._prepare, runner.dispatch = recording_prepare, recording_dispatch
    assert_same_outputs(outputs_of(threaded, prompts, params), expected)
    assert launch_threads and all(name.startswith("jaxllm-launch") for name in launch_threads)
    assert prepare_threads == {threading.current_thread().name}
    assert host_inputs and all(isinstance(buffer, np.ndarray) for buffer in host_inputs)
    assert results and all(isinstance(result, LaunchedResult) for result in results)
    if engine_options:
        assert threaded.llm_engine.scheduler.num_preemptions > 0


def test_prompt_logprobs_and_penalties_through_the_launch_thread(tiny_model_dir, monkeypatch):
    prompts = random_token_prompts(6, [9, 30, 4, 17, 25, 12], seed=2)
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=2, logprobs=3),
        SamplingParams(temperature=0.9, seed=7, max_tokens=10, repetition_penalty=1.4, presence_penalty=0.5),
    ] * 3
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "0")
    want = make_llm(tiny_model_dir, async_scheduling=False).generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "1")
    got = make_llm(tiny_model_dir).generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        if w.prompt_logprobs is not None:
            positions = [sorted(p) if p else p for p in g.prompt_logprobs]
            assert positions == [sorted(p) if p else p for p in w.prompt_logprobs]
            for gp, wp in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
                for token_id in wp:
                    np.testing.assert_allclose(gp[token_id].logprob, wp[token_id].logprob, rtol=1e-5, atol=1e-6)


def test_kv_cache_read_waits_for_queued_launches_and_sleep_mode_works(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "1")
    llm = make_llm(tiny_model_dir, enable_sleep_mode=True)
    prompts = random_token_prompts(3, [11, 5, 20], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    runner = llm.llm_engine.runner
    started, release = threading.Event(), threading.Event()

    def blocking_launch():
        started.set()
        release.wait(5)

    runner._launcher.submit(blocking_launch)
    started.wait(5)
    reader = threading.Thread(target=lambda: runner.kv_caches)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # waiting for the launch queued before it
    release.set()
    reader.join(5)
    assert not reader.is_alive()
    llm.sleep(level=1)
    assert runner.kv_caches is None
    llm.wake_up()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == before
