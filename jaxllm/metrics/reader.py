"""``LLM.get_metrics()``: a snapshot of the engine's Prometheus metrics as plain objects, vLLM's reader classes by
name and field (``Counter``, ``Gauge``, ``Histogram``; ``Vector`` exists for scripts that test for it, and no jaxllm
metric is one). A histogram's ``buckets`` maps each upper bound (as Prometheus writes it, e.g. "0.5", "+Inf") to
the cumulative count of observations up to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclasses.dataclass
class Counter(Metric):
    value: int


@dataclasses.dataclass
class Vector(Metric):
    values: list[int]


@dataclasses.dataclass
class Gauge(Metric):
    value: float


@dataclasses.dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]


def snapshot(collectors: Iterable) -> list[Metric]:
    """One ``Metric`` per labelled series of these ``prometheus_client`` collectors, in their order."""
    metrics: list[Metric] = []
    for collector in collectors:
        for family in collector.collect():
            if family.type == "gauge":
                metrics += [Gauge(family.name, s.labels, s.value) for s in family.samples]
            elif family.type == "counter":
                total = family.name + "_total"
                metrics += [Counter(family.name, s.labels, int(s.value)) for s in family.samples if s.name == total]
            elif family.type == "histogram":
                metrics += _histograms(family)
    return metrics


def _histograms(family) -> list[Histogram]:
    """A family's ``_bucket`` / ``_count`` / ``_sum`` samples, grouped by their labels (``le`` aside)."""
    series: dict[tuple, Histogram] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        key = tuple(sorted(labels.items()))
        histogram = series.setdefault(key, Histogram(family.name, labels, 0, 0.0, {}))
        if sample.name == family.name + "_bucket":
            histogram.buckets[sample.labels["le"]] = int(sample.value)
        elif sample.name == family.name + "_count":
            histogram.count = int(sample.value)
        elif sample.name == family.name + "_sum":
            histogram.sum = sample.value
    return list(series.values())
