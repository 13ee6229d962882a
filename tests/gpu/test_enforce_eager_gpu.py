"""On the GPU machine (marker ``gpu``): ``enforce_eager=True`` (vLLM's: no CUDA graphs) runs the step programs
without a CUDA-graph launch, which the default launches every step, and generates the default engine's greedy
tokens. The launches are counted in a profiler trace as ``benchmarks/profile_step.py`` reads it."""

import gzip
import json

import jax
import pytest

from benchmarks.profile_step import launch_path_ops
from jaxllm import SamplingParams
from tests.engine.conftest import TINY_CONFIG, make_llm, random_token_prompts

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU: CUDA graphs exist only there")]


def generate_traced(llm, prompts, params, trace_dir):
    """(each output's token ids, cuGraphLaunch calls on the host during the generate call)."""
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        outputs = llm.generate(prompts, params, use_tqdm=False)
    with gzip.open(next(trace_dir.rglob("*.trace.json.gz"))) as f:
        launch_path = launch_path_ops(json.load(f), num_steps=1)
    launches = sum(op["calls_per_step"] for op in launch_path if op["name"].startswith("cuGraphLaunch"))
    return [o.outputs[0].token_ids for o in outputs], launches


def test_enforce_eager_launches_no_cuda_graph_and_keeps_the_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = random_token_prompts(3, [5, 9, 30], seed=8)
    results = {}
    for eager in (False, True):
        llm = make_llm(str(tmp_path), enforce_eager=eager)
        llm.generate(prompts, greedy, use_tqdm=False)  # every program compiled before the traced call
        results[eager] = generate_traced(llm, prompts, greedy, tmp_path / f"trace-{eager}")
    (default_tokens, default_launches), (eager_tokens, eager_launches) = results[False], results[True]
    assert eager_tokens == default_tokens
    assert default_launches > 0 and eager_launches == 0
