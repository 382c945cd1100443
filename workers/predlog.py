"""The prediction log: a sampled share of the predictions, each with the exact model input it was scored on.

The ``prediction_log`` stage (last in every worker's pipeline unless ``STREAMSCORE_PREDICTION_LOG__ENABLED`` is
false) picks the rows to log and hands them to a background writer; nothing on the hot path waits for Cassandra:

- a stable share of the requests (``STREAMSCORE_PREDICTION_LOG__SHARE``, default 0.01), by a hash of the request
  id: FNV-1a (32-bit) over the id's code points (its UTF-8 bytes for an ASCII id), logged when the hash is below
  ``share * 2**32``. Vectorized over the batch (numpy), so a replayed or re-sent request is logged again;
- every request carrying ``debug: true``. The decoder does not read that key (unknown keys are ignored): the
  stage searches the batch's raw bytes for the msgpack key ``debug`` once, and unpacks only the requests it
  occurs in, so a batch without it costs one bytes search.

For each logged row: request id, model, version, the assembled float32 vector with each column's name and source
(``request``, ``view:<view>`` with the view row's event time, ``default:<view>`` when the entity had no row), the
outputs, the lineage of the prediction, when. Table (in the ``cassandra`` keyspace, written ``USING TTL``
``STREAMSCORE_PREDICTION_LOG__TTL_S``)::

    CREATE TABLE prediction_log (
        id text, model text, version text, logged_ms bigint, received_ms bigint, debug boolean,
        entities map<text, text>, input_names list<text>, input_values list<float>, input_sources list<text>,
        feature_ts map<text, bigint>, outputs text, lineage map<text, text>,
        PRIMARY KEY ((id), model))

``input_values`` is CQL ``float`` (32-bit): the vector the model saw, bit for bit. ``outputs`` is JSON.
``streamscore explain ID`` prints a logged row; ``streamscore replay ID`` scores its vector again with the
artifact its lineage names (``replay`` below).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamscore.featurestore.cassandra import connect
from streamscore.featurestore.replication import create_keyspace_cql
from streamscore.settings import Settings, get_settings
from streamscore.streams.clock import now_ms

from .library import MANIFEST, Manifest, ModelError, read_manifest, verified_artifact
from .stages import OK, ScoringBatch, register_stage

if TYPE_CHECKING:
    from collections.abc import Mapping

    from prometheus_client import CollectorRegistry

    from streamscore.fastpath import DecodedBatch
    from streamscore.featurestore.views import FeatureView

    from .pipeline import BatchPipeline

log = logging.getLogger(__name__)

STAGE = "prediction_log"
COLUMNS = ("id", "model", "version", "logged_ms", "received_ms", "debug", "entities", "input_names",
           "input_values", "input_sources", "feature_ts", "outputs", "lineage")
DEBUG_TAIL = b"debug\xc3"
"""How the entry ``debug: true`` ends in msgpack, whichever str header its key has (fixstr, or str8 by encoders
that never use fixstr): a map's value follows its key, so requests sending ``debug: false`` are not candidates."""
REPLAY_TOLERANCE = 1e-6

_SMALL_BATCH = 12
"""Up to this many ids, ``sample_mask`` hashes them one by one (the two ways cross at about 16 ids)."""
_FNV_OFFSET = np.uint32(2166136261)
_FNV_PRIME = np.uint32(16777619)


# ------------------------------------------------------------------------------------------ picking rows


def sample_mask(ids: Sequence[str], share: float) -> np.ndarray:
    """Which ids fall in the logged share: FNV-1a-32 of the id's code points below ``share * 2**32``."""
    count = len(ids)
    if share <= 0.0 or count == 0:
        return np.zeros(count, dtype=bool)
    if share >= 1.0:
        return np.ones(count, dtype=bool)
    if count <= _SMALL_BATCH:  # a few ids: a Python loop beats the numpy steps' fixed cost (66 us for one id)
        limit = int(share * (1 << 32))
        return np.fromiter((fnv1a(request_id) < limit for request_id in ids), dtype=bool, count=count)
    codes = np.array(ids, dtype=str)
    width = codes.dtype.itemsize // 4
    points = np.ascontiguousarray(codes.view(np.uint32).reshape(count, width).T)  # one row per character position
    lengths = np.char.str_len(codes)
    hashes = np.full(count, _FNV_OFFSET, dtype=np.uint32)
    mixed = np.empty_like(hashes)
    for column in range(width):  # one numpy step per character position, not per id
        np.bitwise_xor(hashes, points[column], out=mixed)
        np.multiply(mixed, _FNV_PRIME, out=mixed)
        np.copyto(hashes, mixed, where=column < lengths)
    return hashes.astype(np.uint64) < np.uint64(int(share * (1 << 32)))


def fnv1a(request_id: str) -> int:
    """The hash ``sample_mask`` uses, for one id (documentation and tests)."""
    value, prime = 2166136261, 16777619  # _FNV_OFFSET, _FNV_PRIME as Python ints
    for char in request_id:
        value = ((value ^ ord(char)) * prime) & 0xFFFFFFFF
    return value


def flagged_rows(values: Sequence[bytes | None], decoded: DecodedBatch) -> np.ndarray:
    """Decoded rows whose request carries ``debug: true``, from the batch's raw message values. The joined bytes
    are searched once, vectorized (numpy), for ``debug`` followed by msgpack's true; only the requests it occurs
    in are unpacked (bytes that merely look like it, inside a str, are unpacked to see)."""
    try:
        blob = b"".join(values)  # type: ignore[arg-type]
    except TypeError:  # a tombstone (None) or a value that is not bytes: it decoded to no row anyway
        values = [value if isinstance(value, bytes) else b"" for value in values]
        blob = b"".join(values)  # type: ignore[arg-type]
    if not len(decoded):
        return np.zeros(0, dtype=np.intp)
    raw = np.frombuffer(blob, dtype=np.uint8)
    hits = np.flatnonzero(raw == DEBUG_TAIL[-1])  # msgpack's true: rare outside booleans
    for back, byte in enumerate(reversed(DEBUG_TAIL[:-1]), 1):
        hits = hits[hits >= back]
        hits = hits[raw[hits - back] == byte]
        if not len(hits):
            return np.zeros(0, dtype=np.intp)
    lengths = np.fromiter(map(len, values), np.int64, len(values))  # type: ignore[arg-type]
    message_starts = np.concatenate(([0], np.cumsum(lengths)))
    starts = message_starts[decoded.source] + decoded.span[:, 0]
    ends = message_starts[decoded.source] + decoded.span[:, 1]
    rows = np.searchsorted(starts, hits, side="right") - 1
    inside = (rows >= 0) & (hits < ends[np.maximum(rows, 0)])
    candidates = np.unique(rows[inside])
    flagged = [row for row in candidates.tolist() if _debug_set(blob[int(starts[row]):int(ends[row])])]
    return np.asarray(flagged, dtype=np.intp)


def _debug_set(raw: bytes) -> bool:
    import msgpack

    try:
        request = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # what the decoder skips unread (e.g. a map used as a key) msgpack may refuse: not flagged
        return False
    return isinstance(request, dict) and request.get("debug") is True


def column_names(manifest: Manifest) -> list[str]:
    """One name per model input column: the input's name, ``name[i]`` for the columns of a list feature."""
    names: list[str] = []
    for spec in manifest.inputs:
        names.extend([spec.name] if spec.size == 1 else [f"{spec.name}[{i}]" for i in range(spec.size)])
    return names


# --------------------------------------------------------------------------------------- the writer


class LogWriter:
    """Writes logged rows to Cassandra from a thread of its own. ``offer`` never blocks: a full queue drops the
    rows offered (counted, and logged at most every 10 s)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.log_settings = settings.prediction_log
        self._queue: queue.Queue[list[tuple] | None] = queue.Queue(maxsize=self.log_settings.queue_batches)
        self.queued = self.dropped = self.written = self.failed = 0
        self._last_drop_log = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.counter = None
        if registry is not None:
            from prometheus_client import Counter

            self.counter = Counter("streamscore_prediction_log_rows", "Prediction-log rows by outcome (queued, "
                                   "dropped: the writer's queue was full, written, failed)", ["model", "outcome"],
                                   registry=registry)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def offer(self, model: str, rows: list[tuple]) -> bool:
        """Queue rows for writing; False (and the rows counted as dropped) when the queue is full."""
        self.start()
        try:
            self._queue.put_nowait(rows)
        except queue.Full:
            self._count(model, "dropped", len(rows))
            now = time.monotonic()
            if now - self._last_drop_log >= 10.0:
                self._last_drop_log = now
                log.warning("prediction log: writer queue full (%d batches, STREAMSCORE_PREDICTION_LOG__QUEUE_"
                            "BATCHES): dropped %d row(s) of %s, %d dropped so far", self.log_settings.queue_batches,
                            len(rows), model, self.dropped)
            return False
        self._count(model, "queued", len(rows))
        return True

    def _count(self, model: str, outcome: str, rows: int) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + rows)
        if self.counter is not None:
            self.counter.labels(model, outcome).inc(rows)

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued within ``timeout_s`` (a sample: a shutdown does not wait longer for it) and
        disconnect; the thread is a daemon, so a Cassandra that does not answer never holds the exit up."""
        self._closing = True
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):  # a writer stuck on Cassandra: its queue is lost with it
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("prediction log: %d batch(es) still queued at shutdown are not written", self._queue.qsize())

    def _run(self) -> None:
        session, insert, cluster = None, None, None
        while True:
            rows = self._queue.get()
            if rows is None:
                break
            while session is None:
                try:
                    cluster, session = connect(self.settings.cassandra)
                    ensure_table(session, self.settings)
                    insert = session.prepare(f"INSERT INTO {table_of(self.settings)} ({', '.join(COLUMNS)}) "
                                             f"VALUES ({', '.join('?' for _ in COLUMNS)}) USING TTL ?")
                except Exception as exc:
                    if cluster is not None:
                        cluster.shutdown()
                    session = cluster = None
                    log.error("prediction log: cannot reach its Cassandra table (%s); retrying in 2 s", exc)
                    if self._closing:
                        break
                    time.sleep(2.0)
            if session is None:
                self._count(str(rows[0][1]) if rows else "", "failed", len(rows))
                continue
            self._write(session, insert, rows)
        if cluster is not None:
            cluster.shutdown()

    def _write(self, session: Any, insert: Any, rows: list[tuple]) -> None:
        from cassandra.concurrent import execute_concurrent_with_args

        ttl = self.log_settings.ttl_s
        results = execute_concurrent_with_args(session, insert, [(*row, ttl) for row in rows],
                                               concurrency=self.log_settings.write_concurrency,
                                               raise_on_first_error=False)
        for row, (success, result) in zip(rows, results, strict=True):
            self._count(row[1], "written" if success else "failed", 1)
            if not success:
                log.warning("prediction log: writing %s failed: %r", row[0], result)


def table_of(settings: Settings) -> str:
    return f"{settings.cassandra.keyspace}.{settings.prediction_log.table}"


def ensure_table(session: Any, settings: Settings) -> None:
    """Create the table (and the keyspace) only where missing: a worker whose role may only SELECT and MODIFY
    (the schema made by ``streamscore features init``) runs no DDL at all."""
    cassandra = settings.cassandra
    keyspace = session.cluster.metadata.keyspaces.get(cassandra.keyspace)
    if keyspace is not None and settings.prediction_log.table in keyspace.tables:
        return
    if keyspace is None:
        session.execute(create_keyspace_cql(cassandra))
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {table_of(settings)} (id text, model text, version text, logged_ms bigint, "
        "received_ms bigint, debug boolean, entities map<text, text>, input_names list<text>, "
        "input_values list<float>, input_sources list<text>, feature_ts map<text, bigint>, outputs text, "
        "lineage map<text, text>, PRIMARY KEY ((id), model))")


_WRITERS: dict[tuple, LogWriter] = {}


def shared_writer(settings: Settings, registry: CollectorRegistry | None = None) -> LogWriter:
    """One writer per Cassandra table in a process (every model of a worker shares it)."""
    key = (tuple(settings.cassandra.hosts), settings.cassandra.port, table_of(settings))
    if key not in _WRITERS:
        _WRITERS[key] = LogWriter(settings, registry)
    return _WRITERS[key]


def close_writers(timeout_s: float = 2.0) -> None:
    for writer in list(_WRITERS.values()):
        writer.close(timeout_s)
    _WRITERS.clear()


# ---------------------------------------------------------------------------------------------- the stage


@register_stage(STAGE)
class PredictionLog:
    """Hands the rows to log (sampled by id, or flagged ``debug: true``) to the writer, after ``encode`` so it
    records the outputs of every stage and the prediction's own lineage (batch id included)."""

    name = STAGE

    def __init__(self, share: float | None = None, writer: LogWriter | None = None,
                 registry: CollectorRegistry | None = None, model: str = "") -> None:
        self.writer = writer if writer is not None else shared_writer(get_settings(), registry)
        self.share = self.writer.log_settings.share if share is None else float(share)
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"prediction_log share must be within 0..1, got {self.share}")

    async def __call__(self, batch: ScoringBatch) -> None:
        decoded, scored = batch.decoded, batch.scored_rows
        if decoded is None or batch.inputs is None or not len(scored):
            return
        wanted = sample_mask(decoded.ids, self.share)
        values = batch.context.get("values")
        flagged = flagged_rows(values if values is not None else [m.value for m in batch.messages], decoded)
        debug = np.zeros(len(decoded), dtype=bool)
        debug[flagged] = True
        positions = np.flatnonzero((wanted | debug)[scored] & (batch.status[scored] == OK))
        if len(positions):
            self.writer.offer(batch.model.name, log_rows(batch, positions, debug))


def log_rows(batch: ScoringBatch, positions: np.ndarray, debug: np.ndarray) -> list[tuple]:
    """One row of the table (``COLUMNS`` order) per position of ``scored_rows``: each field taken out of its
    array for all the rows at once, then zipped into rows."""
    decoded = batch.decoded
    assert decoded is not None and batch.inputs is not None
    lineage = {key: str(value) for key, value in batch.context.get("lineage", {}).items()}
    rows = batch.scored_rows[positions]
    row_list = rows.tolist()
    count = len(row_list)
    models = batch.routed or [batch.model]
    route = batch.route[rows].tolist() if batch.route is not None else [0] * count
    names = column_names(batch.model.manifest)
    keys = batch.model.decode_spec.entity_keys
    entity_columns = [[column[row] for row in row_list] for column in decoded.entities]
    output_columns = {name: values[rows].tolist() for name, values in batch.outputs.items()}
    views = [fetched.view.name for fetched in batch.fetched]
    stamp_columns = [fetched.event_ts_ms[positions].tolist() for fetched in batch.fetched]
    logged_ms, received_ms = now_ms(), batch.received_ms
    return [
        (decoded.ids[row], models[version].name, models[version].version, logged_ms, received_ms,
         bool(debug[row]), dict(zip(keys, entities, strict=True)), names, values, sources,
         dict(zip(views, stamps, strict=True)), json.dumps(dict(zip(output_columns, outputs, strict=True))),
         {**lineage, "artifact_sha256": models[version].manifest.sha256})
        for row, version, values, sources, entities, stamps, outputs in zip(
            row_list, route, batch.inputs[positions].tolist(), _sources(batch, positions),
            zip(*entity_columns, strict=True) if keys else [()] * count,
            zip(*stamp_columns, strict=True) if views else [()] * count,
            zip(*output_columns.values(), strict=True) if output_columns else [()] * count, strict=True)
    ]


def _sources(batch: ScoringBatch, positions: np.ndarray) -> list[list[str]]:
    """Per row, each column's source: ``request``, ``view:<view>`` or ``default:<view>`` (entity without a row)."""
    columns: list[list[str]] = []
    for column in batch.model.columns:
        if column.from_request:
            columns.append(["request"] * len(positions))
            continue
        fetched = batch.fetched[column.block]
        found = fetched.block.row_of_request[positions] >= 0
        columns.append(np.where(found, f"view:{fetched.view.name}", f"default:{fetched.view.name}").tolist())
    return [list(sources) for sources in zip(*columns, strict=True)] if columns else [[] for _ in positions]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if hasattr(value, "item") else value


def attach(pipeline: BatchPipeline, settings: Settings, registry: CollectorRegistry | None) -> None:
    """Place the prediction log last in a worker's pipeline (unless turned off, or the manifest placed it)."""
    if not settings.prediction_log.enabled or STAGE in pipeline.stage_names:
        return
    pipeline.add(PredictionLog(writer=shared_writer(settings, registry)))


# ------------------------------------------------------------------------------------ reading, replaying


class LogError(RuntimeError):
    """A logged prediction that cannot be read or replayed; the message says why."""


@dataclass
class LoggedPrediction:
    id: str
    model: str
    version: str
    logged_ms: int
    received_ms: int
    debug: bool
    entities: dict[str, str]
    input_names: list[str]
    input_values: list[float]
    input_sources: list[str]
    feature_ts: dict[str, int]
    outputs: dict[str, Any]
    lineage: dict[str, str]

    def source_of(self, index: int) -> str:
        """``request``, ``view <v> (row event time ...)`` or ``default of <v> (entity ... has no row)``."""
        kind, _, view = self.input_sources[index].partition(":")
        if kind == "view":
            stamp = self.feature_ts.get(view, 0)
            return f"view {view}, row event time {_iso(stamp)} ({stamp})"
        if kind == "default":
            return f"default of view {view} (no row for its entity)"
        return kind


def _iso(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def read_logged(settings: Settings, request_id: str, model: str | None = None) -> list[LoggedPrediction]:
    """The logged predictions of a request id (one per model that logged it); [] when none was logged."""
    from cassandra import InvalidRequest

    cluster, session = connect(settings.cassandra)
    try:
        query = f"SELECT {', '.join(COLUMNS)} FROM {table_of(settings)} WHERE id = %s"
        params: tuple = (request_id,)
        if model is not None:
            query, params = query + " AND model = %s", (request_id, model)
        try:
            found = list(session.execute(query, params))
        except InvalidRequest as exc:
            if "unconfigured table" in str(exc) or "does not exist" in str(exc):
                return []
            raise LogError(f"reading {table_of(settings)} failed: {exc}") from exc
    finally:
        cluster.shutdown()
    return [_logged(row) for row in found]


def _logged(row: Sequence[Any]) -> LoggedPrediction:
    values = dict(zip(COLUMNS, row, strict=True))
    return LoggedPrediction(
        id=values["id"], model=values["model"], version=values["version"], logged_ms=values["logged_ms"] or 0,
        received_ms=values["received_ms"] or 0, debug=bool(values["debug"]), entities=dict(values["entities"] or {}),
        input_names=list(values["input_names"] or []), input_values=list(values["input_values"] or []),
        input_sources=list(values["input_sources"] or []), feature_ts=dict(values["feature_ts"] or {}),
        outputs=json.loads(values["outputs"] or "{}"), lineage=dict(values["lineage"] or {}))


def not_logged_message(settings: Settings, request_id: str, model: str | None) -> str:
    share = settings.prediction_log.share
    where = f" by model {model!r}" if model else ""
    return (f"request {request_id!r} was not logged{where} in {table_of(settings)}: the log keeps a share of "
            f"{share:g} of the requests (STREAMSCORE_PREDICTION_LOG__SHARE), picked by a hash of the id, plus every "
            f"request sent with \"debug\": true, for {settings.prediction_log.ttl_s} s (TTL); send it again with "
            "\"debug\": true to log it")


@dataclass
class Replayed:
    output: str
    logged: Any
    replayed: Any
    difference: float | None
    """|logged - replayed| of a numeric output; None for a label (compared for equality)."""

    @property
    def same(self) -> bool:
        if self.difference is None:
            return bool(self.logged == self.replayed)
        return self.difference <= REPLAY_TOLERANCE


def replay(settings: Settings, logged: LoggedPrediction, views: Mapping[str, FeatureView]) -> list[Replayed]:
    """Score the logged vector again with the artifact its lineage names (model, version, sha256) on the
    runtime its manifest names; ``LogError`` when that artifact is gone or is not the one that scored it."""
    from .runtime import runtime_for

    folder = Path(settings.models_dir) / logged.model / logged.version
    wanted = logged.lineage.get("artifact_sha256", "")
    if not (folder / MANIFEST).is_file():
        raise LogError(f"cannot replay {logged.id!r}: the artifact is gone: {logged.model} v{logged.version} is no "
                       f"longer in the library ({folder} has no {MANIFEST}); it had sha256 {wanted}")
    try:
        manifest = read_manifest(folder)
        if manifest.sha256 != wanted:
            raise LogError(f"cannot replay {logged.id!r}: {logged.model} v{logged.version} in the library is another "
                           f"artifact (sha256 {manifest.sha256}) than the one that scored it (sha256 {wanted})")
        artifact = verified_artifact(folder, manifest)
        runtime = runtime_for(manifest, folder).load(manifest, artifact, views, settings.worker)
    except ModelError as exc:
        raise LogError(f"cannot replay {logged.id!r}: {exc}") from exc
    if len(logged.input_values) != len(runtime.columns):
        raise LogError(f"cannot replay {logged.id!r}: {len(logged.input_values)} values logged, but "
                       f"{logged.model} v{logged.version} reads {len(runtime.columns)} columns")
    scored = runtime.run(np.asarray([logged.input_values], dtype=np.float32))
    results = []
    for name, values in scored.items():
        now = _plain(values[0])
        before = logged.outputs.get(name)
        numeric = isinstance(now, float) or (isinstance(before, float) and isinstance(now, int | float))
        difference = abs(float(before) - float(now)) if numeric and isinstance(before, int | float) else None
        if numeric and difference is None:
            difference = float("inf")
        results.append(Replayed(name, before, now, difference))
    return results
