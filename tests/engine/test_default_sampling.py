"""vLLM's default sampling parameters: ``generate`` / ``chat`` without ``SamplingParams`` sample as the model's
generation_config.json recommends (``generation_config="auto"``), as ``SamplingParams()`` with ``"vllm"``, or from
another directory's file; ``override_generation_config`` goes on top; bad sources are errors naming them."""

import json
import pathlib

import pytest

from jaxllm import SamplingParams
from tests.engine.conftest import TINY_CONFIG, make_llm, random_token_prompts

RECOMMENDED = {
    "do_sample": True,  # ignored, as vLLM ignores it
    "temperature": 0.0,
    "top_p": 0.9,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 5,
    "bos_token_id": 0,
}
RECOMMENDED_FIELDS = {"temperature": 0.0, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 5}


def model_dir(root: pathlib.Path, generation_config: dict | None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    if generation_config is not None:
        (root / "generation_config.json").write_text(json.dumps(generation_config))
    return str(root)


def fields_of(params: SamplingParams, names) -> dict:
    return {name: getattr(params, name) for name in names}


@pytest.fixture(scope="module")
def recommending_model(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("recommending"), RECOMMENDED)


def test_generate_without_params_samples_as_the_generation_config_recommends(recommending_model):
    llm = make_llm(recommending_model)
    defaults = llm.get_default_sampling_params()
    assert fields_of(defaults, RECOMMENDED_FIELDS) == RECOMMENDED_FIELDS
    assert defaults.min_p == SamplingParams().min_p  # fields the file does not name keep SamplingParams' defaults
    prompts = random_token_prompts(3, [5, 9, 30], seed=6)
    implicit = llm.generate(prompts, use_tqdm=False)
    explicit = llm.generate(prompts, SamplingParams(**RECOMMENDED_FIELDS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in implicit] == [o.outputs[0].token_ids for o in explicit]
    assert max(len(o.outputs[0].token_ids) for o in implicit) == 5  # max_new_tokens, not SamplingParams' 16
    engine = llm.llm_engine
    engine.add_request("no-params", prompts[0])  # LLMEngine too
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert finished[0].outputs[0].token_ids == implicit[0].outputs[0].token_ids
    given = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) <= 2 for o in given)  # explicit params are not touched


def test_vllm_source_another_directory_and_overrides(recommending_model, tmp_path):
    assert make_llm(recommending_model, generation_config="vllm").llm_engine.default_sampling_fields == {}
    other = model_dir(tmp_path / "other", {"top_p": 0.5, "min_p": 0.1})
    from_other = make_llm(recommending_model, generation_config=pathlib.Path(other))
    assert from_other.llm_engine.default_sampling_fields == {"top_p": 0.5, "min_p": 0.1}
    overridden = make_llm(recommending_model, override_generation_config={"temperature": 0.7, "max_new_tokens": 9})
    assert overridden.llm_engine.default_sampling_fields == {**RECOMMENDED_FIELDS, "temperature": 0.7, "max_tokens": 9}
    plain = make_llm(model_dir(tmp_path / "plain", None))  # no generation_config.json at all
    assert plain.llm_engine.default_sampling_fields == {}


def test_bad_sources_are_errors_naming_them(recommending_model, tmp_path):
    with pytest.raises(ValueError) as error:
        make_llm(recommending_model, generation_config=str(tmp_path / "missing"))
    assert "missing" in str(error.value)
    with pytest.raises(TypeError) as error:
        make_llm(recommending_model, generation_config=3)
    assert "generation_config" in str(error.value)
    with pytest.raises(TypeError) as error:
        make_llm(recommending_model, override_generation_config=["temperature"])
    assert "override_generation_config" in str(error.value)
    bad = model_dir(tmp_path / "bad", {"temperature": -1.0})
    with pytest.raises(ValueError) as error:
        make_llm(bad)
    assert "temperature" in str(error.value) and "generation_config.json" in str(error.value)
