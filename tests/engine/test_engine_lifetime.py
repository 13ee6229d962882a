"""A dropped engine's device memory is free before the next engine starts: an ``LLM`` that went out of scope is
unreachable but, its objects referring to each other, outlives ``del`` until a full garbage collection, which the
next engine runs before it takes memory. Automatic collection is off in the test, so only the engine's own can free
it."""

import contextlib
import gc
import weakref

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


def test_a_dropped_engine_is_freed_when_the_next_one_starts(tiny_model_dir):
    from jaxllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = random_token_prompts(2, [7, 12], seed=3)
    with automatic_collection_off():
        first = make_llm(tiny_model_dir)
        expected = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
        engine = weakref.ref(first.llm_engine)
        key_cache = weakref.ref(first.llm_engine.runner.kv_caches[0][0])  # a device buffer of the dropped engine
        del first
        second = make_llm(tiny_model_dir)
        assert engine() is None and key_cache() is None
        got = [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)]
    assert got == expected
