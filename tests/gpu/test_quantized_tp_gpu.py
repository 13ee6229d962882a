"""On the GPU machine (marker ``gpu``): quantized models with the compiled Pallas quantized-matmul kernels under
tensor parallelism on two GPUs. The mesh runs q/k/v and gate/up as one launch each (the default) over each GPU's own
shards; the one-GPU run it is compared with launches every projection on its own. Greedy tokens and step logits must
agree as on CPU (tests/sharding/test_quantized_tensor_parallel.py): XLA's float32 products run at full precision here
(TF32 otherwise), so the runs differ only in the order of their additions."""

import jax
import pytest

from jaxllm.models.layers import FUSED_PROJECTIONS_ENV
from sharding.engine import ShardedEngine, generate
from tests.sharding.helpers import GREEDY, ReferenceRunner, mixed_prompts, resolved_config
from tests.sharding.test_parallel_generation import run_on_mesh
from tests.sharding.test_quantized_tensor_parallel import (
    assert_same_greedy_run,
    projection_launches,
    record_fused_launches,
    tiny_quantized_model,
)

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU and jax.device_count() >= 2), reason="needs 2 GPUs for a tensor-parallel mesh"),
]


@pytest.mark.parametrize(("method", "group_size"), [("int8", 128), ("int4", 32)])
def test_quantized_tensor_parallel_on_two_gpus_matches_one_gpu(method, group_size, monkeypatch):
    with jax.default_matmul_precision("highest"):
        monkeypatch.setenv(FUSED_PROJECTIONS_ENV, "0")
        config, model = tiny_quantized_model(method, group_size, impl="pallas_gpu")
        prompts = mixed_prompts(config.vocab_size)
        one_gpu = ReferenceRunner(model, resolved_config())
        expected = generate(ShardedEngine(one_gpu, resolved_config()), prompts, GREEDY)

        launches = record_fused_launches(monkeypatch)
        outputs, recording = run_on_mesh(model, prompts, 2, 1)
    assert_same_greedy_run(outputs, expected, recording.step_logits, one_gpu.step_logits)
    assert all(shapes in launches for shapes in projection_launches(config, 2))
