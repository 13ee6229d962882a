"""On the GPU machine (marker ``gpu``): the step programs' XLA options (``jaxllm.runner.xla_options``) keep XLA's
rematerialization pass out of a step that updates a big donated KV cache in place, narrow and wide steps alike.

XLA's GPU compiler recomputes values ("rematerializes") when its estimate of a program's peak memory passes the
device's memory less the program's inputs and outputs. It counts a donated array updated in place by
dynamic-update-slices about 2.5 times, so a step whose K and V arrays hold most of the GPU (one array per stage,
``JAXLLM_KV_ARRAY_MAX_BYTES``) looked far over the limit and had its per-layer matmuls recomputed: 231 recomputed
instructions per 8B batch-1 step, +0.55 ms (``benchmarks/RESULTS.md``, session 38). The control here is a
miniature of that step (layers that write their new K and V into the two big arrays and read them back), sized from
the device's memory and compiled only (nothing is allocated): with XLA's defaults it must show rematerialized
instructions (named ``*.remat*`` in the optimized HLO), with the engine's options none.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from jaxllm.runner.xla_options import NARROW_STEP_MAX_TOKENS, StepCompilerOptions

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (XLA's GPU compiler)")]

LAYERS, HIDDEN, KV_HEADS, HEAD_DIM, BLOCK = 8, 1024, 8, 128, 16
CACHE_SHARE = 0.4  # of the device's memory, per array: K and V together hold 80% of it


def step(k, v, x, block, wq, wk, wv, wo, w_up, w_down):
    """A decoder step's shape: each layer writes its tokens' K and V into blocks of the shared arrays from ``block``
    on, attends over those blocks and adds an MLP; the arrays come back updated (donated by the caller)."""
    h = x
    rows = x.shape[0]
    read = (1, rows // BLOCK, BLOCK, KV_HEADS, HEAD_DIM)
    for layer in range(LAYERS):
        q = (h @ wq[layer]).reshape(rows, KV_HEADS, HEAD_DIM)
        start = (layer, block, 0, 0, 0)
        k = lax.dynamic_update_slice(k, (h @ wk[layer]).reshape(read), start)
        v = lax.dynamic_update_slice(v, (h @ wv[layer]).reshape(read), start)
        keys = lax.dynamic_slice(k, start, read).reshape(rows, KV_HEADS, HEAD_DIM)
        values = lax.dynamic_slice(v, start, read).reshape(rows, KV_HEADS, HEAD_DIM)
        scores = jnp.einsum("qhd,khd->hqk", q, keys, preferred_element_type=jnp.float32)
        attended = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1).astype(h.dtype), values)
        h = h + attended.reshape(rows, -1) @ wo[layer]
        h = h + jax.nn.silu(h @ w_up[layer]) @ w_down[layer]
    return h, k, v


def compiled(options, num_tokens: int):
    device_bytes = jax.devices()[0].memory_stats()["bytes_limit"]
    block_bytes = LAYERS * BLOCK * KV_HEADS * HEAD_DIM * 2
    cache = jax.ShapeDtypeStruct(
        (LAYERS, int(CACHE_SHARE * device_bytes) // block_bytes, BLOCK, KV_HEADS, HEAD_DIM), jnp.bfloat16
    )
    projection = jax.ShapeDtypeStruct((LAYERS, HIDDEN, KV_HEADS * HEAD_DIM), jnp.bfloat16)
    shapes = (
        cache,
        cache,
        jax.ShapeDtypeStruct((num_tokens, HIDDEN), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.int32),
        projection,
        projection,
        projection,
        jax.ShapeDtypeStruct((LAYERS, KV_HEADS * HEAD_DIM, HIDDEN), jnp.bfloat16),
        jax.ShapeDtypeStruct((LAYERS, HIDDEN, 4 * HIDDEN), jnp.bfloat16),
        jax.ShapeDtypeStruct((LAYERS, 4 * HIDDEN, HIDDEN), jnp.bfloat16),
    )
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=options).lower(*shapes).compile()


def rematerialized(program) -> list[str]:
    """The optimized HLO's instructions that XLA named as rematerialized copies (``fusion.3.remat``,
    ``gemm_fusion_dot.40.remat2``); names only, since the source metadata carries this file's function names."""
    names = re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", program.as_text(), flags=re.MULTILINE)
    return [name for name in names if re.search(r"[._]remat\d*(\.|$)", name)]


@pytest.mark.parametrize(
    ("num_tokens", "quantization"),
    [(BLOCK, None), (BLOCK, "int8"), (8 * BLOCK, None)],
    ids=["narrow", "narrow-int8", "wide"],
)
def test_step_options_keep_xla_from_rematerializing_a_big_cache_step(num_tokens, quantization):
    assert 8 * BLOCK > NARROW_STEP_MAX_TOKENS >= BLOCK  # the ids above name the option sets they reach
    control = rematerialized(compiled(None, num_tokens))
    assert control, "with XLA's defaults this step must be rematerialized, or the test proves nothing"
    engine_options = StepCompilerOptions("gpu", quantization=quantization)(num_tokens)
    assert rematerialized(compiled(engine_options, num_tokens)) == [], f"rematerialized with {engine_options}"
