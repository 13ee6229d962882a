"""``pack`` / ``unpack``: a step's host arrays cross to the device as one byte buffer and come back bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.runner.packed_transfer import LEAF_ALIGNMENT, pack, unpack
from jaxllm.sampling import build_sampling_metadata


def _random_tree(rng):
    metadata = build_sampling_metadata([], 8).replace(
        temperature=rng.uniform(0.1, 2.0, 8).astype(np.float32),
        top_k=rng.integers(-5, 50, 8).astype(np.int32),
        seed=rng.integers(0, 2**32, (8, 2), dtype=np.uint64).astype(np.uint32),
        seeded=rng.integers(0, 2, 8).astype(bool),
    )
    return {
        "positions": rng.integers(-(2**31), 2**31 - 1, 37).astype(np.int32),
        "block_tables": rng.integers(0, 10_000, (8, 5)).astype(np.int32),
        "half": rng.standard_normal((3, 2)).astype(np.float16),
        "bytes": rng.integers(-128, 127, 7).astype(np.int8),
        "empty": np.zeros((8, 0), np.int32),  # e.g. token histories without penalties
        "sampling": metadata,
        "key": np.asarray(jax.random.key_data(jax.random.key(int(rng.integers(0, 1000))))),
        "step": np.int32(rng.integers(0, 10_000)),
        "none": None,
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_is_bit_exact_inside_a_program(seed):
    tree = _random_tree(np.random.default_rng(seed))
    buffer, layout = pack(tree)
    assert buffer.dtype == np.uint8 and buffer.ndim == 1 and buffer.size == layout.num_bytes
    assert all(offset % LEAF_ALIGNMENT == 0 for *_, offset in layout.leaves)  # a kernel may read a leaf in place
    out = jax.jit(unpack, static_argnums=1)(jnp.asarray(buffer), layout)
    assert jax.tree.structure(out) == jax.tree.structure(tree)  # static fields (all_greedy ...) included
    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
        want, got = np.asarray(want), np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8))


def test_layout_is_static_and_equal_for_equal_shapes():
    rng = np.random.default_rng(2)
    (_, first), (_, second) = pack(_random_tree(rng)), pack(_random_tree(rng))
    assert first == second and hash(first) == hash(second)  # same shapes: one trace serves every step
    _, wider = pack({**_random_tree(rng), "positions": np.zeros(64, np.int32)})
    assert wider != first


def test_unsupported_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="complex64"):
        pack({"x": np.zeros(3, np.complex64)})
