"""The pipeline's stages: a small contract, the built-in stages, and a registry of stages by name.

A stage is anything with a ``name`` and an async ``__call__(batch)`` that reads and fills in the
``ScoringBatch`` being processed. The pipeline is a list of them; each is timed under its own name (in the
prediction's ``timings_us``, in ``/metrics`` and in the worker's log). The built-in stages are stages like any
other::

    decode -> screen -> route -> features -> assemble -> infer -> encode

(``route`` picks the version that scores each request: production, the deployment's canary by a stable hash
of the primary entity key, or a pinned version; ``infer`` and ``encode`` run once per version.)

A stage of your own goes anywhere in that list: from the model's manifest (``"stages": [{"stage":
"threshold_decision", "after": "infer", "params": {...}}]``, by a name registered here with
``register_stage``), or from Python when composing the worker (``create_app(..., stages={"fraud": [...]})``).
Modules holding registered stages of your own are imported at start when named in
``STREAMSCORE_WORKER__STAGE_MODULES``. A stage that raises is handled like any failure of the pipeline: the
batch is tried again, then split down to the messages at fault, which are dead-lettered ``processing_failed``.

What a stage may do with the batch:

- read anything (``decoded`` columns, ``fetched`` feature views, ``inputs``, ``outputs``);
- after ``infer``: add or change ``outputs`` (a numpy array per output, one row per decoded request: numbers,
  lists of numbers or strings), for the rows in ``live``;
- before ``features``: change ``decoded`` request features, or drop rows from scoring with ``reject`` (each
  such request gets a dead letter with the kind and reason given; after ``features`` a rejected row is still
  scored, but answered by its dead letter only);
- keep what it wants for later stages in ``context``.
"""

from __future__ import annotations

import collections
import importlib
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamscore import fastpath
from streamscore.featurestore.store import FeatureStore, FetchedView
from streamscore.streams.clock import now_ms
from streamscore.streams.records import Inbound, Outbound
from streamscore.streams.topics import reply_to_refusal

from .deadletters import DeadLetters

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .runtime import ModelRuntime

log = logging.getLogger(__name__)

OK, EXPIRED, ERROR = "ok", "expired", "error"
NOT_ANSWERED = "not_answered"
"""Status of a decoded row that gets no prediction: it was dead-lettered by a stage (``ScoringBatch.reject``)."""

UNKNOWN_VERSION = "unknown_version"
BAD_FIELD = "bad_field"


@dataclass(frozen=True)
class Serving:
    """The versions a model's pipeline serves: production, and a canary taking ``weight`` of the requests by a
    stable hash of their primary entity key (the same card always meets the same version). A request's
    ``version`` field pins either of them."""

    production: ModelRuntime
    canary: ModelRuntime | None = None
    weight: float = 0.0
    shadows: tuple[ModelRuntime, ...] = ()
    """Versions that score the same rows in the dark: their outputs never reach the predictions topic."""

    @property
    def versions(self) -> dict[str, ModelRuntime]:
        served = {self.production.version: self.production}
        if self.canary is not None:
            served[self.canary.version] = self.canary
        return served


@dataclass
class ScoringBatch:
    """The batch being processed, as every stage sees it. Row-wise arrays have one entry per decoded request
    (``decoded``), in decoded order."""

    messages: Sequence[Inbound]
    model: ModelRuntime
    received_ms: int
    letters: DeadLetters
    decoded: fastpath.DecodedBatch | None = None
    status: np.ndarray = field(default_factory=lambda: np.empty(0, dtype="<U12"))
    """Per row: ``ok``, ``expired``, ``error`` or ``not_answered``."""
    scored_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    """The rows that were live when ``features`` ran: the rows fetched, assembled and scored, in order."""
    fetched: list[FetchedView] = field(default_factory=list)
    """One per model view, for ``scored_rows`` (in that order)."""
    inputs: np.ndarray | None = None
    """The float32 model input, one row per scored row."""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    """Output name -> array with one row per decoded row (rows not ``ok`` are not read)."""
    error: tuple[str, str] | None = None
    """(kind, message) every live row is answered with when inference failed."""
    dead_letters: list[Outbound] = field(default_factory=list)
    predictions: list[Any] = field(default_factory=list)
    """Outbound-shaped tuples, made by ``encode``."""
    timings_us: dict[str, int] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    """Free room for stages to pass things on."""
    serving: Serving | None = None
    """The versions served (production only when None)."""
    route: np.ndarray | None = None
    """Per row: index into ``routed`` of the version that scores it; None when production scores every row."""
    routed: list[ModelRuntime] = field(default_factory=list)

    @property
    def live(self) -> np.ndarray:
        """Rows to score (status ``ok`` before inference)."""
        return np.flatnonzero(self.status == OK)

    def reject(self, rows: Sequence[int], kind: str, detail: str | Sequence[str]) -> None:
        """Answer these rows with a dead letter (kind, reason) instead of a prediction."""
        assert self.decoded is not None
        decoded = self.decoded
        for position, row in enumerate(rows):
            element = int(decoded.element[row])
            span = (int(decoded.span[row, 0]), int(decoded.span[row, 1])) if element >= 0 else None
            reason = detail if isinstance(detail, str) else detail[position]
            error = fastpath.DecodeError(int(decoded.source[row]), element, kind, reason, decoded.ids[row], span)
            self.dead_letters.append(self.letters.rejected(self.messages[error.message_index], error))
            self.status[row] = NOT_ANSWERED


@runtime_checkable
class Stage(Protocol):
    """One step of the pipeline."""

    name: str

    async def __call__(self, batch: ScoringBatch) -> None: ...


# --------------------------------------------------------------------------------------------- built-ins


class Decode:
    """Raw messages -> columns (the fast path); one dead letter per bad message or element."""

    name = "decode"

    async def __call__(self, batch: ScoringBatch) -> None:
        values = [message.value for message in batch.messages]
        batch.context["values"] = values  # the raw values, for stages that look at them (the prediction log)
        decoded = fastpath.decode_batch(values, batch.model.decode_spec)
        batch.decoded = decoded
        batch.dead_letters.extend(batch.letters.rejected(batch.messages[error.message_index], error)
                                  for error in decoded.errors)
        # an absent deadline decodes as fastpath.NO_DEADLINE; 0 and negative deadlines have passed
        batch.status = np.where(decoded.deadline_ms <= batch.received_ms, EXPIRED, OK).astype("<U12")


class Screen:
    """Requests the worker must not score: a pinned version other than the one served, a reply_to Kafka takes
    no writes to or outside the allowed prefixes. Costs nothing when no request names either."""

    name = "screen"

    def __init__(self, topic_prefix: str, reply_to_prefixes: Sequence[str] | None = None) -> None:
        self.reply_to_prefixes = None if reply_to_prefixes is None else (f"{topic_prefix}.", *reply_to_prefixes)

    async def __call__(self, batch: ScoringBatch) -> None:
        decoded = batch.decoded
        assert decoded is not None
        rows = len(decoded)
        if decoded.version.count(None) == rows and decoded.reply_to.count(None) == rows:
            return  # the usual batch: no Python loop over its requests
        served = batch.serving.versions if batch.serving is not None else {batch.model.version: batch.model}
        for row, (version, reply_to) in enumerate(zip(decoded.version, decoded.reply_to, strict=True)):
            if version is not None and version not in served:
                batch.reject([row], UNKNOWN_VERSION, f"version {version!r} is pinned but {batch.model.name} is "
                                                     f"deployed as {sorted(served)}")
            elif reply_to is not None:
                refusal = reply_to_refusal(reply_to, self.reply_to_prefixes)
                if refusal is not None:
                    batch.reject([row], BAD_FIELD, refusal)


class Route:
    """Which version scores each request: a pinned ``version`` (a deployed one), else the canary for the share
    ``weight`` of the hash space of the primary entity key (crc32 of its UTF-8, or of the request id when the
    model reads no view), else production. Nothing to do (and no per-request work) without a canary or a pin."""

    name = "route"

    async def __call__(self, batch: ScoringBatch) -> None:
        decoded, serving = batch.decoded, batch.serving
        assert decoded is not None
        pinned = decoded.version.count(None) != len(decoded)
        if serving is None or (serving.canary is None and not pinned):
            return
        routed = [serving.production] + ([serving.canary] if serving.canary is not None else [])
        route = np.zeros(len(decoded), dtype=np.int8)
        if serving.canary is not None and len(decoded):
            route[canary_share(decoded.entities[0] if decoded.entities else decoded.ids, serving.weight)] = 1
        if pinned:
            index = {runtime.version: position for position, runtime in enumerate(routed)}
            for row, version in enumerate(decoded.version):
                if version is not None and version in index:
                    route[row] = index[version]
        batch.route, batch.routed = route, routed


def canary_share(keys: Sequence[str], weight: float) -> np.ndarray:
    """Mask of the keys whose stable hash falls in the first ``weight`` of the hash space."""
    hashes = np.fromiter((zlib.crc32(key.encode()) for key in keys), dtype=np.uint64, count=len(keys))
    return hashes < np.uint64(int(weight * (1 << 32)))


class Features:
    """One cache MGET and one concurrent round of store reads for every distinct entity of the live rows."""

    name = "features"

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    async def __call__(self, batch: ScoringBatch) -> None:
        decoded, live = batch.decoded, batch.live
        assert decoded is not None
        batch.scored_rows = live
        if not len(live):
            return
        all_live = len(live) == len(decoded)
        rows = live.tolist()
        batch.fetched = await self.store.fetch(
            [view.name for view in batch.model.views],
            [column if all_live else [column[row] for row in rows] for column in decoded.entities],
        )


class Assemble:
    """The float32 model input in the manifest's column order (the fast path)."""

    name = "assemble"

    async def __call__(self, batch: ScoringBatch) -> None:
        assert batch.decoded is not None
        rows = batch.scored_rows
        if len(rows):
            batch.inputs = fastpath.assemble(batch.decoded.features[rows], [view.block for view in batch.fetched],
                                             batch.model.columns)


class Infer:
    """One runtime call for the live rows; outputs scattered back to decoded rows. A model failure answers
    the live rows with status ``error`` (never loses them)."""

    name = "infer"

    async def __call__(self, batch: ScoringBatch) -> None:
        if batch.inputs is None:
            return
        live = batch.scored_rows
        if batch.route is None:
            self._score(batch, batch.model, batch.inputs, live)
            return
        routes = batch.route[live]
        for position, runtime in enumerate(batch.routed):  # one runtime call per version
            mine = routes == position
            if mine.any():
                self._score(batch, runtime, batch.inputs[mine], live[mine])

    @staticmethod
    def _score(batch: ScoringBatch, runtime: ModelRuntime, inputs: np.ndarray, rows: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            scored = runtime.run(inputs)
        except Exception as exc:
            log.exception("inference failed for %d requests (v%s)", len(rows), runtime.version)
            failures = batch.context.setdefault("inference_failures_by_version", {})
            failures[runtime.version] = failures.get(runtime.version, 0) + 1
            batch.error = ("inference_failed", f"{type(exc).__name__}: {exc}")
            batch.status[rows[batch.status[rows] == OK]] = ERROR
            return
        batch.context.setdefault("runtime_s_by_version", {})[runtime.version] = time.perf_counter() - started
        for name, values in scored.items():
            if len(values) != len(rows):  # one output row per input row, or the batch is not answered
                raise ValueError(f"the model returned {len(values)} rows of {name!r} for {len(rows)} inputs")
            full = batch.outputs.get(name)
            if full is None:
                full = batch.outputs[name] = np.zeros((len(batch.status), *values.shape[1:]), dtype=values.dtype)
            full[rows] = values


class Shadow:
    """Every shadow version scores the rows that were scored, with the same inputs (same feature values, same
    batch), in one runtime call each; one record per request and shadow version goes to
    ``<prefix>.<model>.shadow`` beside the answer's outputs (never to the predictions topic), and the live
    comparison goes to /metrics. Nothing to do without a shadow."""

    name = "shadow"

    def __init__(self, topic: str, lineage: Callable[[], dict[str, object]],
                 registry: CollectorRegistry | None = None) -> None:
        self.topic = topic
        self.lineage = lineage
        self.metrics = _ShadowMetrics(registry) if registry is not None else None

    async def __call__(self, batch: ScoringBatch) -> None:
        serving, decoded = batch.serving, batch.decoded
        if serving is None or not serving.shadows or batch.inputs is None or decoded is None:
            return
        rows = batch.scored_rows
        answered = batch.status[rows] == OK
        if not answered.any():
            return
        route = batch.route[rows] if batch.route is not None else np.zeros(len(rows), dtype=np.int8)
        answering = batch.routed or [batch.model]
        batch_id = str(self.lineage().get("batch_id", ""))
        for runtime in serving.shadows:
            started = time.perf_counter_ns()
            try:
                scored = runtime.run(batch.inputs)
            except Exception:  # a shadow never costs the answer: logged, and the batch goes on
                log.exception("shadow v%s failed on %d requests", runtime.version, len(rows))
                continue
            micros = (time.perf_counter_ns() - started) / 1000 / max(1, len(rows))
            # for the stages after this one (drift): the shadow's outputs, one row per scored row
            batch.context.setdefault("shadow_outputs", []).append((runtime, scored))
            records = _shadow_records(batch, runtime, scored, rows, answered, route, answering, micros, batch_id)
            batch.context.setdefault("extra", []).extend((self.topic, key, value, None) for key, value in records)
            if self.metrics is not None:
                self.metrics.observe(batch, runtime, scored, rows, answered, route, answering, micros)


def _row_value(values: np.ndarray, row: int) -> Any:
    value = values[row]
    if values.ndim > 1:
        return [item.item() if hasattr(item, "item") else item for item in value]
    return value.item() if hasattr(value, "item") else str(value)


def _shadow_records(batch: ScoringBatch, runtime: ModelRuntime, scored: dict[str, np.ndarray], rows: np.ndarray,
                    answered: np.ndarray, route: np.ndarray, answering: list[ModelRuntime], micros: float,
                    batch_id: str) -> list[tuple[bytes, bytes]]:
    """One msgpack record per answered row: the shadow's outputs beside the answer's (plain Python: only runs
    while a shadow is deployed)."""
    import msgpack

    decoded = batch.decoded
    assert decoded is not None
    records = []
    sent = now_ms()
    for position in np.flatnonzero(answered).tolist():
        row = int(rows[position])
        record = {
            "id": decoded.ids[row], "model": batch.model.name, "version": runtime.version,
            "answered_version": answering[int(route[position])].version,
            "outputs": {name: _row_value(values, position) for name, values in scored.items()},
            "answered_outputs": {name: _row_value(values, row) for name, values in batch.outputs.items()},
            "shadow_us": micros, "batch_id": batch_id, "sent_ms": sent,
        }
        records.append((decoded.ids[row].encode(), msgpack.packb(record, use_bin_type=True)))
    return records


class _ShadowMetrics:
    """Live comparison per (shadow, answering) version pair: |score difference| of every numeric output (a
    sample of each batch), the agreement of every label output, and the shadow's runtime cost per request."""

    DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    SAMPLE = 128
    """Most differences observed per batch and output (evenly spaced); `models compare` sees every request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        labels = ["model", "version", "answered_version", "output"]
        self.diff = Histogram("streamscore_shadow_abs_diff", "|shadow - answer| per request and numeric output",
                              labels, buckets=self.DIFF_BUCKETS, registry=registry)
        self.agree = Counter("streamscore_shadow_agreement", "Requests whose label output the shadow agreed on "
                             "(agree=yes|no)", [*labels, "agree"], registry=registry)
        self.cost = Counter("streamscore_shadow_runtime_seconds", "Shadow runtime time (the answer's is in "
                            "streamscore_stage_seconds{stage=infer})", ["model", "version"], registry=registry)
        self.scored = Counter("streamscore_shadow_requests", "Requests scored in shadow", ["model", "version"],
                              registry=registry)

    def observe(self, batch: ScoringBatch, runtime: ModelRuntime, scored: dict[str, np.ndarray], rows: np.ndarray,
                answered: np.ndarray, route: np.ndarray, answering: list[ModelRuntime], micros: float) -> None:
        model = batch.model.name
        self.cost.labels(model, runtime.version).inc(micros * len(rows) / 1e6)
        self.scored.labels(model, runtime.version).inc(int(answered.sum()))
        for position, answerer in enumerate(answering):
            mine = answered & (route == position)
            if not mine.any():
                continue
            for name, values in scored.items():
                theirs = batch.outputs.get(name)
                if theirs is None or values.ndim != 1:
                    continue
                shadow_values, answer_values = values[mine], theirs[rows[mine]]
                labels = (model, runtime.version, answerer.version, name)
                if values.dtype.kind == "f":
                    differences = np.abs(shadow_values.astype(np.float64) - answer_values)
                    if len(differences) > self.SAMPLE:  # a histogram observe is Python per value: sample it
                        differences = differences[:: len(differences) // self.SAMPLE + 1]
                    histogram = self.diff.labels(*labels)
                    for difference in differences.tolist():
                        histogram.observe(difference)
                else:
                    same = int((shadow_values == answer_values).sum())
                    self.agree.labels(*labels, "yes").inc(same)
                    self.agree.labels(*labels, "no").inc(int(mine.sum()) - same)


class Encode:
    """One msgpack prediction per answered row (the fast path), with lineage, degraded and stage timings."""

    name = "encode"

    def __init__(self, predictions_topic: str, lineage: Callable[[], dict[str, object]]) -> None:
        self.predictions_topic = predictions_topic
        self.lineage = lineage

    async def __call__(self, batch: ScoringBatch) -> None:
        decoded = batch.decoded
        assert decoded is not None
        default_topic, reply_to = self.predictions_topic, decoded.reply_to
        lineage = self.lineage()
        batch.context["lineage"] = lineage  # what later stages (the prediction log, batch tables) record beside it
        for runtime, prediction_batch in prediction_batches(batch, lineage):
            encoded = fastpath.encode_predictions(prediction_batch, now_ms())
            # plain tuples, read as Outbound by the publisher: a few thousand per batch, so no per-message class
            batch.predictions.extend(
                (reply_to[row] or default_topic, request_id.encode(), value, None)
                for row, request_id, value in zip(prediction_batch.rows, prediction_batch.ids, encoded, strict=True))
            batch.context.setdefault("answered_by_version", {})[runtime.version] = len(prediction_batch.rows)
            batch.context.setdefault("status_by_version", {})[runtime.version] = value_counts(
                batch.status[prediction_batch.rows])


def value_counts(values: np.ndarray) -> dict[Any, int]:
    """How often each distinct value occurs (plain Python keys). A few values are counted one by one: numpy's
    sort-based count costs more than the whole count below a few dozen values."""
    if len(values) <= 64:
        return dict(collections.Counter(values.tolist()))
    distinct, counts = np.unique(values, return_counts=True)
    return dict(zip(distinct.tolist(), counts.tolist(), strict=True))


def prediction_batches(batch: ScoringBatch, lineage: dict[str, object]) -> list[tuple[ModelRuntime, RowsBatch]]:
    """The answered rows of a batch as columnar predictions, one per version that scored some (production only
    unless routed), each with the lineage of that version's artifact: what ``encode`` encodes, and what batch
    scoring (workers/batch.py) writes as table rows."""
    answered = batch.status != NOT_ANSWERED
    if batch.route is None:
        groups = [(batch.model, answered)]
    else:  # one group per version: each prediction names the version (and artifact) that scored it
        groups = [(runtime, answered & (batch.route == position)) for position, runtime in enumerate(batch.routed)
                  if (answered & (batch.route == position)).any()]
    return [(runtime, _prediction_batch(batch, {**lineage, "artifact_sha256": runtime.manifest.sha256},
                                        np.flatnonzero(mask), runtime))
            for runtime, mask in groups]


@dataclass
class RowsBatch(fastpath.PredictionBatch):
    rows: list[int] = field(default_factory=list)
    """Decoded row of each prediction."""


def _prediction_batch(batch: ScoringBatch, lineage: dict[str, object], rows: np.ndarray,
                      model: ModelRuntime) -> RowsBatch:
    decoded, status = batch.decoded, batch.status
    assert decoded is not None
    row_list = rows.tolist()
    feature_ts = {view.name: np.zeros(len(decoded), dtype=np.int64) for view in model.views}
    degraded = _degraded(batch, feature_ts)
    status_list = status[rows].tolist()
    row_errors: list[tuple[str, str] | None] = [None] * len(row_list)
    for position in np.flatnonzero(status[rows] != OK).tolist():
        row = row_list[position]
        row_errors[position] = (("expired", f"deadline_ms {int(decoded.deadline_ms[row])} passed before the "
                                            "request was scored") if status_list[position] == EXPIRED
                                else batch.error or ("error", "not scored"))
    return RowsBatch(
        rows=row_list,
        ids=decoded.ids if len(row_list) == len(decoded) else [decoded.ids[row] for row in row_list],
        model=model.name,
        version=model.version,
        status=status_list,
        outputs={name: values[rows] for name, values in batch.outputs.items()},
        errors=row_errors,
        degraded=[degraded.get(row, []) for row in row_list] if degraded else [[] for _ in row_list],
        lineage=lineage,
        feature_ts_ms={name: stamps[rows] for name, stamps in feature_ts.items()},
        timings_us=dict(batch.timings_us),
        received_ms=np.full(len(rows), batch.received_ms, dtype=np.int64),
    )


def _degraded(batch: ScoringBatch, feature_ts: dict[str, np.ndarray]) -> dict[int, list[str]]:
    """Fill each view's feature timestamps; name every defaulted entity per request row."""
    decoded, live = batch.decoded, batch.scored_rows
    assert decoded is not None
    degraded: dict[int, list[str]] = {}
    for fetched_view in batch.fetched:
        name = fetched_view.view.name
        feature_ts[name][live] = fetched_view.event_ts_ms
        column = decoded.entities[batch.model.views.index(fetched_view.view)]
        unavailable = set(fetched_view.unavailable_rows)
        for live_row in fetched_view.missing:
            row = int(live[live_row])
            reason = "unavailable" if live_row in unavailable else "missing"
            degraded.setdefault(row, []).append(f"{name}:{reason}:{column[row]}")
    return degraded


# ------------------------------------------------------------------------------------------ an example


class ThresholdDecision:
    """Turns a score output into a decision label by thresholds, e.g. the fraud probability into
    ``approve`` / ``review`` / ``decline``, and counts the decisions in the worker's Prometheus registry
    (``streamscore_decisions_total{model, decision}``).

    ``thresholds`` are ascending; a score below ``thresholds[0]`` gets ``labels[0]``, at or above
    ``thresholds[-1]`` the last label (``len(labels) == len(thresholds) + 1``)."""

    name = "decision"

    def __init__(self, score: str, thresholds: Sequence[float], labels: Sequence[str], output: str = "decision",
                 registry: CollectorRegistry | None = None, model: str = "") -> None:
        if len(labels) != len(thresholds) + 1 or list(thresholds) != sorted(thresholds):
            raise ValueError(f"threshold_decision needs ascending thresholds and one label more than thresholds, "
                             f"got thresholds={list(thresholds)} labels={list(labels)}")
        self.score, self.output, self.model = score, output, model
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.labels = np.asarray(labels)
        self._thresholds: dict[np.dtype, np.ndarray] = {}
        """The thresholds in each score dtype met so far."""
        self._counted: dict[tuple[str, str], Any] = {}
        """(model, label) -> its counter's child (``labels()`` looks up and locks at each call)."""
        self.counter = None
        if registry is not None:
            from prometheus_client import Counter

            self.counter = Counter("streamscore_decisions", "Decisions of the threshold_decision stage",
                                   ["model", "decision"], registry=registry)

    async def __call__(self, batch: ScoringBatch) -> None:
        if self.score not in batch.outputs:
            return  # nothing scored in this batch (all expired, or inference failed)
        scores = batch.outputs[self.score]
        # thresholds in the score's own precision: a float32 score of 0.7 is "at 0.7", not just below it
        thresholds = self._thresholds.get(scores.dtype)
        if thresholds is None:
            thresholds = self._thresholds[scores.dtype] = (self.thresholds.astype(scores.dtype)
                                                           if scores.dtype.kind == "f" else self.thresholds)
        decisions = self.labels[np.searchsorted(thresholds, scores, side="right")]
        batch.outputs[self.output] = decisions
        if self.counter is not None:
            model = self.model or batch.model.name
            for label, count in value_counts(decisions[batch.live]).items():
                child = self._counted.get((model, label))
                if child is None:
                    child = self._counted[(model, label)] = self.counter.labels(model, label)
                child.inc(count)


# -------------------------------------------------------------------------------------------- registry


StageFactory = Callable[..., Stage]
"""Builds a stage from the manifest's ``params`` (keyword arguments), plus ``registry`` and ``model``."""

STAGES: dict[str, StageFactory] = {"threshold_decision": ThresholdDecision}
"""Stages a manifest may name. Built-in stages are not in it: they are always there."""


def register_stage(name: str) -> Callable[[StageFactory], StageFactory]:
    """Class decorator: make a stage available to manifests under ``name``."""

    def register(factory: StageFactory) -> StageFactory:
        STAGES[name] = factory
        return factory

    return register


def import_stage_modules(modules: Sequence[str]) -> None:
    """Import the operator's stage modules (``STREAMSCORE_WORKER__STAGE_MODULES``), which register theirs."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise StageError(f"STREAMSCORE_WORKER__STAGE_MODULES names {module!r}, which cannot be imported: "
                             f"{exc}") from exc


class StageError(ValueError):
    """A stage that cannot be built or placed; the message names the manifest field or setting."""


class StageSpec(BaseModel):
    """A stage a manifest adds to its model's pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    """Registered name (``STAGES``), e.g. ``threshold_decision``."""
    before: str | None = None
    """Name of the stage to run before (one of before/after)."""
    after: str | None = None
    """Name of the stage to run after."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the stage's factory."""


def build_stage(spec: StageSpec, registry: CollectorRegistry | None, model: str) -> Stage:
    factory = STAGES.get(spec.stage)
    if factory is None:
        raise StageError(f"model {model!r}: manifest stage {spec.stage!r} is not registered; known: "
                         f"{sorted(STAGES)} (register yours with register_stage and name its module in "
                         "STREAMSCORE_WORKER__STAGE_MODULES)")
    try:
        return factory(**spec.params, registry=registry, model=model)
    except (TypeError, ValueError) as exc:
        raise StageError(f"model {model!r}: manifest stage {spec.stage!r} params {spec.params}: {exc}") from exc


def place(stages: list[Stage], stage: Stage, before: str | None = None, after: str | None = None) -> list[Stage]:
    """A copy of ``stages`` with ``stage`` inserted before/after the stage of that name (at the end when
    neither is given)."""
    if before is not None and after is not None:
        raise StageError(f"stage {stage.name!r}: give 'before' or 'after', not both")
    names = [existing.name for existing in stages]
    if stage.name in names:
        raise StageError(f"stage {stage.name!r} is already in the pipeline {names}: stage names must be unique")
    anchor = before or after
    if anchor is None:
        return [*stages, stage]
    if anchor not in names:
        raise StageError(f"stage {stage.name!r}: no stage named {anchor!r} to go {'before' if before else 'after'}"
                         f" (the pipeline is {names})")
    index = names.index(anchor) + (1 if after else 0)
    return [*stages[:index], stage, *stages[index:]]
