"""The launch thread (mesh engines' default on GPUs; ``JAXLLM_MESH_LAUNCH_THREAD=1`` elsewhere): a tensor- or
pipeline-parallel engine launching each step on a worker thread (and scheduling ahead) gives exactly the tokens,
stops, logprobs and preemptions of the same mesh run one step at a time (``async_scheduling=False``: no dispatch, no
launch thread), over mixed sampling parameters; the launches do run on the worker, and each step's host work
(packing its inputs, no device array) on the engine's thread. A step's result buffers go back to the
pool only after the next step's launch, which reads them as its pending tokens, has run. The switch: on for GPUs
unless set to 0, elsewhere only when set to 1 (tested in ``tests/engine/test_launch_thread.py``)."""

import threading
import time

import numpy as np
import pytest

from sharding.engine_runners import LAUNCH_THREAD_ENV
from sharding.runner import LaunchedResult
from tests.engine.conftest import make_llm, random_token_prompts
from tests.engine.test_async_scheduling import LENGTHS, assert_same_outputs, mixed_params, outputs_of
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


@pytest.mark.parametrize(
    "engine_options",
    [
        {"tensor_parallel_size": 2},
        {"tensor_parallel_size": 2, "num_gpu_blocks_override": 24, "block_size": 4},  # preempts requests
        {"pipeline_parallel_size": 2},  # two microbatches per launch
    ],
    ids=["tp2", "tp2-preempting", "pp2"],
)
def test_launch_thread_equals_launching_inline(tiny_llama_dir, monkeypatch, engine_options):
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=4)
    params = mixed_params(stop_token=5)
    sync = make_llm(tiny_llama_dir, async_scheduling=False, **engine_options)
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "1")
    threaded = make_llm(tiny_llama_dir, **engine_options)
    runner = threaded.llm_engine.runner
    assert runner._launcher is not None and threaded.llm_engine.core.async_scheduling

    launch_threads, prepare_threads, host_buffers, results = set(), set(), [], []
    launch, prepare, dispatch = runner.pipeline.launch, runner.pipeline.prepare, runner.dispatch

    def recording_launch(*args, **kwargs):
        launch_threads.add(threading.current_thread().name)
        return launch(*args, **kwargs)

    def recording_prepare(*args, **kwargs):
        prepare_threads.add(threading.current_thread().name)
        call = prepare(*args, **kwargs)
        host_buffers.extend(packed.buffer for packed in [*call.stages, call.head])
        return call

    def recording_dispatch(*args, **kwargs):
        step = dispatch(*args, **kwargs)
        results.append(step.result)
        return step

    runner.pipeline.launch, runner.pipeline.prepare = recording_launch, recording_prepare
    runner.dispatch = recording_dispatch
    expected = outputs_of(sync, prompts, params)
    assert_same_outputs(outputs_of(threaded, prompts, params), expected)
    assert launch_threads and all(name.startswith("jaxllm-launch") for name in launch_threads)
    assert prepare_threads == {threading.current_thread().name}  # the host work stays on the engine's thread
    # the copies to the devices are the launch's (see sharding.step_inputs: a buffer placed early changes address)
    assert host_buffers and all(isinstance(buffer, np.ndarray) for buffer in host_buffers)
    assert results and all(isinstance(result, LaunchedResult) for result in results)
    if "num_gpu_blocks_override" in engine_options:
        assert threaded.llm_engine.scheduler.num_preemptions > 0


def test_results_are_released_only_after_the_next_launch_read_them(tiny_llama_dir, monkeypatch):
    """Launches slowed down so the engine collects step N (and would hand its buffers back) while step N+1's launch,
    which feeds N's token ids to its microbatches, has not run: on GPUs (PP 2, session 20) a later microbatch's
    stage took and donated a buffer an earlier one had not read yet ("Array has been deleted")."""
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=5)
    params = mixed_params(stop_token=5)
    sync = make_llm(tiny_llama_dir, async_scheduling=False, pipeline_parallel_size=2)
    monkeypatch.setenv(LAUNCH_THREAD_ENV, "1")
    threaded = make_llm(tiny_llama_dir, pipeline_parallel_size=2)
    runner = threaded.llm_engine.runner
    assert runner.pipeline.stages[-1].results.enabled  # stable step outputs: released buffers are donated later
    readers, early_releases, num_releases = [], [], [0]  # readers: (step's result, the next step's launch)
    launch, dispatch, release = runner.pipeline.launch, runner.dispatch, runner.pipeline.release

    def slow_launch(*args, **kwargs):
        time.sleep(0.02)
        return launch(*args, **kwargs)

    def recording_dispatch(scheduler_output, prev=None):
        step = dispatch(scheduler_output, prev)
        if prev is not None:
            readers.append((prev.result, step.result))
        return step

    def checked_release(results):
        num_releases[0] += 1
        for read, reader in list(readers):
            if read._future.done() and read.get() is results and not reader._future.done():
                early_releases.append(len(early_releases))
        return release(results)

    runner.pipeline.launch, runner.dispatch, runner.pipeline.release = slow_launch, recording_dispatch, checked_release
    expected = outputs_of(sync, prompts, params)
    assert_same_outputs(outputs_of(threaded, prompts, params), expected)
    runner._launcher.submit(lambda: None).result()  # the last collected step's release, queued on the worker, has run
    assert readers and num_releases[0] >= len(readers)
    assert not early_releases, f"{len(early_releases)} of {num_releases[0]} releases came before the reading launch"
