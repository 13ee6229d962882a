"""``EngineMetrics``: the engine's Prometheus metrics under vLLM's names (``vllm:...``, labels ``model_name`` and
``engine``), so vLLM's dashboards and scripts read them unchanged, and vLLM's periodic log line (throughput, queue,
KV cache usage, prefix-cache hit rate). Updated once per engine step from the step's ``IterationStats`` and the
schedulers' state; registered in ``prometheus_client``'s default registry (the previous engine's are unregistered,
so a process can build engines one after another, as vLLM does).

    vllm:num_requests_running / vllm:num_requests_waiting      gauges, every replica's scheduler
    vllm:kv_cache_usage_perc                                    gauge, fraction of KV blocks held (0..1)
    vllm:prompt_tokens / vllm:generation_tokens                 counters
    vllm:request_success{finished_reason=stop|length|abort}     counter, finished samples
    vllm:num_preemptions, vllm:prefix_cache_queries / _hits     counters (tokens for the prefix cache)
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds,
    vllm:request_queue_time_seconds, vllm:request_prompt_tokens, vllm:request_generation_tokens,
    vllm:iteration_tokens_total                                 histograms
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import prometheus_client

from jaxllm.metrics.stats import IterationStats

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0  # vLLM's default interval between log lines
FINISH_REASONS = ("stop", "length", "abort")
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                  80.0, 160.0, 640.0)  # fmt: skip
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0,
                             960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

_registered: list = []  # the collectors of the engine built last, unregistered when the next one registers its own


def token_count_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (and one bucket past it)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            buckets.append(mantissa * scale)
            if buckets[-1] >= max_model_len:
                return buckets
        scale *= 10


class EngineMetrics:
    def __init__(self, model_name: str, max_model_len: int, log_interval_s: float = LOG_INTERVAL_S) -> None:
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)
        for collector in _registered:
            prometheus_client.REGISTRY.unregister(collector)
        _registered.clear()

        def make(kind, name, documentation, extra_labels=(), **kwargs):
            collector = kind(name, documentation, names + list(extra_labels), **kwargs)
            _registered.append(collector)
            self.collectors.append(collector)
            return collector if extra_labels else collector.labels(**labels)

        self.collectors: list = []
        gauge, counter, histogram = prometheus_client.Gauge, prometheus_client.Counter, prometheus_client.Histogram
        self.running = make(gauge, "vllm:num_requests_running", "Requests being computed (samples).")
        self.waiting = make(gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled (samples).")
        self.kv_cache_usage = make(gauge, "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks held (0-1).")
        self.prompt_tokens = make(counter, "vllm:prompt_tokens", "Prompt tokens of requests that got a token.")
        self.generation_tokens = make(counter, "vllm:generation_tokens", "Generated tokens.")
        success = make(counter, "vllm:request_success", "Finished samples by reason.", ("finished_reason",))
        self.request_success = {reason: success.labels(**labels, finished_reason=reason) for reason in FINISH_REASONS}
        self.preemptions = make(counter, "vllm:num_preemptions", "Preemptions (a running request lost its blocks).")
        self.prefix_queries = make(counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = make(counter, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        token_buckets = token_count_buckets(max_model_len)
        histograms = {  # attribute: (name, documentation, bucket upper bounds)
            "ttft": ("vllm:time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS_S),
            "itl": ("vllm:inter_token_latency_seconds", "Between a sample's tokens.", ITL_BUCKETS_S),
            "e2e": ("vllm:e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS_S),
            "queue_time": ("vllm:request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_LATENCY_BUCKETS_S),
            "request_prompt_tokens": ("vllm:request_prompt_tokens", "Prompt tokens per sample.", token_buckets),
            "request_generation_tokens": ("vllm:request_generation_tokens", "Tokens generated per sample.",
                                          token_buckets),
            "iteration_tokens": ("vllm:iteration_tokens_total", "Prompt + generated tokens per step.",
                                 ITERATION_TOKEN_BUCKETS),
        }  # fmt: skip
        for attribute, (name, documentation, buckets) in histograms.items():
            setattr(self, attribute, make(histogram, name, documentation, buckets=buckets))
        self.log_interval_s = log_interval_s
        self._totals = {"preemptions": 0, "queries": 0, "hits": 0}  # the schedulers' counts already added
        self._num_running = self._num_waiting = 0  # the schedulers' state at the last step (for the log line)
        self._kv_usage = 0.0
        self._since_log = {"prompt": 0, "generation": 0}
        self._last_log_time = time.monotonic()

    def record_step(self, stats: IterationStats, schedulers: Sequence) -> None:
        """Adds one step's statistics and the schedulers' state (every data-parallel replica's)."""
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.iteration_tokens.observe(stats.num_prompt_tokens + stats.num_generation_tokens)
        for seconds in stats.time_to_first_tokens_s:
            self.ttft.observe(seconds)
        for seconds in stats.inter_token_latencies_s:
            self.itl.observe(seconds)
        for finished in stats.finished:
            self.record_finished(finished)
        self._since_log["prompt"] += stats.num_prompt_tokens
        self._since_log["generation"] += stats.num_generation_tokens
        self.record_schedulers(schedulers)
        now = time.monotonic()
        if now - self._last_log_time >= self.log_interval_s:
            self._log(now)

    def record_finished(self, finished) -> None:
        self.request_success[finished.finish_reason].inc()
        self.e2e.observe(finished.e2e_latency_s)
        if finished.queue_time_s is not None:
            self.queue_time.observe(finished.queue_time_s)
        self.request_prompt_tokens.observe(finished.num_prompt_tokens)
        self.request_generation_tokens.observe(finished.num_generation_tokens)

    def record_schedulers(self, schedulers: Sequence) -> None:
        self._num_running = sum(len(s.running) for s in schedulers)
        self._num_waiting = sum(len(s.waiting) for s in schedulers)
        self._kv_usage = sum(s.block_manager.usage for s in schedulers) / len(schedulers)
        self.running.set(self._num_running)
        self.waiting.set(self._num_waiting)
        self.kv_cache_usage.set(self._kv_usage)
        totals = {
            "preemptions": sum(s.num_preemptions for s in schedulers),
            "queries": sum(s.block_manager.num_prefix_cache_queries for s in schedulers),
            "hits": sum(s.block_manager.num_prefix_cache_hits for s in schedulers),
        }
        for key, counter in (
            ("preemptions", self.preemptions),
            ("queries", self.prefix_queries),
            ("hits", self.prefix_hits),
        ):
            counter.inc(totals[key] - self._totals[key])
        self._totals = totals

    def _log(self, now: float) -> None:
        elapsed = now - self._last_log_time
        queries, hits = self._totals["queries"], self._totals["hits"]
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
            "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            self._since_log["prompt"] / elapsed,
            self._since_log["generation"] / elapsed,
            self._num_running,
            self._num_waiting,
            100.0 * self._kv_usage,
            100.0 * hits / queries if queries else 0.0,
        )
        self._since_log = {"prompt": 0, "generation": 0}
        self._last_log_time = now
