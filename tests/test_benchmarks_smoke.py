"""The benchmark scripts run end to end on a tiny model (a smoke run: correctness of the scripts, not timing)."""

from benchmarks import latency, roofline, throughput


def test_throughput_smoke_counts_every_output_token():
    record = throughput.main(["--smoke"])
    assert record["num_output_tokens"] == record["num_prompts"] * record["output_len"]
    assert record["output_tokens_per_s"] > 0


def test_latency_smoke_reports_percentiles():
    record = latency.main(["--smoke"])
    for stats in record["batches"].values():
        assert stats["itl_ms"]["p50"] > 0 and stats["ttft_ms"]["p99"] >= stats["ttft_ms"]["p50"]


def test_roofline_j8_floor_matches_shared_benchmarks():
    result = roofline.main(["--job", "J8"])
    # shared/BENCHMARKS.md: about 5.9 s, at most ~11,100 output tok/s on an H100
    assert 5.0 < result["floor_s"] < 6.5
