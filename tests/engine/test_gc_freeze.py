"""``objects_before_frozen``: during an offline run the garbage collector skips the objects that existed before it
(``gc.freeze``), still collects what the run throws away, and afterwards exempts nothing; a freeze made by someone
else after jaxllm's import, or a disabled collector, is left as it is. ``LLM.generate`` steps the engine inside it.
(CPython 3.12 starts with some objects frozen: the fixture unfreezes them first.)"""

import gc
import weakref

import pytest

from jaxllm import SamplingParams
from jaxllm.engine.gc_freeze import objects_before_frozen
from tests.engine.conftest import make_llm, random_token_prompts


class Node:
    def __init__(self):
        self.other = self


@pytest.fixture
def clean_gc_state():
    gc.unfreeze()
    assert gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable()


def test_old_objects_are_skipped_and_new_garbage_collected(clean_gc_state):
    old = Node()
    old_ref = weakref.ref(old)
    with objects_before_frozen():
        assert gc.get_freeze_count() > 0
        del old  # garbage now, but frozen: no collection inside the block frees it
        new = Node()
        new_ref = weakref.ref(new)
        del new
        gc.collect()
        assert new_ref() is None
        assert old_ref() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # unfrozen again: the next collection frees it


def test_someone_elses_freeze_is_left_alone(clean_gc_state, monkeypatch):
    """Neither freezes more nor unfreezes. (Recorded calls, not the frozen count: a frozen object that another
    thread frees leaves the count, which made an equality check flaky: 1440147 then 1440145 in a CI run.)"""
    gc.freeze()
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    with objects_before_frozen():
        Node()
    assert calls == []


def test_a_disabled_collector_is_left_alone(clean_gc_state):
    gc.disable()
    with objects_before_frozen():
        assert gc.get_freeze_count() == 0
    assert not gc.isenabled()


def test_generate_steps_the_engine_with_older_objects_frozen(tiny_model_dir, clean_gc_state):
    llm = make_llm(tiny_model_dir)
    counts, step = [], llm.llm_engine.step

    def recording_step():
        counts.append(gc.get_freeze_count())
        return step()

    llm.llm_engine.step = recording_step
    outputs = llm.generate(random_token_prompts(2, [6, 9], seed=1), SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(outputs) == 2 and counts and min(counts) > 0
    assert gc.get_freeze_count() == 0
