"""The experimental switches' tests: one mixed job, and an engine built without and with a switch."""

from tests.engine.conftest import make_llm, random_token_prompts
from tests.engine.test_async_scheduling import LENGTHS, mixed_params


def plain_and_switched(model_dir, monkeypatch, switch: str, engine_options: dict, seed: int):
    """(prompts, sampling params, the plain engine, the engine built with ``switch=1``) for ``engine_options``."""
    prompts = random_token_prompts(len(LENGTHS), LENGTHS, seed=seed)
    params = mixed_params(stop_token=5)
    plain = make_llm(model_dir, **engine_options)
    monkeypatch.setenv(switch, "1")
    return prompts, params, plain, make_llm(model_dir, **engine_options)
