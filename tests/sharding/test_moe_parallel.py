"""Mixtures of experts on a device mesh: greedy tokens at tensor / pipeline parallel sizes equal the one-device
``LLM``'s (same mixed job as ``test_llm_parallel_options``), and every device holds its share of every expert's
intermediate dimension (not whole experts)."""

import pytest
from flax import nnx

from tests.sharding.helpers import NEEDS_8_DEVICES
from tests.sharding.test_llm_parallel_options import generate, make_llm

pytestmark = NEEDS_8_DEVICES


@pytest.fixture(scope="module")
def one_device():
    cache = {}

    def outputs(name: str) -> list[list[int]]:
        if name not in cache:
            cache[name] = generate(make_llm(name))
        return cache[name]

    return outputs


@pytest.mark.parametrize(
    ("name", "tensor", "pipe"), [("mixtral", 2, 1), ("mixtral", 4, 1), ("qwen3_moe", 2, 2), ("qwen2_moe", 2, 1)]
)
def test_experts_on_a_mesh_match_one_device(one_device, name, tensor, pipe):
    llm = make_llm(name, tensor_parallel_size=tensor, pipeline_parallel_size=pipe)
    assert generate(llm) == one_device(name)
    first_stage = llm.llm_engine.runner.pipeline.stages[0]
    layer = nnx.merge(first_stage.graphdef, first_stage.state).layers[0]
    block = layer.block_sparse_moe if name == "mixtral" else layer.mlp
    gate_name, _, down_name = block.expert_names
    gate = getattr(block.experts, gate_name).kernel.get_value()  # [E, D, I]
    down = getattr(block.experts, down_name).kernel.get_value()  # [E, I, D]
    num_experts, hidden, width = gate.shape
    assert {s.data.shape for s in gate.addressable_shards} == {(num_experts, hidden, width // tensor)}
    assert {s.data.shape for s in down.addressable_shards} == {(num_experts, width // tensor, hidden)}
    assert len({s.device for s in gate.addressable_shards}) == tensor


def test_the_gpu_paths_on_a_mesh_match_one_device(one_device, monkeypatch):
    """The GPU's paths (here with pure-jnp products) on each device's expert shard at TP 2: decode buckets of 16 take
    the per-pair products, prefill steps of 32 the tile plan; greedy tokens equal one device's (``ragged_dot``)."""
    from jaxllm.models import moe
    from tests.models.test_moe import record_expert_paths

    expected = one_device("qwen3_moe")
    monkeypatch.setenv("JAXLLM_MOE_EXPERTS_IMPL", "reference")
    monkeypatch.setattr(moe, "use_pairs", lambda bucket_tokens, top_k, num_experts: bucket_tokens <= 16)
    paths = record_expert_paths(monkeypatch)
    assert generate(make_llm("qwen3_moe", tensor_parallel_size=2, max_num_batched_tokens=32)) == expected
    assert set(paths) == {"tiles", "pairs"}
