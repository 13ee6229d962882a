"""On the GPU machine (marker ``gpu``): the grouped-matmul Pallas kernels compiled by Triton (the tile kernel and the
per-pair products), against numpy and inside the experts' SwiGLU on either path. (The MoE fixtures' logits on the GPU
path against transformers': test_gpu_parity.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.moe import routed_swiglu
from tests.kernels.test_grouped_matmul import test_grouped_matmul_equals_numpy_per_tile as check_grouped
from tests.kernels.test_grouped_matmul import test_pair_products_equal_numpy_per_pair as check_pairs
from tests.models.test_moe import reference_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU to compile the Triton kernel"),
]


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_compiled_kernel_equals_numpy_per_tile(dtype, rtol):
    check_grouped("pallas_gpu", dtype, rtol)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_compiled_pair_kernels_equal_numpy_per_pair(dtype, rtol):
    check_pairs("pallas_gpu", dtype, rtol)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "pair_path"),
    [(1, 128, 8, False), (1, 128, 8, True), (13, 8, 2, True), (37, 8, 2, False), (512, 64, 6, False)],
)
def test_experts_on_the_kernel_equal_a_per_token_loop(num_tokens, num_experts, top_k, pair_path):
    rng = np.random.default_rng(num_tokens)
    d, i = 256, 128
    x = rng.normal(size=(num_tokens, d)).astype(np.float32)
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(num_tokens, top_k)).astype(np.float32)
    w_gate, w_up = (rng.normal(size=(num_experts, d, i)).astype(np.float32) * 0.1 for _ in range(2))
    w_down = rng.normal(size=(num_experts, i, d)).astype(np.float32) * 0.1
    with jax.default_matmul_precision("highest"):
        got = routed_swiglu(
            *map(jnp.asarray, (x, ids, weights, w_gate, w_up, w_down)),
            num_experts=num_experts,
            impl="pallas_gpu",
            pair_path=pair_path,
        )
    expected = reference_experts(x, ids, weights, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
