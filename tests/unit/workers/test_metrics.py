"""The worker's per-batch histograms: exposed exactly as prometheus_client's own histogram would be."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streamscore.workers.metrics import STAGE_BUCKETS, BatchHistograms, WorkerMetrics


def _exposed(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_batch_histograms_expose_what_a_prometheus_histogram_would():
    reference, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("h_seconds", "Time", ["model", "stage"], buckets=STAGE_BUCKETS, registry=reference)
    batched = BatchHistograms("h_seconds", "Time", ["model", "stage"], STAGE_BUCKETS, ours)
    # below the first bound, on a bound (le: in that bucket), between bounds, above the last
    for labels, value in [(("m", "infer"), 0.00005), (("m", "infer"), 0.0001), (("m", "infer"), 0.0003),
                          (("m", "decode"), 0.002), (("m", "infer"), 0.5), (("m", "infer"), 3.0)]:
        histogram.labels(*labels).observe(value)
        batched.observe(labels, value)

    assert _exposed(ours) == _exposed(reference)
    assert ours.get_sample_value("h_seconds_bucket", {"model": "m", "stage": "infer", "le": "0.0001"}) == 2
    assert ours.get_sample_value("h_seconds_count", {"model": "m", "stage": "infer"}) == 5


def test_a_batch_observes_one_sample_per_stage():
    metrics = WorkerMetrics()

    class Outcome:
        answered, expired, errored, dead_letters = 2, 0, 0, []
        timings_us = {"decode": 40, "infer": 250}

    metrics.observe_batch("fraud", 2, Outcome())
    metrics.observe_batch("fraud", 2, Outcome())
    sample = metrics.registry.get_sample_value
    assert sample("streamscore_stage_seconds_count", {"model": "fraud", "stage": "infer"}) == 2
    assert sample("streamscore_stage_seconds_sum", {"model": "fraud", "stage": "decode"}) == 80e-6
    assert sample("streamscore_stage_seconds_bucket", {"model": "fraud", "stage": "infer", "le": "0.00025"}) == 2
    assert sample("streamscore_stage_seconds_bucket", {"model": "fraud", "stage": "infer", "le": "0.0001"}) == 0
