"""Accuracy of quantized SmolLM2-135M (the default model, real weights) against the unquantized model.

Perplexity and mean KL divergence over a fixed ~2,400-token English text (``tests/fixtures/text``), scored in four
independent 512-token windows (2,048 tokens: one compiled shape per model), and greedy generations (int8, fp8 KV
cache) against transformers' greedy tokens of the unquantized model (the committed ``smollm2_gguf`` fixture).

int4 runs at group 64, not the engine's 128: SmolLM2's hidden size 576 is no multiple of 128. The GGUF's weights are
themselves Q4_1, so int4 quantizes a 4-bit grid again (double rounding) and loses more than int4 of a bf16
checkpoint would. Each case asserts the goal (perplexity within 1% for int8 and fp8, within 5% for int4); the two that
miss it today are strict xfails naming the measured ratio, so a fix shows up as an unexpected pass. Measured
perplexity ratios: int8 0.9985, fp8 1.029, int4 1.292 (1.395 before int4 searched each group's scale). fp8 split
into its parts (benchmarks/RESULTS.md): the e4m3 weights alone give 1.0185, the fp8 activations alone 1.0086. With
``quantize_lm_head`` (SmolLM2's head is tied: a quantized copy of the embedding table): int8 0.9986 (mean KL 0.0040
nats against 0.0029), the only case held to the goal; fp8 1.056 and int4 1.589 were measured and are not tests.

``kv_cache_dtype="fp8"`` (unquantized weights, K/V stored as e4m3 with scale 1.0) is scored the same way against the
float32 cache, goal 1%: measured ratio 1.0033, mean KL 0.0075 nats, argmax agreement 95.2%; its greedy generations
equal transformers' on 95.8% of tokens (the float32 cache's: 100%).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.loading.model_loader import abstract_model, load_weights
from jaxllm.loading.model_source import resolve_model_source
from jaxllm.models import ModelConfig, get_model_class
from jaxllm.quantization.config import QuantizationConfig
from tests.models.harness import prompt_logits
from tests.models.test_parity import expected

TEXT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "text" / "perplexity_corpus.txt"
WINDOW = 512
NUM_WINDOWS = 4
# method, group size, lm_head quantized too, goal: largest perplexity ratio (quantized / unquantized)
CASES = [
    pytest.param("int8", 128, False, 1.01, id="int8"),
    pytest.param("int8", 128, True, 1.01, id="int8-lm_head"),
    pytest.param(
        "fp8",
        128,
        False,
        1.01,
        id="fp8",
        marks=pytest.mark.xfail(
            strict=True, reason="goal not met: ratio 1.029; e4m3 rounding of these 4-bit-grid weights alone: 1.0185"
        ),
    ),
    pytest.param(
        "int4",
        64,
        False,
        1.05,
        id="int4",
        marks=pytest.mark.xfail(
            strict=True, reason="goal not met: ratio 1.292; group-64 int4 re-rounds this checkpoint's 4-bit Q4_1 grid"
        ),
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from jaxllm.loading.default_model import default_model_path

    source = resolve_model_source(str(default_model_path()))
    config = ModelConfig.from_hf_config(source.hf_config)
    token_ids = source.load_tokenizer().encode(TEXT.read_text())
    assert len(token_ids) >= WINDOW * NUM_WINDOWS
    windows = [token_ids[i * WINDOW : (i + 1) * WINDOW] for i in range(NUM_WINDOWS)]
    return source, config, windows


def window_log_probs(smollm2, quantization=None, kv_dtype=None) -> np.ndarray:
    """Log-probabilities ``[NUM_WINDOWS, WINDOW, V]`` (float64) of the windows under the (quantized) model, with a
    KV cache of ``kv_dtype`` (default float32, the model's)."""
    source, config, windows = smollm2
    abstract = abstract_model(get_model_class(config.architecture), config, jnp.float32, quantization=quantization)
    model = load_weights(abstract, source.tensors())
    log_probs = []
    for i, window in enumerate(windows):
        logits = prompt_logits(model, window, block_size=16, seed=i, kv_dtype=kv_dtype).astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs.append(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))
    return np.stack(log_probs)


def mean_nll(log_probs, windows) -> float:
    """Mean negative log-likelihood of each window's tokens after its first."""
    next_ids = np.asarray(windows)[:, 1:, None]  # [NUM_WINDOWS, WINDOW-1, 1]
    return -np.mean(np.take_along_axis(log_probs[:, :-1], next_ids, axis=-1))


@pytest.fixture(scope="module")
def unquantized(smollm2):
    return window_log_probs(smollm2)


def compare(unquantized, log_probs, windows, label: str) -> tuple[float, float]:
    """Perplexity ratio and mean KL(unquantized || quantized) in nats per token; prints both and argmax agreement."""
    base_nll, nll = mean_nll(unquantized, windows), mean_nll(log_probs, windows)
    ratio = np.exp(nll - base_nll)
    kl = np.mean((np.exp(unquantized) * (unquantized - log_probs)).sum(-1))
    agreement = np.mean(unquantized.argmax(-1) == log_probs.argmax(-1))
    print(
        f"\n{label}: perplexity {np.exp(nll):.3f} vs {np.exp(base_nll):.3f} (ratio {ratio:.4f}), mean KL {kl:.4f} "
        f"nats, argmax agreement {agreement:.1%} over {NUM_WINDOWS * WINDOW} tokens"
    )
    return ratio, kl


@pytest.mark.parametrize(("method", "group_size", "lm_head", "max_ratio"), CASES)
def test_perplexity_close_to_unquantized(smollm2, unquantized, method, group_size, lm_head, max_ratio):
    log_probs = window_log_probs(smollm2, QuantizationConfig(method, group_size, lm_head=lm_head))
    label = f"{method} (group {group_size}{', lm_head too' if lm_head else ''})"
    ratio, kl = compare(unquantized, log_probs, smollm2[2], label)
    assert ratio < max_ratio, f"{method}: perplexity ratio {ratio:.4f} (mean KL {kl:.4f} nats)"


def test_fp8_kv_cache_perplexity_close_to_float32_cache(smollm2, unquantized):
    """``kv_cache_dtype="fp8"``: unquantized weights, K and V stored as e4m3 with scale 1.0 (vLLM's default)."""
    log_probs = window_log_probs(smollm2, kv_dtype=jnp.float8_e4m3fn)
    ratio, kl = compare(unquantized, log_probs, smollm2[2], "fp8 KV cache")
    assert ratio < 1.01, f"fp8 KV cache: perplexity ratio {ratio:.4f} (mean KL {kl:.4f} nats)"


@pytest.mark.parametrize(
    "options",
    [dict(quantization="int8"), dict(kv_cache_dtype="fp8")],
    ids=["int8", "fp8-kv-cache"],  # measured: 88.5% and 95.8% of tokens equal
)
def test_greedy_generations_agree_with_unquantized(options):
    data = expected("smollm2_gguf")
    llm = LLM(max_model_len=256, max_num_batched_tokens=64, num_gpu_blocks_override=64, **options)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(list(data["text_prompts"]), params, use_tqdm=False)
    got = np.array([o.outputs[0].token_ids for o in outputs])
    agreement = np.mean(got == data["text_greedy_token_ids"])
    first_tokens = np.mean(got[:, 0] == data["text_greedy_token_ids"][:, 0])
    print(f"\n{options} greedy: {agreement:.1%} of tokens equal, first token equal in {first_tokens:.0%} of prompts")
    assert agreement >= 0.75
    assert first_tokens == 1.0
