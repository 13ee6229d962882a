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

from pallas_kernels.ragged_paged_attention import mosaic_gpu, ragged_paged_attention, reference, tile_plan, triton_gpu
from pallas_kernels.tolerances import assert_close
from tests.kernels.attention_cases import Batch, Geometry, make_batch, naive_attention
from tests.kernels.backends import interpreted_and_compiled

KERNEL_IMPLS = interpreted_and_compiled("gpu", "pallas_gpu_interpret", "pallas_gpu")
MOSAIC_IMPLS = interpreted_and_compiled(
    "gpu", "pallas_mosaic_gpu_interpret", "pallas_mosaic_gpu", "mosaic_interpret", compiler="Mosaic GPU"
)

# (query_lens, seq_lens) of the real requests; lengths 1, L-1, L, L+1 (L = 16) and a 2k+ context.
SCENARIOS = {
    "mixed": ([1, 15, 16, 17, 1, 5], [1, 15, 32, 17, 2100, 2053]),
    "decode": ([1] * 8, [1, 15, 16, 17, 33, 2100, 700, 64]),
    "prefill": ([1, 15, 16, 17, 9], [1, 15, 16, 17, 9]),
    "chunked_prefill": ([20, 33, 1], [60, 2080, 40]),
}


# Long queries for the Mosaic GPU kernel (tiles of 128 tokens): lengths L-1, L, L+1 (long for G > 1), a tile plus one
# or two tokens, a chunk continuing a cached prefix, decodes beside them, and padding tokens up to T = 256.
MOSAIC_SCENARIOS = {
    "prefill": ([15, 16, 17, 130, 60], [15, 16, 17, 130, 60]),
    "chunked_mixed": ([129, 40, 1, 1, 20], [300, 45, 20, 700, 68]),
}
MOSAIC_GEOMETRY = dict(num_tokens=256, num_requests=8, num_blocks=96, max_blocks=48)


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


KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")  # Mosaic GPU's interpret mode traces a kernel as mpmd_map


def count_pallas_calls(fn, *args) -> int:
    """Kernel launches in ``fn``'s traced program (nested jaxprs included)."""

    def walk(jaxpr) -> int:
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in KERNEL_PRIMITIVES:
                count += 1
                continue
            for value in eqn.params.values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        count += walk(inner)
        return count

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _check_bounded(impl, batch: Batch, dtype, max_query_len: int, launches: tuple[int, int], **options) -> None:
    """Under ``max_query_len`` (the batch's longest query or more) the op matches the naive attention, with
    ``launches`` = (kernel launches with the bound, without it)."""
    out = ragged_paged_attention(*batch.args, impl=impl, max_query_len=max_query_len, **options)
    check_against_naive(out, batch, dtype, **options)
    bounded = functools.partial(ragged_paged_attention, impl=impl, max_query_len=max_query_len, **options)
    unbounded = functools.partial(ragged_paged_attention, impl=impl, **options)
    assert (count_pallas_calls(bounded, *batch.args), count_pallas_calls(unbounded, *batch.args)) == launches


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_query_len_bound_leaves_out_the_long_launch_only_when_it_covers_no_query(impl):
    """A decode-only step under the bound 1 runs the short launch alone; a mixed step's bound (its longest query)
    keeps both launches, the long one sized by it."""
    geo = Geometry()
    options = dict(sm_scale=geo.head_dim**-0.5)
    decode = make_batch(11, *SCENARIOS["decode"], geo, jnp.float32, poison_unused=True)
    _check_bounded(impl, decode, jnp.float32, 1, (1, 2), **options)
    mixed = make_batch(12, *SCENARIOS["mixed"], geo, jnp.float32)
    _check_bounded(impl, mixed, jnp.float32, max(SCENARIOS["mixed"][0]), (2, 2), **options)


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
    for bound in (0, 1.5):
        with pytest.raises(ValueError, match=f"max_query_len must be a positive int or None, got {bound}"):
            ragged_paged_attention(*batch.args, sm_scale=0.1, max_query_len=bound)
    with pytest.raises(ValueError) as error:
        triton_gpu.KernelConfig(block_rows=24, block_kv=64)
    assert "block_rows" in str(error.value)


def _check_mosaic(impl, geo, scenario, seed, poison_unused=False, **extra_options):
    assert mosaic_gpu.supports(jnp.bfloat16, jnp.bfloat16, geo.head_dim, geo.block_size, mosaic_gpu.MosaicConfig())
    batch = make_batch(seed, *MOSAIC_SCENARIOS[scenario], geo, jnp.bfloat16, poison_unused=poison_unused)
    options = dict(sm_scale=geo.head_dim**-0.5, **extra_options)
    out = ragged_paged_attention(*batch.args, impl=impl, **options)
    check_against_naive(out, batch, jnp.bfloat16, **options)


@pytest.mark.parametrize("impl", MOSAIC_IMPLS)
@pytest.mark.parametrize("scenario", sorted(MOSAIC_SCENARIOS))
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim",
    [(2, 2, 128), (8, 2, 64), (8, 1, 64)],
    ids=["gqa1-h128", "gqa4-h64", "gqa8-h64"],
)
def test_mosaic_long_tiles_match_naive(impl, scenario, num_heads, num_kv_heads, head_dim):
    geo = Geometry(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, **MOSAIC_GEOMETRY)
    _check_mosaic(impl, geo, scenario, seed=7)


@pytest.mark.parametrize("impl", MOSAIC_IMPLS)
def test_mosaic_sliding_window_soft_cap_and_unused_rows(impl):
    """Window and soft cap on a chunk over a cached prefix; every cache row holding no position is NaN."""
    geo = Geometry(num_heads=4, num_kv_heads=2, head_dim=64, **MOSAIC_GEOMETRY)
    _check_mosaic(impl, geo, "chunked_mixed", seed=8, poison_unused=True, sliding_window=40, soft_cap=2.0)


@pytest.mark.parametrize("impl", MOSAIC_IMPLS)
def test_mosaic_query_len_bound(impl):
    """Decode-only under the bound 1: the Triton short launch alone, no Mosaic grid; a chunk's own length as the
    bound: both launches, the Mosaic grid sized by it."""
    geo = Geometry(num_heads=8, num_kv_heads=2, head_dim=64, **MOSAIC_GEOMETRY)
    options = dict(sm_scale=geo.head_dim**-0.5)
    decode = make_batch(13, [1] * 8, [1, 15, 16, 17, 33, 700, 300, 64], geo, jnp.bfloat16, poison_unused=True)
    _check_bounded(impl, decode, jnp.bfloat16, 1, (1, 2), **options)
    query_lens, seq_lens = MOSAIC_SCENARIOS["chunked_mixed"]
    mixed = make_batch(14, query_lens, seq_lens, geo, jnp.bfloat16)
    _check_bounded(impl, mixed, jnp.bfloat16, max(query_lens), (2, 2), **options)
