"""Ragged paged attention, TPU (Pallas Mosaic) kernel: interpret mode on CPU against a naive float64 attention written
here and against ``reference.py``; the same checks compiled on a TPU (marked ``tpu``); the TPU simulator (DMA and
race checks); and a lowering check that exports the kernel for the TPU platform from CPU.

Static shapes are shared between scenarios so each kernel variant compiles once per session.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # race detector state
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import mosaic_tpu, ragged_paged_attention, reference
from pallas_kernels.tolerances import assert_close
from tests.kernels import attention_cases
from tests.kernels.attention_cases import Batch, make_batch, naive_attention
from tests.kernels.backends import ON_TPU, interpreted_and_compiled

MODES = interpreted_and_compiled("tpu", True, False)
# One tier, mid-size tiles: one kernel per compile, used where the tier split is not under test.
ONE_TIER = mosaic_tpu.KernelConfig(short_tile_tokens=None, long_tile_tokens=16, kv_tokens_per_step=32)
# Many tiles per request and one cache block per KV step: exercises the cross-tile prefetch chain.
SMALL_TILES = mosaic_tpu.KernelConfig(short_tile_tokens=None, long_tile_tokens=8, kv_tokens_per_step=16)

# (query_lens, seq_lens) of the real requests; lengths 1, L-1, L, L+1 (L = 16) and ~1k contexts.
SCENARIOS = {
    "mixed": ([1, 15, 16, 17, 1, 5], [1, 15, 32, 17, 1040, 1000]),
    "decode": ([1] * 8, [1, 15, 16, 17, 33, 1040, 700, 64]),
    "prefill": ([1, 15, 16, 17, 9], [1, 15, 16, 17, 9]),
    "chunked_prefill": ([20, 33, 1], [60, 1050, 40]),
}


@dataclasses.dataclass(frozen=True)
class Geometry(attention_cases.Geometry):
    num_blocks: int = 200  # ~1k-token contexts: smaller tables than the GPU tests' 2k
    max_blocks: int = 72


def check(out, batch: Batch, dtype, poisoned=False, **options) -> None:
    """Real rows match the naive attention and (unless unused cache rows hold NaN, which the jnp reference reads
    and masks after the fact) the jnp reference; padding rows are finite."""
    real = batch.num_real_tokens
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    assert np.all(np.isfinite(np.asarray(out[real:], np.float32))), "padding rows must stay finite"
    assert_close(out[:real], naive_attention(batch, **options)[:real], dtype, "kernel vs naive")
    if poisoned:
        return
    ref = reference.ragged_paged_attention_reference(*batch.args, **options)
    assert_close(out[:real], ref[:real], dtype, "kernel vs reference")


@functools.cache
def kernel(interpret, config, **options):
    return jax.jit(
        functools.partial(mosaic_tpu.ragged_paged_attention_tpu, interpret=interpret, config=config, **options)
    )


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_op_default_config_matches_naive_and_reference(interpret, scenario):
    """Through the public op: two tiers (short and long queries), default tiles."""
    geo = Geometry()
    batch = make_batch(1, *SCENARIOS[scenario], geo, jnp.float32)
    options = dict(sm_scale=geo.head_dim**-0.5)
    impl = "pallas_tpu_interpret" if interpret else "pallas_tpu"
    check(ragged_paged_attention(*batch.args, impl=impl, **options), batch, jnp.float32, **options)


@pytest.mark.parametrize("interpret", MODES)
def test_never_reads_unused_cache_rows(interpret):
    """Rows past each request's length, the null block and stray table entries hold NaN: none may leak in."""
    geo = Geometry()
    batch = make_batch(2, *SCENARIOS["mixed"], geo, jnp.float32, poison_unused=True)
    options = dict(sm_scale=geo.head_dim**-0.5)
    impl = "pallas_tpu_interpret" if interpret else "pallas_tpu"
    check(ragged_paged_attention(*batch.args, impl=impl, **options), batch, jnp.float32, poisoned=True, **options)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("scenario", ["chunked_prefill", "mixed"])
def test_small_tiles_and_single_block_steps(interpret, scenario):
    geo = Geometry()
    batch = make_batch(3, *SCENARIOS[scenario], geo, jnp.float32)
    options = dict(sm_scale=geo.head_dim**-0.5)
    check(kernel(interpret, SMALL_TILES, **options)(*batch.args), batch, jnp.float32, **options)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, dtype",
    [(4, 4, 128, jnp.float32), (8, 1, 128, jnp.bfloat16), (4, 2, 256, jnp.bfloat16)],
    ids=["gqa1-h128-f32", "gqa8-h128-bf16", "gqa2-h256-bf16"],
)
def test_gqa_ratios_head_dims_and_dtypes(interpret, num_heads, num_kv_heads, head_dim, dtype):
    geo = Geometry(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    batch = make_batch(4, *SCENARIOS["mixed"], geo, dtype)
    options = dict(sm_scale=head_dim**-0.5)
    check(kernel(interpret, ONE_TIER, **options)(*batch.args), batch, dtype, **options)


@pytest.mark.parametrize("interpret", MODES)
def test_sliding_window_with_soft_cap(interpret):
    geo = Geometry()
    batch = make_batch(5, *SCENARIOS["chunked_prefill"], geo, jnp.float32)
    options = dict(sm_scale=geo.head_dim**-0.5, sliding_window=24, soft_cap=2.0)
    check(kernel(interpret, ONE_TIER, **options)(*batch.args), batch, jnp.float32, **options)


@pytest.mark.skipif(ON_TPU, reason="checks Pallas' TPU simulator; on a TPU the compiled kernel tests run")
def test_tpu_simulator_finds_no_races_or_uninitialized_reads():
    """Pallas' TPU simulator: DMAs land only at their wait, fresh VMEM is NaN, two cores split the kv heads, and
    the race detector watches every buffer. A read of a page slot before its copy completed, or a prefetch into a
    slot still being read, shows up as NaN output or a detected race."""
    geo = Geometry(num_heads=4, num_kv_heads=2, num_tokens=32, num_requests=4)
    batch = make_batch(6, [3, 9, 1], [3, 70, 40], geo, jnp.float32, poison_unused=True)
    options = dict(sm_scale=geo.head_dim**-0.5)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, uninitialized_memory="nan")
    config = mosaic_tpu.KernelConfig(short_tile_tokens=2, long_tile_tokens=4, kv_tokens_per_step=32)
    out = kernel(params, config, **options)(*batch.args)
    check(out, batch, jnp.float32, poisoned=True, **options)
    assert tpu_interpreter.races is not None and not tpu_interpreter.races.races_found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_to_mosaic_for_tpu(dtype):
    """Pallas -> Mosaic lowering (no TPU needed): the exported module carries the kernel as a TPU custom call.
    Mosaic's own layout passes run only inside libtpu, so this does not prove the kernel compiles on a TPU."""
    geo = Geometry()
    batch = make_batch(7, *SCENARIOS["mixed"], geo, dtype)
    lowered = export.export(kernel(False, None, sm_scale=0.125, sliding_window=40, soft_cap=5.0), platforms=["tpu"])(
        *batch.args
    )
    assert lowered.mlir_module().count("tpu_custom_call") == 2  # the short and the long tier


def test_rejects_bad_arguments():
    batch = make_batch(8, *SCENARIOS["decode"], Geometry(block_size=12, max_blocks=96), jnp.float32)
    with pytest.raises(ValueError) as error:
        mosaic_tpu.ragged_paged_attention_tpu(*batch.args, sm_scale=0.1, interpret=True)
    assert "block size 12" in str(error.value)
    batch = make_batch(8, *SCENARIOS["decode"], Geometry(), jnp.float32)
    with pytest.raises(TypeError) as error:
        mosaic_tpu.ragged_paged_attention_tpu(
            batch.q, batch.k_cache, batch.v_cache.astype(jnp.bfloat16), *batch.args[3:], sm_scale=0.1, interpret=True
        )
    assert "bfloat16" in str(error.value)
    with pytest.raises(ValueError) as error:
        mosaic_tpu.ragged_paged_attention_tpu(batch.q[:, :3], *batch.args[1:], sm_scale=0.1, interpret=True)
    assert "(64, 3, 64)" in str(error.value)
    with pytest.raises(ValueError) as error:
        mosaic_tpu.KernelConfig(long_tile_tokens=0)
    assert "long_tile_tokens" in str(error.value)
