"""On-demand scoring over HTTP: the Open Inference Protocol (KServe v2 REST) served by the worker.

    GET  /v2                                            server metadata
    GET  /v2/health/live, /v2/health/ready              health (ready: model loaded, Kafka, Cassandra, Redis answer)
    GET  /v2/models/{model}[/versions/{version}]        model metadata (inputs and outputs from the manifest)
    GET  /v2/models/{model}[/versions/{version}]/ready  model readiness
    POST /v2/models/{model}[/versions/{version}]/infer  inference

docs/http.md is the contract: how input tensors map onto a request's entities and features, and the outputs.

One batcher, one pipeline. An inference request's rows are encoded as one request message of the wire format
(a map, or an array of maps for several rows) with ids of the worker's own, and wait in ``HttpRows``, bounded
by ``http.max_waiting_rows``. The model's agent takes them into the next batch it scores: a batch fetched from
Kafka (as many whole requests as fit under ``worker.batch_max``), or one started for them when they have
waited ``http.batch_window_ms`` (an ``HttpFlight`` on the agent's channel, behind the Kafka batches queued
there). Their predictions and dead letters are taken out of the batch's outcome before it is published and
answer the waiting requests instead of going to Kafka; the batch's Kafka messages are published and committed
exactly as without them (HTTP rows have no offsets).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import math
import secrets
import socket
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from aiohttp import web

from streamscore import __version__
from streamscore.fastpath import DecodeSpec
from streamscore.featurestore.cache import FeatureCache
from streamscore.featurestore.cassandra import CassandraStore
from streamscore.featurestore.store import FeatureStore
from streamscore.settings import HttpSettings, Settings
from streamscore.streams.delivery import Flight
from streamscore.streams.records import Inbound, Outbound
from streamscore.streams.watchdog import Watchdog
from streamscore.streams.wire import HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE, HEADER_REQUEST_ID, HEADER_SOURCE

from .pipeline import BatchOutcome
from .stages import ThresholdDecision

if TYPE_CHECKING:
    from .app import ModelScorer
    from .metrics import WorkerMetrics
    from .runtime import ModelRuntime

log = logging.getLogger(__name__)

HTTP_TOPIC = "http"
"""The ``topic`` of an HTTP request's message (its offset is the request's sequence number, unique per worker):
dead letters of HTTP rows name ``http/-1/<seq>`` as their source."""

ID_INPUT = "id"
"""The optional BYTES input tensor that names each row (echoed in the response's ``ids`` parameter)."""

DEADLINE_HEADER = "Streamscore-Deadline-Ms"
"""Request header with the same meaning as the ``deadline_ms`` request parameter (epoch ms)."""

_INT_TYPES = {"INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
              "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
_FLOAT_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
_NUMERIC_TYPES = {**_INT_TYPES, **_FLOAT_TYPES}
_ENTITY_TYPES = ("BYTES", *_INT_TYPES)
_STATUS_OF_KIND = {"unknown_version": 404, "processing_failed": 500}
"""HTTP status of a row dead-lettered with this kind (any other kind: 400)."""


class HttpBindError(RuntimeError):
    """The endpoint cannot listen where the settings say; the message names the setting."""


class ProtocolError(Exception):
    """A request the protocol answers with an error body ``{"error": message}`` and this status."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


# ------------------------------------------------------------------------------------ waiting rows, routing


@dataclass(eq=False)
class Waiting:
    """One inference request's rows, as one request message, until they are answered."""

    message: Inbound
    row_ids: list[bytes]
    """The id of each row's request (UTF-8), in the request's row order."""
    future: asyncio.Future
    """Resolved (with None) once every row has its answer in ``answers``, or ``failure`` says why not."""
    answers: dict[bytes, tuple[str, Any]] = field(default_factory=dict)
    """Row id -> ("prediction", msgpack bytes) or ("dead_letter", (kind, message))."""
    failure: str | None = None


@dataclass
class HttpFlight(Flight):
    """A batch started for HTTP rows that waited their window without a Kafka batch taking them: no records of
    its own, no offsets, never in the delivery's commit order."""


class HttpRows:
    """The HTTP rows of one model waiting for a batch, and the routing of their answers out of its outcome."""

    def __init__(self, settings: HttpSettings, batch_max: int,
                 put: Callable[[Flight], Coroutine[Any, Any, Any]]) -> None:
        self.max_waiting_rows = settings.max_waiting_rows
        self.window_s = settings.batch_window_ms / 1000
        self.batch_max = batch_max
        self.put = put
        self.waiting: deque[Waiting] = deque()
        self.waiting_rows = 0
        self.rows_taken = 0
        self._armed = False
        """An HttpFlight is scheduled or on the agent's channel and not yet handled."""
        self._puts: set[asyncio.Task] = set()

    def offer(self, waiting: Waiting) -> bool:
        """Queue a request's rows; False (nothing queued) when they would go over ``max_waiting_rows``."""
        rows = len(waiting.row_ids)
        if self.waiting_rows + rows > self.max_waiting_rows:
            return False
        self.waiting.append(waiting)
        self.waiting_rows += rows
        self._arm(0.0 if self.waiting_rows >= self.batch_max else self.window_s)
        return True

    def take(self, flight: Flight) -> list[Waiting]:
        """Whole requests for this batch: as many as fit beside a Kafka batch's messages under ``batch_max``; at
        least one for an HttpFlight (a request may have more rows than ``batch_max``)."""
        started_for_http = isinstance(flight, HttpFlight)
        if started_for_http:
            self._armed = False
        room = self.batch_max - len(flight.records)
        taken: list[Waiting] = []
        rows = 0
        while self.waiting:
            head = self.waiting[0]
            size = len(head.row_ids)
            if not head.future.done() and rows + size > room and (taken or not started_for_http):
                break
            self.waiting.popleft()
            self.waiting_rows -= size
            if head.future.done():  # timed out, or the client went away: not scored
                continue
            taken.append(head)
            rows += size
        self.rows_taken += rows
        if self.waiting:
            self._arm(0.0)
        return taken

    def _arm(self, delay: float) -> None:
        if self._armed:
            return
        self._armed = True
        asyncio.get_running_loop().call_later(delay, self._start_batch)

    def _start_batch(self) -> None:
        loop = asyncio.get_running_loop()
        task: asyncio.Task = loop.create_task(self.put(HttpFlight([], {}, loop.create_future())))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    @staticmethod
    def settle(taken: Sequence[Waiting], outcome: BatchOutcome) -> tuple[BatchOutcome, int]:
        """Answer the taken requests from the batch's outcome; the outcome without their messages (what goes to
        Kafka), and how many HTTP rows got a prediction."""
        by_row = {row_id: waiting for waiting in taken for row_id in waiting.row_ids}
        by_source = {waiting.message.source: waiting for waiting in taken}
        predictions: list[Outbound] = []
        answered = 0
        for message in outcome.predictions:
            waiting = by_row.get(message[1])
            if waiting is None:
                predictions.append(message)
            else:
                waiting.answers[message[1]] = ("prediction", message[2])
                answered += 1
        letters: list[Outbound] = []
        for letter in outcome.dead_letters:
            headers = dict(letter[3] or ())
            waiting = by_source.get(headers.get(HEADER_SOURCE, b"").decode(errors="replace"))
            if waiting is None:
                letters.append(letter)
                continue
            reason = (headers.get(HEADER_ERROR_KIND, b"unknown").decode(),
                      headers.get(HEADER_ERROR_MESSAGE, b"").decode(errors="replace"))
            row_id = headers.get(HEADER_REQUEST_ID)
            for row in [row_id] if row_id in waiting.row_ids else waiting.row_ids:
                waiting.answers.setdefault(row, ("dead_letter", reason))
        for waiting in taken:
            if not waiting.future.done():
                waiting.future.set_result(None)
        return dataclasses.replace(outcome, predictions=predictions, dead_letters=letters), answered

    @staticmethod
    def fail(taken: Sequence[Waiting], why: str) -> None:
        for waiting in taken:
            waiting.failure = why
            if not waiting.future.done():
                waiting.future.set_result(None)

    def close(self, why: str) -> None:
        """Answer every waiting request (the worker is stopping)."""
        self.fail(list(self.waiting), why)
        self.waiting.clear()
        self.waiting_rows = 0


# -------------------------------------------------------------------------------------- the request's tensors


@dataclass
class InferRows:
    """An inference request's rows, checked against the model's inputs."""

    count: int
    entity_keys: list[str]
    entities: list[list[str]]
    """One column per join key (``entity_keys``, the decode spec's), ``count`` long."""
    features: list[list[float] | list[list[float]]]
    """One column per request feature of the decode spec (a list per row when its size is > 1); features left
    out that have a default are not in the rows (the decoder fills the default)."""
    feature_names: list[str]
    ids: list[str] | None
    request_id: str | None
    deadline_ms: int | None
    outputs: list[str] | None
    """Output names asked for; None: all."""


def parse_infer(body: bytes, header_length: str | None, spec: DecodeSpec, max_rows: int,
                deadline_header: str | None = None) -> InferRows:
    """The rows of an inference request body (JSON, or JSON followed by binary tensor data when
    ``Inference-Header-Content-Length`` is given), or ProtocolError(400) saying what is wrong."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < length <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {length} does not fit the body of "
                                     f"{len(body)} bytes")
        body, binary = body[:length], body[length:]
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError(400, "the request body must be a JSON object with 'inputs'")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "'id' must be a string")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "'parameters' must be an object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors {name, shape, datatype, data}")
    tensors = _tensors(inputs, binary)
    count, columns = _rows_of(tensors, spec, max_rows)
    entities = [columns.pop(key) for key in spec.entity_keys]
    feature_names = [feature.name for feature in spec.request_features if feature.name in columns]
    features = [columns.pop(name) for name in feature_names]
    return InferRows(count, list(spec.entity_keys), entities, features, feature_names, columns.pop(ID_INPUT, None),
                     request_id, _deadline(parameters, deadline_header), _requested_outputs(request.get("outputs")))


def _tensors(inputs: list[Any], binary: bytes) -> dict[str, tuple[str, list[int], list[Any]]]:
    """name -> (datatype, shape, flat data), the binary tensor data cut out in input order."""
    tensors: dict[str, tuple[str, list[int], list[Any]]] = {}
    offset = 0
    for position, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError(400, f"input {position} must be an object with a string 'name'")
        name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
        if name in tensors:
            raise ProtocolError(400, f"input {name!r} is given twice")
        if not isinstance(datatype, str):
            raise ProtocolError(400, f"input {name!r} has no 'datatype'")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ProtocolError(400, f"input {name!r}: 'shape' must be [N] or [N, size] of non-negative ints, "
                                     f"got {shape!r}")
        size = tensor.get("parameters", {}).get("binary_data_size") if isinstance(tensor.get("parameters"),
                                                                                   dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(400, f"input {name!r}: binary_data_size {size!r} does not fit the "
                                         f"{len(binary) - offset} bytes of binary data left")
            data = _binary_values(name, datatype, binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            data = _flat(tensor["data"])
        else:
            raise ProtocolError(400, f"input {name!r} has no 'data'")
        if len(data) != math.prod(shape):
            raise ProtocolError(400, f"input {name!r}: shape {shape} holds {math.prod(shape)} values, data has "
                                     f"{len(data)}")
        tensors[name] = (datatype, shape, data)
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return tensors


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(value, list) for value in data):
        return data
    flat: list[Any] = []
    for value in data:
        flat.extend(_flat(value))
    return flat


def _binary_values(name: str, datatype: str, raw: bytes) -> list[Any]:
    if datatype in _NUMERIC_TYPES:
        width = np.dtype(_NUMERIC_TYPES[datatype]).itemsize
        if len(raw) % width:
            raise ProtocolError(400, f"input {name!r}: {len(raw)} bytes of {datatype} data is not a whole number "
                                     "of values")
        values: list[Any] = np.frombuffer(raw, dtype=_NUMERIC_TYPES[datatype]).tolist()
        return values
    if datatype != "BYTES":
        raise ProtocolError(400, f"input {name!r}: datatype {datatype} is not one this model takes")
    strings, offset = [], 0
    while offset < len(raw):  # each element: its length as uint32 little-endian, then its bytes
        if offset + 4 > len(raw):
            raise ProtocolError(400, f"input {name!r}: BYTES data ends inside an element's length")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        element = raw[offset + 4:offset + 4 + length]
        if len(element) != length:
            raise ProtocolError(400, f"input {name!r}: BYTES data ends inside an element")
        try:
            strings.append(element.decode())
        except UnicodeDecodeError:
            raise ProtocolError(400, f"input {name!r}: element {len(strings)} is not valid UTF-8") from None
        offset += 4 + length
    return strings


@functools.lru_cache(maxsize=64)
def _layout(spec: DecodeSpec) -> tuple[dict[str, int], frozenset[str], tuple[str, ...]]:
    """Per decode spec: request feature -> size, every input name taken, the inputs that must be given."""
    sizes = {feature.name: feature.size for feature in spec.request_features}
    required = (*spec.entity_keys, *(feature.name for feature in spec.request_features if feature.default is None))
    return sizes, frozenset((*spec.entity_keys, *sizes, ID_INPUT)), required


def _rows_of(tensors: dict[str, tuple[str, list[int], list[Any]]], spec: DecodeSpec, max_rows: int
             ) -> tuple[int, dict[str, Any]]:
    """The row count and one checked column per input."""
    sizes, known, required = _layout(spec)
    unknown = [name for name in tensors if name not in known]
    if unknown:
        raise ProtocolError(400, f"unknown input {unknown[0]!r}: this model takes {_describe_inputs(spec)}")
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ProtocolError(400, f"input {missing[0]!r} is missing: this model takes {_describe_inputs(spec)}")
    counts = {name: shape[0] for name, (_, shape, _) in tensors.items()}
    count = next(iter(counts.values()))
    if any(rows != count for rows in counts.values()):
        raise ProtocolError(400, f"inputs disagree on the batch dimension (shape[0]): {counts}")
    if count < 1 or count > max_rows:
        raise ProtocolError(400, f"a request carries 1 to {max_rows} rows (shape[0]), this one {count} "
                                 "(STREAMSCORE_HTTP__MAX_ROWS_PER_REQUEST)")
    columns: dict[str, Any] = {}
    for name, (datatype, shape, data) in tensors.items():
        width = sizes.get(name, 1)
        if (len(shape) == 2 and shape[1] != 1) if width == 1 else (shape[1:] != [width]):
            wanted = "[N] or [N, 1]" if width == 1 else f"[N, {width}]"
            raise ProtocolError(400, f"input {name!r}: shape {shape} does not fit; it takes {wanted}")
        if name in sizes:
            columns[name] = _feature_column(name, datatype, data, count, width)
        else:
            columns[name] = _string_column(name, datatype, data, spec.max_str_len, entity=name != ID_INPUT)
    return count, columns


def _describe_inputs(spec: DecodeSpec) -> str:
    entities = [f"{key} (BYTES, [N])" for key in spec.entity_keys]
    features = [f"{feature.name} (FP32, {'[N]' if feature.size == 1 else f'[N, {feature.size}]'}"
                f"{', optional' if feature.default is not None else ''})" for feature in spec.request_features]
    return ", ".join([*entities, *features]) + f", and an optional {ID_INPUT} (BYTES, [N])"


def _string_column(name: str, datatype: str, data: list[Any], max_len: int, entity: bool) -> list[str]:
    if datatype == "BYTES" or (entity and datatype in _INT_TYPES):
        wanted: type | tuple[type, ...] = str if datatype == "BYTES" else int
        for position, value in enumerate(data):
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ProtocolError(400, f"input {name!r}: element {position} is {type(value).__name__}, "
                                         f"not {'a string' if wanted is str else 'an int'} ({datatype})")
        column = [str(value) for value in data] if datatype != "BYTES" else data
        for position, value in enumerate(column):
            if not 1 <= len(value) <= max_len:
                raise ProtocolError(400, f"input {name!r}: element {position} has {len(value)} characters; "
                                         f"1 to {max_len} are taken")
        return column
    takes = "BYTES or an integer type" if entity else "BYTES"
    raise ProtocolError(400, f"input {name!r} has datatype {datatype}; it takes {takes}")


_NUMBERS = (int, float)
_SMALL = 256
"""Columns up to this many values are checked and rounded in plain Python (C-level ``array``), larger ones
with numpy: for a few values numpy's per-call cost is the larger."""


def _feature_column(name: str, datatype: str, data: list[Any], count: int, width: int) -> list[Any]:
    if datatype not in _NUMERIC_TYPES:
        raise ProtocolError(400, f"input {name!r} has datatype {datatype}; it takes FP32 (or another numeric "
                                 "type: FP16, FP64, INT8..INT64, UINT8..UINT64)")
    for value in data:  # exactly int or float: a JSON true is a bool, which the wire format refuses too
        if type(value) not in _NUMBERS:
            raise ProtocolError(400, f"input {name!r}: {value!r} is not a number")
    if datatype in _INT_TYPES and any(type(value) is float for value in data):
        raise ProtocolError(400, f"input {name!r}: datatype {datatype} holds integers, the data has fractions")
    try:
        if len(data) <= _SMALL:  # float32 rounding as the decoder's: int -> float64 -> float32
            column: list[Any] = array("f", data).tolist()
            finite = all(map(math.isfinite, column))
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                values = np.asarray(data, dtype=np.float64).astype(np.float32)
            finite, column = bool(np.isfinite(values).all()), values.tolist()
    except OverflowError:
        finite = False
    if not finite:
        raise ProtocolError(400, f"input {name!r}: every value must be finite in float32 (no NaN, no inf, "
                                 "at most about 3.4e38)")
    return column if width == 1 else [column[row * width:(row + 1) * width] for row in range(count)]


def _deadline(parameters: Mapping[str, Any], header: str | None) -> int | None:
    value: Any = parameters.get("deadline_ms")
    if value is None and header is not None:
        try:
            value = int(header)
        except ValueError:
            raise ProtocolError(400, f"{DEADLINE_HEADER} {header!r} is not an integer (epoch ms)") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 1 << 63):
        raise ProtocolError(400, f"parameter deadline_ms must be an integer (epoch ms), got {value!r}")
    return value


def _requested_outputs(outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise ProtocolError(400, "'outputs' must be a list of {name}")
    return [output["name"] for output in outputs]


def encode_rows(rows: InferRows, row_ids: Sequence[str], version: str | None) -> bytes:
    """The rows as one request message of the wire format (a map for one row, an array of maps for more)."""
    requests = []
    for row, row_id in enumerate(row_ids):
        request: dict[str, Any] = {"id": row_id}
        if rows.entities:
            request["entities"] = {key: column[row] for key, column in
                                   zip(rows.entity_keys, rows.entities, strict=True)}
        if rows.features:
            request["features"] = {name: column[row] for name, column in
                                   zip(rows.feature_names, rows.features, strict=True)}
        if rows.deadline_ms is not None:
            request["deadline_ms"] = rows.deadline_ms
        if version is not None:
            request["version"] = version
        requests.append(request)
    return msgpack.packb(requests[0] if len(requests) == 1 else requests, use_bin_type=True)


# ------------------------------------------------------------------------------------------- the response


def answer_of(model: str, rows: InferRows, waiting: Waiting, output_types: Mapping[str, str]
              ) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for a request whose rows were scored: the outputs as tensors, or the error."""
    if waiting.failure is not None:
        return 500, {"error": waiting.failure}
    predictions = []
    for row_id in waiting.row_ids:
        answer = waiting.answers.get(row_id)
        if answer is None:
            return 500, {"error": f"row {row_id.decode()} got no answer from the pipeline"}
        if answer[0] == "dead_letter":
            kind, detail = answer[1]
            return _STATUS_OF_KIND.get(kind, 400), {"error": f"{kind}: {detail}"}
        predictions.append(msgpack.unpackb(answer[1], raw=False))
    for status, code in (("error", 500), ("expired", 504)):
        failed = next((p for p in predictions if p["status"] == status), None)
        if failed is not None:
            error = failed.get("error") or {}
            return code, {"error": f"{error.get('kind', status)}: {error.get('message', '')}"}
    first = predictions[0]
    names = rows.outputs if rows.outputs is not None else list(first["outputs"])
    versions = [p["version"] for p in predictions]
    body: dict[str, Any] = {
        "model_name": model,
        "model_version": ",".join(dict.fromkeys(versions)),
        "outputs": [_output_tensor(name, [p["outputs"][name] for p in predictions], output_types.get(name))
                    for name in names],
        "parameters": {
            "versions": json.dumps(versions),
            "row_ids": json.dumps([row_id.decode() for row_id in waiting.row_ids]),
            "degraded": json.dumps([p["degraded"] for p in predictions]),
            "lineage": json.dumps([p["lineage"] for p in predictions]),
            "timings_us": json.dumps(first["timings_us"]),
            "received_ms": first["received_ms"],
            "sent_ms": first["sent_ms"],
        },
    }
    if rows.request_id is not None:
        body["id"] = rows.request_id
    if rows.ids is not None:
        body["parameters"]["ids"] = json.dumps(rows.ids)
    return 200, body


def _output_tensor(name: str, values: list[Any], datatype: str | None) -> dict[str, Any]:
    shape = [len(values)] if not isinstance(values[0], list) else [len(values), len(values[0])]
    flat = _flat(values)
    if datatype is None:
        sample = flat[0] if flat else 0.0
        datatype = "BYTES" if isinstance(sample, str) else "INT64" if isinstance(sample, int) else "FP64"
    if datatype in _INT_TYPES:
        flat = [int(value) for value in flat]
    return {"name": name, "datatype": datatype, "shape": shape, "data": flat}


def _datatype(values: np.ndarray) -> str:
    kind, size = values.dtype.kind, values.dtype.itemsize
    if kind in "UOS":
        return "BYTES"
    if kind == "b":
        return "BOOL"
    return {"f": "FP", "i": "INT", "u": "UINT"}.get(kind, "FP") + str(8 * size)


# ------------------------------------------------------------------------------------------- health checks


class Health:
    """Whether the worker can answer: the model loaded, and Kafka, Cassandra and Redis answering (each asked
    with a short timeout, at most once a second however often the endpoint is polled)."""

    TIMEOUT_S = 2.0
    FRESH_S = 1.0

    def __init__(self, store: FeatureStore, scorers: Mapping[str, ModelScorer], watchdog: Watchdog | None) -> None:
        self.store = store
        self.scorers = scorers
        self.watchdog = watchdog
        self._checked: tuple[float, dict[str, str]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> dict[str, str]:
        """Part -> ``ok``, or what is wrong with it."""
        async with self._lock:
            if self._checked is not None and time.monotonic() - self._checked[0] < self.FRESH_S:
                return self._checked[1]
            names = ("kafka", "cassandra", "redis")
            results = await asyncio.gather(*(self._ask(name, check) for name, check in
                                             zip(names, (self._kafka, self._cassandra, self._redis), strict=True)))
            checks = {"worker": self._worker(), **dict(zip(names, results, strict=True))}
            self._checked = (time.monotonic(), checks)
            return checks

    def _worker(self) -> str:
        if self.watchdog is not None and self.watchdog.reason is not None:
            return self.watchdog.reason
        delivery = next(iter(self.scorers.values())).delivery
        if delivery is None or delivery.publisher is None:
            return "starting: not connected to Kafka yet"
        return "ok"

    async def _ask(self, name: str, check: Callable[[], Awaitable[str | None]]) -> str:
        try:
            result = await asyncio.wait_for(check(), self.TIMEOUT_S)
        except TimeoutError:
            return f"did not answer within {self.TIMEOUT_S:g} s"
        except Exception as exc:
            return f"did not answer: {type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        return result or "ok"

    async def _kafka(self) -> str | None:
        delivery = next(iter(self.scorers.values())).delivery
        producer = delivery.producer if delivery is not None else None
        if producer is None:
            return "not connected yet"
        await producer.client.fetch_all_metadata()
        return None

    async def _cassandra(self) -> str | None:
        online = self.store.online
        if not isinstance(online, CassandraStore):
            return f"not used (online store: {type(online).__name__})"
        loop = asyncio.get_running_loop()
        answered: asyncio.Future = loop.create_future()

        def resolve(result: Any, failed: bool) -> None:
            if not answered.done():
                (answered.set_exception if failed else answered.set_result)(result)

        response = online.session.execute_async("SELECT release_version FROM system.local")
        response.add_callbacks(lambda rows: loop.call_soon_threadsafe(resolve, rows, False),
                               lambda exc: loop.call_soon_threadsafe(resolve, exc, True))
        await answered
        return None

    async def _redis(self) -> str | None:
        cache = self.store.cache
        if cache is None:
            return "not used (cache: none)"
        if isinstance(cache, FeatureCache):
            await cache.client.ping()
        return None


# ------------------------------------------------------------------------------------------------ the server


def listen(settings: HttpSettings) -> socket.socket:
    """The endpoint's listening socket, opened before the worker starts so a taken port fails at once."""
    assert settings.port is not None
    try:
        family = socket.AF_INET6 if ":" in settings.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.bind, settings.port))
        sock.listen(1024)
    except OSError as exc:
        raise HttpBindError(f"the HTTP endpoint cannot listen on {settings.bind}:{settings.port} ({exc.strerror}): "
                            "set STREAMSCORE_HTTP__PORT (and STREAMSCORE_HTTP__BIND) to a free address") from None
    sock.setblocking(False)
    return sock


class InferenceServer:
    """The Open Inference Protocol endpoints over the worker's model scorers."""

    def __init__(self, settings: Settings, scorers: Mapping[str, ModelScorer], store: FeatureStore,
                 metrics: WorkerMetrics, watchdog: Watchdog | None) -> None:
        self.settings = settings.http
        self.scorers = scorers
        self.metrics = metrics
        self.health = Health(store, scorers, watchdog)
        self._token = secrets.token_hex(6)
        self._sequence = itertools.count(1)
        self._types: dict[tuple[str, str], dict[str, str]] = {}
        self._runner: web.AppRunner | None = None
        self.stopping = False

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[_errors])
        models, versioned = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        for prefix in (models, versioned):
            app.router.add_get(prefix, self.model_metadata)
            app.router.add_get(prefix + "/ready", self.model_ready)
            app.router.add_post(prefix + "/infer", self.infer)
        return app

    async def start(self, sock: socket.socket) -> None:
        self._runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("Open Inference Protocol endpoint at http://%s:%s/v2", *sock.getsockname()[:2])

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for scorer in self.scorers.values():
            if scorer.http is not None:
                scorer.http.close("the worker is stopping")
        if self._runner is not None:
            await self._runner.cleanup()

    # --- health and metadata

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "streamscore", "version": __version__,
                                  "extensions": ["binary_tensor_data"]})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        checks = await self.health.check()
        failing = [f"{part}: {state}" for part, state in checks.items()
                   if state != "ok" and not state.startswith("not used")]
        models = {name: scorer.pipeline.model.version for name, scorer in self.scorers.items()}
        return web.json_response({"ready": not failing, "not_ready": failing, "checks": checks, "models": models},
                                 status=200 if not failing else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        scorer, runtime = self._served(request)
        spec = runtime.decode_spec
        inputs = [{"name": key, "datatype": "BYTES", "shape": [-1]} for key in spec.entity_keys]
        inputs += [{"name": feature.name, "datatype": "FP32", "shape": [-1] if feature.size == 1 else
                    [-1, feature.size]} for feature in spec.request_features]
        outputs = [{"name": name, "datatype": datatype, "shape": shape}
                   for name, (datatype, shape) in self._outputs(scorer, runtime).items()]
        return web.json_response({"name": runtime.name, "versions": sorted(scorer.pipeline.serving.versions),
                                  "platform": "onnxruntime_onnx" if runtime.manifest.runtime == "onnxruntime"
                                  else runtime.manifest.runtime, "inputs": inputs, "outputs": outputs})

    async def model_ready(self, request: web.Request) -> web.Response:
        self._served(request)
        return web.json_response({"name": request.match_info["model"], "ready": True})

    def _served(self, request: web.Request) -> tuple[ModelScorer, ModelRuntime]:
        """The scorer and version a path names: 404 when this worker does not serve them."""
        name = request.match_info["model"]
        scorer = self.scorers.get(name)
        if scorer is None:
            raise ProtocolError(404, f"model {name!r} is not served here (served: {sorted(self.scorers)})")
        version = request.match_info.get("version")
        served = scorer.pipeline.serving.versions
        if version is None:
            return scorer, scorer.pipeline.model
        if version not in served:
            raise ProtocolError(404, f"model {name!r} version {version!r} is not served (served: {sorted(served)})")
        return scorer, served[version]

    def _outputs(self, scorer: ModelScorer, runtime: ModelRuntime) -> dict[str, tuple[str, list[int]]]:
        """Output name -> (datatype, shape): the manifest's outputs as the model gives them (one run on zeros),
        then the outputs of the model's decision stages."""
        probe = runtime.run(np.zeros((1, len(runtime.columns)), dtype=np.float32))
        outputs = {name: (_datatype(values), [-1, *values.shape[1:]]) for name, values in probe.items()}
        for stage in scorer.pipeline.stages:
            if isinstance(stage, ThresholdDecision):
                outputs[stage.output] = ("BYTES", [-1])
        return outputs

    def _output_types(self, scorer: ModelScorer, runtime: ModelRuntime) -> dict[str, str]:
        key = (runtime.name, runtime.manifest.sha256)
        types = self._types.get(key)
        if types is None:
            types = self._types[key] = {name: datatype for name, (datatype, _)
                                               in self._outputs(scorer, runtime).items()}
        return types

    # --- inference

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        name = request.match_info["model"]
        try:
            status, body, headers = await self._infer(request)
        except ProtocolError as exc:
            status, body, headers = exc.status, {"error": str(exc)}, exc.headers
        self.metrics.observe_http(name if name in self.scorers else "", status, time.perf_counter() - started)
        return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                            content_type="application/json", headers=headers)

    async def _infer(self, request: web.Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        scorer, runtime = self._served(request)
        rows_queue = scorer.http
        delivery = scorer.delivery
        if self.stopping or rows_queue is None or delivery is None or delivery.publisher is None:
            raise ProtocolError(503, "the worker is starting or stopping", self._retry_after())
        body = await request.read()
        spec = runtime.decode_spec
        rows = parse_infer(body, request.headers.get("Inference-Header-Content-Length"), spec,
                           self.settings.max_rows_per_request, request.headers.get(DEADLINE_HEADER))
        output_types = self._output_types(scorer, runtime)
        if rows.outputs is not None:
            unknown = [output for output in rows.outputs if output not in output_types]
            if unknown:
                raise ProtocolError(400, f"unknown output {unknown[0]!r}: this model gives {sorted(output_types)}")
        if rows.count > self.settings.max_waiting_rows:
            raise ProtocolError(400, f"{rows.count} rows can never wait at once: at most "
                                     f"{self.settings.max_waiting_rows} (STREAMSCORE_HTTP__MAX_WAITING_ROWS)")
        sequence = next(self._sequence)
        prefix = f"http-{self._token}-{sequence}"
        row_ids = [f"{prefix}.{row}" for row in range(rows.count)]
        pinned = request.match_info.get("version")
        message = Inbound(encode_rows(rows, row_ids, pinned), None, HTTP_TOPIC, -1, sequence)
        waiting = Waiting(message, [row_id.encode() for row_id in row_ids],
                          asyncio.get_running_loop().create_future())
        if not rows_queue.offer(waiting):
            raise ProtocolError(503, f"overloaded: {rows_queue.waiting_rows} rows are waiting for a batch, at most "
                                     f"{self.settings.max_waiting_rows} (STREAMSCORE_HTTP__MAX_WAITING_ROWS); "
                                     "try again later", self._retry_after())
        try:
            await asyncio.wait_for(asyncio.shield(waiting.future), self.settings.timeout_s)
        except TimeoutError:
            waiting.future.cancel()
            raise ProtocolError(504, f"not answered within {self.settings.timeout_s:g} s "
                                     "(STREAMSCORE_HTTP__TIMEOUT_S)") from None
        finally:
            if not waiting.future.done():  # the client went away: its rows are skipped if not taken yet
                waiting.future.cancel()
        status, response = answer_of(runtime.name, rows, waiting, output_types)
        return status, response, {}

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Every error as the protocol's error body ``{"error": "..."}``; nothing a client sends crashes the worker."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": f"{exc.reason}: {request.method} {request.path}"
                                           + (f" ({exc.text})" if exc.text and exc.text != f"{exc.status}: "
                                              f"{exc.reason}" else "")}, status=exc.status)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, status=500)
