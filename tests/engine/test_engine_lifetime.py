"""A dropped engine frees its device memory at ``del``: nothing in it refers back to itself (its caches and jitted
programs of its own methods hold it weakly, ``jaxllm.weak_methods``), so reference counting frees it without a
garbage collection. Automatic collection is off while the engine is dropped, so a cycle would keep it alive; the
collection before it clears what loading left behind (flax's own short-lived cycles). A dropped engine that still
sits in a cycle is freed by the full collection every engine start runs first."""

import contextlib
import gc
import threading
import weakref

import pytest

from tests.engine.conftest import make_llm, random_token_prompts


@contextlib.contextmanager
def automatic_collection_off():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _greedy_tokens(llm, prompts):
    from jaxllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _device_buffers(llm) -> list[weakref.ref]:
    """Weak references to one KV-cache buffer and every parameter array of the engine's (first) runner."""
    runner = llm.llm_engine.runner
    if hasattr(runner, "kv_caches"):  # one device
        kv, params = runner.kv_caches[0][0], runner.params
    else:  # a mesh: the pipeline's first stage
        stage = runner.pipeline.stages[0]
        kv, params = stage.kv_caches[0][0], stage.state
    import jax

    arrays = [kv] + [leaf for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)]
    assert len(arrays) > 5
    return [weakref.ref(a) for a in arrays]


def _launch_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("jaxllm-launch")}


@pytest.mark.parametrize(
    "mesh, env",
    [
        ({}, {}),
        ({}, {"JAXLLM_LAUNCH_THREAD": "1"}),  # the GPU default: steps launched from a thread of the runner's
        (dict(tensor_parallel_size=2, pipeline_parallel_size=2), {"JAXLLM_MESH_LAUNCH_THREAD": "0"}),
        (dict(tensor_parallel_size=2), {"JAXLLM_MESH_LAUNCH_THREAD": "1"}),  # likewise on a mesh
        (dict(data_parallel_size=2), {}),
        (dict(enable_sleep_mode=True), {}),  # its sleep state holds the runners, never the engine
    ],
    ids=["one-device", "one-device-launch-thread", "tp2-pp2", "tp2-launch-thread", "dp2", "sleep-mode"],
)
def test_del_frees_the_engine_and_its_device_buffers(tiny_model_dir, monkeypatch, mesh, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    prompts = random_token_prompts(2, [7, 12], seed=3)
    threads_before = _launch_threads()
    llm = make_llm(tiny_model_dir, **mesh)
    expected = _greedy_tokens(llm, prompts)
    engine, buffers = weakref.ref(llm.llm_engine), _device_buffers(llm)
    gc.collect()  # garbage left by loading and compiling; the engine itself is reachable and stays
    assert engine() is not None
    with automatic_collection_off():
        del llm
        assert engine() is None
        assert [b for b in buffers if b() is not None] == []
        assert _launch_threads() <= threads_before  # the runner's launch thread ended with it
    assert _greedy_tokens(make_llm(tiny_model_dir, **mesh), prompts) == expected  # the next engine works alike


def test_an_engine_kept_in_a_cycle_is_freed_when_the_next_one_starts(tiny_model_dir):
    prompts = random_token_prompts(2, [9, 5], seed=4)
    with automatic_collection_off():
        first = make_llm(tiny_model_dir)
        expected = _greedy_tokens(first, prompts)
        holder = {"llm": first}
        holder["self"] = holder  # the user's own cycle: only a collection frees it
        engine, buffers = weakref.ref(first.llm_engine), _device_buffers(first)
        del first, holder
        assert engine() is not None
        second = make_llm(tiny_model_dir)
        assert engine() is None and [b for b in buffers if b() is not None] == []
        assert _greedy_tokens(second, prompts) == expected
