"""vLLM's ``LLM.sleep(level)`` / ``LLM.wake_up(tags)`` (``enable_sleep_mode=True``): an idle engine deletes its
parameter and KV-cache arrays from the devices, refuses requests while asleep, and after ``wake_up`` generates the
same tokens as before it slept: level 1 from the host copy of the weights, level 2 by loading the checkpoint again.
(On a mesh: tests/sharding/test_sleep_mode_mesh.py.)"""

import jax
import pytest

from jaxllm import SamplingParams
from tests.engine.conftest import LLAMA, make_llm, random_token_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


def greedy_tokens(llm, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def device_arrays(llm) -> list[jax.Array]:
    """Every parameter and KV-cache array of the engine's runner, as it holds them now."""
    runner = llm.llm_engine.runner
    return [*runner.param_arrays(), *jax.tree.leaves(runner.kv_caches)]


@pytest.fixture(scope="module")
def sleepy():
    """A checkpoint's engine with sleep mode, and its greedy tokens on a job before any sleep."""
    llm = make_llm(LLAMA, load_format="auto", enable_sleep_mode=True)
    prompts = random_token_prompts(3, [7, 30, 12], seed=3)
    return llm, prompts, greedy_tokens(llm, prompts)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_the_arrays_and_wake_up_gives_the_same_tokens(sleepy, level):
    llm, prompts, expected = sleepy
    before = device_arrays(llm)
    llm.sleep(level=level)
    assert llm.llm_engine.is_sleeping()
    assert all(array.is_deleted() for array in before)
    assert llm.llm_engine.runner.kv_caches is None
    with pytest.raises(ValueError, match=rf"asleep \(level {level}.*call wake_up\(\)"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.wake_up()
    assert not llm.llm_engine.is_sleeping()
    assert greedy_tokens(llm, prompts) == expected  # weights back (host copy / checkpoint), a fresh cache


def test_wake_up_by_tags_takes_requests_once_both_are_awake(sleepy):
    llm, prompts, expected = sleepy
    llm.sleep()
    llm.wake_up(["weights"])
    assert not any(array.is_deleted() for array in llm.llm_engine.runner.param_arrays())
    assert llm.llm_engine.runner.kv_caches is None and llm.llm_engine.is_sleeping()
    with pytest.raises(ValueError, match=r"asleep: \['kv_cache'\]"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.sleep()  # the woken weights go back to sleep (from their host copy again)
    assert all(array.is_deleted() for array in llm.llm_engine.runner.param_arrays())
    llm.wake_up(["kv_cache"])
    llm.sleep()  # and so does a woken KV cache
    assert llm.llm_engine.runner.kv_caches is None
    llm.wake_up(["kv_cache"])
    llm.wake_up(["weights"])
    llm.wake_up()  # awake already: nothing to do
    assert greedy_tokens(llm, prompts) == expected


def test_a_second_sleep_at_level_2_drops_the_host_copy(sleepy):
    llm, prompts, expected = sleepy
    llm.sleep(1)
    llm.sleep(1)  # asleep already: nothing changes
    llm.sleep(2)
    assert llm.llm_engine._sleep_mode.level == 2 and llm.llm_engine._sleep_mode._host_params is None
    llm.wake_up()
    assert greedy_tokens(llm, prompts) == expected


@pytest.mark.parametrize("level", [0, 3, True, "1", 1.0, None])
def test_a_bad_level_is_named(sleepy, level):
    llm, _, _ = sleepy
    with pytest.raises(ValueError, match=f"sleep level must be 1 .* or 2 .*got {level!r}"):
        llm.sleep(level)
    assert not llm.llm_engine.is_sleeping()


@pytest.mark.parametrize("tags", ["weights", [], ["weight"], ["weights", "kv"], 3])
def test_bad_tags_are_named(sleepy, tags):
    llm, prompts, expected = sleepy
    llm.sleep()
    with pytest.raises(ValueError, match="wake_up tags must be"):
        llm.wake_up(tags)
    llm.wake_up()
    assert greedy_tokens(llm, prompts) == expected


def test_sleep_waits_for_no_request_and_the_request_still_finishes(sleepy):
    llm, prompts, expected = sleepy
    engine = llm.llm_engine
    engine.add_request("busy", prompts[0], GREEDY)
    with pytest.raises(ValueError, match=r"sleep\(level=1\) with 1 unfinished request"):
        llm.sleep()
    assert not engine.is_sleeping()
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].token_ids for o in finished] == expected[:1]


def test_without_sleep_mode_sleep_and_wake_up_are_refused(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    prompts = random_token_prompts(1, [5], seed=1)
    expected = greedy_tokens(llm, prompts)
    for call in (llm.sleep, llm.wake_up):
        with pytest.raises(ValueError, match=r"needs sleep mode: build the engine with enable_sleep_mode=True"):
            call()
    assert greedy_tokens(llm, prompts) == expected
    with pytest.raises(TypeError, match="enable_sleep_mode must be a bool, got 1"):
        make_llm(tiny_model_dir, enable_sleep_mode=1)


def test_level_2_brings_the_same_dummy_weights_back(tiny_model_dir):
    """Dummy weights come from the engine's seed, so loading them again gives the same ones."""
    llm = make_llm(tiny_model_dir, enable_sleep_mode=True)
    prompts = random_token_prompts(3, [7, 20, 9], seed=2)
    expected = greedy_tokens(llm, prompts)
    llm.sleep(2)
    llm.wake_up()
    assert greedy_tokens(llm, prompts) == expected
