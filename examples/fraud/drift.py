"""``streamscore demo --drift``: a drift scenario you can watch, from the shift to the retrained version in shadow.

One run, on topics of its own (``<prefix>-drift-<run>.*``) and a model library of its own
(``<data_dir>/drift/models``, so each run starts from v1):

1. ``fraud`` v1 is trained and registered with its training profile; a worker (drift windows of a few seconds,
   every prediction logged) and the monitor (``streamscore monitor --model fraud --retrain-on "live_auc < 0.75"``,
   label windows of a few seconds) run as subprocesses;
2. normal traffic streams, then the population shifts to a new fraud pattern (card testing: tiny amounts, many
   abroad; ``data.generate_shifted_transactions``), whose labels follow another function than the one v1 learnt;
   every request's true label is sent to ``<prefix>.fraud.labels`` a moment after its prediction arrived;
3. the demo watches ``<prefix>.fraud.monitoring`` and ``<prefix>.fraud.alerts``: the drift alert on ``amount``
   (from the worker's window reports), v1's live AUC falling (the monitor's accuracy reports) and its alert,
   which makes the monitor retrain (the prediction log joined with the labels) and deploy v2 in shadow; v2's
   AUC on the shifted traffic comes from its shadow records (``<prefix>.fraud.shadow``) joined with the labels;
4. ``<data_dir>/drift/drift.json`` and ``drift.png``: PSI per column over time, AUC over time per version, the
   alert and retrain moments marked.

The run fails when the drift alert is not raised, when no retrained version scores in shadow, or when a request
is unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import Client, ensure_topics, tail_consumer
from streamscore.streams.wire import unpack
from streamscore.workers import deployments

from .data import generate_shifted_transactions, generate_transactions
from .model import build_and_register
from .requests import as_request
from .run import MODEL, DemoFailed, fill_views, stack_up, stop_process

Echo = Callable[[str], None]

DRIFT_RULE = "drift_psi[amount] > 0.2"
"""The drift alert: the amount's PSI against v1's training profile, in a worker's window report."""
AUC_RULE = "live_auc < 0.75"
"""The accuracy alert (v1's held-out AUC is about 0.86): the one the monitor retrains on."""
AUC_MIN_PAIRS = 200
"""Fewest joined pairs of a window the AUC rule judges."""
DRIFT_WINDOW_S = 3.0
LABEL_WINDOW_S = 5.0
LABEL_HORIZON_S = 5.0
LABEL_DELAY_S = 1.0
"""How long after its prediction arrived a request's true label is sent."""
RELOAD_S = 1.0
NORMAL_S = 20.0
"""Seconds of normal traffic before the shift."""
SHADOW_S = 20.0
"""Seconds of shifted traffic scored by the retrained version in shadow."""
ALERT_WAIT_S = 60.0
RETRAIN_WAIT_S = 150.0
"""Longest wait for the retrained version in shadow after the accuracy alert (training on a busy machine)."""
COLUMNS_PLOTTED = ("amount", "is_foreign", "hour", "fraud_probability")


@dataclass
class Truth:
    label: int
    shifted: bool


@dataclass
class Watch:
    """What the run saw: requests, predictions, shadow records, reports, alerts, marks (times in epoch ms)."""

    origin_ms: int = 0
    truth: dict[str, Truth] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    """v1's (the answered version's) score per request id."""
    answered_ms: dict[str, int] = field(default_factory=dict)
    shadow: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    """{version: {request id: (score, sent_ms)}} from the shadow records."""
    drift_reports: list[dict[str, Any]] = field(default_factory=list)
    accuracy_reports: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    labels_sent: int = 0
    shifted: bool = False
    stop: bool = False
    trained_by: str | None = None
    """Who retrained: the monitor's --retrain-on hook, or the demo when no accuracy alert came."""


def run_drift(settings: Settings, rate: float, echo: Echo = print) -> dict[str, Any]:
    started = time.monotonic()
    run = uuid.uuid4().hex[:6]
    out = (settings.data_dir / "drift").resolve()
    models_dir = out / "models"
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    drift = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}-drift-{run}",
                                        "models_dir": models_dir})
    echo(f"== 1/6 local stack (this run's topics: {drift.topic_prefix}.*)")
    stack_up(settings, echo)
    echo(f"== 2/6 feature views and rows; fraud v1 trained and registered with its training profile in {models_dir}")
    rows = fill_views(settings)
    _v1(models_dir, out / "v1-library", echo)
    asyncio.run(_prepare(drift))
    echo(f"== 3/6 a worker (drift windows of {DRIFT_WINDOW_S:g} s, every prediction logged) and the monitor "
         f"(--retrain-on {AUC_RULE!r}, label windows of {LABEL_WINDOW_S:g} s)")
    env = _environment(drift)
    worker = _start(drift, env, "worker", ["worker", "--model", MODEL])
    monitor = _start(drift, env, "monitor", ["monitor", "--model", MODEL, "--retrain-on", AUC_RULE])
    try:
        watch = asyncio.run(_scenario(drift, rows, rate, worker, monitor, echo))
    finally:
        stop_process(monitor)
        stop_process(worker)
    result = build_result(watch, rate)
    echo("== 6/6 timeline")
    for line in timeline_lines(result):
        echo(line)
    (out / "drift.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, out / "drift.png")
    echo(f"wrote {out / 'drift.json'} and {out / 'drift.png'}; logs: {out}/worker.log, {out}/monitor.log")
    echo(f"drift demo finished in {time.monotonic() - started:.0f} s")
    if result["problems"]:
        raise DemoFailed("; ".join(result["problems"]))
    return result


def _v1(models_dir: Path, kept: Path, echo: Echo) -> None:
    """v1 in the run's library: trained once into the library ``kept`` (seeded: the same model each time), then
    copied from there."""
    from streamscore.workers.library import ModelError, read_manifest

    try:
        manifest = read_manifest(kept / MODEL / "1")
    except ModelError:
        manifest = None
    if manifest is None or manifest.profile is None:
        shutil.rmtree(kept, ignore_errors=True)
        manifest, _ = build_and_register(kept)
    else:
        echo(f"   v1 as an earlier run trained it (same seed; sha256 {manifest.sha256[:12]}…)")
    shutil.copytree(kept / MODEL / "1", models_dir / MODEL / "1")


async def _prepare(settings: Settings) -> None:
    prefix, partitions = settings.topic_prefix, settings.worker.partitions
    await deployments.ensure_topic(settings, MODEL)
    await ensure_topics(settings, [topics.requests(prefix, MODEL), topics.predictions(prefix, MODEL),
                                   topics.shadow(prefix, MODEL), topics.labels(prefix, MODEL),
                                   topics.monitoring(prefix, MODEL), topics.alerts(prefix, MODEL)], partitions)


def _environment(settings: Settings) -> dict[str, str]:
    rules = [DRIFT_RULE, {"metric": "live_auc", "op": "<", "threshold": 0.75, "min_count": AUC_MIN_PAIRS}]
    return {**os.environ, "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
            "STREAMSCORE_MODELS_DIR": str(settings.models_dir),
            "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": str(RELOAD_S),
            "STREAMSCORE_WORKER__WEB_PORT": str(settings.worker.web_port + 20),
            "STREAMSCORE_MONITORING__DRIFT": "true",
            "STREAMSCORE_MONITORING__WINDOW_S": str(DRIFT_WINDOW_S),
            "STREAMSCORE_MONITORING__WINDOW_REQUESTS": "1000000",
            "STREAMSCORE_MONITORING__LABEL_WINDOW_S": str(LABEL_WINDOW_S),
            "STREAMSCORE_MONITORING__LABEL_HORIZON_S": str(LABEL_HORIZON_S),
            "STREAMSCORE_MONITORING__ALERT_RULES": json.dumps(rules),
            "STREAMSCORE_MONITORING__WEB_PORT": str(settings.monitoring.web_port + 20),
            "STREAMSCORE_PREDICTION_LOG__ENABLED": "true",
            "STREAMSCORE_PREDICTION_LOG__SHARE": "1.0"}


def _start(settings: Settings, env: dict[str, str], name: str, args: list[str]) -> subprocess.Popen:
    log_file = open(settings.models_dir.parent / f"{name}.log", "wb")  # noqa: SIM115 - closed with the child
    return subprocess.Popen([sys.executable, "-m", "streamscore", *args], stdout=log_file,
                            stderr=subprocess.STDOUT, env=env)


def _traffic(rows: Any, run: str, watch: Watch) -> Iterator[dict[str, Any]]:
    """Endless labelled requests, ids ``drift-<run>-<n>``: normal ones until ``watch.shifted``, then shifted."""
    index, chunk = 0, 0
    while not watch.stop:
        shifted = watch.shifted
        make = generate_shifted_transactions if shifted else generate_transactions
        for transaction in make(rows, 1000, 5000 + chunk):
            if watch.stop or watch.shifted != shifted:
                break
            request_id = f"drift-{run}-{index}"
            watch.truth[request_id] = Truth(int(transaction["label"]), shifted)
            watch.sent.append(request_id)
            index += 1
            yield as_request(request_id, transaction)
        chunk += 1


def _score(outputs: Any) -> float | None:
    value = outputs.get("fraud_probability") if isinstance(outputs, Mapping) else None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


async def _consume(consumer: Any, handle: Callable[[dict[str, Any]], None]) -> None:
    while True:
        for records in (await consumer.getmany(timeout_ms=200, max_records=4096)).values():
            for record in records:
                try:
                    value = unpack(record.value)
                except Exception:  # a record the demo cannot read is not the demo's to judge
                    continue
                if isinstance(value, dict):
                    handle(value)


async def _scenario(settings: Settings, rows: Any, rate: float, worker: subprocess.Popen,
                    monitor: subprocess.Popen, echo: Echo) -> Watch:
    prefix = settings.topic_prefix
    watch = Watch()
    due: list[tuple[float, str]] = []  # (monotonic time to send its label, request id), in arrival order

    def on_prediction(prediction: dict[str, Any]) -> None:
        request_id = prediction.get("id")
        if request_id in watch.truth and request_id not in watch.answered_ms:
            watch.answered_ms[request_id] = int(time.time() * 1000)
            score = _score(prediction.get("outputs"))
            if score is not None:
                watch.scores[request_id] = score
            due.append((time.monotonic() + LABEL_DELAY_S, request_id))

    def on_shadow(record: dict[str, Any]) -> None:
        score = _score(record.get("outputs"))
        if record.get("id") in watch.truth and score is not None:
            watch.shadow.setdefault(str(record.get("version")), {})[record["id"]] = (
                score, int(record.get("sent_ms") or 0))

    def on_report(report: dict[str, Any]) -> None:
        if report.get("kind") == "accuracy":
            watch.accuracy_reports.append(report)
        elif isinstance(report.get("columns"), dict):
            watch.drift_reports.append(report)

    consumers = [await tail_consumer(settings, topics.predictions(prefix, MODEL)),
                 await tail_consumer(settings, topics.shadow(prefix, MODEL)),
                 await tail_consumer(settings, topics.monitoring(prefix, MODEL)),
                 await tail_consumer(settings, topics.alerts(prefix, MODEL))]
    tasks = [asyncio.create_task(_consume(consumer, handle)) for consumer, handle in
             zip(consumers, (on_prediction, on_shadow, on_report, watch.alerts.append), strict=True)]

    def mark(what: str) -> None:
        at = time.time() * 1000 - watch.origin_ms
        watch.marks.append((at / 1000, what))
        echo(f"   t={at / 1000:6.1f} s  {what}")

    def alive() -> None:
        for name, process in (("worker", worker), ("monitor", monitor)):
            if process.poll() is not None:
                raise DemoFailed(f"the {name} exited with code {process.returncode}; see "
                                 f"{settings.models_dir.parent / (name + '.log')}")

    async def until(test: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive()
            found = test()
            if asyncio.iscoroutine(found):
                found = await found
            if found:
                return found
            await asyncio.sleep(0.25)
        return None

    def raised(rule: str, version: str = "1") -> dict[str, Any] | None:
        return next((event for event in watch.alerts if event.get("rule") == rule and event.get("state") == "raised"
                     and str(event.get("version")) == version), None)

    try:
        async with Client(settings) as client:
            await _until_answered(client, settings, alive)
            labels = asyncio.create_task(_send_labels(client, settings, due, watch))
            echo(f"== 4/6 normal traffic at {rate:.0f} requests/s, then the shift; labels {LABEL_DELAY_S:g} s "
                 "after each prediction")
            watch.origin_ms = int(time.time() * 1000)
            producer = asyncio.create_task(client.produce_many(MODEL, _traffic(rows, uuid.uuid4().hex[:6], watch),
                                                               rate, window=200))
            mark(f"streaming normal traffic; production v1 (AUC rule {AUC_RULE!r}, drift rule {DRIFT_RULE!r})")
            await until(lambda: producer.done(), NORMAL_S)
            watch.shifted = True
            shift_ms = int(time.time() * 1000)
            mark("population shifted: card testing (tiny amounts, abroad), a new label function")
            report = await until(lambda: _drifted(watch, shift_ms), ALERT_WAIT_S)
            if report is not None:
                mark(f"the worker's drift window report flags amount (PSI {report['columns']['amount']['psi']:.2f}), "
                     f"drifted: {', '.join(report.get('drifted_columns', []))}")
            event = await until(lambda: raised(DRIFT_RULE), ALERT_WAIT_S)
            if event is not None:
                mark(f"drift alert raised by the monitor: {DRIFT_RULE} on v1 (PSI {event['value']:.2f})")
            event = await until(lambda: raised(AUC_RULE), ALERT_WAIT_S)
            demo_retrain = _Retrain(settings)
            if event is not None:
                mark(f"accuracy alert raised: v1's live AUC fell to {event['value']:.3f}; the monitor retrains "
                     f"(--retrain-on {AUC_RULE!r})")
                watch.trained_by = "the monitor's --retrain-on hook"
            else:
                mark("no accuracy alert in time: the demo calls retrain itself")
                watch.trained_by = "the demo (no accuracy alert came in time)"
                demo_retrain.start()

            async def shadowed() -> str | None:
                version = await _new_shadow(settings)
                if version is None and not demo_retrain.started and _monitor_retrain_failed(settings):
                    mark("the monitor's retraining failed (see monitor.log): the demo calls retrain itself")
                    watch.trained_by = "the demo (the monitor's retraining failed)"
                    demo_retrain.start()
                return version or ("-" if demo_retrain.error else None)  # "-": given up

            state = await until(shadowed, RETRAIN_WAIT_S)
            state = None if state == "-" else state
            if demo_retrain.error:
                mark(f"retraining failed: {demo_retrain.error}")
            if state:
                mark(f"v{state} deployed in shadow (retrained by {watch.trained_by})")
                if await until(lambda: len(watch.shadow.get(state, {})) > 0, 15):
                    mark(f"v{state} scoring in shadow")
                await until(lambda: producer.done(), SHADOW_S)
            watch.stop = True
            with contextlib.suppress(Exception):
                await producer
            mark(f"stopped streaming: {len(watch.sent)} requests sent")
            await until(lambda: all(request_id in watch.answered_ms for request_id in watch.sent), 60)
            await until(lambda: not due, 30)
            mark(f"{len(watch.answered_ms)}/{len(watch.sent)} answered, {watch.labels_sent} labels sent; waiting "
                 "for the last accuracy reports")
            last_ms = max(watch.answered_ms.values(), default=watch.origin_ms)
            await until(lambda: any(report["window_end_ms"] > last_ms for report in watch.accuracy_reports),
                        3 * (LABEL_WINDOW_S + LABEL_HORIZON_S))
            labels.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await labels
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for consumer in consumers:
            await consumer.stop()
    return watch


async def _new_shadow(settings: Settings) -> str | None:
    try:
        state = await deployments.read_deployment(settings, MODEL)
    except Exception:  # not readable yet: asked again
        return None
    return next((version for version in state.shadow if version != "1"), None) if state is not None else None


class _Retrain:
    """``retrain`` called by the demo, in a thread (when the monitor's hook did not do it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = False
        self.error: str | None = None

    def start(self) -> None:
        self.started = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from streamscore.workers.retrain import retrain

        try:
            retrain(self.settings, MODEL)
        except Exception as exc:  # the run reports it: no version in shadow
            self.error = f"{type(exc).__name__}: {exc}"


def _monitor_retrain_failed(settings: Settings) -> bool:
    log = settings.models_dir.parent / "monitor.log"
    return log.is_file() and f"retraining {MODEL} after alert" in log.read_text(errors="replace")


def _drifted(watch: Watch, since_ms: int) -> dict[str, Any] | None:
    """The first drift report of v1 since ``since_ms`` that flags ``amount``."""
    return next((report for report in watch.drift_reports if str(report.get("version")) == "1"
                 and not report.get("shadow") and int(report.get("window_end_ms", 0)) > since_ms
                 and report.get("columns", {}).get("amount", {}).get("drifted")), None)


async def _until_answered(client: Client, settings: Settings, alive: Callable[[], None],
                          timeout_s: float = 120.0) -> None:
    from streamscore.streams.client import PredictTimeout

    deadline = time.monotonic() + timeout_s
    probe = as_request("probe", {"card_id": "card-1", "merchant_id": "merchant-1", "amount": 10.0, "hour": 12.0,
                                 "is_foreign": 0.0})
    while time.monotonic() < deadline:
        alive()
        try:
            await client.predict(MODEL, {**probe, "id": f"probe-{uuid.uuid4().hex[:8]}"}, timeout=5.0)
            return
        except PredictTimeout:
            continue
    raise DemoFailed(f"the worker did not answer within {timeout_s:.0f} s; see {settings.models_dir.parent}/worker.log")


async def _send_labels(client: Client, settings: Settings, due: list[tuple[float, str]], watch: Watch) -> None:
    """Each request's true label, ``LABEL_DELAY_S`` after its prediction arrived (``event_ms``: the send time)."""
    topic = topics.labels(settings.topic_prefix, MODEL)
    while True:
        now = time.monotonic()
        ready = 0
        while ready < len(due) and due[ready][0] <= now:
            ready += 1
        if ready:
            batch, due[:ready] = due[:ready], []
            event_ms = int(time.time() * 1000)
            sends = [await client.producer.send(topic, msgpack.packb(
                {"id": request_id, "label": watch.truth[request_id].label, "event_ms": event_ms}, use_bin_type=True),
                key=request_id.encode()) for _, request_id in batch]
            await asyncio.gather(*sends)
            watch.labels_sent += len(batch)
        await asyncio.sleep(0.2)


# --- the result: series, timeline, plot (pure functions of what was watched) -------------------------------------

def _auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None


def psi_series(reports: Sequence[Mapping[str, Any]], origin_ms: int, version: str = "1",
               columns: Sequence[str] = COLUMNS_PLOTTED) -> dict[str, list[tuple[float, float]]]:
    """PSI per column over time (seconds since ``origin_ms`` at each window's end) from the drift reports of the
    answering ``version`` (shadow reports left out)."""
    series: dict[str, list[tuple[float, float]]] = {column: [] for column in columns}
    for report in sorted(reports, key=lambda report: report.get("window_end_ms", 0)):
        if str(report.get("version")) != version or report.get("shadow"):
            continue
        at = (int(report["window_end_ms"]) - origin_ms) / 1000
        for column in columns:
            stats = report.get("columns", {}).get(column) or report.get("outputs", {}).get(column)
            if stats is not None and stats.get("psi") is not None:
                series[column].append((round(at, 2), round(float(stats["psi"]), 4)))
    return series


def window_auc(ids: Sequence[str], scores: Mapping[str, float], times_ms: Mapping[str, int],
               labels: Mapping[str, int], origin_ms: int, window_s: float) -> list[dict[str, Any]]:
    """AUC per epoch-aligned window (``[t - t % window, + window)`` of ``times_ms``, as the monitor's) of the
    labelled ``ids`` that have a score: ``{t (window middle, s since origin), auc, count}``, one-class windows left
    out."""
    size = round(window_s * 1000)
    windows: dict[int, list[str]] = {}
    for request_id in ids:
        if request_id in scores and request_id in labels and request_id in times_ms:
            at = times_ms[request_id]
            windows.setdefault(at - at % size, []).append(request_id)
    points = []
    for start, members in sorted(windows.items()):
        auc = _auc([labels[member] for member in members], [scores[member] for member in members])
        if auc is not None:
            points.append({"t": round((start + size / 2 - origin_ms) / 1000, 2), "auc": round(auc, 4),
                           "count": len(members)})
    return points


def build_result(watch: Watch, rate: float) -> dict[str, Any]:
    """The run's JSON: marks, alerts, PSI and AUC series, v1 against v2 on the same shifted requests, problems."""
    origin = watch.origin_ms
    problems: list[str] = []
    labels = {request_id: truth.label for request_id, truth in watch.truth.items()}
    lost = [request_id for request_id in watch.sent if request_id not in watch.answered_ms]
    if lost:
        problems.append(f"{len(lost)} of {len(watch.sent)} requests unanswered, e.g. {lost[:3]}")
    raised = [event for event in watch.alerts if event.get("state") == "raised"]
    if not any(event.get("rule") == DRIFT_RULE for event in raised):
        problems.append(f"the drift alert {DRIFT_RULE!r} was not raised")
    retrained = sorted((version for version in watch.shadow if version != "1"), key=lambda v: (len(v), v))
    if not retrained:
        problems.append("no retrained version scored in shadow")
    auc_v1 = [{"t": round(((report["window_start_ms"] + report["window_end_ms"]) / 2 - origin) / 1000, 2),
               "auc": report.get("auc"), "count": report.get("count")}
              for report in sorted(watch.accuracy_reports, key=lambda report: report["window_start_ms"])
              if str(report.get("version")) == "1" and report.get("auc") is not None]
    auc: dict[str, list[dict[str, Any]]] = {"1": auc_v1}
    same: dict[str, Any] = {}
    for version in retrained:
        records = watch.shadow[version]
        scores = {request_id: score for request_id, (score, _) in records.items()}
        times = {request_id: sent for request_id, (_, sent) in records.items()}
        ids = [request_id for request_id in records if watch.truth[request_id].shifted]
        auc[version] = window_auc(ids, scores, times, labels, origin, LABEL_WINDOW_S)
        both = [request_id for request_id in ids if request_id in watch.scores]
        if both:
            same[version] = {
                "requests": len(both), "positives": int(sum(labels[request_id] for request_id in both)),
                "auc_v1": _auc([labels[i] for i in both], [watch.scores[i] for i in both]),
                f"auc_v{version}": _auc([labels[i] for i in both], [scores[i] for i in both])}
    return {"rate": rate, "origin_ms": origin, "rules": {"drift": DRIFT_RULE, "accuracy": AUC_RULE},
            "retrained_by": watch.trained_by,
            "sent": len(watch.sent), "answered": len(watch.answered_ms), "lost": len(lost),
            "labels_sent": watch.labels_sent, "marks": watch.marks,
            "alerts": [{**event, "t": round((int(event.get("at_ms", origin)) - origin) / 1000, 2)}
                       for event in watch.alerts],
            "psi": psi_series(watch.drift_reports, origin), "auc": auc, "same_window": same,
            "drift_reports": len(watch.drift_reports), "accuracy_reports": len(watch.accuracy_reports),
            "problems": problems}


def timeline_lines(result: Mapping[str, Any]) -> list[str]:
    lines = [f"   t={at:6.1f} s  {what}" for at, what in result["marks"]]
    v1 = result["auc"].get("1", [])
    if v1:
        before = [point["auc"] for point in v1 if point["t"] < _shift_at(result)]
        lowest = min(v1, key=lambda point: point["auc"])
        lines.append(f"   v1 live AUC (monitor): {np.mean(before) if before else float('nan'):.3f} before the shift, "
                     f"down to {lowest['auc']:.3f} at t={lowest['t']:.1f} s")
    for version, same in result["same_window"].items():
        lines.append(f"   shifted requests scored by both v1 and v{version} (shadow), labelled: {same['requests']} "
                     f"({same['positives']} fraud): AUC v1 {_fmt(same['auc_v1'])}, v{version} "
                     f"{_fmt(same[f'auc_v{version}'])}")
    lines.append(f"   {result['answered']}/{result['sent']} requests answered (lost {result['lost']}), "
                 f"{result['labels_sent']} labels sent, {result['drift_reports']} drift reports, "
                 f"{result['accuracy_reports']} accuracy reports")
    lines.extend(f"   PROBLEM: {problem}" for problem in result["problems"])
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _shift_at(result: Mapping[str, Any]) -> float:
    return next((at for at, what in result["marks"] if what.startswith("population shifted")), float("inf"))


def _plotted(mark: str) -> bool:
    return any(word in mark for word in ("shifted", "alert raised", "deployed in shadow"))


def plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for column, points in result["psi"].items():
        if points:
            top.plot([at for at, _ in points], [psi for _, psi in points], marker=".", label=column)
    top.axhline(0.2, color="red", linewidth=0.6, linestyle=":")
    top.set(ylabel="PSI against v1's training profile", title="fraud: drift and live accuracy around a shift")
    top.legend(fontsize=8)
    for version, points in result["auc"].items():
        if points:
            bottom.plot([point["t"] for point in points], [point["auc"] for point in points], marker="o",
                        label=f"v{version}" + (" (monitor)" if version == "1" else " (shadow + labels)"))
    bottom.set(xlabel="seconds since the stream started", ylabel="ROC AUC per label window")
    bottom.legend(fontsize=8)
    for axes in (top, bottom):
        for at, what in result["marks"]:
            if _plotted(what):
                axes.axvline(at, color="grey", linewidth=0.7, linestyle="--")
    for at, what in result["marks"]:
        if _plotted(what):
            top.text(at, top.get_ylim()[1] * 0.98, what[:38], rotation=90, va="top", ha="right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
