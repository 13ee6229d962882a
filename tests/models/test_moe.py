"""The mixture-of-experts pieces on their own: routing and the grouped expert SwiGLU against numpy references,
config parsing of the three families, and the loader's errors for experts' tensors.

Whole-model parity with transformers (Mixtral, Qwen2-MoE, Qwen3-MoE fixtures) is in ``test_parity.py``.
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxllm import LLM
from jaxllm.loading.model_loader import abstract_model, load_weights, split_expert
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.models.moe import default_experts_impl, pair_path_max_tokens, route, routed_swiglu
from pallas_kernels import grouped_matmul as gmm
from sharding.rules import model_rules

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"


def numpy_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_picks_the_top_k_softmax_probabilities(normalize):
    logits = np.random.default_rng(0).normal(size=(37, 8)).astype(np.float32) * 2
    weights, ids = route(jnp.asarray(logits), 3, normalize)
    probs = numpy_softmax(logits.astype(np.float64))
    expected_ids = np.argsort(-probs, axis=-1)[:, :3]
    expected = np.take_along_axis(probs, expected_ids, axis=-1)
    if normalize:
        expected = expected / expected.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(ids), expected_ids)
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)


def reference_experts(x, ids, weights, w_gate, w_up, w_down):
    """Token by token, expert by expert, in float64."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            gate, up = x[t] @ w_gate[e], x[t] @ w_up[e]
            out[t] += weights[t, j] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


def random_experts(rng, num_experts: int, top_k: int, d: int, i: int, t: int) -> tuple[np.ndarray, ...]:
    """``t`` tokens' rows ``[t, d]``, each routed to ``top_k`` distinct experts with weights in [0.1, 1), and the
    experts' gate / up ``[E, d, i]`` and down ``[E, i, d]`` kernels: float32 except the int32 ids."""
    x = rng.normal(size=(t, d)).astype(np.float32)
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(t, top_k)).astype(np.float32)
    w_gate, w_up = (rng.normal(size=(num_experts, d, i)).astype(np.float32) * 0.3 for _ in range(2))
    w_down = rng.normal(size=(num_experts, i, d)).astype(np.float32) * 0.3
    return x, ids, weights, w_gate, w_up, w_down


PATHS = [  # (impl, pair_path): XLA's ragged_dot, and each plan backend on the tile plan and on the per-pair products
    ("ragged_dot", None),
    ("reference", False),
    ("reference", True),
    ("pallas_gpu_interpret", False),
    ("pallas_gpu_interpret", True),
]


@pytest.mark.parametrize(("impl", "pair_path"), PATHS)
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_routed_swiglu_equals_a_per_token_loop(num_tokens, impl, pair_path):
    rng = np.random.default_rng(num_tokens)
    num_experts, top_k, d, i = 6, 2, 16, 32
    x, ids, weights, w_gate, w_up, w_down = random_experts(rng, num_experts, top_k, d, i, num_tokens)
    arrays = map(jnp.asarray, (x, ids, weights, w_gate, w_up, w_down))
    got = routed_swiglu(*arrays, num_experts=num_experts, impl=impl, pair_path=pair_path)
    expected = reference_experts(x, ids, weights, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("impl", "pair_path"), PATHS)
def test_padding_tokens_leave_the_real_tokens_alone(impl, pair_path):
    rng = np.random.default_rng(11)
    num_experts, top_k, d, i, t, real = 8, 2, 16, 32, 12, 5
    x, ids, weights, w_gate, w_up, w_down = random_experts(rng, num_experts, top_k, d, i, t)
    arrays = list(map(jnp.asarray, (x, ids, weights, w_gate, w_up, w_down)))
    got = routed_swiglu(*arrays, jnp.int32(real), num_experts=num_experts, impl=impl, pair_path=pair_path)
    expected = reference_experts(x[:real], ids[:real], weights[:real], w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got)[:real], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("impl", "pair_path"), PATHS)
@pytest.mark.parametrize("num_shards", [2, 4])
def test_expert_parallel_shards_sum_to_every_expert(impl, pair_path, num_shards):
    """Expert parallelism: each shard runs only the pairs routed to its own experts ``[offset, offset + E/S)`` and
    the shards' partial sums add up to the whole block; padding tokens stay out of every shard."""
    rng = np.random.default_rng(num_shards)
    num_experts, top_k, d, i, t, real = 8, 2, 16, 32, 12, 9
    x, ids, weights, w_gate, w_up, w_down = random_experts(rng, num_experts, top_k, d, i, t)
    local = num_experts // num_shards
    partials = []
    for shard in range(num_shards):
        experts = slice(shard * local, (shard + 1) * local)
        arrays = map(jnp.asarray, (x, ids, weights, w_gate[experts], w_up[experts], w_down[experts]))
        partial = routed_swiglu(
            *arrays,
            jnp.int32(real),
            num_experts=num_experts,
            impl=impl,
            pair_path=pair_path,
            expert_offset=jnp.int32(shard * local),
        )
        partials.append(np.asarray(partial)[:real])
    first_shard = reference_experts(x[:real], ids[:real], weights[:real] * (ids[:real] < local), w_gate, w_up, w_down)
    np.testing.assert_allclose(partials[0], first_shard, rtol=1e-4, atol=1e-4)  # its own experts' pairs, no others
    expected = reference_experts(x[:real], ids[:real], weights[:real], w_gate, w_up, w_down)
    np.testing.assert_allclose(sum(partials), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("impl", "pair_path"), PATHS[1:])
def test_a_step_of_padding_only_gives_zeros_not_unwritten_rows(impl, pair_path):
    """Warm-up runs steps with no real token: every tile (every pair) is skipped, and the tile kernel leaves its rows
    unwritten. The padding tokens must still come out finite (their K/V go to the null block every request's
    attention reads)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(4, 2, replace=False) for _ in range(8)]), jnp.int32)
    kernels = [jnp.asarray(rng.normal(size=(4, 16, 16)), jnp.float32) for _ in range(3)]
    got = routed_swiglu(x, ids, jnp.ones((8, 2)), *kernels, jnp.int32(0), num_experts=4, impl=impl, pair_path=pair_path)
    np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_the_tile_plan_lays_out_only_the_real_tokens_pairs(monkeypatch):
    """The padding tokens' pairs get no tiles: the plan is told how many pairs are real (``num_tokens * top_k``)."""
    planned = []
    real_plan_tiles = gmm.plan_tiles

    def spy(group_ids, num_groups, block_m, num_valid=None):
        planned.append(num_valid)
        return real_plan_tiles(group_ids, num_groups, block_m, num_valid)

    monkeypatch.setattr(gmm, "plan_tiles", spy)
    args = (jnp.ones((12, 16)), jnp.zeros((12, 2), jnp.int32), jnp.ones((12, 2)), *[jnp.ones((4, 16, 16))] * 3)
    routed_swiglu(*args, jnp.int32(5), num_experts=4, impl="reference", pair_path=False)
    assert [int(n) for n in planned] == [10]


def record_expert_paths(monkeypatch) -> list[str]:
    """A list that gets "tiles" each time the experts lay out the tile plan and "pairs" each time they take the
    per-pair products (both happen when a step program is traced)."""
    calls = []
    for path, name in (("tiles", "plan_tiles"), ("pairs", "pair_swiglu")):
        real = getattr(gmm, name)
        monkeypatch.setattr(gmm, name, lambda *a, _real=real, _path=path, **k: calls.append(_path) or _real(*a, **k))
    return calls


@pytest.mark.parametrize(
    ("bucket", "num_experts", "setting", "pairs"),
    [(16, 64, None, True), (16, 8, None, False), (32, 64, None, False), (32, 64, "32", True), (8, 64, "0", False)],
)
def test_small_steps_take_the_pair_path(bucket, num_experts, setting, pairs, monkeypatch):
    """Buckets up to ``PAIR_PATH_MAX_TOKENS`` (16) whose pairs (2 per token here) are no more than the experts run
    the per-pair products and no tile plan; the variable moves the token bound (0: never)."""
    if setting is not None:
        monkeypatch.setenv("JAXLLM_MOE_PAIR_PATH_MAX_TOKENS", setting)
    calls = record_expert_paths(monkeypatch)
    rng = np.random.default_rng(bucket)
    ids = jnp.asarray(np.stack([rng.choice(num_experts, 2, replace=False) for _ in range(bucket)]), jnp.int32)
    kernels = [jnp.asarray(rng.normal(size=(num_experts, 16, 16)), jnp.float32) for _ in range(3)]
    x, weights = jnp.ones((bucket, 16)), jnp.ones((bucket, 2))
    routed_swiglu(x, ids, weights, *kernels, jnp.int32(3), num_experts=num_experts, impl="reference")
    assert calls == (["pairs"] if pairs else ["tiles"])


def test_a_bad_pair_path_bound_is_named(monkeypatch):
    monkeypatch.setenv("JAXLLM_MOE_PAIR_PATH_MAX_TOKENS", "sixteen")
    with pytest.raises(ValueError, match="JAXLLM_MOE_PAIR_PATH_MAX_TOKENS must be .* got 'sixteen'"):
        pair_path_max_tokens()


@pytest.mark.parametrize(("impl", "pair_path"), [("ragged_dot", None), *PATHS[3:]])
def test_routed_swiglu_in_bfloat16_stays_close_to_float64(impl, pair_path):
    rng = np.random.default_rng(7)
    num_experts, top_k, d, i, t = 8, 2, 64, 32, 48
    x = rng.normal(size=(t, d)).astype(np.float32)
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(t, top_k)).astype(np.float32)
    w_gate, w_up = (rng.normal(size=(num_experts, d, i)).astype(np.float32) * 0.2 for _ in range(2))
    w_down = rng.normal(size=(num_experts, i, d)).astype(np.float32) * 0.2
    as_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (x, w_gate, w_up, w_down)]
    got = routed_swiglu(
        as_bf16[0],
        jnp.asarray(ids),
        jnp.asarray(weights),
        *as_bf16[1:],
        num_experts=num_experts,
        impl=impl,
        pair_path=pair_path,
    )
    assert got.dtype == jnp.bfloat16
    rounded = [np.asarray(a.astype(jnp.float32)) for a in as_bf16]
    expected = reference_experts(rounded[0], ids, weights, *rounded[1:])
    relative = np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max()
    assert relative < 2e-2, relative  # three bf16 roundings of products accumulated in float32


QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
}


def test_the_gpu_kernel_serves_dims_it_tiles():
    assert default_experts_impl(2048, 768, "gpu") == "pallas_gpu"
    assert default_experts_impl(2048, 24, "gpu") == "ragged_dot"  # e.g. a tensor shard too narrow to tile
    assert default_experts_impl(2048, 768, "cpu") == "ragged_dot"


def test_unknown_experts_impl_is_named():
    args = (jnp.ones((2, 16)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)), *[jnp.ones((2, 16, 16))] * 3)
    with pytest.raises(ValueError, match="experts impl must be one of .* got 'megablox'"):
        routed_swiglu(*args, num_experts=2, impl="megablox")


def test_the_experts_impl_variable_forces_a_backend_and_names_a_bad_one(monkeypatch):
    monkeypatch.setenv("JAXLLM_MOE_EXPERTS_IMPL", "reference")
    assert default_experts_impl(2048, 768, "cpu") == "reference"
    monkeypatch.setenv("JAXLLM_MOE_EXPERTS_IMPL", "cuBLAS")
    with pytest.raises(ValueError, match="JAXLLM_MOE_EXPERTS_IMPL must be one of .* got 'cuBLAS'"):
        default_experts_impl(2048, 768, "cpu")


def test_qwen_sparse_layers_follow_the_step_and_the_dense_list():
    config = ModelConfig.from_hf_config({**QWEN3_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert config.moe.sparse_layers == (1, 5)
    assert config.qk_norm and not config.moe.normalize_top_k  # transformers' default norm_topk_prob is false
    assert [config.is_sparse_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_mixtral_experts_and_defaults():
    hf = {**QWEN3_MOE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4}
    del hf["num_experts"], hf["moe_intermediate_size"]
    config = ModelConfig.from_hf_config(hf)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.intermediate_size) == (4, 2, 64)
    assert config.moe.normalize_top_k and config.moe.sparse_layers == tuple(range(6))
    assert ModelConfig.from_hf_config({**QWEN3_MOE, "architectures": ["LlamaForCausalLM"]}).moe is None


def test_qwen2_moe_has_qkv_biases_and_the_shared_expert():
    hf = {**QWEN3_MOE, "architectures": ["Qwen2MoeForCausalLM"], "shared_expert_intermediate_size": 48}
    config = ModelConfig.from_hf_config(hf)
    assert config.attention_bias and not config.qk_norm
    assert config.moe.shared_expert_intermediate_size == 48
    assert not ModelConfig.from_hf_config({**hf, "qkv_bias": False}).attention_bias


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds the 8 experts"),
        ({"num_experts": 0}, "num_experts of the experts must be a positive int, got 0"),
        ({"moe_intermediate_size": None}, "intermediate_size of the experts must be a positive int, got None"),
    ],
)
def test_bad_expert_fields_name_the_value(override, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**QWEN3_MOE, **override})


def test_tensor_parallel_needs_the_expert_width_to_split():
    config = ModelConfig.from_hf_config({**QWEN3_MOE, "num_attention_heads": 8, "moe_intermediate_size": 12})
    model_rules(config, 4)  # 12 % 4 == 0
    with pytest.raises(ValueError, match="moe_intermediate_size=12 is not divisible by tensor_parallel_size=8"):
        model_rules(config, 8)


def test_expert_parallel_needs_the_experts_to_split_not_their_width():
    config = ModelConfig.from_hf_config({**QWEN3_MOE, "num_attention_heads": 8, "moe_intermediate_size": 12})
    expert_parallel = config.with_expert_parallel(True)
    assert config.moe.expert_parallel is False and expert_parallel.moe.expert_parallel is True
    rules = model_rules(expert_parallel, 8)  # 12 % 8 != 0, but whole experts split: the width stays whole
    assert (rules["experts"], rules["expert_mlp"], rules["mlp"]) == ("tensor", None, "tensor")
    assert model_rules(config, 4)["experts"] is None and model_rules(config, 4)["expert_mlp"] == "tensor"
    twelve = ModelConfig.from_hf_config({**QWEN3_MOE, "num_attention_heads": 8, "num_experts": 12})
    with pytest.raises(ValueError, match="num_experts=12 is not divisible by tensor_parallel_size=8 .*whole experts"):
        model_rules(twelve.with_expert_parallel(True), 8)
    dense = ModelConfig.from_hf_config(json.loads((FIXTURES / "llama" / "config.json").read_text()))
    assert dense.with_expert_parallel(True) is dense


def test_split_expert_paths():
    assert split_expert(("model", "layers", 0, "mlp", "experts", 3, "gate_proj", "kernel")) == (
        ("model", "layers", 0, "mlp", "experts", "gate_proj", "kernel"),
        3,
    )
    assert split_expert(("model", "layers", 0, "mlp", "gate", "kernel")) is None


def load(model_dir):
    source = resolve_model_source(str(model_dir))
    config = ModelConfig.from_hf_config(source.hf_config)
    return load_weights(abstract_model(get_model_class(config.architecture), config, jnp.float32), source.tensors())


@pytest.fixture
def mixtral_copy(tmp_path):
    """A writable copy of the Mixtral fixture, and its tensors."""
    shutil.copytree(FIXTURES / "mixtral", tmp_path / "mixtral")
    return tmp_path / "mixtral", load_file(FIXTURES / "mixtral" / "model.safetensors")


def test_each_expert_lands_in_its_slice_of_the_stack(mixtral_copy):
    model_dir, tensors = mixtral_copy
    model = load(model_dir)
    w2 = model.model.layers[1].block_sparse_moe.experts.w2.kernel.get_value()  # [E, I, D]
    for e in range(8):
        np.testing.assert_array_equal(
            np.asarray(w2[e]), tensors[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"].T
        )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", r"missing 1 tensor\(s\): model\.layers\.0\.block_sparse_moe\.experts\.\{5\}\.w1"),
        ("reshape", r"'model\.layers\.0\.block_sparse_moe\.experts\.5\.w1\.weight' has shape \(48, 64\), model "),
        ("extra", r"unexpected tensor 'model\.layers\.0\.block_sparse_moe\.experts\.8\.w1\.weight': expert 8 of"),
    ],
)
def test_bad_expert_tensors_name_the_tensor(mixtral_copy, edit, message):
    model_dir, tensors = mixtral_copy
    name = "model.layers.0.block_sparse_moe.experts.5.w1.weight"
    if edit == "drop":
        del tensors[name]
    elif edit == "reshape":
        tensors[name] = tensors[name][:48]
    else:
        tensors[name.replace("experts.5", "experts.8")] = tensors[name]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load(model_dir)


def test_quantizing_a_mixture_of_experts_is_refused():
    with pytest.raises(ValueError, match="quantization='int8' is not supported for the mixture-of-experts model"):
        LLM(model=str(FIXTURES / "qwen3_moe"), quantization="int8", skip_tokenizer_init=True, max_model_len=64)


def test_dummy_weights_build_a_mixture_of_experts(tmp_path):
    config = json.loads((FIXTURES / "qwen2_moe" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, max_model_len=64, dtype="bfloat16")
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 16
    runner = llm.llm_engine.runner
    experts = nnx.merge(runner.graphdef, runner.params).model.layers[0].mlp.experts
    kernel = experts.gate_proj.kernel.get_value()
    assert kernel.shape == (6, 64, 32) and kernel.dtype == jnp.bfloat16
    assert float(jnp.std(kernel.astype(jnp.float32))) > 0.01
