"""On the GPU machine (marker ``gpu``): the KV cache update and the attention kernels work at the far end of a cache
array of several GiB, where a value's element offset passes 2**31; and why ``jaxllm.models.kv_cache_layout`` never
makes a one-byte (fp8) cache array of 2 to 4 GiB.

Pallas' Triton lowering computes a kernel's element offsets in 32 bits for arrays of at most 4 GiB and in 64 bits
above. Arrays over 4 GiB (bf16 or fp8: what layers sharing arrays give) work; an fp8 array of 2-4 GiB (more than
2**31 one-byte values) faults in the Triton attention kernel (an illegal address on an H200, session 37), so it runs
in a child process (a fault ends the CUDA context) and the test says so when it stops faulting. Each case embeds a
random batch's blocks in the last blocks of a big cache whose other blocks hold NaN, writes the batch's new tokens
there with ``update_kv_cache`` (the engine's scatter) and runs the attention kernels on it; the reference is the naive
float64 attention of ``tests.kernels.attention_cases`` over the small batch, so a read or a write at a wrong offset
shows as NaN or as a wrong value.

    PYTHONPATH=. python3 -m tests.gpu.test_large_kv_cache_gpu float8_e4m3fn 3221225472   # one case, by hand
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_cache_update import update_kv_cache
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.tolerances import assert_close
from tests.kernels.attention_cases import Batch, Geometry, make_batch, naive_attention
from tests.kernels.test_fp8_kv_cache import SCENARIOS, fp8_case

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (arrays of several GiB)")]

# The Llama-3.1-8B attention shape; a block of 32 rows (the fp8 tests' size) is 32 KiB in fp8, 64 KiB in bf16.
GEO = Geometry(num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, num_tokens=128, num_blocks=110, max_blocks=40)
BLOCK_VALUES = GEO.block_size * GEO.num_kv_heads * GEO.head_dim
GIB = 2**30
CASES = [  # (cache dtype, bytes of each of K and V): arrays over 4 GiB, element offsets in 64 bits
    pytest.param("bfloat16", 5 * GIB, id="bf16-5GiB"),
    pytest.param("float8_e4m3fn", 5 * GIB, id="fp8-5GiB"),
]
FP8_OVERFLOW_BYTES = 3 * GIB  # an fp8 array of 2-4 GiB: 32-bit offsets that overflow
UPDATE_CHECKED = "update at the far end: ok"
IMPLS = ["pallas_gpu", "pallas_mosaic_gpu"]
FAR_OFFSET = 2**31  # the element offset every block of the batch lies past


def small_batch(cache_dtype: str) -> tuple[Batch, tuple, dict]:
    """(the batch to compare against, the kernel's arguments on the small cache, the cache scales)."""
    if cache_dtype == "float8_e4m3fn":
        case = fp8_case(3, "mixed", GEO, jnp.bfloat16, calibrated=True)
        return case.dequantized, case.args, case.scales
    batch = make_batch(3, *SCENARIOS["mixed"], GEO, jnp.bfloat16)
    return batch, batch.args, dict(k_scale=1.0, v_scale=1.0)


def new_token_slots(batch: Batch) -> np.ndarray:
    """The small cache's slot (block * L + row) of each real token's own position, in token order."""
    tables, lens, starts = (np.asarray(x) for x in batch.args[3:])
    slots = []
    for request, length in enumerate(lens):
        start, end = starts[request], starts[request + 1]
        for position in length - (end - np.arange(start, end)):
            slots.append(tables[request, position // GEO.block_size] * GEO.block_size + position % GEO.block_size)
    return np.asarray(slots, np.int32)


@functools.partial(jax.jit, static_argnames=("num_blocks",))
def embed(small_cache, slots, num_blocks: int):
    """A ``[num_blocks, L, K, H]`` cache of NaN whose last blocks are ``small_cache`` with the rows at ``slots``
    (the step's new tokens, still to be written) NaN too; and those rows' values."""
    flat = small_cache.reshape(-1, *small_cache.shape[2:])
    new_rows = flat[slots]
    nan = jnp.full((), jnp.nan, small_cache.dtype)
    holed = flat.at[slots].set(nan).reshape(small_cache.shape)
    big = jnp.full((num_blocks, *small_cache.shape[1:]), nan, small_cache.dtype)
    return jax.lax.dynamic_update_slice_in_dim(big, holed, num_blocks - small_cache.shape[0], axis=0), new_rows


def check_far_end(cache_dtype: str, cache_bytes: int) -> None:
    """Asserts the update and each of ``IMPLS`` right on a ``cache_bytes`` cache whose last blocks hold the batch."""
    itemsize = jnp.dtype(cache_dtype).itemsize
    num_blocks = cache_bytes // (BLOCK_VALUES * itemsize)
    first = num_blocks - GEO.num_blocks  # where the small cache's block 0 lands
    assert first * BLOCK_VALUES > FAR_OFFSET
    reference, args, scales = small_batch(cache_dtype)
    q, small_k, small_v, tables, seq_lens, query_start_loc = args
    slots = new_token_slots(reference)
    big_k, new_k = embed(small_k, jnp.asarray(slots), num_blocks)
    big_v, new_v = embed(small_v, jnp.asarray(slots), num_blocks)
    assert big_k.nbytes == num_blocks * BLOCK_VALUES * itemsize
    # the engine writes the model dtype's K / V; an fp8 cache stores them divided by its scale
    new_k = new_k.astype(jnp.float32) * scales["k_scale"]
    new_v = new_v.astype(jnp.float32) * scales["v_scale"]
    big_slots = jnp.asarray(slots + first * GEO.block_size)
    big_k, big_v = jax.jit(update_kv_cache, static_argnames=("k_scale", "v_scale"), donate_argnums=(0, 1))(
        big_k, big_v, new_k, new_v, big_slots, **scales
    )
    written = big_k.reshape(-1, GEO.num_kv_heads, GEO.head_dim)[big_slots]
    np.testing.assert_array_equal(
        np.asarray(written, np.float32),
        np.asarray(small_k, np.float32).reshape(-1, GEO.num_kv_heads, GEO.head_dim)[slots],
        err_msg="rows written at the far end",
    )
    print(UPDATE_CHECKED, flush=True)
    expected = naive_attention(reference, sm_scale=GEO.head_dim**-0.5)[: reference.num_real_tokens]
    for impl in IMPLS:
        out = ragged_paged_attention(
            q,
            big_k,
            big_v,
            tables + first,
            seq_lens,
            query_start_loc,
            sm_scale=GEO.head_dim**-0.5,
            impl=impl,
            **scales,
        )
        assert_close(
            out[: reference.num_real_tokens],
            expected,
            jnp.bfloat16,
            f"{impl}, {cache_dtype} cache of {cache_bytes / GIB:g} GiB",
        )


@pytest.mark.parametrize("cache_dtype, cache_bytes", CASES)
def test_update_and_attention_at_the_far_end_of_a_big_cache(cache_dtype, cache_bytes):
    check_far_end(cache_dtype, cache_bytes)


def test_an_fp8_cache_array_of_2_to_4_gib_still_breaks_the_triton_kernel():
    """The reason for ``kv_cache_layout``'s fp8 window: the same check on a 3 GiB fp8 cache fails in the attention
    kernels (a fault, or a wrong value) after the update passed. When this test fails, Pallas' Triton lowering no
    longer overflows there and the window (``_fits``' ``fp8_overflow``) can go."""
    child = subprocess.run(
        [sys.executable, "-m", "tests.gpu.test_large_kv_cache_gpu", "float8_e4m3fn", str(FP8_OVERFLOW_BYTES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = child.stdout + child.stderr
    assert UPDATE_CHECKED in child.stdout, f"the child did not reach the attention kernels:\n{output[-3000:]}"
    assert child.returncode != 0, "an fp8 cache array of 3 GiB now works: drop kv_cache_layout's fp8 window"
    assert "ILLEGAL_ADDRESS" in output or "AssertionError" in output, output[-3000:]


if __name__ == "__main__":
    check_far_end(sys.argv[1], int(sys.argv[2]))
    print("attention at the far end: ok")
