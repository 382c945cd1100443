"""Batch scoring: a table of requests in, a table of predictions out, through the worker's own pipeline.

``streamscore score --engine local`` runs it in this process; ``--engine spark`` runs the same ``BatchScorer`` in
each Spark partition (``spark_job.py``). A table of requests (columns: ``id``, the model's entity keys, its
request features, optionally ``deadline_ms`` and ``version``; see README "Batch scoring") is scored in chunks.
Each chunk is encoded as wire-format request records (``streams/wire.py``, one msgpack array message per 4096
rows) and handed to ``BatchPipeline.process`` exactly as a Kafka batch: the pipeline's first stage is the
decoder, and going through it means a row is judged by the same rules as a request on Kafka (a NaN feature, a
missing join key, an over-long id are rejected with the same kind and reason as a dead letter), so no second
reading of the inputs can drift from the first. The encode costs about what the decode does (a few µs a row).

The pipeline is the worker's (``default_stages`` and the manifest's own stages), with one stage added at the end,
``Tabulate``: it turns the answered rows into table rows through ``stages.prediction_batches``, the very
columns ``encode`` turns into msgpack, so a table row carries what a prediction on Kafka carries (outputs,
status, degraded, artifact sha256, feature row timestamps, code version, batch and worker ids). ``encode``
itself runs only when the predictions also go to the predictions topic (``--to-topic``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamscore.fastpath import RequestFeature
from streamscore.featurestore.memory import MemoryStore
from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import FeatureView, load_views
from streamscore.settings import Settings
from streamscore.streams.records import Inbound, Outbound
from streamscore.streams.wire import HEADER_ELEMENT, HEADER_SOURCE, headers_dict, pack_request

from .pipeline import BatchPipeline
from .runtime import ModelRuntime, load_model
from .stages import OK, RowsBatch, ScoringBatch, prediction_batches

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from streamscore.streams.delivery import BatchPublisher

log = logging.getLogger(__name__)

MESSAGE_ROWS = 4096
"""Rows per encoded request message: the wire format's largest batch message."""
REJECTED = "rejected"
"""Status of a row the pipeline dead-lettered (bad input, an unknown pinned version): ``error_kind`` says why."""
OPTIONAL_COLUMNS = {"deadline_ms": "integer", "version": "string"}
"""Request fields a table may carry besides id, entity keys and features."""
LINEAGE_COLUMNS = ("artifact_sha256", "code_version", "batch_id", "worker_id")
ROW = "_row"
"""Position of the row in its input (internal: the output is in input order, the column is dropped)."""


class BatchInputError(ValueError):
    """A requests table that cannot be scored; the message (one line) names the file, the column and the fix."""


class BatchRunError(RuntimeError):
    """A run that failed on the way (a Spark job whose tasks kept failing); the message is one line: what failed."""


# ------------------------------------------------------------------------------------------- the requests


@dataclass(frozen=True)
class RequestColumns:
    """The columns a model's requests table must (and may) have."""

    entity_keys: tuple[str, ...]
    features: tuple[RequestFeature, ...]

    @classmethod
    def of(cls, model: ModelRuntime) -> RequestColumns:
        return cls(model.decode_spec.entity_keys, model.decode_spec.request_features)

    def describe(self) -> str:
        features = [f"{feature.name}{'' if feature.default is None else ' (optional)'}" for feature in self.features]
        return f"id, {', '.join([*self.entity_keys, *features])}; optional: {', '.join(OPTIONAL_COLUMNS)}"


def check_schema(schema: pa.Schema, columns: RequestColumns, source: str) -> None:
    """Refuse a table whose columns cannot make requests of this model, naming the first column at fault."""
    expected = columns.describe()

    def fail(problem: str) -> None:
        raise BatchInputError(f"{source}: {problem} (the model's requests have columns: {expected})")

    names = set(schema.names)
    for name in ("id", *columns.entity_keys, *(f.name for f in columns.features if f.default is None)):
        if name not in names:
            fail(f"column {name!r} is missing")
    kinds = {"id": ("string",), **{key: ("string", "integer") for key in columns.entity_keys},
             **{name: (kind,) for name, kind in OPTIONAL_COLUMNS.items()}}
    for name, allowed in kinds.items():
        if name in names and _kind(schema.field(name).type) not in allowed:
            fail(f"column {name!r} is {schema.field(name).type}, not {' or '.join(allowed)}")
    for feature in columns.features:
        if feature.name not in names:
            continue
        kind = schema.field(feature.name).type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        numbers = _kind(kind.value_type if is_list else kind) in ("number", "integer")
        if feature.size == 1 and not numbers:
            fail(f"column {feature.name!r} is {kind}, not a number")
        if feature.size > 1 and not (is_list and numbers):
            fail(f"column {feature.name!r} is {kind}, not a list of {feature.size} numbers")


def _kind(arrow_type: pa.DataType) -> str:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_integer(arrow_type):
        return "integer" if not pa.types.is_boolean(arrow_type) else "bool"
    if pa.types.is_floating(arrow_type):
        return "number"
    return str(arrow_type)


def encode_requests(table: pa.Table, columns: RequestColumns, first_row: int, source: str) -> list[Inbound]:
    """The rows as wire-format requests: one msgpack array message per ``MESSAGE_ROWS`` rows, each an Inbound
    whose ``offset`` is the position of its first row in the input (so a dead letter's source names the row).
    A null value is left out of its request, so the decoder treats it as a request without it (a feature's
    default, or the missing field's dead letter)."""
    count = table.num_rows
    ids = table.column("id").to_pylist()
    keys = columns.entity_keys
    entity_rows = _row_maps(table, keys, count)
    names = [feature.name for feature in columns.features if feature.name in table.column_names]
    feature_rows = _row_maps(table, names, count, numbers=True)
    optional = {name: table.column(name).to_pylist() for name in OPTIONAL_COLUMNS if name in table.column_names}
    requests: list[dict[str, Any]] = [{"id": request_id, "entities": entities, "features": features}
                                      for request_id, entities, features in zip(ids, entity_rows, feature_rows,
                                                                                strict=True)]
    for name, values in optional.items():
        for request, value in zip(requests, values, strict=True):
            if value is not None:
                request[name] = value
    return [Inbound(pack_request(requests[start:start + MESSAGE_ROWS]), None, source, 0, first_row + start)
            for start in range(0, count, MESSAGE_ROWS)]


def _row_maps(table: pa.Table, names: Sequence[str], count: int, numbers: bool = False) -> list[dict[str, Any]]:
    """One {name: value} dict per row, nulls left out (a column without nulls costs one zip per row)."""
    values = []
    for name in names:
        column = table.column(name)
        if numbers and pa.types.is_integer(column.type):
            column = column.cast(pa.float64())  # the wire format reads ints as numbers anyway; keeps msgpack small
        values.append(column.to_pylist())
    if not names:
        return [{} for _ in range(count)]
    rows = [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
    for name, column_values in zip(names, values, strict=True):
        if table.column(name).null_count:
            for row, value in zip(rows, column_values, strict=True):
                if value is None:
                    del row[name]
    return rows


# ------------------------------------------------------------------------------------------ the predictions


class Tabulate:
    """The last stage of a batch pipeline: the batch's answered rows (the columns ``encode`` encodes) and its dead
    letters as one table, kept by the position of the batch's first row until ``BatchScorer`` takes it."""

    name = "tabulate"

    def __init__(self, pipeline: BatchPipeline, schema: pa.Schema | None = None) -> None:
        self.pipeline = pipeline
        self.schema = schema
        self.tables: dict[int, pa.Table] = {}

    async def __call__(self, batch: ScoringBatch) -> None:
        lineage = batch.context.get("lineage") or self.pipeline.lineage()
        offsets = np.array([message.offset for message in batch.messages], dtype=np.int64)
        parts = [_answered(batch, runtime.name, rows_batch, offsets)
                 for runtime, rows_batch in prediction_batches(batch, lineage)]
        parts.append(_rejected(batch.model.name, batch.dead_letters, lineage))
        table = _concat(parts, self.schema)
        self.tables[int(offsets[0]) if len(offsets) else 0] = table


def _answered(batch: ScoringBatch, model: str, rows_batch: RowsBatch, offsets: np.ndarray) -> dict[str, Any]:
    decoded = batch.decoded
    assert decoded is not None
    rows = np.asarray(rows_batch.rows, dtype=np.intp)
    count = len(rows)
    not_ok = np.asarray(rows_batch.status) != OK
    columns: dict[str, Any] = {
        ROW: pa.array(offsets[decoded.source[rows]] + np.maximum(decoded.element[rows], 0), pa.int64()),
        "id": pa.array(rows_batch.ids, pa.string()),
        "model": pa.array([model] * count, pa.string()),
        "version": pa.array([rows_batch.version] * count, pa.string()),
        "status": pa.array(rows_batch.status, pa.string()),
    }
    for name, values in rows_batch.outputs.items():
        columns[f"out:{name}"] = _output_array(values, not_ok)
    errors = rows_batch.errors
    columns["error_kind"] = pa.array([None if error is None else error[0] for error in errors], pa.string())
    columns["error_message"] = pa.array([None if error is None else error[1] for error in errors], pa.string())
    columns["degraded"] = pa.array(rows_batch.degraded, pa.list_(pa.string()))
    for name in LINEAGE_COLUMNS:
        columns[name] = pa.array([str(rows_batch.lineage[name])] * count, pa.string())
    for view, stamps in rows_batch.feature_ts_ms.items():
        columns[f"feature_ts_ms_{view}"] = pa.array(stamps, pa.int64(), mask=stamps == 0)
    return columns


def _output_array(values: np.ndarray, not_ok: np.ndarray) -> pa.Array:
    """An output column: null where the row was not scored; a 2-d output as a list per row."""
    if values.ndim == 1:
        return pa.array(values if values.dtype.kind != "U" else values.tolist(), mask=not_ok)
    count, width = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    offsets = pa.array(np.arange(0, count * width + 1, width, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, flat)
    return pa.array([None if bad else row for bad, row in zip(not_ok.tolist(), lists.to_pylist(), strict=True)],
                    lists.type) if not_ok.any() else lists


def _rejected(model: str, dead_letters: Sequence[Outbound], lineage: Mapping[str, object]) -> dict[str, Any]:
    """One table row per dead letter: its row in the input (from its source offset and element index)."""
    from .deadletters import kind_of

    rows, ids, kinds, reasons = [], [], [], []
    for letter in dead_letters:
        headers = headers_dict(letter[3])
        first_row = int(headers[HEADER_SOURCE].rsplit("/", 1)[1])
        rows.append(first_row + max(int(headers.get(HEADER_ELEMENT, "-1")), 0))
        ids.append(headers.get("streamscore-request-id"))
        kinds.append(kind_of(letter))
        reasons.append(headers.get("streamscore-error-message"))
    count = len(rows)
    return {ROW: pa.array(rows, pa.int64()), "id": pa.array(ids, pa.string()),
            "model": pa.array([model] * count, pa.string()), "status": pa.array([REJECTED] * count, pa.string()),
            "error_kind": pa.array(kinds, pa.string()), "error_message": pa.array(reasons, pa.string()),
            "degraded": pa.array([[]] * count, pa.list_(pa.string())),
            **{name: pa.array([str(lineage[name])] * count, pa.string())
               for name in ("code_version", "batch_id", "worker_id")}}


def _concat(parts: list[dict[str, Any]], schema: pa.Schema | None) -> pa.Table:
    """The parts as one table of ``schema`` (columns a part lacks are null); without a schema, the first part's
    columns (the schema probe)."""
    if schema is None:
        return pa.table(parts[0])
    tables = []
    for part in parts:
        count = len(part[ROW])
        arrays = []
        for schema_field in schema:
            array = part.get(schema_field.name)
            arrays.append(pa.nulls(count, schema_field.type) if array is None else array.cast(schema_field.type))
        tables.append(pa.Table.from_arrays(arrays, schema=schema))
    return pa.concat_tables(tables)


def output_schema(table: pa.Table) -> pa.Schema:
    """The table's schema, every field nullable, output columns named by the output (``out:`` dropped)."""
    return pa.schema([pa.field(name, table.schema.field(name).type, nullable=True) for name in table.column_names])


def public(table: pa.Table) -> pa.Table:
    """The predictions as written: without the internal row position, output columns by their own name."""
    kept = [name for name in table.column_names if name != ROW]
    return table.select(kept).rename_columns([name.removeprefix("out:") for name in kept])


# ------------------------------------------------------------------------------------------------ the scorer


class BatchScorer:
    """One model's batch pipeline: the worker's stages plus ``Tabulate``, a feature store, and (with
    ``to_topic``) a publisher to the predictions topic. Use from one event loop."""

    def __init__(self, settings: Settings, model: ModelRuntime, views: Mapping[str, FeatureView],
                 worker_id: str, to_topic: bool = False, store: FeatureStore | None = None) -> None:
        self.settings = settings
        self.model = model
        self.columns = RequestColumns.of(model)
        self.store = store if store is not None else FeatureStore(settings, views)
        self.pipeline = BatchPipeline(model, self.store, settings.topic_prefix, worker_id,
                                      settings.worker.reply_to_prefixes)
        if not to_topic:  # nobody reads the msgpack of a table row
            self.pipeline.stages = [stage for stage in self.pipeline.stages if stage.name != "encode"]
        self.pipeline.add_from_manifest(None)
        self.tabulate = Tabulate(self.pipeline)
        self.pipeline.add(self.tabulate)
        self.to_topic = to_topic
        self._producer: AIOKafkaProducer | None = None
        self._publisher: BatchPublisher | None = None

    @classmethod
    def probe_schema(cls, settings: Settings, model: ModelRuntime, views: Mapping[str, FeatureView]) -> pa.Schema:
        """The output table's schema, from one request with default values scored by this same pipeline over an
        empty in-memory store (no I/O): the outputs a model's own stages add are known only once they ran."""
        store = FeatureStore(settings, views, use_cache=False, online=MemoryStore(views))
        store.connect()
        scorer = cls(settings, model, views, "schema-probe", store=store)
        probe = {"id": "probe", "entities": dict.fromkeys(scorer.columns.entity_keys, "probe"),
                 "features": {f.name: (f.default or 0.0) if f.size == 1 else [f.default or 0.0] * f.size
                              for f in scorer.columns.features}}
        message = Inbound(pack_request([probe]), None, "probe", 0, 0)
        asyncio.run(scorer.pipeline.process([message]))
        table = scorer.tabulate.tables.pop(0)
        if table.column("status")[0].as_py() != OK:
            raise BatchInputError(f"{model.name} v{model.version}: a request of default values was not scored "
                                  f"({table.column('error_kind')[0]}): cannot tell the output columns")
        return output_schema(table)

    async def start(self, schema: pa.Schema) -> None:
        self.tabulate.schema = schema
        self.store.connect()
        if self.to_topic:
            from aiokafka import AIOKafkaProducer

            from streamscore.streams.delivery import BatchPublisher
            from streamscore.streams.kafka import client_kwargs

            self._producer = AIOKafkaProducer(**client_kwargs(self.settings.kafka), acks="all", linger_ms=5)
            await self._producer.start()
            self._publisher = BatchPublisher(self._producer)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await self.store.close()

    async def score(self, table: pa.Table, first_row: int, source: str) -> pa.Table:
        """Score a table of requests (rows ``first_row``.. of ``source``): one pipeline batch per chunk of
        ``settings.batch.chunk_rows`` rows; the predictions table in input order, with the ``_row`` column."""
        chunk_rows = self.settings.batch.chunk_rows
        results = []
        for start in range(0, table.num_rows, chunk_rows):
            chunk = table.slice(start, chunk_rows)
            messages = encode_requests(chunk, self.columns, first_row + start, source)
            outcome = await self.pipeline.process(messages)
            if self._publisher is not None:
                acked = await self._publisher.publish([*outcome.predictions, *outcome.dead_letters])
                await acked
            results.append(self.tabulate.tables.pop(first_row + start))
        if not results:
            return self.tabulate.schema.empty_table() if self.tabulate.schema is not None else pa.table({})
        return pa.concat_tables(results).sort_by(ROW)


# --------------------------------------------------------------------------------------------- the summary


@dataclass
class Summary:
    """What one run did; written as JSON beside the output and printed."""

    engine: str
    model: str
    version: str
    input: str
    output: str
    rows: int = 0
    """Rows of the input."""
    answered: int = 0
    """Rows with a prediction (any status: ok, expired, error)."""
    ok: int = 0
    expired: int = 0
    errored: int = 0
    rejected: int = 0
    """Rows dead-lettered by the pipeline (bad input, unknown pinned version): in the output with their reason."""
    degraded: int = 0
    """Answered rows that used a default or a stale value (their ``degraded`` list is not empty)."""
    output_rows: int = 0
    lost: int = 0
    """Input rows without an output row: any is a failed run."""
    duration_s: float = 0.0
    rows_per_s: float = 0.0
    started_at: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def count(self, status_counts: Mapping[str, int], degraded: int) -> None:
        self.ok = int(status_counts.get(OK, 0))
        self.expired = int(status_counts.get("expired", 0))
        self.errored = int(status_counts.get("error", 0))
        self.rejected = int(status_counts.get(REJECTED, 0))
        self.answered = self.ok + self.expired + self.errored
        self.output_rows = int(sum(status_counts.values()))
        self.degraded = int(degraded)
        self.lost = self.rows - self.output_rows

    def finish(self, started: float) -> None:
        self.duration_s = round(time.monotonic() - started, 3)
        self.rows_per_s = round(self.rows / self.duration_s, 1) if self.duration_s > 0 else 0.0

    def line(self) -> str:
        return json.dumps(asdict(self))

    def write(self) -> Path:
        path = summary_path(Path(self.output))
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def summary_path(output: Path) -> Path:
    """``predictions.parquet`` -> ``predictions.summary.json`` beside it."""
    return output.with_name(output.name.removesuffix(".parquet") + ".summary.json")


def status_counts(table: pa.Table) -> tuple[dict[str, int], int]:
    """(rows by status, rows whose degraded list is not empty)."""
    counts = table.column("status").value_counts().to_pylist()
    degraded = pa.compute.sum(pa.compute.greater(pa.compute.list_value_length(table.column("degraded")), 0)).as_py()
    return {entry["values"]: entry["counts"] for entry in counts}, int(degraded or 0)


# ------------------------------------------------------------------------------------------ the local engine


def prepare(settings: Settings, model_name: str, version: str | None) -> tuple[ModelRuntime, dict[str, FeatureView]]:
    """The views and the model version to score with: ``version``, else the one workers serve (the deployment's
    production version, or the library's newest)."""
    from .app import wanted_version

    views = load_views(settings.views_file)
    if version is None:
        version = asyncio.run(wanted_version(settings, model_name))
    return load_model(settings.models_dir, model_name, views, settings.worker, version), views


def open_requests(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise BatchInputError(f"{path}: no such file (--input names a parquet file of requests)")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BatchInputError(f"{path}: not a parquet file ({exc})") from exc


def run_local(settings: Settings, model_name: str, input_path: Path, output_path: Path,
              version: str | None = None, to_topic: bool = False) -> Summary:
    """Score a parquet file of requests into a parquet file of predictions (in input order), in this process."""
    started = time.monotonic()
    requests = open_requests(input_path)
    model, views = prepare(settings, model_name, version)
    columns = RequestColumns.of(model)
    check_schema(requests.schema_arrow, columns, str(input_path))
    schema = BatchScorer.probe_schema(settings, model, views)
    summary = Summary("local", model.name, model.version, str(input_path), str(output_path),
                      rows=requests.metadata.num_rows, started_at=utc_now())
    counts: dict[str, int] = {}
    degraded = 0
    output_path.parent.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        nonlocal degraded
        scorer = BatchScorer(settings, model, views, f"batch:{host_id()}", to_topic)
        await scorer.start(schema)
        writer = pq.ParquetWriter(output_path, public(schema.empty_table()).schema)
        try:
            first_row = 0
            for record_batch in requests.iter_batches(batch_size=settings.batch.chunk_rows * 4):
                scored = await scorer.score(pa.Table.from_batches([record_batch]), first_row, input_path.name)
                first_row += record_batch.num_rows
                writer.write_table(public(scored))
                chunk_counts, chunk_degraded = status_counts(scored)
                for status, number in chunk_counts.items():
                    counts[status] = counts.get(status, 0) + number
                degraded += chunk_degraded
        finally:
            writer.close()
            await scorer.close()

    asyncio.run(run())
    summary.count(counts, degraded)
    summary.finish(started)
    return summary


def host_id() -> str:
    """``host:pid``, the worker id part of a batch run's lineage."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
