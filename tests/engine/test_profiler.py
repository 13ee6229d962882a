"""``LLM.start_profile()`` / ``stop_profile()``: a JAX profiler trace of the generation in between, under the
directory the environment names (jaxllm's variable or vLLM's)."""

import gzip
import json

import pytest

from jaxllm import SamplingParams
from jaxllm.engine.profiler import PROFILER_DIR_VARIABLES
from tests.engine.conftest import make_llm, random_token_prompts


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make_llm(tiny_model_dir)


@pytest.mark.parametrize("variable", PROFILER_DIR_VARIABLES)
def test_the_trace_holds_the_step_programs_run_in_between(llm, variable, tmp_path, monkeypatch):
    for name in PROFILER_DIR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(tmp_path))
    llm.start_profile(profile_prefix="run1")
    llm.generate(random_token_prompts(2, [5, 9], seed=1), SamplingParams(max_tokens=3), use_tqdm=False)
    directory = llm.stop_profile()
    assert directory == tmp_path / "run1"
    assert list(directory.glob("plugins/profile/*/*.xplane.pb"))
    (perfetto,) = directory.glob("plugins/profile/*/*.trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    names = {event.get("name", "") for event in (events["traceEvents"] if isinstance(events, dict) else events)}
    assert any("forward" in name for name in names)  # the engine's step program ran while recording


def test_without_a_directory_or_out_of_order_is_a_value_error(llm, tmp_path, monkeypatch):
    for name in PROFILER_DIR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="JAXLLM_PROFILER_DIR"):
        llm.start_profile()
    with pytest.raises(ValueError, match="call start_profile"):
        llm.stop_profile()
    monkeypatch.setenv("JAXLLM_PROFILER_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="profile_prefix must be a non-empty str or None, got 3"):
        llm.start_profile(profile_prefix=3)
    llm.start_profile()
    with pytest.raises(ValueError, match="already being recorded"):
        llm.start_profile()
    assert llm.stop_profile() == tmp_path
