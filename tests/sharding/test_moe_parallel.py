"""Mixtures of experts on a device mesh: greedy tokens at tensor / pipeline parallel sizes equal the one-device
``LLM``'s (same mixed job as ``test_llm_parallel_options``); every device holds its share of every expert's
intermediate dimension, or with ``enable_expert_parallel=True`` its ``E / T`` whole experts."""

import re

import pytest
from flax import nnx

from jaxllm.runner.step_batch import padding_step_batch
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
    gate, down = first_expert_kernels(llm, name)
    num_experts, hidden, width = gate.shape
    assert {s.data.shape for s in gate.addressable_shards} == {(num_experts, hidden, width // tensor)}
    assert {s.data.shape for s in down.addressable_shards} == {(num_experts, width // tensor, hidden)}
    assert len({s.device for s in gate.addressable_shards}) == tensor


@pytest.mark.parametrize(("name", "tensor", "pipe"), [("mixtral", 4, 1), ("qwen3_moe", 2, 2), ("qwen2_moe", 2, 1)])
def test_expert_parallel_matches_one_device(one_device, name, tensor, pipe):
    """vLLM's ``enable_expert_parallel=True``: each device holds ``E / T`` whole experts (Qwen2-MoE's shared expert
    still split like the dense MLP) and runs only the pairs routed to them; greedy tokens equal one device's."""
    llm = make_llm(name, tensor_parallel_size=tensor, pipeline_parallel_size=pipe, enable_expert_parallel=True)
    assert generate(llm) == one_device(name)
    gate, down = first_expert_kernels(llm, name)
    num_experts, hidden, width = gate.shape
    assert {s.data.shape for s in gate.addressable_shards} == {(num_experts // tensor, hidden, width)}
    assert {s.data.shape for s in down.addressable_shards} == {(num_experts // tensor, width, hidden)}
    assert len({s.device for s in gate.addressable_shards}) == tensor
    router = first_moe_block(llm, name).gate.kernel.get_value()  # [D, E]: whole on every device
    assert {s.data.shape for s in router.addressable_shards} == {(hidden, num_experts)}
    if pipe == 1:  # the block's one all-reduce per layer, as with split experts: no all-to-all, no gathered logits
        all_reduces, others = stage_collectives(llm.llm_engine.runner)
        assert len(all_reduces) == 2 * llm.llm_engine.model_config.num_layers + 1  # o_proj, the block, the embedding
        assert {kind for _, kind in others} == {"all-gather"}  # the vocab-split logits' rows only
        assert all(shape.endswith(f",{llm.llm_engine.model_config.vocab_size}") for shape, _ in others)


def stage_collectives(runner) -> tuple[list[str], list[tuple[str, str]]]:
    """The first stage's compiled collectives at its smallest bucket: the all-reduces' shapes, and every other one's
    (shape, kind)."""
    bucket = runner.config.token_buckets[0]
    batch = padding_step_batch(bucket, runner.config.request_rows_for(bucket), runner.config.max_blocks_per_request)
    hlo = runner.pipeline.lower_stage(0, batch).compile().as_text()  # cached: the program already ran
    kinds = "all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
    collectives = re.findall(rf"= \w+\[([\d,]*)\]\S* ({kinds})\(", hlo)
    return [shape for shape, kind in collectives if kind == "all-reduce"], [
        c for c in collectives if c[1] != "all-reduce"
    ]


def first_moe_block(llm, name: str):
    """The first layer's mixture-of-experts block, its parameters as placed on the mesh."""
    first_stage = llm.llm_engine.runner.pipeline.stages[0]
    layer = nnx.merge(first_stage.graphdef, first_stage.state).layers[0]
    return layer.block_sparse_moe if name == "mixtral" else layer.mlp


def first_expert_kernels(llm, name: str):
    """The first layer's stacked gate ``[E, D, I]`` and down ``[E, I, D]`` kernels, as placed on the mesh."""
    block = first_moe_block(llm, name)
    gate_name, _, down_name = block.expert_names
    return getattr(block.experts, gate_name).kernel.get_value(), getattr(block.experts, down_name).kernel.get_value()


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts_split", "whole_experts"])
def test_the_gpu_paths_on_a_mesh_match_one_device(one_device, monkeypatch, expert_parallel):
    """The GPU's paths (here with pure-jnp products) on each device's expert shard at TP 2: decode buckets of 16 take
    the per-pair products, prefill steps of 32 the tile plan; greedy tokens equal one device's (``ragged_dot``). With
    expert parallelism each device's pairs of its own experts go first and the rest read no weight."""
    from jaxllm.models import moe
    from tests.models.test_moe import record_expert_paths

    expected = one_device("qwen3_moe")
    monkeypatch.setenv("JAXLLM_MOE_EXPERTS_IMPL", "reference")
    monkeypatch.setattr(moe, "use_pairs", lambda bucket_tokens, top_k, num_experts: bucket_tokens <= 16)
    paths = record_expert_paths(monkeypatch)
    options = dict(tensor_parallel_size=2, max_num_batched_tokens=32, enable_expert_parallel=expert_parallel)
    assert generate(make_llm("qwen3_moe", **options)) == expected
    assert set(paths) == {"tiles", "pairs"}
