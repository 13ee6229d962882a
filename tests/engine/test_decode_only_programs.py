"""Decode-only step programs (``ResolvedConfig.decode_only_programs``): which buckets get one, when the default turns
them on, which steps take them, and that the Triton kernel (interpreted on CPU) generates the same greedy tokens with
them as without."""

import dataclasses

import pytest

from jaxllm import SamplingParams
from jaxllm.config import EngineConfig, ResolvedConfig
from jaxllm.engine import setup
from jaxllm.runner import model_runner
from tests.engine.conftest import make_llm, random_token_prompts

ENV = "JAXLLM_DECODE_PROGRAMS"


def test_step_variants_bound_the_buckets_a_decode_step_can_take():
    config = ResolvedConfig(
        max_model_len=256,
        max_num_seqs=40,
        max_num_batched_tokens=128,
        block_size=16,
        num_blocks=8,
        token_buckets=(16, 32, 64, 128),
        decode_only_programs=True,
    )
    unbounded = [(16, None), (32, None), (64, None), (128, None)]
    assert config.step_variants() == unbounded + [(16, 1), (32, 1), (64, 1)]  # 40 decodes fill the 64 bucket
    assert dataclasses.replace(config, max_num_seqs=512).step_variants() == unbounded + [
        (b, 1) for b in (16, 32, 64, 128)
    ]
    assert dataclasses.replace(config, decode_only_programs=False).step_variants() == unbounded


def test_default_follows_the_attention_backend(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert setup.decode_only_programs(EngineConfig(attention_impl="pallas_gpu_interpret"))
    assert setup.decode_only_programs(EngineConfig(attention_impl="pallas_mosaic_gpu"))
    assert not setup.decode_only_programs(EngineConfig(attention_impl="reference"))
    assert not setup.decode_only_programs(EngineConfig())  # this CPU's default backend is the jnp reference
    monkeypatch.setenv(ENV, "1")
    assert setup.decode_only_programs(EngineConfig(attention_impl="reference"))
    monkeypatch.setenv(ENV, "0")
    assert not setup.decode_only_programs(EngineConfig(attention_impl="pallas_gpu"))
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=f"{ENV} must be 0 or 1 when set, got 'yes'"):
        setup.decode_only_programs(EngineConfig())


def test_decode_steps_take_their_programs_and_generate_the_same_tokens(tiny_model_dir, monkeypatch):
    """Mixed prefill / decode steps (short prompts beside long ones, chunked) and decode-only ones, through the
    Triton kernel: a mixed step wrongly bounded would lose its long queries' attention and change the tokens."""
    prompts = random_token_prompts(6, [1, 5, 17, 40, 3, 90], seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    options = dict(attention_impl="pallas_gpu_interpret", max_num_batched_tokens=32)
    monkeypatch.setenv(ENV, "0")
    plain = make_llm(tiny_model_dir, **options)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]

    steps = []  # (tokens, requests, max_query_len) of each packed step
    pack = model_runner.pack_step_batch

    def recording_pack(*args, **kwargs):
        batch = pack(*args, **kwargs)
        steps.append((batch.num_tokens, batch.num_requests, batch.max_query_len))
        return batch

    monkeypatch.setattr(model_runner, "pack_step_batch", recording_pack)
    monkeypatch.setenv(ENV, "1")
    llm = make_llm(tiny_model_dir, **options)
    runner, resolved = llm.llm_engine.runner, llm.llm_engine.resolved
    assert runner.num_traces == len(resolved.step_variants()) > len(resolved.token_buckets)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == expected
    assert runner.num_traces == len(resolved.step_variants())  # every step took a program compiled at warm-up
    assert {bound for *_, bound in steps} == {1, None}
    assert all((bound == 1) == (tokens == requests) for tokens, requests, bound in steps)
