"""shard_mapped_attention: the attention op run per tensor shard equals it run whole, alone and inside the model."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import jaxllm.models.decoder
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from sharding import make_mesh, shard_mapped_attention
from sharding.attention import CACHE_SPEC, QUERY_SPEC, install_shard_mapped_attention
from tests.sharding.helpers import FAST_COMPILE, tiny_model

pytestmark = [
    pytest.mark.multidevice,
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices"),
]

BLOCK_SIZE = 4


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


@pytest.mark.parametrize(("tensor", "num_heads", "num_kv_heads"), [(4, 8, 4), (8, 16, 8)])
def test_per_shard_attention_equals_whole(tensor, num_heads, num_kv_heads):
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, num_real = ragged_inputs(num_heads, num_kv_heads)
    mesh = make_mesh(tensor_parallel_size=tensor)
    local_shapes = []

    def recording_reference(q, k_cache, v_cache, *metadata, **kwargs):
        local_shapes.append((q.shape, k_cache.shape))
        return ragged_paged_attention_reference(q, k_cache, v_cache, *metadata, **kwargs)

    attention = shard_mapped_attention(mesh, recording_reference)
    q_dev = jax.device_put(q, NamedSharding(mesh, QUERY_SPEC))
    k_dev, v_dev = jax.device_put((k_cache, v_cache), NamedSharding(mesh, CACHE_SPEC))
    run = jax.jit(lambda *args: attention(*args, sm_scale=0.3, sliding_window=None), compiler_options=FAST_COMPILE)
    got = run(q_dev, k_dev, v_dev, block_tables, seq_lens, query_start_loc)
    inputs = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    want = ragged_paged_attention_reference(*map(jnp.asarray, inputs), sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(got)[:num_real], np.asarray(want)[:num_real], rtol=1e-6, atol=1e-6)
    assert got.sharding.spec == QUERY_SPEC
    per_shard = (q.shape[0], num_heads // tensor, q.shape[2])
    assert local_shapes == [(per_shard, (k_cache.shape[0], BLOCK_SIZE, num_kv_heads // tensor, 8))]


def test_heads_must_split_evenly():
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, _ = ragged_inputs(8, 2)
    attention = shard_mapped_attention(make_mesh(tensor_parallel_size=4), ragged_paged_attention_reference)
    with pytest.raises(ValueError) as e:
        attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sm_scale=0.3)
    assert "num_kv_heads=2" in str(e.value) and "multiples of 4" in str(e.value)


def test_model_with_shard_mapped_attention_matches_one_device(reference, monkeypatch):
    """The decoder's attention call routed through shard_map (how a Pallas kernel runs under tensor parallelism)."""
    from tests.sharding.test_parallel_generation import assert_matches, run_on_mesh

    mesh = make_mesh(tensor_parallel_size=4)
    calls = []

    def reference_impl(*args, impl=None, **kwargs):
        calls.append(args[0].shape)
        return ragged_paged_attention_reference(*args, **kwargs)

    if hasattr(reference.model.model.layers[0].self_attn, "attention_fn"):  # the decoder has the hook

        def prepare(model, mesh):
            install_shard_mapped_attention(model, mesh, reference_impl)
            return model
    else:  # until then: swap the op the decoder module calls
        patched = shard_mapped_attention(mesh, reference_impl)
        monkeypatch.setattr(jaxllm.models.decoder, "ragged_paged_attention", patched)
        prepare = None
    outputs, recording = run_on_mesh(reference.model, reference.prompts, 4, 1, prepare=prepare)
    assert_matches(reference, outputs, recording)
    assert calls and all(shape[1] == reference.model.config.num_heads // 4 for shape in calls)


def test_install_needs_the_decoder_hook():
    layer = SimpleNamespace(self_attn=object())  # an attention module without the attention_fn attribute
    model = SimpleNamespace(config=tiny_model().config, model=SimpleNamespace(layers=[layer] * 4))
    with pytest.raises(TypeError) as e:
        install_shard_mapped_attention(model, make_mesh(tensor_parallel_size=2))
    assert "attention_fn" in str(e.value)
