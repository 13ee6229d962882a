"""Attention under tensor parallelism runs per shard (``jax.shard_map``), so opaque Pallas kernels see only their
device's heads and the KV cache never moves; alone, inside the model, and with the Pallas kernel interpreted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import jaxllm.models.decoder
from jaxllm.models import activation_sharding as act
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from sharding import LOGICAL_AXIS_RULES, logical_to_spec, make_mesh
from tests.sharding.helpers import FAST_COMPILE, NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES

BLOCK_SIZE = 4
METADATA = (act.REPLICATED,) * 3


def ragged_inputs(num_heads: int, num_kv_heads: int, seed: int = 0):
    """Requests of 1, block-1, block+1 and long lengths with 1..5 new tokens each, over a permuted paged cache."""
    rng = np.random.default_rng(seed)
    seq_lens = np.array([1, BLOCK_SIZE - 1, BLOCK_SIZE + 1, 4 * BLOCK_SIZE + 2], np.int32)
    new_tokens = np.array([1, 2, 5, 3], np.int32)
    max_blocks = -(-int(seq_lens.max()) // BLOCK_SIZE)
    num_blocks = len(seq_lens) * max_blocks + 1
    block_tables = rng.permutation(np.arange(1, num_blocks)).reshape(len(seq_lens), max_blocks).astype(np.int32)
    query_start_loc = np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32)
    num_tokens = int(query_start_loc[-1]) + 2  # two padding tokens
    head_dim = 8
    q = rng.normal(size=(num_tokens, num_heads, head_dim)).astype(np.float32)
    k_cache = rng.normal(size=(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.normal(size=(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)).astype(np.float32)
    return q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, int(query_start_loc[-1])


def test_off_a_mesh_per_shard_is_the_function():
    def fn(x):
        return x

    assert act.per_shard(fn, in_axes=(act.HEADS_Q,), out_axes=(act.HEADS_Q,)) is fn


@pytest.mark.parametrize(("tensor", "num_heads", "num_kv_heads"), [(4, 8, 4), (8, 16, 8)])
def test_per_shard_attention_equals_whole(tensor, num_heads, num_kv_heads):
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, num_real = ragged_inputs(num_heads, num_kv_heads)
    mesh = make_mesh(tensor_parallel_size=tensor)
    local_shapes = []

    def recording_reference(q, k_cache, v_cache, *metadata):
        local_shapes.append((q.shape, k_cache.shape))
        return (ragged_paged_attention_reference(q, k_cache, v_cache, *metadata, sm_scale=0.3),)

    def run(*args):
        with act.activation_sharding(mesh, LOGICAL_AXIS_RULES):
            attention = act.per_shard(
                recording_reference,
                in_axes=(act.HEADS_Q, act.KV_CACHE, act.KV_CACHE, *METADATA),
                out_axes=(act.HEADS_Q,),
            )
            return attention(*args)[0]

    q_spec, cache_spec = logical_to_spec(act.HEADS_Q), logical_to_spec(act.KV_CACHE)
    q_dev = jax.device_put(q, NamedSharding(mesh, q_spec))
    k_dev, v_dev = jax.device_put((k_cache, v_cache), NamedSharding(mesh, cache_spec))
    got = jax.jit(run, compiler_options=FAST_COMPILE)(q_dev, k_dev, v_dev, block_tables, seq_lens, query_start_loc)
    inputs = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    want = ragged_paged_attention_reference(*map(jnp.asarray, inputs), sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(got)[:num_real], np.asarray(want)[:num_real], rtol=1e-6, atol=1e-6)
    assert got.sharding.spec == q_spec
    per_shard = (q.shape[0], num_heads // tensor, q.shape[2])
    assert local_shapes == [(per_shard, (k_cache.shape[0], BLOCK_SIZE, num_kv_heads // tensor, 8))]


def test_model_attention_sees_only_its_shard_of_heads(reference, monkeypatch):
    """The decoder's cache write + attention run per tensor shard: each call sees N/T query heads."""
    from tests.sharding.test_parallel_generation import assert_matches, run_on_mesh

    calls = []

    def recording_reference(q, k_cache, *args, impl=None, max_query_len=None, **kwargs):
        calls.append((q.shape[1], k_cache.shape[2]))
        return ragged_paged_attention_reference(q, k_cache, *args, **kwargs)

    monkeypatch.setattr(jaxllm.models.decoder, "ragged_paged_attention", recording_reference)
    outputs, recording = run_on_mesh(reference.model, reference.prompts, 4, 1)
    assert_matches(reference, outputs, recording)
    config = reference.model.config
    assert calls and set(calls) == {(config.num_heads // 4, config.num_kv_heads // 4)}


def test_pallas_kernel_under_tensor_parallelism(reference):
    """The Pallas GPU kernel (interpreted on CPU), an opaque op to the partitioner, on a TP 2 x PP 2 mesh."""
    from tests.sharding.test_parallel_generation import assert_matches, run_on_mesh

    def use_pallas(model, mesh):
        for layer in model.model.layers:
            layer.self_attn.attention_impl = "pallas_gpu_interpret"
        return model

    outputs, recording = run_on_mesh(reference.model, reference.prompts, 2, 2, prepare=use_pallas)
    assert_matches(reference, outputs, recording)
