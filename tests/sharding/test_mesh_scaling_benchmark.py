"""benchmarks/mesh_scaling.py end to end on 8 fake devices, and benchmarks/multiprocess_mesh.py with two processes
(smoke runs: the scripts' correctness, not timing)."""

import os
import pathlib

import jax
import pytest

from benchmarks import mesh_scaling
from jaxllm import LLM, process_env
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


def test_measured_bubble_times_the_engines_own_programs():
    """The stages run one at a time are the programs the engine compiled: the bubble once timed a new trace of the
    first stage (called without its pending-token vector) and read 0.00 on every GPU pipeline."""
    model = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models" / "llama"
    llm = LLM(
        model=str(model),
        dtype="float32",
        max_model_len=64,
        max_num_batched_tokens=16,
        block_size=4,
        num_gpu_blocks_override=64,
        skip_tokenizer_init=True,
        pipeline_parallel_size=2,
    )
    [runner] = mesh_scaling.replica_runners(llm)
    traces = runner.num_traces, runner.num_head_traces
    bubbles = [mesh_scaling.measured_bubble(runner) for _ in range(2)]
    assert (runner.num_traces, runner.num_head_traces) == traces
    assert all(0.0 <= bubble < 1.0 for bubble in bubbles)


def test_a_run_with_a_jaxllm_switch_records_and_labels_it(monkeypatch, capsys):
    """A run with ``JAXLLM_MESH_LAUNCH_THREAD=1`` must not read as one at the defaults (session 20's A/B printed
    "variant: defaults" for both sides); bookkeeping variables such as ``JAXLLM_COMMIT`` are not switches."""
    monkeypatch.setenv("JAXLLM_MESH_LAUNCH_THREAD", "1")
    monkeypatch.setenv("JAXLLM_COMMIT", "abc1234")
    argv = ["--smoke", "--meshes", "2x1x1", "--num-prompts", "2", "--input-len", "8", "--output-len", "2"]
    record = mesh_scaling.main([*argv, "--latency-output-len", "0"])
    assert record["engine"]["switches"] == {"JAXLLM_MESH_LAUNCH_THREAD": "1"} and record["commit"] == "abc1234"
    assert "variant: JAXLLM_MESH_LAUNCH_THREAD=1; XLA_FLAGS=" in capsys.readouterr().out


def test_expert_parallel_reaches_the_engine_and_the_record(capsys):
    """``--enable-expert-parallel`` (a variant option of every engine benchmark) builds the engine with whole experts
    per device, and the record and its variant line say so."""
    model = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models" / "qwen3_moe"
    argv = ["--model", str(model), "--meshes", "2x1x1", "--num-prompts", "2", "--input-len", "8", "--output-len", "2"]
    record = mesh_scaling.main([*argv, "--latency-output-len", "0", "--max-num-seqs", "4", "--enable-expert-parallel"])
    assert record["engine"]["enable_expert_parallel"] is True and record["rows"][0]["output_tokens_per_s"] > 0
    assert "variant: expert parallel" in capsys.readouterr().out


def test_process_per_mesh_runs_each_mesh_in_its_own_child():
    argv = ["--smoke", "--meshes", "1x1x1,2x1x1", "--num-prompts", "4", "--input-len", "8", "--output-len", "4"]
    record = mesh_scaling.main([*argv, "--process-per-mesh", "--latency-output-len", "0"])
    assert [row["mesh"] for row in record["rows"]] == ["1x1x1", "2x1x1"]
    assert record["device"] == "cpu:cpu x8" and record["rows"][0]["scaling_efficiency"] == 1.0
    assert all(row["output_tokens_per_s"] > 0 and row["num_preemptions"] == 0 for row in record["rows"])
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ.get(process_env.DEFAULTED, ""):  # jaxllm's pool, not the user's
        # each child's engine set its pool before JAX started: the TP 2 engine leaves room for XLA's collectives
        assert [row["pool_fraction"] for row in record["rows"]] == ["0.95", process_env.MESH_POOL_FRACTION]
    assert mesh_scaling.child_argv(["--job", "J8", "--meshes=4x1x1", "--process-per-mesh", "--smoke"], "2x1x1")[2:] == [
        "--job",
        "J8",
        "--smoke",
        "--meshes",
        "2x1x1",
    ]


def test_process_per_mesh_needs_meshes():
    with pytest.raises(SystemExit):
        mesh_scaling.parse_args(["--smoke", "--process-per-mesh"])


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the smoke run gives each process a fake CPU device")
def test_multiprocess_mesh_smoke_runs_one_process_per_device():
    """benchmarks/multiprocess_mesh.py: two processes of one fake CPU device each join one job and run TP 2."""
    from benchmarks import multiprocess_mesh

    argv = ["--num-processes", "2", "--smoke", "--num-prompts", "4", "--input-len", "8", "--output-len", "4"]
    record = multiprocess_mesh.main(argv)
    [row] = record["rows"]
    assert row["mesh"] == "2x1x1 (2 processes)" and record["device"] == "cpu:cpu x2"
    assert row["output_tokens_per_s"] > 0 and row["batch1_itl_p50_ms"] > 0 and row["num_preemptions"] == 0
    assert 0 < row["param_bytes_per_device"] < mesh_scaling_param_bytes_one_device() / 1.5


def mesh_scaling_param_bytes_one_device() -> int:
    argv = ["--smoke", "--meshes", "1x1x1", "--num-prompts", "1", "--input-len", "8", "--output-len", "2"]
    return mesh_scaling.main([*argv, "--latency-output-len", "0"])["rows"][0]["param_bytes_per_device"]


def test_efficiency_is_against_1x1x1_else_the_smallest_mesh():
    def row(mesh, devices, tokens_per_s):
        return {"mesh": mesh, "num_devices": devices, "output_tokens_per_s": tokens_per_s}

    rows = [row("4x1x1", 4, 3000.0), row("8x1x1", 8, 5400.0), row("4x2x1", 8, 4000.0)]  # the 70B shape's sweep
    mesh_scaling.add_efficiency(rows)
    assert [r["scaling_base"] for r in rows] == ["4x1x1"] * 3
    assert [r["scaling_efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 2 / 3])

    rows = [row("2x1x1", 2, 3000.0), row("1x1x1", 1, 2000.0)]
    mesh_scaling.add_efficiency(rows)
    assert rows[0]["scaling_base"] == "1x1x1" and rows[0]["scaling_efficiency"] == pytest.approx(0.75)

    rows = [row("4x1x1 (4 processes)", 4, 3000.0)]  # one mesh: nothing to compare with
    mesh_scaling.add_efficiency(rows)
    assert rows[0]["scaling_efficiency"] is None and rows[0]["scaling_base"] is None


def test_efficiency_against_an_earlier_runs_log(tmp_path, capsys):
    """A sweep split over two invocations: the second draws its efficiency against the first's 1x1x1 row."""
    argv = ["--smoke", "--num-prompts", "2", "--input-len", "8", "--output-len", "2", "--latency-output-len", "0"]
    first = mesh_scaling.main([*argv, "--meshes", "1x1x1"])
    log = tmp_path / "mesh8.log"
    log.write_text(capsys.readouterr().out)
    second = mesh_scaling.main([*argv, "--meshes", "2x1x1", "--scaling-base-log", str(log)])
    [base], [row] = first["rows"], second["rows"]
    assert row["scaling_base"] == "1x1x1 (earlier run)" and second["scaling_base_log"] == str(log)
    expected = (row["output_tokens_per_s"] / 2) / base["output_tokens_per_s"]
    assert row["scaling_efficiency"] == pytest.approx(expected)

    other_job = [*argv[:-4], "--output-len", "3", "--latency-output-len", "0"]
    with pytest.raises(ValueError, match=r"--scaling-base-log .*job .*'output_len': 2.* there, .*'output_len': 3"):
        mesh_scaling.main([*other_job, "--meshes", "2x1x1", "--scaling-base-log", str(log)])
    other_device = tmp_path / "other_device.log"  # the device is known only after the runs: checked against the record
    other_device.write_text(log.read_text().replace(f'"device": "{first["device"]}"', '"device": "gpu:NVIDIA H200 x4"'))
    with pytest.raises(ValueError, match="device 'gpu:NVIDIA H200 x4' there, 'cpu:cpu x8' here"):
        mesh_scaling.earlier_run_rows(str(other_device), first)
    empty = tmp_path / "empty.log"
    empty.write_text("no record here\n")
    with pytest.raises(ValueError, match="no mesh_scaling JSON record"):
        mesh_scaling.main([*argv, "--meshes", "2x1x1", "--scaling-base-log", str(empty)])


def test_efficiency_base_from_earlier_rows_is_marked():
    def row(mesh, devices, tokens_per_s):
        return {"mesh": mesh, "num_devices": devices, "output_tokens_per_s": tokens_per_s}

    earlier = [row("2x1x1", 2, 2000.0)]  # the 70B shape's TP 2, run in an earlier call
    rows = [row("4x1x1", 4, 3200.0)]
    mesh_scaling.add_efficiency(rows, earlier)
    assert rows[0]["scaling_base"] == "2x1x1 (earlier run)" and rows[0]["scaling_efficiency"] == pytest.approx(0.8)
    rows = [row("1x1x1", 1, 1500.0), row("4x1x1", 4, 3000.0)]  # this run's 1x1x1 is still the base
    mesh_scaling.add_efficiency(rows, earlier)
    assert [r["scaling_base"] for r in rows] == ["1x1x1"] * 2 and rows[1]["scaling_efficiency"] == pytest.approx(0.5)
