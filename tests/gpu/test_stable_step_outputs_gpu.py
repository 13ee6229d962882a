"""On the GPU machine (marker ``gpu``): stable step outputs (the default) on a tensor-parallel mesh of two GPUs give
the plain engine's outputs, and each reused result buffer was donated into its call (deleted after it): CPU runs
show it for the logits only (tests/sharding/test_stable_step_outputs.py)."""

import jax
import pytest

from tests.sharding.conftest import tiny_llama_dir  # noqa: F401 (the fixture)
from tests.sharding.test_stable_step_outputs import check_stable_outputs_match_plain

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU and jax.device_count() >= 2), reason="needs 2 GPUs for a tensor-parallel mesh"),
]


def test_stable_step_outputs_on_two_gpus(tiny_llama_dir, monkeypatch):  # noqa: F811
    check_stable_outputs_match_plain(tiny_llama_dir, monkeypatch, {"tensor_parallel_size": 2}, all_donated=True)
