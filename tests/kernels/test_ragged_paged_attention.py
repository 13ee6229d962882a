"""Ragged paged attention: the Pallas GPU kernel (interpret mode on CPU, compiled on the GPU machine) and the jnp
reference, each against a naive float64 attention written here, on random ragged batches.

Static shapes are shared between scenarios so that each kernel variant compiles once per session.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, reference, tile_plan, triton_gpu
from pallas_kernels.tolerances import assert_close
from tests.kernels.attention_cases import Batch, Geometry, make_batch, naive_attention
from tests.kernels.backends import interpreted_and_compiled

KERNEL_IMPLS = interpreted_and_compiled("gpu", "pallas_gpu_interpret", "pallas_gpu")

# (query_lens, seq_lens) of the real requests; lengths 1, L-1, L, L+1 (L = 16) and a 2k+ context.
SCENARIOS = {
    "mixed": ([1, 15, 16, 17, 1, 5], [1, 15, 32, 17, 2100, 2053]),
    "decode": ([1] * 8, [1, 15, 16, 17, 33, 2100, 700, 64]),
    "prefill": ([1, 15, 16, 17, 9], [1, 15, 16, 17, 9]),
    "chunked_prefill": ([20, 33, 1], [60, 2080, 40]),
}


def check_against_naive(out, batch: Batch, dtype, **options) -> None:
    real = batch.num_real_tokens
    assert np.all(np.isfinite(np.asarray(out[real:], np.float32))), "padding rows must stay finite"
    assert_close(out[:real], naive_attention(batch, **options)[:real], dtype)


_jitted_reference = jax.jit(
    reference.ragged_paged_attention_reference, static_argnames=("sm_scale", "sliding_window", "soft_cap")
)


def jitted_reference(*args, **options):
    """reference.py at full float32 matmul precision (XLA on GPU would otherwise multiply float32 in TF32)."""
    with jax.default_matmul_precision("highest"):
        return _jitted_reference(*args, **options)


jitted_tile_plan = jax.jit(
    tile_plan.build_tile_plan, static_argnames=("tile_tokens", "num_slots", "min_query_len", "max_query_len")
)


@functools.cache
def _kernel_with_configs(short_config, long_config, interpret, **options):
    return jax.jit(
        functools.partial(
            triton_gpu.ragged_paged_attention_triton,
            short_config=short_config,
            long_config=long_config,
            interpret=interpret,
            **options,
        )
    )


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kernel_matches_naive_and_reference_f32(impl, scenario):
    geo = Geometry()
    batch = make_batch(1, *SCENARIOS[scenario], geo, jnp.float32)
    options = dict(sm_scale=geo.head_dim**-0.5)
    out = ragged_paged_attention(*batch.args, impl=impl, **options)
    check_against_naive(out, batch, jnp.float32, **options)
    ref = jitted_reference(*batch.args, **options)
    check_against_naive(ref, batch, jnp.float32, **options)
    assert_close(out[: batch.num_real_tokens], ref[: batch.num_real_tokens], jnp.float32, "kernel vs reference")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, dtype",
    [(4, 4, 128, jnp.float32), (8, 2, 128, jnp.bfloat16), (8, 1, 256, jnp.bfloat16)],
    ids=["gqa1-h128-f32", "gqa4-h128-bf16", "mqa8-h256-bf16"],
)
def test_gqa_ratios_head_dims_and_dtypes(impl, num_heads, num_kv_heads, head_dim, dtype):
    geo = Geometry(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    batch = make_batch(2, *SCENARIOS["mixed"], geo, dtype)
    options = dict(sm_scale=head_dim**-0.5)
    out = ragged_paged_attention(*batch.args, impl=impl, **options)
    check_against_naive(out, batch, dtype, **options)
    ref = jitted_reference(*batch.args, **options)
    check_against_naive(ref, batch, dtype, **options)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_sliding_window_with_soft_cap(impl):
    geo = Geometry()
    batch = make_batch(3, *SCENARIOS["mixed"], geo, jnp.float32)
    options = dict(sm_scale=geo.head_dim**-0.5, sliding_window=24, soft_cap=2.0)
    out = ragged_paged_attention(*batch.args, impl=impl, **options)
    check_against_naive(out, batch, jnp.float32, **options)
    ref = jitted_reference(*batch.args, **options)
    check_against_naive(ref, batch, jnp.float32, **options)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernel_never_reads_unused_cache_rows(impl):
    """Rows past each request's length, the null block and stray table entries hold NaN: none may leak in."""
    geo = Geometry()
    batch = make_batch(4, *SCENARIOS["mixed"], geo, jnp.float32, poison_unused=True)
    options = dict(sm_scale=geo.head_dim**-0.5)
    out = ragged_paged_attention(*batch.args, impl=impl, **options)
    check_against_naive(out, batch, jnp.float32, **options)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_unsplit_short_launch_and_small_tiles(impl):
    """Non-default configs: no KV split, 16-row long tiles, 16-token KV steps."""
    geo = Geometry()
    batch = make_batch(5, *SCENARIOS["chunked_prefill"], geo, jnp.float32)
    options = dict(sm_scale=geo.head_dim**-0.5)
    short = triton_gpu.KernelConfig(block_rows=16, block_kv=16, num_kv_splits=1)
    long = triton_gpu.KernelConfig(block_rows=32, block_kv=16)
    out = _kernel_with_configs(short, long, impl.endswith("interpret"), **options)(*batch.args)
    check_against_naive(out, batch, jnp.float32, **options)


def test_tile_plan_covers_each_eligible_token_once():
    query_start_loc = jnp.asarray([0, 1, 6, 6, 30, 31], jnp.int32)  # lengths 1, 5, 0, 24, 1
    plan = jitted_tile_plan(query_start_loc, tile_tokens=4, num_slots=12, min_query_len=2)
    covered = []
    for request, first, count in zip(*(np.asarray(x) for x in plan), strict=True):
        covered += [(int(request), token) for token in range(first, first + count)]
    expected = [(1, t) for t in range(1, 6)] + [(3, t) for t in range(6, 30)]
    assert sorted(covered) == expected
    assert np.sum(np.asarray(plan.num_tokens) > 0) == 2 + 6
    assert tile_plan.max_tile_slots(31, 5, 4, 2, None) >= 8


def test_op_rejects_bad_arguments():
    batch = make_batch(6, *SCENARIOS["decode"], Geometry(), jnp.float32)
    with pytest.raises(ValueError) as error:
        ragged_paged_attention(*batch.args, sm_scale=0.1, impl="cuda_magic")
    assert "cuda_magic" in str(error.value)
    with pytest.raises(ValueError) as error:
        ragged_paged_attention(batch.q[:, :3], *batch.args[1:], sm_scale=0.1)
    assert "multiple of kv heads" in str(error.value)
    with pytest.raises(ValueError) as error:
        ragged_paged_attention(*batch.args, sm_scale=0.1, sliding_window=0)
    assert "sliding_window" in str(error.value)
    with pytest.raises(ValueError) as error:
        triton_gpu.KernelConfig(block_rows=24, block_kv=64)
    assert "block_rows" in str(error.value)
