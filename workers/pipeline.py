"""The per-batch pipeline: decode -> features -> assemble -> infer -> encode.

It takes the raw messages of one batch and returns what must be published: one prediction per valid
request (``ok`` or ``expired``, or ``error`` when inference failed) and one dead letter per bad message or
array element. It publishes nothing itself, so the delivery layer decides when offsets may be committed.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamscore import __version__, fastpath
from streamscore.featurestore.store import FeatureStore, FetchedView
from streamscore.streams import topics
from streamscore.streams.clock import now_ms
from streamscore.streams.records import Inbound, Outbound

from .deadletters import DeadLetters
from .runtime import ModelRuntime

log = logging.getLogger(__name__)

UNKNOWN_VERSION = "unknown_version"
BAD_FIELD = "bad_field"
REFUSED_TOPICS = frozenset({".", "..", "__consumer_offsets", "__transaction_state", "__share_group_state",
                            "__cluster_metadata"})
"""Topic names Kafka never takes a write to (invalid, or internal): a reply_to naming one is a bad field,
dead-lettered at once instead of being retried against the broker."""


@dataclass
class BatchOutcome:
    predictions: list[Outbound]
    dead_letters: list[Outbound]
    answered: int
    expired: int
    timings_us: dict[str, int]
    failed: int = 0
    """Predictions with status error (the model failed on the batch)."""


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}"


class _Clock:
    def __init__(self) -> None:
        self.marks: dict[str, int] = {}
        self._last = time.perf_counter_ns()

    def lap(self, stage: str) -> None:
        now = time.perf_counter_ns()
        self.marks[stage] = (now - self._last) // 1000
        self._last = now


class BatchPipeline:
    def __init__(self, model: ModelRuntime, store: FeatureStore, topic_prefix: str,
                 worker_id: str | None = None, reply_to_prefixes: Sequence[str] | None = None) -> None:
        self.model = model
        self.reply_to_prefixes = None if reply_to_prefixes is None else (f"{topic_prefix}.", *reply_to_prefixes)
        self.store = store
        self.prefix = topic_prefix
        self.predictions_topic = topics.predictions(topic_prefix, model.name)
        self.dlq_topic = topics.dead_letters(topic_prefix, model.name)
        self.letters = DeadLetters(model.name, self.dlq_topic)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.code_version = code_version()
        self._batch_seq = itertools.count(1)

    async def process(self, batch: Sequence[Inbound]) -> BatchOutcome:
        clock = _Clock()
        received_ms = now_ms()
        decoded = fastpath.decode_batch([message.value for message in batch], self.model.decode_spec)
        clock.lap("decode")
        dead_letters = [self.letters.rejected(batch[error.message_index], error) for error in decoded.errors]
        keep = self._screen(batch, decoded, dead_letters)
        # an absent deadline decodes as fastpath.NO_DEADLINE; 0 and negative deadlines have passed
        status = np.where(decoded.deadline_ms <= received_ms, "expired", "ok")
        status[~keep] = "skip"
        live = np.flatnonzero(status == "ok")
        all_live = len(live) == len(decoded)
        live_rows = live.tolist()
        fetched = await self.store.fetch(
            [view.name for view in self.model.views],
            [column if all_live else [column[row] for row in live_rows] for column in decoded.entities],
        ) if len(live) else []
        clock.lap("features")
        inputs = fastpath.assemble(decoded.features[live], [view.block for view in fetched],
                                   self.model.columns) if len(live) else None
        clock.lap("assemble")
        outputs, errors = self._infer(inputs, live, len(decoded))
        clock.lap("infer")
        prediction_batch = self._prediction_batch(decoded, status, live, outputs, errors, fetched, received_ms,
                                                  clock.marks)
        encoded = fastpath.encode_predictions(prediction_batch, now_ms())
        clock.lap("encode")
        default_topic, reply_to = self.predictions_topic, decoded.reply_to
        # plain tuples, read as Outbound by the publisher: a few thousand per batch, so no per-message class
        predictions: list[Any] = [
            (reply_to[row] or default_topic, request_id.encode(), value, None)
            for row, request_id, value in zip(prediction_batch.rows, prediction_batch.ids, encoded, strict=True)
        ]
        return BatchOutcome(predictions, dead_letters, answered=len(predictions),
                            expired=int((status == "expired").sum()), timings_us=clock.marks,
                            failed=len(live) if errors is not None else 0)

    def _screen(self, batch: Sequence[Inbound], decoded: fastpath.DecodedBatch,
                dead_letters: list[Outbound]) -> np.ndarray:
        """Rows not to score, dead-lettered: a pinned version other than the one served, or a reply_to that
        names a topic Kafka refuses writes to."""
        keep = np.ones(len(decoded), dtype=bool)
        rows = len(decoded)
        if decoded.version.count(None) == rows and decoded.reply_to.count(None) == rows:
            return keep  # the usual batch: nothing to screen, no Python loop over its requests
        for row, (version, reply_to) in enumerate(zip(decoded.version, decoded.reply_to, strict=True)):
            if version is not None and version != self.model.version:
                kind, detail = UNKNOWN_VERSION, (f"version {version!r} is pinned but this worker serves "
                                                 f"{self.model.name} v{self.model.version}")
            elif reply_to is not None and reply_to in REFUSED_TOPICS:
                kind, detail = BAD_FIELD, f"'reply_to' {reply_to!r} names a topic Kafka takes no writes to"
            elif reply_to is not None and self.reply_to_prefixes and not reply_to.startswith(self.reply_to_prefixes):
                kind, detail = BAD_FIELD, (f"'reply_to' {reply_to!r} is not allowed: it must start with one of "
                                           f"{list(self.reply_to_prefixes)} (STREAMSCORE_WORKER__REPLY_TO_PREFIXES)")
            else:
                continue
            keep[row] = False
            element = int(decoded.element[row])
            span = (int(decoded.span[row, 0]), int(decoded.span[row, 1])) if element >= 0 else None
            error = fastpath.DecodeError(int(decoded.source[row]), element, kind, detail, decoded.ids[row], span)
            dead_letters.append(self.letters.rejected(batch[error.message_index], error))
        return keep

    def _infer(self, inputs: np.ndarray | None, live: np.ndarray, rows: int
               ) -> tuple[dict[str, np.ndarray], tuple[str, str] | None]:
        """Outputs scattered back to batch rows; on failure, the error every live row is answered with."""
        if inputs is None:
            return {}, None
        try:
            scored = self.model.run(inputs)
        except Exception as exc:  # a model failure answers the batch with status error, never loses it
            log.exception("inference failed for a batch of %d requests", len(live))
            return {}, ("inference_failed", f"{type(exc).__name__}: {exc}")
        outputs = {}
        for name, values in scored.items():
            full = np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
            full[live] = values
            outputs[name] = full
        return outputs, None

    def _prediction_batch(self, decoded: fastpath.DecodedBatch, status: np.ndarray, live: np.ndarray,
                          outputs: dict[str, np.ndarray], error: tuple[str, str] | None,
                          fetched: list[FetchedView], received_ms: int, timings: dict[str, int]
                          ) -> _RowsBatch:
        rows = np.flatnonzero(status != "skip")
        row_list = rows.tolist()
        feature_ts = {view.name: np.zeros(len(decoded), dtype=np.int64) for view in self.model.views}
        degraded = self._degraded(decoded, live, fetched, feature_ts)
        row_status = status[rows]
        if error is not None:
            row_status[row_status == "ok"] = "error"
        status_list = row_status.tolist()
        row_errors: list[tuple[str, str] | None] = [None] * len(row_list)
        for position in np.flatnonzero(row_status != "ok").tolist():
            row_errors[position] = self._row_error(decoded, row_list[position], status_list[position], error)
        return _RowsBatch(
            rows=row_list,
            ids=decoded.ids if len(row_list) == len(decoded) else [decoded.ids[row] for row in row_list],
            model=self.model.name,
            version=self.model.version,
            status=status_list,
            outputs={name: values[rows] for name, values in outputs.items()},
            errors=row_errors,
            degraded=[degraded.get(row, []) for row in row_list] if degraded else [[] for _ in row_list],
            lineage={
                "artifact_sha256": self.model.manifest.sha256,
                "code_version": self.code_version,
                "batch_id": f"{self.worker_id}/{next(self._batch_seq)}",
                "worker_id": self.worker_id,
            },
            feature_ts_ms={name: stamps[rows] for name, stamps in feature_ts.items()},
            timings_us=dict(timings),
            received_ms=np.full(len(rows), received_ms, dtype=np.int64),
        )

    def _degraded(self, decoded: fastpath.DecodedBatch, live: np.ndarray, fetched: list[FetchedView],
                  feature_ts: dict[str, np.ndarray]) -> dict[int, list[str]]:
        """Fill each view's feature timestamps; name every defaulted entity per request row."""
        degraded: dict[int, list[str]] = {}
        for fetched_view in fetched:
            name = fetched_view.view.name
            feature_ts[name][live] = fetched_view.event_ts_ms
            column = decoded.entities[self.model.views.index(fetched_view.view)]
            unavailable = set(fetched_view.unavailable_rows)
            for live_row in fetched_view.missing:
                row = int(live[live_row])
                reason = "unavailable" if live_row in unavailable else "missing"
                degraded.setdefault(row, []).append(f"{name}:{reason}:{column[row]}")
        return degraded

    @staticmethod
    def _row_error(decoded: fastpath.DecodedBatch, row: int, state: str,
                   error: tuple[str, str] | None) -> tuple[str, str] | None:
        if state == "expired":
            return ("expired", f"deadline_ms {int(decoded.deadline_ms[row])} passed before the request was scored")
        if state == "error":
            return error
        return None


@dataclass
class _RowsBatch(fastpath.PredictionBatch):
    rows: list[int] = field(default_factory=list)
    """Batch row of each prediction (decoded order)."""
