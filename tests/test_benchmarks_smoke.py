"""The benchmark scripts run end to end on a tiny model (a smoke run: correctness of the scripts, not timing)."""

import json
import math
import pathlib

import pytest

from benchmarks import latency, roofline, throughput


def test_throughput_smoke_counts_every_output_token():
    record = throughput.main(["--smoke"])
    assert record["num_output_tokens"] == record["num_prompts"] * record["output_len"]
    assert record["output_tokens_per_s"] > 0
    times = record["step_times"]
    assert times["num_steps"] > 0 and times["host_ms"] >= 0 and times["device_wait_ms"] >= 0


def test_throughput_smoke_scoring_job_gets_every_prompt_logprob():
    record = throughput.main(["--smoke", "--output-len", "1", "--prompt-logprobs", "2"])
    assert record["num_prompt_logprobs"] == record["num_prompts"] * (record["input_len"] - 1)
    assert record["num_output_tokens"] == record["num_prompts"]


def test_latency_smoke_reports_percentiles():
    record = latency.main(["--smoke"])
    for stats in record["batches"].values():
        assert stats["itl_ms"]["p50"] > 0 and stats["ttft_ms"]["p99"] >= stats["ttft_ms"]["p50"]
        assert stats["tpot_mean_ms"] > 0 and 1 < stats["arrivals_per_request"] <= 4  # --smoke: 4 output tokens


def test_roofline_j8_floor_matches_shared_benchmarks():
    result = roofline.main(["--job", "J8"])
    # shared/BENCHMARKS.md: about 5.9 s, at most ~11,100 output tok/s on an H100
    assert 5.0 < result["floor_s"] < 6.5


def test_roofline_of_experts_all_active_equals_the_dense_model_of_their_width(tmp_path):
    """A mixture whose every token uses every expert multiplies and reads what a dense SwiGLU of E times the width
    does, plus the router; with top 2 of 8 its prefill needs a quarter of the experts' FLOPs."""
    dense = json.loads((pathlib.Path(roofline.JOBS["J8"].model_config) / "config.json").read_text())
    moe = {**dense, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 8,
           "intermediate_size": dense["intermediate_size"] // 8}  # fmt: skip
    results = {}
    for name, config in (("dense", dense), ("all_active", moe), ("top2", {**moe, "num_experts_per_tok": 2})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        results[name] = roofline.main(["--job", "J8", "--model", str(tmp_path / name)])
    # the router adds hidden * 8 parameters per layer: ~1e-4 of the model
    assert results["all_active"]["floor_s"] == pytest.approx(results["dense"]["floor_s"], rel=1e-3)
    assert results["all_active"]["floor_s"] > results["dense"]["floor_s"]  # the router's extra parameters
    assert results["top2"]["prefill_s"] < 0.6 * results["all_active"]["prefill_s"]
    assert results["top2"]["decode_s"] == pytest.approx(results["all_active"]["decode_s"], rel=1e-3)  # 256 seqs


def test_profile_step_smoke_traces_decode_steps(tmp_path):
    from benchmarks import profile_step

    record = profile_step.main(["--smoke", "--steps", "2", "--out", str(tmp_path)])
    assert record["num_running"] == 8 and record["step_wall_ms"] > 0
    assert record["trace"].endswith(".trace.json.gz")


def test_profile_step_split_counts_each_instant_of_overlapping_streams_once():
    from benchmarks.profile_step import busy_time_us, classify

    events = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 30, "dur": 5}]
    assert busy_time_us(events) == 20
    assert classify("ragged_paged_attention_kernel") == "attention"
    assert classify("sm90_xmma_gemm_bf16bf16") == "matmul"
    assert classify("loop_add_fusion") == "other"


def test_profile_step_launch_path_counts_host_graph_work_per_step():
    from benchmarks.profile_step import launch_path_ops

    def complete(pid, name, dur):
        return {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "name": name, "dur": dur}

    trace = {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            *[complete(1, "cuGraphLaunch", 30) for _ in range(6)],
            *[complete(1, "cuGraphExecUpdate_v2", 50) for _ in range(4)],
            complete(1, "PjitFunction(step)", 900),  # not launch-path work
            complete(2, "cuGraphLaunch", 99),  # a device thread: not host work
        ]
    }
    ops = launch_path_ops(trace, num_steps=2)
    assert [op["name"] for op in ops] == ["cuGraphExecUpdate_v2", "cuGraphLaunch"]
    assert ops[0]["calls_per_step"] == 2 and ops[0]["ms_per_step"] == 0.1
    assert ops[1]["calls_per_step"] == 3 and ops[1]["ms_per_step"] == 0.09


def test_profile_step_forward_host_work_is_the_first_gpus_forward_program():
    from benchmarks.profile_step import forward_host_work

    def complete(tid, name, ts, dur):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "name": name, "dur": dur}

    def execution(tid, device, program, ts):  # one program launch on a device's host thread
        return [
            complete(tid, f"[{device}] GpuExecutable::ExecuteThunks", ts, 100),
            complete(tid, f"{program}:XLA GPU module", ts + 1, 98),
            complete(tid, "cuGraphLaunch (CudaGraph:12)", ts + 10, 20),
            complete(tid, "cuGraphLaunch (CudaGraph:31)", ts + 40, 25),
            complete(tid, "all-reduce.3.0-fusion.1", ts + 70, 10),
        ]

    trace = {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            *execution(7, 0, "jit_program", 0),
            *execution(7, 0, "jit_head", 200),  # the sampler's program: not the forward
            *execution(8, 1, "jit_program", 0),  # the second GPU's thread
            *execution(7, 0, "jit_program", 400),
        ]
    }
    rows = {row["name"]: row for row in forward_host_work(trace, num_steps=2)}
    assert rows["cuGraphLaunch"]["calls_per_step"] == 2 and rows["cuGraphLaunch"]["ms_per_step"] == 0.045
    all_reduce = rows["all-reduce_N_N-fusion_N"]  # numbers folded
    assert all_reduce["calls_per_step"] == 1 and all_reduce["ms_per_step"] == 0.01
    assert rows["[0] GpuExecutable::ExecuteThunks"]["ms_per_step"] == 0.1
    assert "jit_head:XLA GPU module" not in rows and not any(name.startswith("[1]") for name in rows)


def test_profile_step_graph_launch_cost_is_per_device_op():
    from benchmarks.profile_step import graph_launch_cost

    launch_path = [
        {"name": "cuGraphLaunch (CudaGraph:7)", "ms_per_step": 2.0, "calls_per_step": 1.0},
        {"name": "cuGraphLaunch (CudaGraph:9)", "ms_per_step": 0.5, "calls_per_step": 1.0},
        {"name": "command_buffer::execute", "ms_per_step": 3.0, "calls_per_step": 2.0},  # encloses the launches
    ]
    cost = graph_launch_cost(launch_path, num_device_ops=1000.0)
    assert cost["graph_launch_ms_per_step"] == 2.5 and cost["graph_launch_us_per_device_op"] == 2.5
    assert graph_launch_cost(launch_path, num_device_ops=0.0)["graph_launch_us_per_device_op"] is None  # CPU


def test_compare_hf_smoke_reports_ratios():
    import pytest

    pytest.importorskip("torch", reason="compare_hf runs transformers' models: needs torch, not a jaxllm dependency")
    from benchmarks import compare_hf

    record = compare_hf.main(["--smoke"])
    assert set(record["ratios"]) == {"continuous_batching", "static_batches_of_4"}
    assert all(ratio > 0 for ratio in record["ratios"].values())


def test_startup_smoke_times_a_cold_and_a_cached_start():
    from benchmarks import startup

    record = startup.main(["--smoke"])
    assert record["cold"]["first_token_s"] > 0 and record["warm"]["first_token_s"] > 0
    assert record["speedup"] == record["cold"]["first_token_s"] / record["warm"]["first_token_s"]


def test_kernels_smoke_times_every_case():
    from benchmarks import kernels

    record = kernels.main(["--smoke"])
    assert record["rows"] and all("error" not in row and row["time_us"] > 0 for row in record["rows"])


def test_quantized_matmul_smoke_matches_the_reference_under_engine_options():
    from benchmarks import quantized_matmul

    record = quantized_matmul.main(["--smoke", "--engine-xla-options", "--int4-bit-convert"])
    rows = [row for row in record["rows"] if row["method"] != "bf16"]
    assert {row["method"] for row in rows} == {"int8", "int4", "fp8"}
    assert any(row["note"] == "fast accumulation" for row in rows)
    assert any(row["note"] == "int4 bit convert off" for row in rows)  # the default is on at these widths
    for row in rows:
        assert "error" not in row, row
        assert row["time_us"] > 0 and row["relative_error"] < 0.05, row


def test_memory_report_smoke_analyses_every_bucket():
    from benchmarks import memory_report

    record = memory_report.main(["--smoke"])
    programs = {row["program"]: row for row in record["programs"]}
    assert record["num_kv_blocks"] > 1 and any(name.startswith("forward") for name in programs)
    assert all(row["temp"] >= 0 and row["argument"] > 0 for row in programs.values())


def test_moe_experts_smoke_times_every_backend_and_path():
    from benchmarks import moe_experts

    record = moe_experts.main(["--smoke"])
    paths = (("pallas_gpu_interpret", "tiles"), ("pallas_gpu_interpret", "pairs"), ("ragged_dot", "sorted"))
    assert {(r["bucket"], r["tokens"], r["impl"], r["path"]) for r in record["rows"]} == {
        (bucket, tokens, impl, path) for bucket, tokens in moe_experts.SMOKE_STEPS for impl, path in paths
    }
    assert all(r["us"] > 0 and r["experts_read"] >= 2 for r in record["rows"])


def test_launch_split_smoke_times_each_part_of_every_step_launch():
    from benchmarks import launch_split
    from sharding.pipeline import PipelinedModel

    original = PipelinedModel._call_stage
    record = launch_split.main(["--smoke", "--repeats", "2"])
    assert PipelinedModel._call_stage is original  # the timers are taken out again
    assert len(record["runs"]) == 2
    for run in record["runs"]:
        parts = run["parts"]
        assert set(parts) == {"place", "stage_call", "head_call", "launch", "dispatch", "collect"}
        steps = parts["launch"]["calls"]
        # one step per output token (the prefill's gives the first): each part once a step, nothing from the warm-up
        assert record["output_len"] - 1 <= steps <= record["output_len"] + 1
        assert all(stats["calls"] == steps for stats in parts.values())
        assert parts["launch"]["median_ms"] > parts["stage_call"]["median_ms"] > 0  # the launch holds the call
        assert run["itl_p50_ms"] > 0
    config = json.loads((pathlib.Path(launch_split.SMOKE_CONFIG) / "config.json").read_text())
    cache = record["kv_cache"]  # the default layout: one K array per layer, each sharded over the 2 devices' KV heads
    assert cache["k_arrays"] == config["num_hidden_layers"]
    assert cache["first_k_shape"][2] == config["num_key_value_heads"]
    assert 0 < cache["first_k_gib_per_device"] * 2**30 * 2 == math.prod(cache["first_k_shape"]) * 4  # float32


@pytest.mark.parametrize("freeze_args", [[], ["--no-gc-freeze"]], ids=["gc-freeze", "no-gc-freeze"])
def test_host_phases_smoke_times_each_phase_of_every_run(freeze_args):
    from benchmarks import host_phases
    from jaxllm.core.scheduler import Scheduler
    from jaxllm.entrypoints import llm as llm_module

    original_schedule, original_freeze = Scheduler.schedule, llm_module.objects_before_frozen
    records = host_phases.main(["--smoke", "--reps", "2", *freeze_args])
    assert Scheduler.schedule is original_schedule and llm_module.objects_before_frozen is original_freeze
    assert [r["rep"] for r in records] == [0, 1] and all(r["gc_freeze"] is not bool(freeze_args) for r in records)
    for record in records:
        phases = record["phases_ms_per_step"]
        timed = {"schedule", "update_from_output", "dispatch", "collect", "pack_step_batch", "forward call"}
        assert timed <= set(phases)
        assert phases["dispatch"] > phases["pack_step_batch"] > 0  # packing is part of the dispatch
        assert record["step_times"]["num_steps"] > 0 and record["output_tokens_per_s"] > 0
