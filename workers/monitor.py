"""The monitor: live accuracy of a model from its ground truth, and its alerts (``streamscore monitor``).

A Faust app of its own (id and consumer group ``<prefix>-monitor-<model>``) with one agent over three topics:

- ``<prefix>.<model>.predictions``: each answered prediction (status ok) waits in the ``joins`` table for its
  label, keyed by request id, with its version, score and time (``sent_ms``);
- ``<prefix>.<model>.labels``: each label (``{id, label, event_ms}``) is joined to its prediction, or waits for
  it; whichever comes first waits, for at most ``monitoring.label_horizon_s``;
- ``<prefix>.<model>.monitoring``: the workers' drift reports, judged by the drift alert rules.

The joined pairs of each version are gathered by tumbling window of prediction time (``monitoring.label_window_s``,
aligned on the epoch); a window is closed once no label can join it any more (its
end plus the horizon), and its report (AUC, precision and recall at the decision threshold, calibration, label
delay, count) goes to ``<prefix>.<model>.monitoring`` (``kind: accuracy``), to the gauges at ``/metrics`` and
to the alert rules. Alerts go to ``<prefix>.<model>.alerts``, once per episode, and to ``on_alert`` hooks.

State lives in Faust tables backed by their changelog topics (``memory://`` store, restored from the changelog
at start): the join table (waiting predictions and labels, joined pairs until their window is reported, and
for one more horizon a marker of each request done with, so that a late or repeated label is told apart from an
unknown one) and the open alert episodes per (rule, version). A restart loses nothing that was committed and
re-raises no open episode. Windows are closed by the monitor's timer rather than by a Faust windowed table's
expiry: faust-streaming 0.15 re-arms that expiry only on writes, not on recovery from the changelog, so windows
open at a restart would never close; and its compiled window ranges step in whole seconds (a 0.5 s window has a
step of 0) and overflow on epoch milliseconds. A window here is ``[t - t % size, + size)`` in milliseconds.

One monitor process per model: its reports cover the partitions it owns.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import faust
import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import ensure_topics, partition_count
from streamscore.streams.kafka import faust_broker, faust_credentials
from streamscore.streams.wire import (
    HEADER_ELEMENT,
    HEADER_ERROR_KIND,
    HEADER_ERROR_MESSAGE,
    HEADER_FAILED_MS,
    HEADER_MODEL,
    HEADER_REQUEST_ID,
    HEADER_SOURCE,
    bounded_letter,
)

from .accuracy import DEFAULT_THRESHOLD, decision_of, window_report
from .alerts import AlertRule, judge, parse_rules

log = logging.getLogger(__name__)

UNDECODABLE, BAD_LABEL, DUPLICATE, LATE, UNKNOWN = ("undecodable", "bad_label", "duplicate_label", "late_label",
                                                    "unknown_id")
"""Why a label was dead-lettered (``docs/wire-format.md``, "Label dead letter")."""

AlertHook = Callable[[dict[str, Any]], Any]
"""Called with every alert event the monitor publishes (``docs/wire-format.md``, "Alert event"), in the
monitor's event loop, after the event was queued for Kafka. It must not block: start a thread for long work
(``streamscore monitor --retrain-on RULE`` does so). What it raises is logged, never stops the monitor."""


def now_ms() -> int:
    return int(time.time() * 1000)


class RequestTable(faust.Table):
    """A table keyed by request id whose changelog partition is the one the worker publishes the request's
    prediction to (crc32 of the id, ``streams/delivery.py``), whoever writes it: an agent's event of any of the
    monitor's topics, or its timer (Faust's own rule, the partition of the current event, has no event there)."""

    def partition_for_key(self, key: Any) -> int | None:
        return zlib.crc32(str(key).encode()) % (self.partitions or 1)


class LabelError(ValueError):
    def __init__(self, kind: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.request_id = kind, request_id


def read_label(value: bytes | None, timestamp_ms: int) -> tuple[str, int, int]:
    """(request id, label, event ms) of a label message; LabelError with the dead-letter kind otherwise."""
    if not value:
        raise LabelError(UNDECODABLE, "the value is null or empty")
    try:
        label = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception as exc:  # any malformed msgpack: truncated, trailing bytes, reserved byte, bad UTF-8
        raise LabelError(UNDECODABLE, f"not one msgpack object: {type(exc).__name__}: {exc}") from None
    if not isinstance(label, dict):
        raise LabelError(BAD_LABEL, f"a label is a map, got {type(label).__name__}")
    request_id = label.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
        raise LabelError(BAD_LABEL, f"'id' must be a str of 1..256 characters, got {request_id!r:.80}")
    outcome = label.get("label")
    if isinstance(outcome, bool):
        outcome = int(outcome)
    if not isinstance(outcome, int) or outcome not in (0, 1):
        raise LabelError(BAD_LABEL, f"'label' must be 0 or 1, got {outcome!r:.80}", request_id)
    event_ms = label.get("event_ms", timestamp_ms)
    if event_ms is None:
        event_ms = timestamp_ms
    if not isinstance(event_ms, int) or isinstance(event_ms, bool):
        raise LabelError(BAD_LABEL, f"'event_ms' must be an int (epoch ms), got {event_ms!r:.80}", request_id)
    return request_id, outcome, event_ms


@dataclass(frozen=True)
class Scored:
    request_id: str
    version: str
    score: float
    sent_ms: int


def read_prediction(value: bytes | None, timestamp_ms: int, score_output_of: Callable[[str], str]
                    ) -> Scored | str:
    """What the monitor keeps of a prediction, or why it skips it (a reason for a counter)."""
    try:
        prediction = msgpack.unpackb(value, raw=False, strict_map_key=False) if value else None
    except Exception:
        return "undecodable"
    if not isinstance(prediction, dict) or not isinstance(prediction.get("id"), str) \
            or not isinstance(prediction.get("version"), str):
        return "not_a_prediction"
    if prediction.get("status") != "ok":
        return "not_ok"
    outputs = prediction.get("outputs")
    score = outputs.get(score_output_of(prediction["version"])) if isinstance(outputs, dict) else None
    if isinstance(score, list) and len(score) == 1:
        score = score[0]
    if not isinstance(score, int | float) or isinstance(score, bool) or score != score:
        return "no_score"
    sent_ms = next((stamp for stamp in (prediction.get("sent_ms"), prediction.get("received_ms"))
                    if isinstance(stamp, int) and not isinstance(stamp, bool)), timestamp_ms)
    return Scored(prediction["id"], prediction["version"], float(score), sent_ms)


class MonitorMetrics:
    """The monitor's Prometheus metrics, served at its own ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        gauge = lambda name, text, labels=("model", "version"): Gauge(  # noqa: E731
            name, text, list(labels), registry=self.registry)
        self.auc = gauge("streamscore_live_auc", "ROC AUC of the last reported window, by version")
        self.precision = gauge("streamscore_live_precision", "Precision at the decision threshold, last window")
        self.recall = gauge("streamscore_live_recall", "Recall at the decision threshold, last window")
        self.brier = gauge("streamscore_live_brier", "Brier score of the last reported window")
        self.pairs = gauge("streamscore_live_pairs", "Joined predictions of the last reported window")
        self.label_delay = gauge("streamscore_label_delay_seconds", "Label event time minus prediction time, "
                                 "quantiles of the last reported window", ("model", "version", "quantile"))
        self.alert_open = gauge("streamscore_alert_open", "1 while an alert episode is open", ("model", "rule",
                                                                                                 "version"))
        self.rejects = Counter("streamscore_label_rejects", "Labels dead-lettered, by reason", ["model", "reason"],
                               registry=self.registry)
        self.joined = Counter("streamscore_labels_joined", "Labels joined with their prediction", ["model"],
                              registry=self.registry)
        self.expired = Counter("streamscore_monitor_predictions_expired", "Predictions dropped without a label "
                               "after the horizon", ["model"], registry=self.registry)
        self.skipped = Counter("streamscore_monitor_predictions_skipped", "Predictions not joined (not ok, no "
                               "score, undecodable, repeated)", ["model", "reason"], registry=self.registry)
        self.alerts = Counter("streamscore_alerts", "Alert events published", ["model", "rule", "state"],
                              registry=self.registry)
        self.reports = Counter("streamscore_monitor_reports", "Accuracy reports published", ["model", "version"],
                               registry=self.registry)

    def observe_report(self, model: str, report: Mapping[str, Any]) -> None:
        version = str(report["version"])
        for gauge_, key in ((self.auc, "auc"), (self.precision, "precision"), (self.recall, "recall"),
                            (self.brier, "brier")):
            value = report.get(key)
            gauge_.labels(model, version).set(float("nan") if value is None else value)
        self.pairs.labels(model, version).set(report["count"])
        for quantile, ms in report.get("label_delay_ms", {}).items():
            self.label_delay.labels(model, version, quantile).set(ms / 1000.0)
        self.reports.labels(model, version).inc()


@dataclass
class Judgement:
    """Per version: the score output, the decision threshold and the alert rules (settings + manifest)."""

    score_output: str
    threshold: float
    rules: list[AlertRule]


@dataclass
class JoinIndex:
    """In-memory indexes over the join table (rebuilt from it after recovery): when each waiting entry or
    marker expires, and the joined requests of each (version, window start)."""

    deadlines: list[tuple[int, str]] = field(default_factory=list)
    windows: dict[tuple[str, int], set[str]] = field(default_factory=lambda: defaultdict(set))

    def clear(self) -> None:
        self.deadlines.clear()
        self.windows.clear()

    def expire_at(self, at_ms: int, request_id: str) -> None:
        heapq.heappush(self.deadlines, (at_ms, request_id))

    def due(self, now: int) -> Iterable[str]:
        while self.deadlines and self.deadlines[0][0] <= now:
            yield heapq.heappop(self.deadlines)[1]


class Monitor:
    """The join, the windows and the alerts of one model; ``create_monitor_app`` wires it into a Faust app."""

    def __init__(self, settings: Settings, model: str, app: faust.App, partitions: int,
                 metrics: MonitorMetrics | None = None, on_alert: Iterable[AlertHook] = ()) -> None:
        self.settings, self.model, self.app = settings, model, app
        config = settings.monitoring
        self.horizon_ms = int(config.label_horizon_s * 1000)
        self.window_ms = max(1, round(config.label_window_s * 1000))
        self.metrics = metrics or MonitorMetrics()
        self.on_alert = list(on_alert)
        self.setting_rules = parse_rules(config.alert_rules)
        prefix = settings.topic_prefix
        self.predictions_topic = topics.predictions(prefix, model)
        self.labels_topic = topics.labels(prefix, model)
        self.monitoring_topic = topics.monitoring(prefix, model)
        self.alerts_topic = topics.alerts(prefix, model)
        self.dlq_topic = topics.labels_dead_letters(prefix, model)
        self.joins = _table(app, "joins", partitions, "waiting predictions and labels, joined pairs, markers")
        self.episodes = _table(app, "alert-episodes", partitions, "open alert episodes, by rule and version")
        self.index = JoinIndex()
        self._judgements: dict[str, Judgement] = {}
        self.rejected: dict[str, int] = defaultdict(int)
        self.seen: dict[str, int] = defaultdict(int)
        """Messages read, by topic kind (``predictions``, ``labels``, ``monitoring``)."""
        self.published_reports = 0

    # --- per version ----------------------------------------------------------------------------------------

    def judgement(self, version: str) -> Judgement:
        """Score output, threshold and rules of a version: settings first, then its manifest, then defaults."""
        known = self._judgements.get(version)
        if known is None:
            config = self.settings.monitoring
            output, threshold = decision_of(self.settings.models_dir, self.model, version)
            rules = list(self.setting_rules)
            manifest_rules = self._manifest_rules(version)
            rules += [rule for rule in manifest_rules if all(rule.title != known.title for known in rules)]
            known = Judgement(config.score_output or output or "score",
                              config.threshold if config.threshold is not None else
                              threshold if threshold is not None else DEFAULT_THRESHOLD, rules)
            self._judgements[version] = known
        return known

    def _manifest_rules(self, version: str) -> list[AlertRule]:
        from .library import ModelError, read_manifest

        try:
            manifest = read_manifest(self.settings.models_dir / self.model / version)
        except ModelError:
            return []
        try:
            return parse_rules(getattr(manifest, "alert_rules", ()))
        except ValueError as exc:
            log.error("%s v%s: the manifest's alert rules are ignored: %s", self.model, version, exc)
            return []

    # --- events ---------------------------------------------------------------------------------------------

    async def on_prediction(self, value: bytes | None, timestamp_ms: int) -> None:
        read = read_prediction(value, timestamp_ms, lambda version: self.judgement(version).score_output)
        if isinstance(read, str):
            self.metrics.skipped.labels(self.model, read).inc()
            return
        now = now_ms()
        entry = self.joins.get(read.request_id)
        if entry is not None and ("v" in entry or "x" in entry):
            self.metrics.skipped.labels(self.model, "repeated").inc()  # at-least-once: a prediction published twice
            return
        mine = {"v": read.version, "s": read.score, "p": read.sent_ms}
        if entry is None:
            if now - read.sent_ms > self.horizon_ms:
                self.metrics.expired.labels(self.model).inc()
                if now - read.sent_ms <= 2 * self.horizon_ms:  # older ones (a first start's backlog): no marker
                    self._mark(read.request_id, "expired", now)
                return
            self.joins[read.request_id] = mine
            self.index.expire_at(read.sent_ms + self.horizon_ms, read.request_id)
            return
        # a label waited for this prediction
        if entry["a"] - read.sent_ms > self.horizon_ms:
            self._mark(read.request_id, "expired", now)
            await self._reject(None, LATE, f"the label came {entry['a'] - read.sent_ms} ms after its prediction, "
                               f"more than the horizon of {self.horizon_ms} ms", read.request_id,
                               _label_bytes(read.request_id, entry), entry.get("src", ""))
            return
        self._join(read.request_id, {**mine, "l": entry["l"], "e": entry["e"], "src": entry.get("src")})

    async def on_label(self, value: bytes | None, key: bytes | None, timestamp_ms: int, source: str) -> None:
        try:
            request_id, label, event_ms = read_label(value, timestamp_ms)
        except LabelError as error:
            await self._reject(key, error.kind, str(error), error.request_id, value, source)
            return
        now = now_ms()
        entry = self.joins.get(request_id)
        if entry is None:
            self.joins[request_id] = {"l": label, "e": event_ms, "a": now, "src": source}
            self.index.expire_at(now + self.horizon_ms, request_id)
        elif entry.get("src") == source:
            return  # this very message, read again after a restart (at-least-once): not a second label
        elif entry.get("x") == "expired":
            await self._reject(key, LATE, f"its prediction came more than the horizon of {self.horizon_ms} ms "
                               "before it (dropped unjoined)", request_id, value, source)
        elif "l" in entry or entry.get("x") == "joined":
            await self._reject(key, DUPLICATE, "the request already has a label", request_id, value, source)
        elif now - entry["p"] > self.horizon_ms:
            self._mark(request_id, "expired", now)
            self.metrics.expired.labels(self.model).inc()
            await self._reject(key, LATE, f"it came {now - entry['p']} ms after its prediction, more than the "
                               f"horizon of {self.horizon_ms} ms", request_id, value, source)
        else:
            self._join(request_id, {**entry, "l": label, "e": event_ms, "src": source})

    def _join(self, request_id: str, pair: dict[str, Any]) -> None:
        self.joins[request_id] = pair
        self.index.windows[(pair["v"], self.window_start(pair["p"]))].add(request_id)
        self.metrics.joined.labels(self.model).inc()

    def _mark(self, request_id: str, why: str, now: int, source: str | None = None) -> None:
        """Done with a request: keep a marker for one more horizon (a late or repeated label is told apart)."""
        self.joins[request_id] = {"x": why, "u": now + self.horizon_ms, **({"src": source} if source else {})}
        self.index.expire_at(now + self.horizon_ms, request_id)

    async def on_drift_report(self, value: bytes | None) -> None:
        try:
            report = msgpack.unpackb(value, raw=False, strict_map_key=False) if value else None
        except Exception:
            return  # not ours to judge: the workers' reports are checked where they are made
        if not isinstance(report, dict) or not isinstance(report.get("version"), str):
            return
        if report.get("kind", "drift" if isinstance(report.get("columns"), dict) else None) == "drift":
            await self._judge({**report, "kind": "drift"})  # the drift stage's reports may carry no kind

    # --- the timer: expiry and windows ----------------------------------------------------------------------

    async def tick(self) -> None:
        """Expire what waited past the horizon, then close and report the windows no label can join any more."""
        now = now_ms()
        for request_id in list(self.index.due(now)):
            await self._expire(request_id, now)
        closable = sorted((start, version) for version, start in self.index.windows
                          if start + self.window_ms + self.horizon_ms <= now)
        for start, version in closable:
            await self._close(version, start, now)

    async def _expire(self, request_id: str, now: int) -> None:
        entry = self.joins.get(request_id)
        if entry is None or ("l" in entry and "v" in entry):
            return  # gone, or joined: its window reports it
        if "x" in entry:
            if entry["u"] <= now:
                del self.joins[request_id]
            return
        if "v" in entry:  # a prediction no label came for
            if entry["p"] + self.horizon_ms <= now:
                self._mark(request_id, "expired", now)
                self.metrics.expired.labels(self.model).inc()
            return
        if entry["a"] + self.horizon_ms <= now:  # a label no prediction came for
            del self.joins[request_id]
            await self._reject(None, UNKNOWN, f"no prediction of request {request_id!r} came within the horizon of "
                               f"{self.horizon_ms} ms", request_id, _label_bytes(request_id, entry),
                               entry.get("src", ""))

    async def _close(self, version: str, start: int, now: int) -> None:
        ids = self.index.windows.pop((version, start))
        pairs = [(request_id, entry) for request_id in sorted(ids)
                 if (entry := self.joins.get(request_id)) is not None and "l" in entry and "v" in entry]
        if pairs:
            judgement = self.judgement(version)
            report = {"kind": "accuracy", "model": self.model, "version": version, "window_start_ms": start,
                      "window_end_ms": start + self.window_ms, "produced_ms": now,
                      "score_output": judgement.score_output,
                      **window_report([entry["s"] for _, entry in pairs], [entry["l"] for _, entry in pairs],
                                      [entry["e"] - entry["p"] for _, entry in pairs], judgement.threshold,
                                      self.settings.monitoring.calibration_bins)}
            await self._send(self.monitoring_topic, f"{self.model}/{version}".encode(), _pack(report))
            self.published_reports += 1
            self.metrics.observe_report(self.model, report)
            log.info("%s v%s window %d: %d pairs, AUC %s, precision %s, recall %s", self.model, version, start,
                     report["count"], report["auc"], report["precision"], report["recall"])
            await self._judge(report)
        for request_id, entry in pairs:
            self._mark(request_id, "joined", now, entry.get("src"))

    # --- alerts ---------------------------------------------------------------------------------------------

    async def _judge(self, report: dict[str, Any]) -> None:
        rules = self.judgement(str(report["version"])).rules
        for event in judge(rules, report, self.episodes, now_ms()):
            await self._send(self.alerts_topic, f"{event['rule']}|{event['version']}".encode(), _pack(event))
            self.metrics.alerts.labels(self.model, event["rule"], event["state"]).inc()
            self.metrics.alert_open.labels(self.model, event["rule"], str(event["version"])).set(
                1 if event["state"] == "raised" else 0)
            log.warning("%s alert %s: %s v%s, value %s (window %s)", event["state"], event["rule"], self.model,
                        event["version"], event["value"], event["window_start_ms"])
            for hook in self.on_alert:
                try:
                    hook(event)
                except Exception:
                    log.exception("an on_alert hook failed on %s", event["rule"])

    # --- publishing -----------------------------------------------------------------------------------------

    async def _reject(self, key: bytes | None, kind: str, message: str, request_id: str | None,
                      value: bytes | None, source: str) -> None:
        headers = [(HEADER_ERROR_KIND, kind.encode()), (HEADER_ERROR_MESSAGE, message[:2000].encode()),
                   (HEADER_MODEL, self.model.encode()), (HEADER_ELEMENT, b"-1"), (HEADER_SOURCE, source.encode()),
                   (HEADER_FAILED_MS, str(now_ms()).encode())]
        if request_id is not None:
            headers.append((HEADER_REQUEST_ID, request_id.encode()))
        key, value, headers = bounded_letter(key if key is not None else (request_id or "").encode() or None, value,
                                             headers)
        await self._send(self.dlq_topic, key, value, headers)
        self.rejected[kind] += 1
        self.metrics.rejects.labels(self.model, kind).inc()

    async def _send(self, topic: str, key: bytes | None, value: bytes | None,
                    headers: list[tuple[str, bytes]] | None = None) -> None:
        await self.app.producer.send(topic, key, value, partition=None, timestamp=None, headers=headers)

    # --- recovery -------------------------------------------------------------------------------------------

    def rebuild_index(self) -> None:
        """The in-memory indexes from the join table, as recovered from its changelog."""
        self.index.clear()
        for request_id, entry in self.joins.items():
            if "x" in entry:
                self.index.expire_at(int(entry["u"]), request_id)
            elif "l" in entry and "v" in entry:
                self.index.windows[(entry["v"], self.window_start(entry["p"]))].add(request_id)
            elif "v" in entry:
                self.index.expire_at(int(entry["p"]) + self.horizon_ms, request_id)
            else:
                self.index.expire_at(int(entry["a"]) + self.horizon_ms, request_id)
        log.info("%s: join state recovered: %d entries, %d windows open", self.model, len(self.joins),
                 len(self.index.windows))

    def show_open_episodes(self) -> None:
        """The open-alert gauges of the episodes recovered from the changelog."""
        for key in self.episodes:
            rule, _, version = str(key).rpartition("|")
            self.metrics.alert_open.labels(self.model, rule, version).set(1)

    def window_start(self, at_ms: int) -> int:
        return at_ms - at_ms % self.window_ms

    def status(self) -> dict[str, Any]:
        return {"model": self.model, "join_entries": len(self.joins), "windows_open": len(self.index.windows),
                "open_alerts": sorted(self.episodes.keys()), "reports_published": self.published_reports,
                "labels_rejected": dict(self.rejected), "seen": dict(self.seen)}


def _table(app: faust.App, name: str, partitions: int, help_text: str) -> Any:
    """A RequestTable of JSON keys and values, registered with the app (as ``app.Table`` does for its own)."""
    schema: faust.Schema = faust.Schema(key_serializer="json", value_serializer="json")
    table = RequestTable(app, name=name, partitions=partitions, schema=schema, beacon=app.tables.beacon,
                         help=help_text)
    return app.tables.add(table)


def _label_bytes(request_id: str, entry: Mapping[str, Any]) -> bytes:
    return _pack({"id": request_id, "label": entry["l"], "event_ms": entry["e"]})


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


async def _prepare_topics(settings: Settings, model: str) -> int:
    """Create the monitor's topics that are missing; the partitions of its tables are the predictions'."""
    prefix = settings.topic_prefix
    predictions = topics.predictions(prefix, model)
    partitions = await partition_count(settings, predictions) or settings.worker.partitions
    await ensure_topics(settings, [predictions, topics.labels(prefix, model), topics.labels_dead_letters(prefix, model),
                                   topics.monitoring(prefix, model), topics.alerts(prefix, model)], partitions)
    return partitions


def create_monitor_app(settings: Settings, model: str, on_alert: Iterable[AlertHook] = ()
                       ) -> tuple[faust.App, Monitor]:
    """The monitor's Faust app and the Monitor it drives (topics created, rules parsed: a bad rule raises
    ValueError naming it)."""
    parse_rules(settings.monitoring.alert_rules)  # refuse a bad rule before connecting anything
    partitions = asyncio.run(_prepare_topics(settings, model))
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}-monitor-{model}",
        broker=faust_broker(settings.kafka),
        broker_credentials=faust_credentials(settings.kafka),
        store="memory://",
        # the data folder, not "<app id>-data" in the current directory (as the worker's)
        datadir=str(settings.data_dir / "faust" / "{conf.name}"),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        web_port=settings.monitoring.web_port,
        web_bind=settings.monitoring.web_bind,
        web_host="127.0.0.1" if settings.monitoring.web_bind in ("0.0.0.0", "::") else settings.monitoring.web_bind,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
    )
    monitor = Monitor(settings, model, app, partitions, on_alert=on_alert)
    source = app.topic(monitor.predictions_topic, monitor.labels_topic, monitor.monitoring_topic,
                       key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    @app.agent(source, name=f"monitor-{model}", concurrency=1)
    async def watch(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            try:
                await _dispatch(monitor, message)
            except Exception:  # one message must never stop the monitor
                log.exception("the monitor failed on %s/%d/%d", message.topic, message.partition, message.offset)

    @monitor.joins.on_recover
    async def recovered() -> None:
        monitor.rebuild_index()

    @monitor.episodes.on_recover
    async def episodes_recovered() -> None:
        monitor.show_open_episodes()

    @app.timer(interval=settings.monitoring.tick_s)
    async def tick() -> None:
        try:
            await monitor.tick()
        except Exception:
            log.exception("the monitor's tick failed")

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(monitor.metrics.registry), content_type="text/plain; version=0.0.4")

    @app.page("/status")
    async def status(web: Any, request: Any) -> Any:
        return web.json(monitor.status())

    return app, monitor


async def _dispatch(monitor: Monitor, message: Any) -> None:
    timestamp_ms = int(message.timestamp * 1000) if message.timestamp else now_ms()
    if message.topic == monitor.labels_topic:
        monitor.seen["labels"] += 1
        source = f"{message.topic}/{message.partition}/{message.offset}"
        await monitor.on_label(message.value, message.key, timestamp_ms, source)
    elif message.topic == monitor.predictions_topic:
        monitor.seen["predictions"] += 1
        await monitor.on_prediction(message.value, timestamp_ms)
    elif message.topic == monitor.monitoring_topic:
        monitor.seen["monitoring"] += 1
        await monitor.on_drift_report(message.value)


def run_monitor(settings: Settings, model: str, on_alert: Iterable[AlertHook] = (), loglevel: str = "info") -> None:
    """Run the monitor in the foreground until SIGTERM/SIGINT."""
    app, _ = create_monitor_app(settings, model, on_alert)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
