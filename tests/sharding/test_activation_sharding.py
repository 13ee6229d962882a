"""Activations carry logical axis names: off a mesh they are untouched; on a tensor-parallel stage each name becomes a
sharding constraint through ``sharding.rules``' table (q/k/v and attention output over heads, the SwiGLU
intermediate over ``mlp``, the residual stream replicated)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.models import activation_sharding as act
from jaxllm.models.attention_metadata import AttentionMetadata
from jaxllm.models.kv_cache_layout import array_shapes
from sharding import make_mesh, shard_model
from sharding.rules import activation_rules
from tests.sharding.helpers import NEEDS_8_DEVICES, tiny_model

pytestmark = NEEDS_8_DEVICES


def test_off_a_mesh_constrain_is_the_identity():
    x = jnp.arange(12.0).reshape(3, 4)
    assert act.constrain(x, act.MLP) is x


def test_names_map_through_the_rules_table():
    mesh = make_mesh(tensor_parallel_size=4)
    model = tiny_model()
    rules = activation_rules(model.config, mesh)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32)

    def constrained(x):
        with act.activation_sharding(mesh, rules):
            return act.constrain(x, act.MLP), act.constrain(x, act.HIDDEN)

    mlp, hidden = jax.jit(constrained)(x)
    assert mlp.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor")), 2)
    assert hidden.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None)), 2)
    with pytest.raises(ValueError, match=r"do not match an activation of shape \(8, 64\)"):
        with act.activation_sharding(mesh, rules):
            act.constrain(x, ("tokens",))


def test_a_tensor_parallel_forward_constrains_every_named_activation():
    model = tiny_model()
    config = model.config
    mesh = make_mesh(tensor_parallel_size=4)
    sharded = shard_model(model, mesh)
    num_tokens, block_size, num_blocks = 8, 4, 8
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    kv = [(jnp.zeros(s), jnp.zeros(s)) for s in array_shapes(config.num_layers, shape, jnp.float32)]
    md = AttentionMetadata(
        positions=jnp.arange(num_tokens, dtype=jnp.int32),
        slot_mapping=jnp.arange(block_size, block_size + num_tokens, dtype=jnp.int32),
        context_lens=jnp.full((num_tokens,), num_tokens, jnp.int32),
        block_tables=jnp.asarray([[1, 2, 0, 0]], jnp.int32),
        seq_lens=jnp.asarray([num_tokens], jnp.int32),
        query_start_loc=jnp.asarray([0, num_tokens], jnp.int32),
    )
    ids = jnp.arange(num_tokens, dtype=jnp.int32)

    def forward(model, ids, kv, md):
        with act.activation_sharding(mesh, activation_rules(config, mesh)):
            return model(ids, kv, md)[0]

    text = jax.jit(forward).lower(sharded, ids, kv, md).as_text()
    constraints = re.findall(r"sharding_constraint[^\n]*", text)
    split = [c for c in constraints if '"tensor"' in c]
    # per layer: q, k, v, attention output (heads) and the SwiGLU intermediate (mlp) split over tensor
    assert len(split) == 5 * config.num_layers, constraints
    # per layer: o_proj and down_proj outputs and the layer output replicated, plus the embedding output
    assert len(constraints) - len(split) == 3 * config.num_layers + 1, constraints
