"""Statistics (``disable_log_stats=False``): Prometheus metrics under vLLM's names, ``LLM.get_metrics()`` and the
periodic log line, checked against what the requests themselves returned."""

import logging

import prometheus_client
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.metrics.prometheus import token_count_buckets
from jaxllm.metrics.reader import Counter, Gauge, Histogram
from tests.engine.conftest import LLAMA, make_llm, random_token_prompts

LENGTHS = [5, 9, 30, 17, 40]


def by_name(metrics) -> dict:
    """name -> Metric, or name -> {finished_reason: Counter} for the labelled request counter."""
    out = {}
    for metric in metrics:
        if "finished_reason" in metric.labels:
            out.setdefault(metric.name, {})[metric.labels["finished_reason"]] = metric
        else:
            assert metric.name not in out, metric.name  # one series per name otherwise
            out[metric.name] = metric
    return out


def test_counts_match_what_the_requests_returned(tiny_model_dir):
    llm = make_llm(tiny_model_dir, disable_log_stats=False)
    prompts = random_token_prompts(5, LENGTHS, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    metrics = by_name(llm.get_metrics())
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == 35
    assert isinstance(metrics["vllm:prompt_tokens"], Counter) and metrics["vllm:prompt_tokens"].value == sum(LENGTHS)
    assert metrics["vllm:generation_tokens"].value == generated
    assert {k: c.value for k, c in metrics["vllm:request_success"].items()} == {"length": 5, "stop": 0, "abort": 0}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert isinstance(metrics[name], Gauge) and metrics[name].value == 0.0, name
    ttft, itl, e2e = (metrics[f"vllm:{n}"] for n in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                                     "e2e_request_latency_seconds"))  # fmt: skip
    assert isinstance(ttft, Histogram) and ttft.count == 5 and itl.count == 5 * 6 and e2e.count == 5
    assert ttft.buckets["+Inf"] == 5 and all(0 < h.sum for h in (ttft, itl, e2e))
    latest = {o.request_id: o.metrics.finished_time - o.metrics.arrival_time for o in outputs}
    assert e2e.sum == pytest.approx(sum(latest.values()), rel=1e-9)  # the same events, timed by the same clock
    prompt_sizes, generation_sizes = metrics["vllm:request_prompt_tokens"], metrics["vllm:request_generation_tokens"]
    assert (prompt_sizes.count, prompt_sizes.sum) == (5, sum(LENGTHS))
    assert (generation_sizes.count, generation_sizes.sum) == (5, generated)
    assert prompt_sizes.buckets["5.0"] == 1 and prompt_sizes.buckets["10.0"] == 2  # cumulative: <= 5, <= 10
    iteration = metrics["vllm:iteration_tokens_total"]
    assert iteration.sum == sum(LENGTHS) + generated
    assert metrics["vllm:prompt_tokens"].labels == {"model_name": tiny_model_dir, "engine": "0"}
    exposed = prometheus_client.generate_latest().decode()  # the default registry, as an HTTP server would serve it
    assert f'vllm:generation_tokens_total{{engine="0",model_name="{tiny_model_dir}"}} {float(generated)}' in exposed


def test_prefix_hits_stops_and_aborts_are_counted(tiny_model_dir):
    llm = make_llm(tiny_model_dir, disable_log_stats=False, served_model_name="tiny")
    prompts = random_token_prompts(2, [40, 56], seed=12)  # full 16-token blocks
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts, greedy, use_tqdm=False)
    llm.generate(prompts, greedy, use_tqdm=False)  # the same prompts again: their blocks are cached
    blocks = llm.llm_engine.scheduler.block_manager
    metrics = by_name(llm.get_metrics())
    assert metrics["vllm:prefix_cache_queries"].value == blocks.num_prefix_cache_queries == 2 * (40 + 56)
    assert metrics["vllm:prefix_cache_hits"].value == blocks.num_prefix_cache_hits == 32 + 48  # the second run's
    engine = llm.llm_engine
    engine.add_request("aborted", prompts[0], greedy)
    engine.add_request("kept", prompts[1], greedy)
    engine.step()
    engine.abort_request("aborted")
    while engine.has_unfinished_requests():
        engine.step()
    counts = {k: c.value for k, c in by_name(llm.get_metrics())["vllm:request_success"].items()}
    assert counts == {"length": 5, "stop": 0, "abort": 1}
    assert all(metric.labels["model_name"] == "tiny" for metric in llm.get_metrics())  # served_model_name


def test_stop_string_finishes_count_as_stop():
    # test_vllm_arguments.py's engine shape (and test_bad_words.py's): its programs are in the test cache by then
    llm = LLM(model=LLAMA, dtype="float32", max_model_len=256, num_gpu_blocks_override=64, disable_log_stats=False)
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (text,) = [o.outputs[0].text for o in llm.generate(["The capital of France is"], free, use_tqdm=False)]
    stop = text[len(text) // 2 :][:3]
    stopped = llm.generate(["The capital of France is"], free.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop"
    counts = {k: c.value for k, c in by_name(llm.get_metrics())["vllm:request_success"].items()}
    assert counts == {"length": 1, "stop": 1, "abort": 0}
    assert by_name(llm.get_metrics())["vllm:generation_tokens"].value == 12 + len(stopped.token_ids)


def test_statistics_are_off_by_default_and_the_log_line_reports_throughput(tiny_model_dir, caplog):
    with pytest.raises(ValueError, match="disable_log_stats"):
        make_llm(tiny_model_dir).get_metrics()
    with pytest.raises(TypeError, match="disable_log_stats must be a bool, got 'no'"):
        make_llm(tiny_model_dir, disable_log_stats="no")
    llm = make_llm(tiny_model_dir, disable_log_stats=False)
    llm.llm_engine.metrics.log_interval_s = 0.0  # a line after every step
    with caplog.at_level(logging.INFO, logger="jaxllm.metrics.prometheus"):
        llm.generate(random_token_prompts(2, [5, 9], seed=13), SamplingParams(max_tokens=3), use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxllm.metrics.prometheus"]
    assert lines and all("Avg generation throughput" in line and "KV cache usage" in line for line in lines)
    assert "Running: 0 reqs, Waiting: 0 reqs" in lines[-1]


def test_token_count_buckets_reach_max_model_len():
    assert token_count_buckets(256) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert token_count_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
