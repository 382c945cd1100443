"""Prometheus metrics of a worker, served at ``/metrics`` on the Faust web server.

Observed once per batch (never per request), so they cost nothing on the hot path.
"""

from __future__ import annotations

import bisect
import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class _Live(Collector):
    """Values read at scrape time from the objects that own them (cache counters, batches in flight)."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (help_text, value) in self.read().items():
            yield GaugeMetricFamily(name, help_text, value=value)


class BatchHistograms(Collector):
    """Histograms observed several times per batch (each pipeline stage's time), without prometheus_client's
    per-observation work (a label lookup, a lock and a bucket walk in Python each): a bisect and two additions.
    Exposed as the same histogram family (``_bucket``, ``_count``, ``_sum``). Observed and collected on the event
    loop's thread (the worker's web server runs there)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = [float(bound) for bound in buckets]
        self._series: dict[tuple[str, ...], list[Any]] = {}
        """Labels -> [bucket counts (the last one above every bound), sum]."""
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [[0] * (len(self.bounds) + 1), 0.0]
        series[0][bisect.bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in its bucket
        series[1] += value

    def describe(self) -> Iterable[HistogramMetricFamily]:
        """The family without samples: the registry learns the names served (and refuses a second of them)."""
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in list(self._series.items()):
            cumulative = list(itertools.accumulate(counts))
            family.add_metric(list(labels), [(floatToGoString(bound), count) for bound, count in
                                             zip([*self.bounds, math.inf], cumulative, strict=True)], total)
        yield family


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("streamscore_predictions", "Predictions published, by model and status",
                                ["model", "status"], registry=self.registry)
        self.dead_letters = Counter("streamscore_dead_letters", "Dead letters published, by model and reason",
                                    ["model", "kind"], registry=self.registry)
        self.by_version = Counter("streamscore_predictions_by_version", "Predictions published, by model and the "
                                  "version that made them (production, canary, pinned)", ["model", "version"],
                                  registry=self.registry)
        self.version_predictions = Counter(
            "streamscore_version_predictions", "Predictions published, by model, version and status (ok, expired, "
            "error)", ["model", "version", "status"], registry=self.registry)
        self.version_inference = BatchHistograms(
            "streamscore_version_inference_seconds", "Time of one version's runtime call per batch, by model and "
            "version", ["model", "version"], STAGE_BUCKETS, self.registry)
        self.version_batch = BatchHistograms(
            "streamscore_version_batch_seconds", "Pipeline time of the batches a version answered rows of (every "
            "stage, from decode to encode), by model and version", ["model", "version"], STAGE_BUCKETS,
            self.registry)
        self.version_failures = Counter(
            "streamscore_version_inference_failures", "Runtime calls that raised (their rows answered with status "
            "error), by model and version", ["model", "version"], registry=self.registry)
        self.batch_size = BatchHistograms("streamscore_batch_messages", "Messages per batch", ["model"],
                                          BATCH_BUCKETS, self.registry)
        self.stage_seconds = BatchHistograms("streamscore_stage_seconds", "Time per batch and pipeline stage",
                                             ["model", "stage"], STAGE_BUCKETS, self.registry)
        self.model_version = Gauge("streamscore_model_info", "Model version served (value 1)",
                                   ["model", "version", "sha256", "provider"], registry=self.registry)
        self.consumer_lag = Gauge("streamscore_consumer_lag", "Messages of an assigned request partition not yet "
                                  "committed by the worker group (end offset less committed offset)",
                                  ["topic", "partition"], registry=self.registry)
        self.model_provider = Gauge("streamscore_model_provider", "Execution provider a model version runs on "
                                    "(value 1), and why (device: the worker.device note, e.g. why not CUDA)",
                                    ["model", "version", "provider", "device"], registry=self.registry)
        self._provider_labels: dict[str, tuple[str, ...]] = {}
        self._served_labels: dict[str, tuple[str, str, str, str]] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        """The labelled child of each per-batch counter and histogram, once looked up (``labels()`` checks and
        locks at each call: most of what observing a batch cost)."""

        self.answered_by_source = Counter("streamscore_answered", "Requests answered (a prediction of any status), by "
                                          "where they came from: kafka or http", ["model", "source"],
                                          registry=self.registry)
        self.http_responses = Counter("streamscore_http_responses", "Inference requests answered over HTTP, by "
                                      "status code", ["model", "code"], registry=self.registry)
        self.http_seconds = Histogram("streamscore_http_request_seconds", "Inference request time over HTTP, from "
                                      "its arrival to its answer", ["model"], buckets=STAGE_BUCKETS,
                                      registry=self.registry)

    def report_lag(self, lags: Mapping[Any, int]) -> None:
        """Lag by assigned partition (``TopicPartition`` -> messages); partitions no longer assigned vanish."""
        self.consumer_lag.clear()
        for tp, lag in lags.items():
            self.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_sources(self, model: str, kafka: int, http: int) -> None:
        if kafka:
            self._child(self.answered_by_source, model, "kafka").inc(kafka)
        if http:
            self._child(self.answered_by_source, model, "http").inc(http)

    def observe_http(self, model: str, code: int, seconds: float) -> None:
        """One inference request answered over HTTP (per request, not per batch: it is a request's own cost)."""
        self.http_responses.labels(model, str(code)).inc()
        if code == 200:
            self.http_seconds.labels(model).observe(seconds)

    def watch(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.registry.register(_Live(read))

    def observe_batch(self, model: str, messages: int, outcome: Any) -> None:
        child = self._child
        self.batch_size.observe((model,), messages)
        ok = outcome.answered - outcome.expired - outcome.errored
        for status, count in (("ok", ok), ("expired", outcome.expired), ("error", outcome.errored)):
            if count:
                child(self.requests, model, status).inc(count)
        for version, count in getattr(outcome, "by_version", {}).items():
            child(self.by_version, model, version).inc(count)
        batch_seconds = sum(outcome.timings_us.values()) / 1e6
        for version, statuses in getattr(outcome, "status_by_version", {}).items():
            for status, count in statuses.items():
                child(self.version_predictions, model, version, status).inc(count)
            self.version_batch.observe((model, version), batch_seconds)
        for version, seconds in getattr(outcome, "runtime_s_by_version", {}).items():
            self.version_inference.observe((model, version), seconds)
        for version, count in getattr(outcome, "inference_failures_by_version", {}).items():
            child(self.version_failures, model, version).inc(count)
        for letter in outcome.dead_letters:
            kind = dict(letter[3] or ()).get("streamscore-error-kind", b"unknown").decode()
            child(self.dead_letters, model, kind).inc()
        observe = self.stage_seconds.observe
        for stage, micros in outcome.timings_us.items():
            observe((model, stage), micros / 1e6)

    def serve_model(self, model: str, version: str, sha256: str, provider: str) -> None:
        """One series per model (a worker serving several models shows each)."""
        previous = self._served_labels.pop(model, None)
        if previous is not None:
            self.model_version.remove(*previous)
        self._served_labels[model] = (model, version, sha256, provider)
        self.model_version.labels(model, version, sha256, provider).set(1)

    def serve_provider(self, model: str, version: str, provider: str, note: str) -> None:
        labels = (model, version, provider, note)
        previous = self._provider_labels.get(model)
        if previous is not None and previous != labels:
            self.model_provider.remove(*previous)
        self._provider_labels[model] = labels
        self.model_provider.labels(*labels).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DriftGauges:
    """The drift stage's window figures (``workers/drift.py``), set at each window's close: per model, version and
    column (input columns and outputs by name) the PSI and p-value against the training profile and whether it is
    flagged; per model and version the share of requests with a defaulted entity and with a stale feature row."""

    def __init__(self, registry: CollectorRegistry) -> None:
        column = ["model", "version", "column"]
        self.psi = Gauge("streamscore_drift_psi", "PSI of the last drift window against the training profile",
                         column, registry=registry)
        self.p_value = Gauge("streamscore_drift_pvalue", "p-value of the chi-square test of the last "
                             "drift window against the training profile", column, registry=registry)
        self.drifted = Gauge("streamscore_drift_flagged", "1 when the column was flagged drifted in the last window "
                             "(PSI and p-value past their thresholds)", column, registry=registry)
        self.defaulted = Gauge("streamscore_defaulted_share", "Share of the last drift window's requests with a "
                               "defaulted (unknown or unavailable) entity", ["model", "version"], registry=registry)
        self.stale = Gauge("streamscore_stale_share", "Share of the last drift window's requests that read a feature "
                           "row older than its view's ttl_s", ["model", "version"], registry=registry)
        self.windows = Counter("streamscore_drift_windows", "Drift windows closed and reported",
                               ["model", "version"], registry=registry)

    def observe(self, report: Mapping[str, Any]) -> None:
        model, version = report["model"], report["version"]
        for name, column in {**report["columns"], **report["outputs"]}.items():
            self.psi.labels(model, version, name).set(column["psi"])
            self.p_value.labels(model, version, name).set(column["p_value"])
            self.drifted.labels(model, version, name).set(1.0 if column["drifted"] else 0.0)
        self.defaulted.labels(model, version).set(report["defaulted_share"])
        self.stale.labels(model, version).set(report["stale_share"])
        self.windows.labels(model, version).inc()


_DRIFT_GAUGES: weakref.WeakKeyDictionary[CollectorRegistry, DriftGauges] = weakref.WeakKeyDictionary()


def drift_gauges(registry: CollectorRegistry) -> DriftGauges:
    """The registry's drift gauges, made on first use: every model's drift stage of a worker shares them."""
    if registry not in _DRIFT_GAUGES:
        _DRIFT_GAUGES[registry] = DriftGauges(registry)
    return _DRIFT_GAUGES[registry]
