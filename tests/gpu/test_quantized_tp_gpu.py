"""On the GPU machine (marker ``gpu``): quantized models with the compiled Pallas quantized-matmul kernels under
tensor parallelism on two GPUs. The mesh runs q/k/v and gate/up as one launch each (the default) over each GPU's own
shards; the one-GPU run it is compared with launches every projection on its own. Greedy tokens and step logits must
agree as on CPU (tests/sharding/test_quantized_tensor_parallel.py): XLA's float32 products run at full precision here
(TF32 otherwise), so the runs differ only in the order of their additions."""

import jax
import pytest

from tests.sharding.test_quantized_tensor_parallel import check_fused_tp2_matches_separate_one_device

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU and jax.device_count() >= 2), reason="needs 2 GPUs for a tensor-parallel mesh"),
]


@pytest.mark.parametrize(("method", "group_size"), [("int8", 128), ("int4", 32)])
def test_quantized_tensor_parallel_on_two_gpus_matches_one_gpu(method, group_size, monkeypatch):
    with jax.default_matmul_precision("highest"):
        check_fused_tp2_matches_separate_one_device(method, group_size, "pallas_gpu", monkeypatch)
