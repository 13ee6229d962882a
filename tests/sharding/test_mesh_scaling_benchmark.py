"""benchmarks/mesh_scaling.py end to end on 8 fake devices (a smoke run: the script's correctness, not timing)."""

from benchmarks import mesh_scaling
from tests.sharding.helpers import NEEDS_8_DEVICES

pytestmark = NEEDS_8_DEVICES


def test_mesh_scaling_smoke_sweeps_meshes_through_llm():
    argv = ["--smoke", "--meshes", "1x1x1,2x2x1", "--num-prompts", "4", "--input-len", "8", "--output-len", "4"]
    rows = {row["mesh"]: row for row in mesh_scaling.main(argv)["rows"]}
    assert list(rows) == ["1x1x1", "2x2x1"]
    assert all(row["output_tokens_per_s"] > 0 and row["num_preemptions"] == 0 for row in rows.values())
    assert rows["1x1x1"]["scaling_efficiency"] == 1.0 and rows["1x1x1"]["bubble_measured"] is None
    assert rows["2x2x1"]["num_microbatches"] == 2 and rows["2x2x1"]["bubble_measured"] is not None
    # tensor x pipeline 2 x 2: each device holds about a quarter of the parameters and of the KV cache
    assert rows["2x2x1"]["param_bytes_per_device"] < rows["1x1x1"]["param_bytes_per_device"] / 3
    assert rows["2x2x1"]["kv_bytes_per_device"] < rows["1x1x1"]["kv_bytes_per_device"] / 3
