"""The rules table and placement: every parameter's and the KV cache's sharding, stage and shard shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxllm.models import ModelConfig, get_model_class
from sharding import build_sharded_model, logical_to_spec, make_mesh, param_placement, shard_model
from sharding.model_sharding import init_dummy_weights_by_device_set, kv_bytes_per_block_per_device
from sharding.pipeline import PipelinedModel
from sharding.stages import stage_layer_ranges, stage_of_path
from tests.sharding.helpers import NEEDS_8_DEVICES, random_hf_tensors, tiny_hf_config, tiny_model

pytestmark = NEEDS_8_DEVICES

# Written out by hand from the Megatron layout (not derived from the rules table).
EXPECTED_SPECS = {
    ("embed_tokens", "embedding"): P("tensor", None),
    ("q_proj", "kernel"): P(None, "tensor"),
    ("k_proj", "kernel"): P(None, "tensor"),
    ("v_proj", "kernel"): P(None, "tensor"),
    ("o_proj", "kernel"): P("tensor", None),
    ("gate_proj", "kernel"): P(None, "tensor"),
    ("up_proj", "kernel"): P(None, "tensor"),
    ("down_proj", "kernel"): P("tensor", None),
    ("lm_head", "kernel"): P(None, "tensor"),
    ("input_layernorm", "weight"): P(None),
    ("post_attention_layernorm", "weight"): P(None),
    ("norm", "weight"): P(None),
}


def _model_config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config(**overrides))


def _expected_stage(path: tuple) -> int:
    if path[:2] == ("model", "layers"):
        return 0 if path[2] < 2 else 1
    return 0 if path[1] == "embed_tokens" else 1


def test_logical_to_spec():
    assert logical_to_spec(("embed", "q_heads")) == P(None, "tensor")
    assert logical_to_spec(("mlp", "embed")) == P("tensor", None)
    assert logical_to_spec(("kv_blocks", "block_slots", "kv_heads", "head_dim")) == P(None, None, "tensor", None)
    assert logical_to_spec(("experts", "embed", "expert_mlp")) == P(
        None, None, "tensor"
    )  # each expert split like the MLP
    with pytest.raises(ValueError) as e:
        logical_to_spec(("embed", "channels"))
    assert "channels" in str(e.value)


def test_every_parameter_on_its_stage_and_split_by_the_table():
    model = tiny_model()
    mesh = make_mesh(tensor_parallel_size=4, pipeline_parallel_size=2)
    sharded = shard_model(model, mesh)
    original = dict(nnx.to_flat_state(nnx.state(model)))
    checked = 0
    for path, variable in nnx.to_flat_state(nnx.state(sharded)):
        array = variable.get_value()
        assert array.sharding.spec == EXPECTED_SPECS[path[-2:]], path
        stage_devices = {d.id for d in mesh.devices[0, _expected_stage(path)].flat}
        assert {d.id for d in array.sharding.device_set} == stage_devices, path
        split_dims = [i for i, axis in enumerate(array.sharding.spec) if axis == "tensor"]
        expected_shard = [n // 4 if i in split_dims else n for i, n in enumerate(array.shape)]
        assert all(list(s.data.shape) == expected_shard for s in array.addressable_shards), path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(original[path].get_value()))
        checked += 1
    assert checked == len(original) == 4 * 9 + 3


def test_kv_cache_split_over_kv_heads_on_each_stage():
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2)
    pipeline = PipelinedModel(shard_model(tiny_model(), mesh), mesh)
    pipeline.allocate_kv_cache(num_blocks=6, block_size=4, dtype=jnp.float32)
    for stage_index, stage in enumerate(pipeline.stages):
        assert len(stage.kv_caches) == 2
        for k, v in stage.kv_caches:
            for cache in (k, v):
                assert cache.shape == (6, 4, 4, 8)
                assert cache.sharding.spec == P(None, None, "tensor", None)
                assert {d.id for d in cache.sharding.device_set} == {2 * stage_index, 2 * stage_index + 1}
                assert all(s.data.shape == (6, 4, 2, 8) for s in cache.addressable_shards)
    per_device: dict[int, int] = {}
    for stage in pipeline.stages:
        for cache in jax.tree.leaves(stage.kv_caches):
            for shard in cache.addressable_shards:
                per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    assert set(per_device.values()) == {2 * 2 * 6 * 4 * 2 * 8 * 4}  # K, V x 2 layers x [6, 4, 2 heads, 8] f32
    assert kv_bytes_per_block_per_device(pipeline.config, 4, jnp.float32, 2, 2) == per_device[0] // 6


def test_kv_bytes_per_device_counts_expanded_heads_and_the_largest_stage():
    config = _model_config(num_hidden_layers=5, num_key_value_heads=2)
    # T=4 > K=2: one (replicated) KV head per device; P=2: the first stage has 3 of the 5 layers
    assert kv_bytes_per_block_per_device(config, 16, jnp.bfloat16, 4, 2) == 2 * 3 * 16 * 1 * 8 * 2
    assert kv_bytes_per_block_per_device(config, 16, jnp.float32, 1, 1) == 2 * 5 * 16 * 2 * 8 * 4


def test_fewer_kv_heads_than_tensor_devices_replicates_each_head():
    model = tiny_model(num_key_value_heads=2, tie_word_embeddings=True)
    mesh = make_mesh(tensor_parallel_size=4)
    sharded = shard_model(model, mesh)
    assert sharded.config.num_kv_heads == 4 and model.config.num_kv_heads == 2
    for name in ("k_proj", "v_proj"):
        before = np.asarray(getattr(model.model.layers[1].self_attn, name).kernel.get_value())  # [D, 2*H]
        after = getattr(sharded.model.layers[1].self_attn, name).kernel.get_value()  # [D, 4*H]
        assert after.sharding.spec == P(None, "tensor")
        heads = before.reshape(64, 2, 8)
        expected = np.stack([heads[:, 0], heads[:, 0], heads[:, 1], heads[:, 1]], axis=1).reshape(64, 32)
        np.testing.assert_array_equal(np.asarray(after), expected)
        shards = sorted(after.addressable_shards, key=lambda s: s.device.id)
        np.testing.assert_array_equal(np.asarray(shards[1].data), heads[:, 0])  # device 1 holds KV head 0
        np.testing.assert_array_equal(np.asarray(shards[2].data), heads[:, 1])  # device 2 holds KV head 1


def test_query_heads_must_split_evenly():
    config = _model_config(num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError) as e:
        param_placement(make_mesh(tensor_parallel_size=4), config)
    assert "num_heads=6" in str(e.value) and "tensor_parallel_size=4" in str(e.value)


def test_kv_heads_and_tensor_size_must_divide_one_another():
    config = _model_config(num_attention_heads=12, num_key_value_heads=3, head_dim=8, hidden_size=96)
    with pytest.raises(ValueError) as e:
        param_placement(make_mesh(tensor_parallel_size=2), config)
    assert "num_kv_heads=3" in str(e.value) and "tensor_parallel_size=2" in str(e.value)


def test_mlp_must_split_evenly():
    with pytest.raises(ValueError) as e:
        param_placement(make_mesh(tensor_parallel_size=8), _model_config(intermediate_size=100))
    assert "intermediate_size=100" in str(e.value)


def test_vocab_not_divisible_is_replicated():
    config = _model_config(vocab_size=250)
    placement = param_placement(make_mesh(tensor_parallel_size=4), config)
    abstract = nnx.eval_shape(lambda: get_model_class(config.architecture)(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(abstract)))
    path = ("model", "embed_tokens", "embedding")
    assert placement(path, flat[path]).spec == P(None, None)
    assert placement(("lm_head", "kernel"), flat[("lm_head", "kernel")]).spec == P(None, None)


def test_stage_layer_ranges():
    assert stage_layer_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layer_ranges(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError) as e:
        stage_layer_ranges(2, 4)
    assert "pipeline_parallel_size=4" in str(e.value) and "2 layers" in str(e.value)
    with pytest.raises(ValueError) as e:
        stage_of_path(("model", "rotary", "inv_freq"), 4, 2)
    assert "model.rotary.inv_freq" in str(e.value)


def test_loaded_weights_land_in_their_shards():
    model = tiny_model(num_key_value_heads=2, tie_word_embeddings=True)
    mesh = make_mesh(tensor_parallel_size=4, pipeline_parallel_size=2)
    model_cls = get_model_class(model.config.architecture)
    loaded = build_sharded_model(model_cls, model.config, jnp.float32, mesh, tensors=random_hf_tensors(model.config))
    _assert_same_placed_values(loaded, shard_model(model, mesh))


class _Weights(nnx.Module):
    """Deterministic stand-in parameters (no RNG program to compile): iota values offset per parameter."""

    def __init__(self, name: str, shape: tuple, axes: tuple, offset: int):
        size = int(np.prod(shape))
        setattr(
            self,
            name,
            nnx.Param(jnp.arange(offset, offset + size, dtype=jnp.float32).reshape(shape), logical_axes=axes),
        )


class _Layer(nnx.Module):
    def __init__(self, index: int):
        self.mlp = _Weights("kernel", (64, 128), ("embed", "mlp"), 1000 * index)


class _Inner(nnx.Module):
    def __init__(self, config):
        self.embed_tokens = _Weights("embedding", (256, 64), ("vocab", "embed"), -7)
        self.layers = nnx.List([_Layer(i) for i in range(config.num_layers)])
        self.norm = _Weights("weight", (64,), ("norm",), 5)


class _StandInModel(nnx.Module):
    """The parameter paths of a decoder model (``model.layers.i...``, ``lm_head``), none of its layers."""

    def __init__(self, config, *, dtype, rngs, attention_impl=None):
        self.model = _Inner(config)
        self.lm_head = _Weights("kernel", (64, 256), ("embed", "vocab"), 3)


def test_dummy_weights_on_several_device_sets_equal_one_device():
    config = _model_config()
    mesh = make_mesh(tensor_parallel_size=2, pipeline_parallel_size=2)
    placement = param_placement(mesh, config)
    built = init_dummy_weights_by_device_set(_StandInModel, config, jnp.float32, placement, 0, None)
    one_device = _StandInModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    expected = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(one_device))}
    for path, variable in nnx.to_flat_state(nnx.state(built)):
        array = variable.get_value()
        assert array.sharding == placement(path, variable), path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected[path]))
    stages = {
        path[2]: {d.id for d in v.get_value().sharding.device_set}
        for path, v in nnx.to_flat_state(nnx.state(built))
        if path[1] == "layers"
    }
    assert stages == {0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}}


def _assert_same_placed_values(model, expected_model):
    expected = dict(nnx.to_flat_state(nnx.state(expected_model)))
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        array, want = variable.get_value(), expected[path].get_value()
        assert array.sharding == want.sharding, path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(want))
