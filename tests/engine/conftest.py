"""Engine test fixtures: a tiny random Llama (config only, ``load_format="dummy"``) and engines built on it; the path
of the fixture Llama checkpoint with its tokenizer."""

import json
import pathlib

import numpy as np
import pytest

LLAMA = str(pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models" / "llama")  # weights and tokenizer

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "eos_token_id": 255,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


def make_llm(model_dir, **overrides):
    from jaxllm import LLM

    kwargs = dict(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        max_num_batched_tokens=64,
        num_gpu_blocks_override=128,
        seed=0,
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def random_token_prompts(num_prompts, lengths, seed=0, vocab=250):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(0, vocab, int(n)).tolist()} for n in lengths[:num_prompts]]


def raw_distributions(completion, vocab_size: int) -> np.ndarray:
    """[steps, V] raw logprobs of each step of ``completion``, from a full-vocabulary ``logprobs`` request."""
    rows = np.full((len(completion.logprobs), vocab_size), -np.inf)
    for step, entry in enumerate(completion.logprobs):
        for token, logprob in entry.items():
            rows[step, token] = logprob.logprob
    assert np.isfinite(rows).all()
    return rows
