"""On the GPU machine (marker ``gpu``): the one-shot Mosaic GPU all-reduce (``pallas_kernels.all_reduce``) compiled
and run on two or more GPUs of one process. Its sums equal float32 additions in device order rounded once, bit for
bit (numpy's, the reference); on two devices that is also XLA's ``psum`` bit for bit, while on more XLA's all-reduce
rounds its partial bf16 sums and may differ by an ulp. A tensor-parallel mesh with ``JAXLLM_PALLAS_ALL_REDUCE=1``
produces one device's greedy tokens and logits with the row-parallel sums in the kernel (one XLA all-reduce left: the
vocab-split embedding)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.models import activation_sharding as act
from jaxllm.runner.step_batch import padding_step_batch
from tests.kernels.test_all_reduce import summed_over

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU and jax.device_count() >= 2), reason="needs 2 GPUs of one process"),
]


@pytest.mark.parametrize("num_devices", sorted({2, jax.device_count()}))
@pytest.mark.parametrize(
    ("rows", "dtype"), [(1, jnp.bfloat16), (8, jnp.bfloat16), (256, jnp.bfloat16), (8, jnp.float32)]
)
def test_kernel_sums_equal_psum(num_devices, rows, dtype):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("tp",))
    parts = np.random.default_rng(rows).standard_normal((num_devices * rows, 4096)).astype(np.float32)
    x = jax.device_put(jnp.asarray(parts, dtype), NamedSharding(mesh, P("tp")))
    got, by_xla = summed_over(mesh, "pallas_gpu")(x), summed_over(mesh, "xla")(x)
    want = in_device_order(np.asarray(x, np.float32).reshape(num_devices, rows, 4096), dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    if num_devices == 2:  # one rounding either way
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(by_xla, np.float32))
    else:  # XLA rounds each partial sum: at most an ulp or two of the result apart
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(by_xla, np.float32), rtol=2**-6, atol=2**-6)
    again = summed_over(mesh, "pallas_gpu")(x * 2)  # the semaphores start from zero on every call
    np.testing.assert_array_equal(np.asarray(again, np.float32), want * 2)


def in_device_order(parts: np.ndarray, dtype) -> np.ndarray:
    """The kernel's arithmetic in numpy: float32 additions of the devices' parts in device order, rounded once."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return np.asarray(jnp.asarray(total).astype(dtype), np.float32)


def test_tensor_parallel_mesh_with_the_kernel_matches_one_device(monkeypatch):
    from tests.sharding.conftest import reference_run
    from tests.sharding.test_parallel_generation import assert_matches, run_on_mesh

    overrides = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, head_dim=128)
    with jax.default_matmul_precision("highest"):
        reference = reference_run(**overrides)
        monkeypatch.setenv(act.PALLAS_ALL_REDUCE_ENV, "1")
        jax.clear_caches()
        outputs, recording = run_on_mesh(reference.model, reference.prompts, 2, 1)
    assert_matches(reference, outputs, recording)
    runner = recording.runner
    bucket = runner.config.token_buckets[0]
    batch = padding_step_batch(bucket, runner.config.request_rows_for(bucket), runner.config.max_blocks_per_request)
    hlo = runner.pipeline.lower_stage(0, batch).compile().as_text()
    assert len(re.findall(r" all-reduce\(", hlo)) == 1  # the embedding's; 2 per layer without the kernel
