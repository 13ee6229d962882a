"""Fixtures of the sharding tests: the one-device reference runs, computed once per session and shared, and a tiny
Llama checkpoint directory (config only: engines load it with dummy weights)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sharding.engine import ShardedEngine, generate
from tests.sharding.helpers import GREEDY, ReferenceRunner, mixed_prompts, resolved_config, tiny_model


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    model: object
    prompts: dict[str, list[int]]
    outputs: dict[str, list[int]]  # greedy output ids per request
    step_logits: list[dict]  # per step: request id -> float32 logits [V] of its last scheduled token


def reference_run(**model_overrides) -> ReferenceRun:
    model = tiny_model(**model_overrides)
    config = resolved_config()
    runner = ReferenceRunner(model, config)
    prompts = mixed_prompts(model.config.vocab_size)
    outputs = generate(ShardedEngine(runner, config), prompts, GREEDY)
    return ReferenceRun(model, prompts, outputs, runner.step_logits)


@pytest.fixture(scope="session")
def reference():
    """The default tiny Llama (8 heads, 4 KV heads, 4 layers) on one device."""
    return reference_run()


@pytest.fixture(scope="session")
def reference_few_kv_heads():
    """A tiny model with 2 KV heads (fewer than T=4) and tied embeddings, on one device."""
    return reference_run(num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A directory holding the engine tests' tiny Llama ``config.json``, for ``make_llm(..., load_format="dummy")``."""
    from tests.engine.conftest import TINY_CONFIG

    path = tmp_path_factory.mktemp("tiny_llama")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)
