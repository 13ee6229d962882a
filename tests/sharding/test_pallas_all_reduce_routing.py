"""``JAXLLM_PALLAS_ALL_REDUCE=1`` on CPU meshes: every row-parallel product (o_proj, down_proj) goes through
``per_shard``, whose sum over shards stays ``psum`` off GPUs, and the mesh still produces one device's greedy tokens
and logits with one all-reduce per row-parallel product. The kernel path itself: tests/gpu/test_all_reduce_gpu.py."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxllm.models import activation_sharding as act
from jaxllm.models import layers
from tests.sharding.helpers import NEEDS_8_DEVICES
from tests.sharding.test_parallel_generation import assert_matches, assert_megatron_collectives, run_on_mesh

pytestmark = NEEDS_8_DEVICES


@pytest.fixture
def pallas_all_reduce_on(monkeypatch):
    monkeypatch.setenv(act.PALLAS_ALL_REDUCE_ENV, "1")
    jax.clear_caches()
    yield
    monkeypatch.delenv(act.PALLAS_ALL_REDUCE_ENV)
    jax.clear_caches()


@pytest.mark.parametrize("tensor", [2, 4])
def test_row_parallel_products_route_through_per_shard_and_match_one_device(
    reference, tensor, pallas_all_reduce_on, monkeypatch
):
    routed = []
    row_parallel_product = layers._row_parallel_product

    def recording(x, kernel, axes):
        routed.append(axes)
        return row_parallel_product(x, kernel, axes)

    monkeypatch.setattr(layers, "_row_parallel_product", recording)
    outputs, recording_runner = run_on_mesh(reference.model, reference.prompts, tensor, 1)
    assert_matches(reference, outputs, recording_runner)
    assert_megatron_collectives(recording_runner.runner, reference.model.config)
    num_layers = reference.model.config.num_layers
    assert sorted(set(routed)) == [("mlp", "embed"), ("q_heads", "embed")]
    assert len(routed) >= 2 * num_layers  # each trace routes every layer's o_proj and down_proj


def test_the_switch_routes_only_split_contractions(pallas_all_reduce_on):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    rules = {"mlp": "tensor", "embed": None}
    assert not act.reduces_in_kernel("mlp")  # no mesh installed
    with act.activation_sharding(mesh, rules):
        assert act.reduces_in_kernel("mlp") and not act.reduces_in_kernel("embed")
        x = jax.numpy.ones((1, 4096), jax.numpy.bfloat16)
        assert act._all_reduce_impl(x, mesh) == "xla"  # CPU devices: Mosaic GPU cannot run here


def test_off_by_default(reference, monkeypatch):
    monkeypatch.delenv(act.PALLAS_ALL_REDUCE_ENV, raising=False)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    with act.activation_sharding(mesh, {"mlp": "tensor"}):
        assert not act.reduces_in_kernel("mlp")
