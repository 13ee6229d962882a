"""The one-shot all-reduce op on CPU: its XLA path sums every device's shard, the Pallas path lowers (for CUDA) to one
Mosaic GPU custom call and no XLA collective, and operands it cannot take are errors. The kernel itself runs on GPUs
only (Pallas' GPU interpreter in jax 0.11.2 has no cross-device semaphores): tests/gpu/test_all_reduce_gpu.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.all_reduce import all_reduce, row_elements, supports
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


def summed_over(mesh: Mesh, impl: str):
    return jax.jit(
        jax.shard_map(
            functools.partial(all_reduce, axis_name="tp", impl=impl),
            mesh=mesh,
            in_specs=P("tp"),
            out_specs=P(),
            check_vma=False,
        )
    )


@pytest.mark.parametrize("num_devices", [2, 4])
def test_xla_path_sums_every_shard(num_devices):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("tp",))
    parts = np.random.default_rng(num_devices).standard_normal((num_devices, 3, 2048)).astype(np.float32)
    x = jax.device_put(parts.reshape(num_devices * 3, 2048), NamedSharding(mesh, P("tp")))
    np.testing.assert_allclose(np.asarray(summed_over(mesh, "xla")(x)), parts.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_path_lowers_to_one_mosaic_gpu_call_and_no_xla_collective(dtype):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    x = jax.ShapeDtypeStruct((2 * 4, 4096), dtype, sharding=NamedSharding(mesh, P("tp")))
    module = summed_over(mesh, "pallas_gpu").trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert module.count("mosaic_gpu_v2") == 1
    assert "stablehlo.all_reduce" not in module
    # the XLA path of the same function is one all-reduce, so the check above can fail
    xla_module = summed_over(mesh, "xla").trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.all_reduce" in xla_module and "mosaic_gpu" not in xla_module


def test_operands_it_cannot_take_are_errors():
    assert row_elements(jnp.bfloat16) == 2048 and row_elements(jnp.float32) == 1024
    assert supports((1, 4096), jnp.bfloat16) and not supports((1, 576), jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    for shape, dtype, message in [
        ((2, 576), jnp.bfloat16, r"multiple of 2048 bfloat16 elements, got \(1, 576\)"),
        ((2, 4096), jnp.int32, r"operands, got int32"),
    ]:
        x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("tp")))
        with pytest.raises(ValueError, match=message):
            summed_over(mesh, "pallas_gpu").trace(x)
    with pytest.raises(ValueError, match="unknown all_reduce impl 'nccl'"):
        all_reduce(jnp.ones(4), "tp", impl="nccl")
