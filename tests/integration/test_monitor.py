"""The monitor against the real Kafka: a `streamscore monitor` process joins labels with predictions, reports
accuracy per version and window, dead-letters the labels it cannot use, raises and clears alerts once per
episode, and keeps its join state and open episodes across a restart.

Predictions are produced here in the wire format the worker writes (the join does not care who scored them),
each test under versions of its own, so the reports and alerts of one test never mix with another's. Windows
are short (0.5 s) and the horizon 6 s, so a window is reported 6.5 s after its predictions' time (the tests date
their predictions a few seconds back to hear sooner). The restart test has a monitor of its own whose horizon
(60 s) outlasts any restart on a loaded machine; both start side by side."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.kafka import client_kwargs

MODEL = "fraud"
WINDOW_MS = 500
HORIZON_MS = 6_000
THRESHOLD = 0.7
PARTITIONS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MonitorProcess:
    """`streamscore monitor --model fraud` as a subprocess, with its own topic prefix."""

    def __init__(self, tmp: Path, horizon_ms: int = HORIZON_MS) -> None:
        run = uuid.uuid4().hex[:8]
        self.port = _free_port()
        self.env = {
            **os.environ,
            "STREAMSCORE_TOPIC_PREFIX": f"mon{run}",
            "STREAMSCORE_MODELS_DIR": str(tmp / "models"),
            "STREAMSCORE_WORKER__PARTITIONS": str(PARTITIONS),
            "STREAMSCORE_MONITORING__LABEL_WINDOW_S": str(WINDOW_MS / 1000),
            "STREAMSCORE_MONITORING__LABEL_HORIZON_S": str(horizon_ms / 1000),
            "STREAMSCORE_MONITORING__TICK_S": "0.1",
            "STREAMSCORE_MONITORING__THRESHOLD": str(THRESHOLD),
            "STREAMSCORE_MONITORING__SCORE_OUTPUT": "fraud_probability",
            "STREAMSCORE_MONITORING__ALERT_RULES": json.dumps(
                ["live_auc < 0.75", {"metric": "drift_psi", "column": "amount", "op": ">", "threshold": 0.2}]),
            "STREAMSCORE_MONITORING__WEB_PORT": str(self.port),
        }
        self.settings = Settings(topic_prefix=self.env["STREAMSCORE_TOPIC_PREFIX"])
        self.log_path = tmp / f"monitor-{run}.log"
        self.process: subprocess.Popen | None = None
        self._readies = 0

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "streamscore", "monitor", "--model", MODEL],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the monitor exited:\n{self.log_text()}"
            if self.log_text().count("Worker]: Ready") > self._readies:
                self._readies += 1
                return
            time.sleep(0.2)
        raise AssertionError(f"the monitor did not become ready:\n{self.log_text()}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return response.read().decode()

    def topic(self, kind: str) -> str:
        prefix = self.settings.topic_prefix
        return {"predictions": topics.predictions, "labels": topics.labels, "dlq": topics.labels_dead_letters,
                "monitoring": topics.monitoring, "alerts": topics.alerts}[kind](prefix, MODEL)


@pytest.fixture(scope="module")
def monitors(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MonitorProcess, MonitorProcess]]:
    tmp = tmp_path_factory.mktemp("monitor")
    both = (MonitorProcess(tmp), MonitorProcess(tmp, horizon_ms=60_000))
    try:
        for process in both:
            process.spawn()
        for process in both:
            process.wait_ready()
        yield both
    finally:
        for process in both:  # both told at once, then waited for
            if process.alive():
                process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for process in both:
            process.stop()


@pytest.fixture
def monitor(monitors: tuple[MonitorProcess, MonitorProcess]) -> MonitorProcess:
    return monitors[0]


@pytest.fixture
def restartable(monitors: tuple[MonitorProcess, MonitorProcess]) -> MonitorProcess:
    """A monitor of its own, horizon 60 s: stopped and started again by the restart test."""
    return monitors[1]


# --- producing and reading -------------------------------------------------------------------------------------

def prediction(request_id: str, version: str, score: float, sent_ms: int) -> dict[str, Any]:
    return {"id": request_id, "model": MODEL, "version": version, "status": "ok",
            "outputs": {"fraud_probability": score, "label": int(score >= 0.5), "decision": "approve"},
            "error": None, "degraded": [], "lineage": {}, "timings_us": {}, "received_ms": sent_ms - 3,
            "sent_ms": sent_ms}


def produce(monitor: MonitorProcess, kind: str, messages: list[tuple[str | None, Any]], raw: bool = False) -> None:
    """Messages (key, value) to one of the monitor's topics; a value packed with msgpack unless ``raw``."""

    async def send() -> None:
        producer = AIOKafkaProducer(**client_kwargs(monitor.settings.kafka), linger_ms=5)
        await producer.start()
        try:
            futures = []
            for key, value in messages:
                encoded = value if raw else msgpack.packb(value, use_bin_type=True)
                key_bytes = key.encode() if key is not None else None
                partition = zlib.crc32(key_bytes) % PARTITIONS if key_bytes else 0  # as the worker partitions
                futures.append(await producer.send(monitor.topic(kind), encoded, key=key_bytes, partition=partition))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def read_until(monitor: MonitorProcess, kind: str, done: Callable[[list[Any]], bool], timeout: float = 20.0,
               keep: Callable[[Any], bool] = lambda record: True) -> list[Any]:
    """Records of a topic from its beginning, those ``keep`` takes, until ``done`` says they are all there."""

    async def read() -> list[Any]:
        consumer = AIOKafkaConsumer(**client_kwargs(monitor.settings.kafka), enable_auto_commit=False)
        await consumer.start()
        try:
            parts = [TopicPartition(monitor.topic(kind), p) for p in range(PARTITIONS)]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            found: list[Any] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(record for record in batch if keep(record))
                if done(found):
                    return found
                assert monitor.alive(), f"the monitor died:\n{monitor.log_text()[-3000:]}"
            return found
        finally:
            await consumer.stop()

    return asyncio.run(read())


def reports_of(monitor: MonitorProcess, version: str, done: Callable[[list[dict]], bool],
               timeout: float = 20.0) -> list[dict[str, Any]]:
    keep = lambda record: record.key == f"{MODEL}/{version}".encode()  # noqa: E731
    records = read_until(monitor, "monitoring", lambda found: done(_unpacked(found, "accuracy")), timeout, keep)
    return _unpacked(records, "accuracy")


def _unpacked(records: list[Any], kind: str | None = None) -> list[dict[str, Any]]:
    values = [msgpack.unpackb(record.value, raw=False) for record in records]
    return [value for value in values if kind is None or value.get("kind") == kind]


def headers(record: Any) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers or ()}


def metric(text: str, name: str) -> float:
    """The value of one sample in the Prometheus text ``text``."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported once:\n{text}"
    return values[0]


def now_ms() -> int:
    return int(time.time() * 1000)


def window_start(at_ms: int) -> int:
    return at_ms - at_ms % WINDOW_MS


# --- the join and the statistics ----------------------------------------------------------------------------

def test_labels_join_before_and_after_their_predictions_and_the_report_matches_sklearn(
        monitor: MonitorProcess) -> None:
    rng = np.random.default_rng(12)
    n = 160
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.clip(0.45 * labels + rng.random(n) * 0.6, 0, 1).round(6)
    sent = window_start(now_ms() - 2000) + 1  # one window for all, reported 4.5 s from now
    ids = [f"auc-{i}" for i in range(n)]
    first_labels = [(ids[i], {"id": ids[i], "label": int(labels[i]), "event_ms": sent + 1000 + i})
                    for i in range(0, n, 2)]  # half the labels come before their predictions
    later_labels = [(ids[i], {"id": ids[i], "label": int(labels[i]), "event_ms": sent + 1000 + i})
                    for i in range(1, n, 2)]
    produce(monitor, "labels", first_labels)
    produce(monitor, "predictions", [(ids[i], prediction(ids[i], "auc", float(scores[i]), sent)) for i in range(n)])
    produce(monitor, "labels", later_labels)
    # late but within the horizon: predictions 3 s old (six windows back) still get their labels
    late_sent = window_start(now_ms() - 3000) + 1
    produce(monitor, "predictions", [(f"late-{i}", prediction(f"late-{i}", "late", 0.9 - i / 10, late_sent))
                                     for i in range(6)])
    produce(monitor, "labels", [(f"late-{i}", {"id": f"late-{i}", "label": i % 2}) for i in range(6)])

    reports = reports_of(monitor, "auc", lambda found: sum(r["count"] for r in found) >= n)
    late = reports_of(monitor, "late", lambda found: sum(r["count"] for r in found) >= 6)

    assert [r["count"] for r in reports] == [n] and [r["count"] for r in late] == [6]
    report = reports[0]
    assert report["window_start_ms"] == window_start(sent) and report["window_end_ms"] == window_start(sent) + WINDOW_MS
    assert report["positives"] == int(labels.sum())
    assert report["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    decisions = (scores >= THRESHOLD).astype(int)
    assert report["threshold"] == THRESHOLD
    assert report["precision"] == pytest.approx(precision_score(labels, decisions), abs=1e-12)
    assert report["recall"] == pytest.approx(recall_score(labels, decisions), abs=1e-12)
    assert report["brier"] == pytest.approx(float(np.mean((scores - labels) ** 2)), abs=1e-12)
    assert sum(b["count"] for b in report["calibration"]) == n
    delays = np.arange(n) + 1000 - 0.0
    assert report["label_delay_ms"]["p50"] == pytest.approx(np.quantile(delays, 0.5))
    assert report["label_delay_ms"]["max"] == pytest.approx(1000 + n - 1)
    metrics = monitor.get("/metrics")
    assert metric(metrics, 'streamscore_live_auc{model="fraud",version="auc"}') == pytest.approx(report["auc"])
    assert metric(metrics, 'streamscore_live_recall{model="fraud",version="auc"}') == pytest.approx(report["recall"])
    assert metric(metrics, 'streamscore_label_delay_seconds{model="fraud",quantile="max",version="auc"}') == \
        pytest.approx((1000 + n - 1) / 1000)


def test_labels_it_cannot_use_are_dead_lettered_with_their_reason(monitor: MonitorProcess) -> None:
    now = now_ms()
    produce(monitor, "predictions", [
        ("dup-1", prediction("dup-1", "bad", 0.4, now)),
        ("old-1", prediction("old-1", "bad", 0.4, now - HORIZON_MS - 3000)),  # came in past the horizon
    ])
    produce(monitor, "labels", [
        ("dup-1", {"id": "dup-1", "label": 1}), ("dup-1", {"id": "dup-1", "label": 1}),
        ("old-1", {"id": "old-1", "label": 0}),
        ("two-1", {"id": "two-1", "label": 2}), ("half-1", {"id": "half-1", "label": 0.5}),
        ("str-1", {"id": "str-1", "label": "1"}), ("ts-1", {"id": "ts-1", "label": 1, "event_ms": "yesterday"}),
        ("noid-1", {"label": 1}), ("list-1", [1, 2]),
        ("ghost-1", {"id": "ghost-1", "label": 1, "event_ms": now}),  # no prediction ever: unknown after the horizon
    ])
    produce(monitor, "labels", [("junk-1", b"\xc1\x00"), ("trail-1", msgpack.packb({"id": "x", "label": 1}) + b"\x01"),
                                ("empty-1", b"")], raw=True)
    expected = {"dup-1": "duplicate_label", "old-1": "late_label", "two-1": "bad_label", "half-1": "bad_label",
                "str-1": "bad_label", "ts-1": "bad_label", "noid-1": "bad_label", "list-1": "bad_label",
                "ghost-1": "unknown_id", "junk-1": "undecodable", "trail-1": "undecodable", "empty-1": "undecodable"}

    letters = read_until(monitor, "dlq", lambda found: {r.key.decode() for r in found} >= set(expected),
                         timeout=HORIZON_MS / 1000 + 10)

    kinds = {record.key.decode(): headers(record)["streamscore-error-kind"] for record in letters}
    assert {key: kinds.get(key) for key in expected} == expected
    by_key = {record.key.decode(): record for record in letters}
    assert msgpack.unpackb(by_key["ghost-1"].value) == {"id": "ghost-1", "label": 1, "event_ms": now}  # re-encoded
    assert by_key["junk-1"].value == b"\xc1\x00"  # the original bytes
    assert headers(by_key["two-1"])["streamscore-request-id"] == "two-1"
    assert headers(by_key["dup-1"])["streamscore-source"].startswith(monitor.topic("labels") + "/")
    metrics = monitor.get("/metrics")
    assert metric(metrics, 'streamscore_label_rejects_total{model="fraud",reason="bad_label"}') == 6
    assert metric(metrics, 'streamscore_label_rejects_total{model="fraud",reason="undecodable"}') == 3
    assert metric(metrics, 'streamscore_label_rejects_total{model="fraud",reason="unknown_id"}') == 1
    assert monitor.alive()


# --- alerts ---------------------------------------------------------------------------------------------------

def _window_pairs(version: str, start: int, good: bool, n: int = 40) -> tuple[list, list]:
    rng = np.random.default_rng(start % 1000)
    labels = np.arange(n) % 2
    scores = (0.2 + 0.6 * labels) if good else rng.random(n)
    ids = [f"{version}-{start}-{i}" for i in range(n)]
    return ([(ids[i], prediction(ids[i], version, float(scores[i]), start + 1)) for i in range(n)],
            [(ids[i], {"id": ids[i], "label": int(labels[i])}) for i in range(n)])


def test_an_alert_is_raised_once_per_episode_and_cleared_when_it_recovers(monitor: MonitorProcess) -> None:
    base = window_start(now_ms() - 3000)
    quality = [True, False, False, False, True]  # AUC 1, three random windows, AUC 1 again
    pairs = [_window_pairs("al", base + offset * WINDOW_MS, good) for offset, good in enumerate(quality)]
    produce(monitor, "predictions", [message for predictions, _ in pairs for message in predictions])
    produce(monitor, "labels", [message for _, labels in pairs for message in labels])

    reports = reports_of(monitor, "al", lambda found: len(found) >= 5)
    events = _unpacked(read_until(monitor, "alerts", lambda found: len(found) >= 2, timeout=5,
                                  keep=lambda record: record.key == b"live_auc < 0.75|al"))

    assert [r["window_start_ms"] for r in reports] == [base + i * WINDOW_MS for i in range(5)]
    bad = [r for r, good in zip(reports, quality, strict=True) if not good]
    assert all(r["auc"] < 0.75 for r in bad), [r["auc"] for r in reports]
    assert [(e["state"], e["window_start_ms"]) for e in events] == [("raised", base + WINDOW_MS),
                                                                    ("cleared", base + 4 * WINDOW_MS)]
    raised, cleared = events
    assert raised["value"] == pytest.approx(bad[0]["auc"]) and cleared["value"] == pytest.approx(1.0)
    assert raised["rule"] == "live_auc < 0.75" and raised["version"] == "al" and raised["model"] == MODEL
    assert cleared["raised_ms"] == raised["raised_ms"]


def _drift(version: str, psi: float, start: int) -> dict[str, Any]:
    """A drift window report as the workers' drift stage writes it (no ``kind``), cut down to what is judged."""
    return {"model": MODEL, "version": version, "window_start_ms": start, "window_end_ms": start + 1000,
            "requests": 100, "columns": {"amount": {"psi": psi, "p_value": 0.001}}, "outputs": {},
            "drifted_columns": ["amount"] if psi >= 0.2 else [], "sent_ms": now_ms()}


def drift_events(monitor: MonitorProcess, version: str, done: Callable[[list], bool],
                 timeout: float = 10.0) -> list[dict[str, Any]]:
    key = f"drift_psi[amount] > 0.2|{version}".encode()
    return _unpacked(read_until(monitor, "alerts", done, timeout, keep=lambda record: record.key == key))


def test_drift_reports_raise_and_clear_their_rule_on_a_column(monitor: MonitorProcess) -> None:
    start = now_ms()
    produce(monitor, "monitoring", [(v, _drift("dr", psi, start + i)) for i, (v, psi) in
                                    enumerate([("dr", 0.05), ("dr", 0.31), ("dr", 0.5), ("dr", 0.1)])])

    events = drift_events(monitor, "dr", lambda found: len(found) >= 2)

    assert [(e["state"], e["value"]) for e in events] == [("raised", 0.31), ("cleared", 0.1)]
    assert events[0]["report_kind"] == "drift" and events[0]["column"] == "amount"


# --- restart --------------------------------------------------------------------------------------------------

def test_a_restart_keeps_the_join_state_and_the_open_episodes(restartable: MonitorProcess) -> None:
    monitor = restartable
    sent = now_ms()
    produce(monitor, "predictions", [(f"rs-{i}", prediction(f"rs-{i}", "rs", 0.1 + 0.2 * (i % 5), sent))
                                     for i in range(10)])
    produce(monitor, "labels", [("rs-0", {"id": "rs-0", "label": 0, "event_ms": sent})])  # joined before it
    produce(monitor, "labels", [("early-1", {"id": "early-1", "label": 1, "event_ms": sent})])  # waits across it
    produce(monitor, "monitoring", [("rs", _drift("rs", 0.9, sent))])  # an episode opens before the restart
    drift_events(monitor, "rs", lambda found: len(found) >= 1)
    wait_for_status(monitor, lambda status: status["join_entries"] >= 11 and status["seen"].get("labels", 0) >= 2)

    assert monitor.stop() == 0
    monitor.start()
    assert json.loads(monitor.get("/status"))["join_entries"] >= 11  # recovered from the changelog
    produce(monitor, "labels", [(f"rs-{i}", {"id": f"rs-{i}", "label": i % 2, "event_ms": sent + 100})
                                for i in range(10)])  # rs-0 a second time: a duplicate, also after the restart
    produce(monitor, "predictions", [("early-1", prediction("early-1", "rs", 0.8, sent))])
    # still drifting: nothing new; then (same key, so read after it) another version's first episode
    produce(monitor, "monitoring", [("rs", _drift("rs", 0.8, sent + 1)), ("rs", _drift("rs2", 0.9, sent + 1))])

    drift_events(monitor, "rs2", lambda found: len(found) >= 1)
    status = wait_for_status(monitor, lambda status: status["seen"].get("labels", 0) >= 10 and
                             status["seen"].get("predictions", 0) >= 1)
    metrics = monitor.get("/metrics")

    assert metric(metrics, 'streamscore_labels_joined_total{model="fraud"}') == 10  # rs-1..9 and early-1
    assert metric(metrics, 'streamscore_alert_open{model="fraud",rule="drift_psi[amount] > 0.2",version="rs"}') == 1
    assert status["labels_rejected"] == {"duplicate_label": 1}
    assert status["windows_open"] == 1  # all eleven pairs, in the window of `sent`, reported after the horizon
    assert "drift_psi[amount] > 0.2|rs" in status["open_alerts"]
    events = drift_events(monitor, "rs", lambda found: False, timeout=1.0)  # everything there is
    assert [e["state"] for e in events] == ["raised"]


def wait_for_status(monitor: MonitorProcess, done: Callable[[dict[str, Any]], bool],
                    timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(monitor.get("/status"))
        if done(status):
            return status
        assert time.monotonic() < deadline, f"the monitor's status stayed {status}"
        time.sleep(0.1)


# --- `streamscore labels` ---------------------------------------------------------------------------------

def test_the_labels_command_sends_json_lines_the_monitor_joins(monitor: MonitorProcess,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from streamscore.cli import main
    from streamscore.settings import get_settings

    sent = window_start(now_ms() - 1000) + 1
    produce(monitor, "predictions", [(f"cli-{i}", prediction(f"cli-{i}", "cli", i / 10, sent)) for i in range(8)])
    monkeypatch.setenv("STREAMSCORE_TOPIC_PREFIX", monitor.settings.topic_prefix)
    get_settings.cache_clear()
    try:
        bad = CliRunner().invoke(main, ["labels", "--model", MODEL], input='{"id": "cli-0", "label": 1}\n{"id": 3}\n')
        lines = "".join(json.dumps({"id": f"cli-{i}", "label": int(i >= 4), **({"event_ms": sent + 500} if i else {})})
                        + "\n" for i in range(8))
        good = CliRunner().invoke(main, ["labels", "--model", MODEL], input=lines)
    finally:
        get_settings.cache_clear()

    assert bad.exit_code == 1 and "label 2: 'id' must be a string" in bad.output
    assert good.exit_code == 0, good.output
    reports = reports_of(monitor, "cli", lambda found: sum(r["count"] for r in found) >= 8)
    assert [(r["count"], r["positives"], r["auc"]) for r in reports] == [(8, 4, 1.0)]
