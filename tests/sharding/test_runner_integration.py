"""PipelineRunner with jaxllm's own sampler against jaxllm's ModelRunner on one device.

Seeded random sampling (temperature, top-p) with logprobs: a seeded request's key depends only on its seed and
output position, so the tokens must be the same although the pipeline splits each step into microbatches (which
moves requests to other rows) and tensor parallelism reorders the logits' sums.
"""

import jax.numpy as jnp
import numpy as np

from jaxllm.runner.model_runner import ModelRunner
from jaxllm.sampling_params import SamplingParams
from sharding import ShardedEngine, make_mesh, shard_model
from tests.sharding.helpers import FAST_COMPILE, NEEDS_8_DEVICES, mixed_prompts, resolved_config, tiny_model

pytestmark = NEEDS_8_DEVICES


def run(engine, prompts: dict[str, list[int]], seeded: bool = True, logprobs_of=lambda index: 3):
    for i, (request_id, token_ids) in enumerate(prompts.items()):
        seed = 100 + i if seeded else None  # unseeded rows draw from the engine's per-step key
        params = SamplingParams(
            temperature=0.8, top_p=0.9, seed=seed, max_tokens=4, logprobs=logprobs_of(i), ignore_eos=True
        )
        engine.add_request(request_id, token_ids, params)
    tokens = {request_id: [] for request_id in prompts}
    logprobs = {request_id: [] for request_id in prompts}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
            logprobs[output.request_id].extend(output.new_logprobs or [None] * len(output.new_token_ids))
    return tokens, logprobs


def test_seeded_sampling_and_logprobs_match_model_runner():
    model, config = tiny_model(), resolved_config()
    prompts = mixed_prompts(model.config.vocab_size, seed=5)
    want_tokens, want_logprobs = run(ShardedEngine(ModelRunner(model, config, jnp.float32, seed=7), config), prompts)
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2)
    runner_kwargs = {"seed": 7, "compiler_options": FAST_COMPILE}
    engine = ShardedEngine.from_model(shard_model(model, mesh), mesh, config, jnp.float32, runner_kwargs=runner_kwargs)
    got_tokens, got_logprobs = run(engine, prompts)
    assert got_tokens == want_tokens
    assert engine.runner.pipeline.num_stages == 2 and engine.runner.num_microbatches == 2
    for request_id, steps in want_logprobs.items():
        for got, want in zip(got_logprobs[request_id], steps, strict=True):
            assert got.top_token_ids == want.top_token_ids
            np.testing.assert_allclose(got.sampled_logprob, want.sampled_logprob, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)
            assert got.sampled_rank == want.sampled_rank and want.sampled_rank >= 1
    # really sampled: some drawn token is not the most likely one
    drawn_and_top = [
        (token, step.top_token_ids[0])
        for request_id, tokens in want_tokens.items()
        for token, step in zip(tokens, want_logprobs[request_id], strict=True)
    ]
    assert any(token != top for token, top in drawn_and_top)
    ranks = [step.sampled_rank for steps in want_logprobs.values() for step in steps]
    assert [rank == 1 for rank in ranks] == [token == top for token, top in drawn_and_top]  # ties aside


def test_microbatches_with_and_without_logprobs():
    """Only the last request asks for logprobs, so a step's microbatches have different top-logprob widths (0 and
    5): the runner pads them to one width when it gathers the rows (this crashed before)."""
    model, config = tiny_model(), resolved_config()
    prompts = mixed_prompts(model.config.vocab_size, seed=8)

    def last_only(index):
        return 5 if index == len(prompts) - 1 else None

    reference = ShardedEngine(ModelRunner(model, config, jnp.float32, seed=3), config)
    want_tokens, want_logprobs = run(reference, prompts, logprobs_of=last_only)
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2)
    runner_kwargs = {"seed": 3, "compiler_options": FAST_COMPILE}
    engine = ShardedEngine.from_model(shard_model(model, mesh), mesh, config, jnp.float32, runner_kwargs=runner_kwargs)
    got_tokens, got_logprobs = run(engine, prompts, logprobs_of=last_only)
    assert got_tokens == want_tokens and engine.runner.num_microbatches == 2
    last = list(prompts)[-1]
    assert all(got_logprobs[rid] == [None] * len(want_tokens[rid]) for rid in prompts if rid != last)
    assert len(got_logprobs[last]) == len(want_logprobs[last]) == 4
    for got, want in zip(got_logprobs[last], want_logprobs[last], strict=True):
        assert got.top_token_ids == want.top_token_ids and len(got.top_token_ids) == 5
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)


def test_unseeded_sampling_uses_model_runner_step_keys():
    """Unseeded rows draw from the step key, which the pipeline's sampler head folds in inside its program (the
    host never reads a key back from the device) exactly as ModelRunner does."""
    model, config = tiny_model(), resolved_config()
    prompts = mixed_prompts(model.config.vocab_size, seed=6)
    reference = ShardedEngine(ModelRunner(model, config, jnp.float32, seed=11), config)
    want_tokens, _ = run(reference, prompts, seeded=False)
    mesh = make_mesh(tensor_parallel_size=2)
    runner_kwargs = {"seed": 11, "compiler_options": FAST_COMPILE}
    engine = ShardedEngine.from_model(shard_model(model, mesh), mesh, config, jnp.float32, runner_kwargs=runner_kwargs)
    assert run(engine, prompts, seeded=False)[0] == want_tokens
    other_seed = ShardedEngine(ModelRunner(model, config, jnp.float32, seed=12), config)
    assert run(other_seed, prompts, seeded=False)[0] != want_tokens  # the engine seed really drives these rows
