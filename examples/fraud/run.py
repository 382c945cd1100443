"""``streamscore demo``: card-transaction fraud scoring, end to end, checked offline.

1. bring the local stack up; 2. declare the feature views and fill them (10k cards, 1k merchants);
3. train the fraud MLP, export it to ONNX and register it; 4. start a worker; 5. stream the requests with a
progress bar while a subscriber collects the predictions; 6. print throughput, latency percentiles and a few
predictions with lineage; 7. re-score every request offline with the trained scikit-learn model on the same
feature values: every streamed score must match, or the demo fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import load_views
from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import Client, PredictTimeout, ensure_topics, tail_consumer

from .data import feature_matrix, generate_feature_rows, generate_transactions, write_views
from .model import build_and_register, offline_scores
from .requests import FEATURE_SEED, as_request

SCORE_TOLERANCE = 1e-5
MODEL = "fraud"


class DemoFailed(RuntimeError):
    """The demo did not show what it promises; the message says what went wrong."""


Echo = Callable[[str], None]


def run_demo(settings: Settings, count: int, rate: float | None, echo: Echo = print) -> dict[str, Any]:
    started = time.monotonic()
    echo("== 1/6 local stack")
    stack_up(settings, echo)
    echo("== 2/6 feature views: card_stats (10k cards), merchant_stats (1k merchants)")
    rows = fill_views(settings)
    echo("== 3/6 fraud model: train (scikit-learn MLP), export to ONNX, register")
    manifest, pipeline = build_and_register(settings.models_dir)
    echo(f"   {manifest.name} v{manifest.version} sha256 {manifest.sha256[:16]}…  {manifest.description.summary}")
    transactions = generate_transactions(rows, count, seed=int(time.time()) % 100_000, with_labels=False)
    run_id = uuid.uuid4().hex[:8]
    requests = [as_request(f"demo-{run_id}-{index}", txn) for index, txn in enumerate(transactions)]
    echo("== 4/6 worker")
    worker = _start_worker(settings)
    try:
        asyncio.run(_wait_for_worker(settings, worker))
        echo(f"== 5/6 streaming {count} requests")
        predictions, arrivals = asyncio.run(_stream(settings, requests, rate))
    finally:
        stop_process(worker)
    echo("== 6/6 summary and offline check")
    expected = offline_scores(pipeline, feature_matrix(transactions, rows))
    summary = _summarize(requests, predictions, arrivals, expected, echo)
    echo(f"demo finished in {time.monotonic() - started:.0f} s")
    if summary["missing"] or summary["mismatched"]:
        raise DemoFailed(f"{summary['missing']} requests unanswered and {summary['mismatched']} scores differ "
                         f"from the offline computation (tolerance {SCORE_TOLERANCE})")
    return summary


def stack_up(settings: Settings, echo: Echo) -> None:
    """The local stack, running (a server that cannot start fails the demo with its log's last lines)."""
    from streamscore_stack import Stack, StackError

    try:
        Stack(settings.stack, echo=echo).ensure_up()
    except StackError as exc:
        raise DemoFailed(str(exc)) from exc


def fill_views(settings: Settings) -> dict[str, dict[str, dict[str, Any]]]:
    """Declare the demo's views and write their seeded rows (the schema made first); returns the rows."""
    rows = generate_feature_rows(FEATURE_SEED)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    write_views(settings.views_file)
    asyncio.run(_fill_store(settings, rows))
    return rows


async def _fill_store(settings: Settings, rows: dict[str, dict[str, dict[str, Any]]]) -> None:
    store = FeatureStore(settings, load_views(settings.views_file))
    store.connect(create_schema=True)  # the demo is its own administrator: `features init`
    try:
        total = sum(len(entities) for entities in rows.values())
        with tqdm(total=total, unit="row", desc="features") as progress:
            for view, entities in rows.items():
                items = list(entities.items())
                for start in range(0, len(items), 1000):
                    chunk = items[start:start + 1000]
                    await store.put(view, [(entity, values, None) for entity, values in chunk])
                    progress.update(len(chunk))
    finally:
        await store.close()


def _start_worker(settings: Settings) -> subprocess.Popen:
    log_path = settings.data_dir / "worker.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL],
                            stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())


async def _wait_for_worker(settings: Settings, worker: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Ready means answering: a predict() round trip through Kafka, the feature store and the model."""
    await ensure_topics(settings, [topics.requests(settings.topic_prefix, MODEL),
                                   topics.predictions(settings.topic_prefix, MODEL)], settings.worker.partitions)
    deadline = time.monotonic() + timeout_s
    async with Client(settings) as client:
        probe = as_request("probe", {"card_id": "card-1", "merchant_id": "merchant-1", "amount": 10.0,
                                     "hour": 12.0, "is_foreign": 0.0})
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise DemoFailed(f"the worker exited with code {worker.returncode}; see "
                                 f"{settings.data_dir / 'worker.log'}")
            try:
                await client.predict(MODEL, {**probe, "id": f"probe-{uuid.uuid4().hex[:8]}"}, timeout=5.0)
                return
            except PredictTimeout:
                continue
    raise DemoFailed(f"the worker did not answer within {timeout_s:.0f} s; see {settings.data_dir / 'worker.log'}")


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (a worker drains and commits its batches in flight), then SIGKILL after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _stream(settings: Settings, requests: list[dict[str, Any]], rate: float | None
                  ) -> tuple[dict[str, dict], dict[str, int]]:
    from streamscore.streams.wire import unpack

    topic = topics.predictions(settings.topic_prefix, MODEL)
    consumer = await tail_consumer(settings, topic)
    wanted = {request["id"] for request in requests}
    predictions: dict[str, dict] = {}
    arrivals: dict[str, int] = {}

    async def collect() -> None:
        while len(predictions) < len(wanted):
            for records in (await consumer.getmany(timeout_ms=200, max_records=4096)).values():
                arrived = time.time_ns() // 1_000_000
                for record in records:
                    prediction = unpack(record.value)
                    if prediction.get("id") in wanted and prediction["id"] not in predictions:
                        predictions[prediction["id"]] = prediction
                        arrivals[prediction["id"]] = arrived

    collector = asyncio.create_task(collect())
    try:
        async with Client(settings) as client:
            with tqdm(total=len(requests), unit="req", desc="stream") as progress:
                await client.produce_many(MODEL, requests, rate, progress.update, window=500)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(collector), timeout=60)
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await consumer.stop()
    return predictions, arrivals


WARM_S = 3.0
"""The demo's first seconds (cold caches) are reported apart from the rest."""
HOPS = ("to worker", "in worker", "to client", "total")


def _hops(requests: list[dict[str, Any]], predictions: dict[str, dict], arrivals: dict[str, int],
          first_sent_ms: int) -> dict[str, dict[str, dict[str, float]]]:
    """p50/p99 of each hop, from the client's send stamp, the worker's received/sent stamps and the arrival:
    client -> Kafka -> worker (``to worker``), the worker's batch (``in worker``), worker -> Kafka -> client
    (``to client``); split into the first ``WARM_S`` seconds of sends and the rest."""
    first = f"first {WARM_S:g} s"
    phases: dict[str, list[list[int]]] = {first: [], "after": []}
    for request in requests:
        prediction = predictions.get(request["id"])
        if prediction is None or "received_ms" not in prediction or "sent_ms" not in prediction:
            continue
        sent, received, published = request["sent_ms"], prediction["received_ms"], prediction["sent_ms"]
        arrived = arrivals[request["id"]]
        phase = first if sent - first_sent_ms < WARM_S * 1000 else "after"
        phases[phase].append([received - sent, published - received, arrived - published, arrived - sent])
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for phase, rows in phases.items():
        if rows:
            values = np.array(rows, dtype=np.float64)
            summary[phase] = {hop: {"p50": float(np.percentile(values[:, index], 50)),
                                    "p99": float(np.percentile(values[:, index], 99))}
                              for index, hop in enumerate(HOPS)}
    return summary


def _summarize(requests: list[dict[str, Any]], predictions: dict[str, dict], arrivals: dict[str, int],
               expected: np.ndarray, echo: Echo) -> dict[str, Any]:
    histogram = HdrHistogram(1, 600_000, 3)
    mismatched, missing, worst = 0, 0, 0.0
    for request, offline in zip(requests, expected.tolist(), strict=True):
        prediction = predictions.get(request["id"])
        if prediction is None:
            missing += 1
            continue
        histogram.record_value(max(1, arrivals[request["id"]] - request["sent_ms"]))
        score = prediction["outputs"].get("fraud_probability") if prediction["status"] == "ok" else None
        difference = abs(score - offline) if score is not None else float("inf")
        worst = max(worst, difference)
        mismatched += difference > SCORE_TOLERANCE
    answered = len(requests) - missing
    first_sent_ms = min(request["sent_ms"] for request in requests)
    elapsed = max(1, max(arrivals.values(), default=first_sent_ms) - first_sent_ms) / 1000
    hops = _hops(requests, predictions, arrivals, first_sent_ms)
    summary = {
        "requests": len(requests), "answered": answered, "missing": missing, "mismatched": mismatched,
        "max_abs_score_difference": worst, "throughput_rps": answered / elapsed,
        "latency_ms": {f"p{p}": histogram.get_value_at_percentile(p) for p in (50, 95, 99)},
        "hops_ms": hops,
    }
    echo(f"answered {answered}/{len(requests)} in {elapsed:.1f} s: {summary['throughput_rps']:.0f} predictions/s")
    echo("end-to-end latency (sent -> prediction received), whole run: " +
         ", ".join(f"{name} {value} ms" for name, value in summary["latency_ms"].items()))
    echo(f"latency by hop, p50 / p99 ms (the first {WARM_S:g} s, while the worker's caches fill from Cassandra, "
         "apart from the rest):")
    for phase, by_hop in hops.items():
        echo(f"  {phase:<12}" + "  ".join(f"{hop} {values['p50']:.0f} / {values['p99']:.0f}"
                                          for hop, values in by_hop.items()))
    for request in requests[:3]:
        prediction = predictions.get(request["id"])
        if prediction is not None:
            outputs = prediction["outputs"]
            echo(f"  {request['id']}: {prediction['status']} fraud_probability="
                 f"{outputs.get('fraud_probability'):.6f} decision={outputs.get('decision')} "
                 f"degraded={prediction['degraded']} lineage={prediction['lineage']}")
    decisions = Counter(p["outputs"].get("decision") for p in predictions.values() if p["status"] == "ok")
    echo("decisions (the manifest's threshold_decision stage, after infer): " +
         ", ".join(f"{label} {decisions[label]}" for label in ("approve", "review", "decline")))
    verdict = "all match" if not mismatched and not missing else "MISMATCH"
    echo(f"offline check: {answered - mismatched}/{len(requests)} scores equal the offline scikit-learn scores "
         f"within {SCORE_TOLERANCE} (max |difference| {worst:.2e}): {verdict}")
    return summary

