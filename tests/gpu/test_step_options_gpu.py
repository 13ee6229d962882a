"""On the GPU machine (marker ``gpu``): the step programs' XLA options (``jaxllm.runner.xla_options``) keep XLA's
rematerialization pass out of the compile, narrow and wide steps alike.

XLA's GPU compiler rematerializes (recomputes a value later instead of keeping it) when its estimate of a program's
peak memory passes a limit, ``xla_gpu_memory_limit_slop_factor`` percent of the free device memory. A slop factor of
0 makes that limit zero, so the control, compiled with XLA's defaults otherwise, must show rematerialized
instructions (named ``*.remat*`` in the optimized HLO) in a chain of matmuls whose first product is read again at
the end; the engine's options must leave the same program without any, and its results unchanged.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.runner.xla_options import NARROW_STEP_MAX_TOKENS, StepCompilerOptions

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (XLA's GPU compiler)")]

NO_MEMORY = {"xla_gpu_memory_limit_slop_factor": 0}  # XLA's memory limit for the program: zero bytes


def first_product_read_last(x, w):
    first = x @ w  # live across the chain unless recomputed at the end
    h = first
    for _ in range(3):
        h = jnp.tanh(h @ w)
    return h + first


def compiled(options):
    shape = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    return jax.jit(first_product_read_last, compiler_options=options).lower(shape, shape).compile()


def rematerialized(program) -> list[str]:
    """The optimized HLO's instructions that XLA named as rematerialized copies (``fusion.3.remat``,
    ``gemm_fusion_dot_2_remat2``); names only, since the source metadata carries this file's function names."""
    names = re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", program.as_text(), flags=re.MULTILINE)
    return [name for name in names if re.search(r"[._]remat\d*(\.|$)", name)]


@pytest.mark.parametrize("num_tokens", [16, NARROW_STEP_MAX_TOKENS + 1], ids=["narrow", "wide"])
def test_step_options_keep_xla_from_rematerializing(num_tokens):
    control = compiled(NO_MEMORY)
    assert rematerialized(control), "the control must rematerialize, or this test proves nothing"
    engine = compiled({**StepCompilerOptions("gpu")(num_tokens), **NO_MEMORY})
    assert rematerialized(engine) == []
    keys = jax.random.split(jax.random.key(0), 2)
    x, w = (jax.random.normal(key, (4096, 4096), jnp.float32) / 8 for key in keys)  # products of order 1
    expected = np.asarray(control(x, w))  # TF32 products in both (XLA's default precision), cuBLAS or Triton GEMMs
    assert np.abs(expected).mean() > 0.3
    np.testing.assert_allclose(np.asarray(engine(x, w)), expected, rtol=1e-2, atol=1e-2)
