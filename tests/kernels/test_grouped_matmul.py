"""The grouped matmul over tile-aligned groups: ``plan_tiles``' layout and the Pallas kernel (interpreted on CPU)
against a numpy product per tile; the per-pair products (``pair_swiglu`` / ``pair_matmul``) against numpy per pair;
the kernels themselves on a GPU in ``tests/gpu``."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul, pair_matmul, pair_swiglu, plan_tiles
from pallas_kernels.grouped_matmul.op import num_slots


def random_groups(rng, num_rows, num_groups, skew=False):
    p = rng.dirichlet(np.full(num_groups, 0.3 if skew else 5.0))
    return rng.choice(num_groups, num_rows, p=p).astype(np.int32)


@pytest.mark.parametrize(("num_rows", "num_groups", "block_m"), [(1, 8, 16), (40, 6, 16), (300, 8, 32), (64, 128, 16)])
def test_plan_puts_every_row_in_a_tile_of_its_group(num_rows, num_groups, block_m):
    rng = np.random.default_rng(num_rows)
    groups = random_groups(rng, num_rows, num_groups, skew=num_rows == 300)
    plan = plan_tiles(jnp.asarray(groups), num_groups, block_m)
    slots, row_of_slot, tile_groups = (np.asarray(a) for a in (plan.slot_of_row, plan.row_of_slot, plan.tile_groups))
    assert len(row_of_slot) == num_slots(num_rows, num_groups, block_m) and len(row_of_slot) % block_m == 0
    assert len(set(slots.tolist())) == num_rows  # one slot per row
    np.testing.assert_array_equal(tile_groups[slots // block_m], groups)  # each row's tile is its group's
    np.testing.assert_array_equal(row_of_slot[slots], np.arange(num_rows))
    used = tile_groups >= 0
    assert used[: used.sum()].all()  # used tiles first, then only unused ones
    expected_tiles = sum(-(-np.sum(groups == g) // block_m) for g in range(num_groups))
    assert used.sum() == expected_tiles  # no tile more than each group needs
    assert np.all(np.diff(tile_groups[used]) >= 0)  # groups in order


@pytest.mark.parametrize("num_valid", [1, 23, 40])
def test_plan_leaves_padding_rows_out(num_valid):
    rng = np.random.default_rng(num_valid)
    num_rows, num_groups, block_m = 40, 16, 16
    groups = random_groups(rng, num_rows, num_groups)
    plan = plan_tiles(jnp.asarray(groups), num_groups, block_m, num_valid=jnp.int32(num_valid))
    slots, row_of_slot, tile_groups = (np.asarray(a) for a in (plan.slot_of_row, plan.row_of_slot, plan.tile_groups))
    valid = groups[:num_valid]
    np.testing.assert_array_equal(tile_groups[slots[:num_valid] // block_m], valid)
    np.testing.assert_array_equal(row_of_slot[slots[:num_valid]], np.arange(num_valid))
    assert (tile_groups >= 0).sum() == sum(-(-np.sum(valid == g) // block_m) for g in range(num_groups))
    assert set(row_of_slot[np.repeat(tile_groups >= 0, block_m)]) <= set(range(num_valid))  # no padding row read
    assert np.all((slots[num_valid:] >= 0) & (slots[num_valid:] < len(row_of_slot)))  # harmless to read back


def numpy_grouped(lhs, rhs, tile_groups, block_m):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    for t, g in enumerate(tile_groups):
        if g >= 0:
            rows = slice(t * block_m, (t + 1) * block_m)
            out[rows] = np.asarray(lhs[rows], np.float64) @ np.asarray(rhs[g], np.float64)
    return out


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu_interpret"])
@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_grouped_matmul_equals_numpy_per_tile(impl, dtype, rtol):
    rng = np.random.default_rng(3)
    num_rows, num_groups, k, n, block_m = 50, 5, 64, 48, 16
    groups = random_groups(rng, num_rows, num_groups)
    plan = plan_tiles(jnp.asarray(groups), num_groups, block_m)
    lhs = rng.normal(size=(len(plan.row_of_slot), k)).astype(np.float32)
    rhs = rng.normal(size=(num_groups, k, n)).astype(np.float32)
    lhs_d, rhs_d = jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)
    got = grouped_matmul(lhs_d, rhs_d, plan.tile_groups, block_m=block_m, impl=impl)
    assert got.dtype == dtype
    tile_groups = np.asarray(plan.tile_groups)
    expected = numpy_grouped(
        np.asarray(lhs_d.astype(jnp.float32)), np.asarray(rhs_d.astype(jnp.float32)), tile_groups, block_m
    )
    used_rows = np.repeat(tile_groups >= 0, block_m)
    got = np.asarray(got.astype(jnp.float32))[used_rows]
    np.testing.assert_allclose(got, expected[used_rows], rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize(
    ("shapes", "block_m", "message"),
    [
        (((48, 64), (4, 32, 16)), 16, "lhs has K=64 columns but rhs is"),
        (((40, 64), (4, 64, 16)), 16, "must be whole tiles of block_m=16"),
        (((48, 64), (4, 64, 24)), 16, "needs K and N multiples of 16"),
        (((48, 64), (4, 64, 16)), 24, "block_m a power of two >= 16, got 24"),
    ],
)
def test_bad_shapes_name_the_values(shapes, block_m, message):
    (p, k), rhs_shape = shapes
    lhs, rhs = jnp.ones((p, k)), jnp.ones(rhs_shape)
    with pytest.raises(ValueError, match=message):
        grouped_matmul(lhs, rhs, jnp.zeros(p // block_m, jnp.int32), block_m=block_m, impl="pallas_gpu_interpret")


def numpy_pair_products(x, ids, w_gate, w_up, w_down, top_k, num_real):
    """Per pair in float64: the SwiGLU hidden row and its down projection; padding pairs zeros."""
    rows = np.asarray(x, np.float64)[np.arange(len(ids)) // top_k]
    gate = np.einsum("pk,pkn->pn", rows, np.asarray(w_gate, np.float64)[ids])
    up = np.einsum("pk,pkn->pn", rows, np.asarray(w_up, np.float64)[ids])
    hidden = gate / (1 + np.exp(-gate)) * up
    hidden[num_real:] = 0
    return hidden, np.einsum("pk,pkn->pn", hidden, np.asarray(w_down, np.float64)[ids])


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu_interpret"])
@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pair_products_equal_numpy_per_pair(impl, dtype, rtol):
    """Pairs past ``num_pairs`` (padding) come out as zeros; two pairs may share an expert. The kernel splits the
    gate / up products' K in four (``default_config``: 3 pairs x 3 N tiles are few programs), the down one not."""
    rng = np.random.default_rng(4)
    num_tokens, top_k, num_experts, d, i, num_real = 7, 3, 5, 64, 48, 17
    ids = rng.integers(0, num_experts, num_tokens * top_k).astype(np.int32)
    x = rng.normal(size=(num_tokens, d))
    w_gate, w_up = (rng.normal(size=(num_experts, d, i)) * 0.2 for _ in range(2))
    w_down = rng.normal(size=(num_experts, i, d)) * 0.2
    x_d, gate_d, up_d, down_d = (jnp.asarray(a, dtype) for a in (x, w_gate, w_up, w_down))
    as_f32 = [np.asarray(a.astype(jnp.float32)) for a in (x_d, gate_d, up_d, down_d)]
    hidden = pair_swiglu(x_d, jnp.asarray(ids), gate_d, up_d, jnp.int32(num_real), top_k=top_k, impl=impl)
    out = pair_matmul(hidden, jnp.asarray(ids), down_d, jnp.int32(num_real), top_k=top_k, impl=impl)
    assert hidden.dtype == dtype and out.dtype == jnp.float32
    expected_hidden, _ = numpy_pair_products(as_f32[0], ids, *as_f32[1:], top_k, num_real)
    # the down projection of the kernel's own (rounded) hidden rows, so each product is checked on its own
    expected_out = np.einsum("pk,pkn->pn", np.asarray(hidden.astype(jnp.float32), np.float64), as_f32[3][ids])
    for got, expected in ((hidden, expected_hidden), (out, expected_out)):
        got = np.asarray(got.astype(jnp.float32))
        np.testing.assert_array_equal(got[num_real:], 0.0)
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pair_matmul(jnp.ones((4, 32)), jnp.zeros(4, jnp.int32), jnp.ones((2, 16, 16)), top_k=2), "with K=32"),
        (
            lambda: pair_matmul(jnp.ones((4, 32)), jnp.zeros(3, jnp.int32), jnp.ones((2, 32, 16)), top_k=2),
            "names 3 pairs",
        ),
        (
            lambda: pair_matmul(
                jnp.ones((4, 32)), jnp.zeros(4, jnp.int32), jnp.ones((2, 32, 24)), top_k=2, impl="pallas_gpu"
            ),
            "multiples of 16",
        ),
        (
            lambda: pair_swiglu(jnp.ones((2, 32)), jnp.zeros(5, jnp.int32), *[jnp.ones((2, 32, 16))] * 2, top_k=2),
            "5 pairs need 2 per token of x's 2 rows",
        ),
        (
            lambda: pair_matmul(
                jnp.ones((4, 32)), jnp.zeros(4, jnp.int32), jnp.ones((2, 32, 16)), top_k=2, impl="cuda"
            ),
            "'cuda'",
        ),
    ],
)
def test_bad_pair_product_arguments_name_the_values(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_k_split_fills_the_gpu_with_one_tokens_pairs():
    """Qwen3-30B-A3B at batch 1: 8 pairs x 12 N tiles of gate / up split K in 8 (768 programs); the down product
    (32 N tiles, K = 768) in 4; Mixtral's 2 pairs x 224 N tiles in 2; a K that 16 does not divide twice: no split."""
    from pallas_kernels.grouped_matmul.pair_gemv_triton import GemvConfig, default_config

    assert default_config(2048, 768, 8) == GemvConfig(block_n=64, block_k=256, splits=8)
    assert default_config(768, 2048, 8) == GemvConfig(block_n=64, block_k=64, splits=4)
    assert default_config(4096, 14336, 2) == GemvConfig(block_n=64, block_k=256, splits=2)
    assert default_config(48, 64, 1).splits == 1
