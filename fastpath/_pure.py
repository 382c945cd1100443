"""Pure-Python twin of the compiled fast path: the reference semantics, and the fallback.

Same API and same results as ``_fast.pyx``; the parity tests hold the two together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from ._types import (
    BAD_ENTITIES,
    BAD_ENTITY,
    BAD_FEATURE,
    BAD_FEATURES,
    BAD_FIELD,
    BAD_ID,
    EMPTY_BATCH,
    MISSING_ENTITY,
    MISSING_FEATURE,
    MISSING_ID,
    NOT_A_MAP,
    TOO_LARGE,
    UNDECODABLE,
    DecodedBatch,
    DecodeError,
    DecodeSpec,
    InputColumn,
    PredictionBatch,
    ViewBlock,
)

_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_MAX_TOPIC_LEN = 249
# Smallest magnitude that rounds to inf in float32: half-way between FLT_MAX and 2**128 (ties go to the even
# 2**128). Checked before the cast because numpy warns on an overflowing cast, and warnings are errors in tests.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103

MAX_NESTING = 64
"""Deepest nesting of maps/arrays a message may have (the top-level container is level 1); deeper is
``undecodable``. msgpack's own limits differ between its C unpacker (1024 levels) and its pure-Python one (the
interpreter's recursion limit), so one explicit rule, far above what a request needs, keeps both twins equal."""


class _Invalid(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float32(value: Any, name: str) -> np.float32:
    if not _is_number(value):
        raise _Invalid(BAD_FEATURE, f"feature {name!r} must be a number, got {type(value).__name__}")
    try:
        as_double = float(value)  # an int is rounded to float64 first, exactly as np.float32(int) does
    except OverflowError:  # an int beyond float64
        as_double = math.inf
    if not abs(as_double) < _FLOAT32_OVERFLOW:  # NaN, inf, or a value that rounds to inf in float32
        raise _Invalid(BAD_FEATURE, f"feature {name!r} must be finite in float32, got {value!r}")
    return np.float32(as_double)


def _read_id(request: dict, spec: DecodeSpec) -> str:
    if "id" not in request:
        raise _Invalid(MISSING_ID, "request has no 'id'")
    request_id = request["id"]
    if not isinstance(request_id, str) or not 0 < len(request_id) <= spec.max_str_len:
        raise _Invalid(BAD_ID, f"'id' must be a non-empty str of at most {spec.max_str_len} characters")
    return request_id


def _read_entities(request: dict, spec: DecodeSpec) -> list[str]:
    entities = request.get("entities", {})
    if not isinstance(entities, dict):
        raise _Invalid(BAD_ENTITIES, f"'entities' must be a map, got {type(entities).__name__}")
    keys = []
    for name in spec.entity_keys:
        if name not in entities:
            raise _Invalid(MISSING_ENTITY, f"entity key {name!r} is missing from 'entities'")
        value = entities[name]
        if isinstance(value, int) and not isinstance(value, bool):
            keys.append(str(value))
        elif isinstance(value, str) and 0 < len(value) <= spec.max_str_len:
            keys.append(value)
        else:
            raise _Invalid(BAD_ENTITY, f"entity key {name!r} must be an int or a non-empty str of at most "
                                       f"{spec.max_str_len} characters")
    return keys


def _read_features(request: dict, spec: DecodeSpec, row: np.ndarray) -> None:
    features = request.get("features", {})
    if not isinstance(features, dict):
        raise _Invalid(BAD_FEATURES, f"'features' must be a map, got {type(features).__name__}")
    column = 0
    for feature in spec.request_features:
        if feature.name not in features:
            if feature.default is None:
                raise _Invalid(MISSING_FEATURE, f"request feature {feature.name!r} is missing and has no default")
            row[column:column + feature.size] = feature.default
        elif feature.size == 1:
            row[column] = _as_float32(features[feature.name], feature.name)
        else:
            values = features[feature.name]
            if not isinstance(values, list) or len(values) != feature.size:
                raise _Invalid(BAD_FEATURE, f"feature {feature.name!r} must be a list of {feature.size} numbers")
            for offset, value in enumerate(values):
                row[column + offset] = _as_float32(value, feature.name)
        column += feature.size


def _read_int(request: dict, name: str) -> int:
    value = request.get(name)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not _INT64_MIN <= value <= _INT64_MAX:
        raise _Invalid(BAD_FIELD, f"{name!r} must be an int64 (epoch milliseconds)")
    return value


def _read_str(request: dict, name: str, spec: DecodeSpec) -> str | None:
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= spec.max_str_len:
        raise _Invalid(BAD_FIELD, f"{name!r} must be a non-empty str of at most {spec.max_str_len} characters")
    return value


def _read_reply_to(request: dict, spec: DecodeSpec) -> str | None:
    topic = _read_str(request, "reply_to", spec)
    if topic is not None and (len(topic) > _MAX_TOPIC_LEN or not _TOPIC_CHARS.issuperset(topic)):
        raise _Invalid(BAD_FIELD, "'reply_to' must be a Kafka topic name: letters, digits, '.', '_', '-'")
    return topic


class _Columns:
    def __init__(self, spec: DecodeSpec, capacity: int) -> None:
        self.spec = spec
        self.ids: list[str] = []
        self.entities: list[list[str]] = [[] for _ in spec.entity_keys]
        self.features = np.zeros((capacity, spec.feature_columns), dtype=np.float32)
        self.deadline_ms: list[int] = []
        self.sent_ms: list[int] = []
        self.reply_to: list[str | None] = []
        self.version: list[str | None] = []
        self.source: list[int] = []
        self.errors: list[DecodeError] = []

    def add(self, request: Any, message_index: int, element_index: int) -> None:
        if not isinstance(request, dict):
            self.errors.append(DecodeError(message_index, element_index, NOT_A_MAP,
                                           f"a request must be a msgpack map, got {type(request).__name__}"))
            return
        request_id = None
        row = np.zeros(self.spec.feature_columns, dtype=np.float32)
        try:
            request_id = _read_id(request, self.spec)
            keys = _read_entities(request, self.spec)
            _read_features(request, self.spec, row)
            deadline, sent = _read_int(request, "deadline_ms"), _read_int(request, "sent_ms")
            reply_to, version = _read_reply_to(request, self.spec), _read_str(request, "version", self.spec)
        except _Invalid as invalid:
            self.errors.append(DecodeError(message_index, element_index, invalid.kind, invalid.detail, request_id))
            return
        self._grow_if_full()
        self.features[len(self.ids)] = row
        self.ids.append(request_id)
        for column, key in zip(self.entities, keys, strict=True):
            column.append(key)
        self.deadline_ms.append(deadline)
        self.sent_ms.append(sent)
        self.reply_to.append(reply_to)
        self.version.append(version)
        self.source.append(message_index)

    def _grow_if_full(self) -> None:
        if len(self.ids) == len(self.features):
            grown = np.zeros((max(16, 2 * len(self.features)), self.spec.feature_columns), dtype=np.float32)
            grown[: len(self.features)] = self.features
            self.features = grown

    def batch(self) -> DecodedBatch:
        return DecodedBatch(
            ids=self.ids,
            entities=self.entities,
            features=self.features[: len(self.ids)].copy(),
            deadline_ms=np.array(self.deadline_ms, dtype=np.int64),
            sent_ms=np.array(self.sent_ms, dtype=np.int64),
            reply_to=self.reply_to,
            version=self.version,
            source=np.array(self.source, dtype=np.int32),
            errors=self.errors,
        )


def _unpack(message: bytes) -> Any:
    return msgpack.unpackb(message, raw=False, strict_map_key=False, use_list=True)


def _too_deep(decoded: Any) -> bool:
    """True when maps/arrays nest deeper than MAX_NESTING levels (walked level by level, no recursion)."""
    level = [decoded] if type(decoded) in (dict, list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_NESTING:
            return True
        children: list = []
        for container in level:
            children.extend(child for child in (container.values() if type(container) is dict else container)
                            if type(child) in (dict, list))
        level = children
    return False


def _check_spec(spec: DecodeSpec) -> None:
    for feature in spec.request_features:
        if feature.size < 0:
            raise ValueError(f"request feature {feature.name!r} has size {feature.size}: a size is at least 0")


def decode_batch(messages: Sequence[bytes], spec: DecodeSpec) -> DecodedBatch:
    """Decode raw request messages (single requests or msgpack arrays of them) into columns.

    A message that msgpack cannot unpack (``unpackb(raw=False, strict_map_key=False)``: truncated, trailing
    bytes, invalid UTF-8, 0xc1, unhashable map key, bad timestamp) or that nests deeper than MAX_NESTING is
    ``undecodable``; map keys repeated in a message keep their last value, as a dict does.
    """
    _check_spec(spec)
    columns = _Columns(spec, capacity=len(messages))
    for message_index, message in enumerate(messages):
        if len(message) > spec.max_message_bytes:
            columns.errors.append(DecodeError(message_index, -1, TOO_LARGE,
                                              f"message of {len(message)} bytes is over the limit of "
                                              f"{spec.max_message_bytes}"))
            continue
        try:
            decoded = _unpack(message)
        except Exception as exc:  # msgpack raises several unrelated classes for bad bytes
            columns.errors.append(DecodeError(message_index, -1, UNDECODABLE,
                                              f"not a valid msgpack message: {type(exc).__name__}"))
            continue
        if _too_deep(decoded):
            columns.errors.append(DecodeError(message_index, -1, UNDECODABLE,
                                              f"not a valid msgpack message: nested deeper than {MAX_NESTING} "
                                              "maps/arrays"))
            continue
        if isinstance(decoded, list):
            _add_array(columns, decoded, message_index, spec)
        else:
            columns.add(decoded, message_index, -1)
    return columns.batch()


def _add_array(columns: _Columns, requests: list, message_index: int, spec: DecodeSpec) -> None:
    if not requests:
        columns.errors.append(DecodeError(message_index, -1, EMPTY_BATCH, "a msgpack array with no request"))
    elif len(requests) > spec.max_requests_per_message:
        columns.errors.append(DecodeError(message_index, -1, TOO_LARGE,
                                          f"{len(requests)} requests in one message, over the limit of "
                                          f"{spec.max_requests_per_message}"))
    else:
        for element_index, request in enumerate(requests):
            columns.add(request, message_index, element_index)


def assemble(
    request_features: np.ndarray, blocks: Sequence[ViewBlock], columns: Sequence[InputColumn]
) -> np.ndarray:
    """Build the float32 (n x inputs) model input in the manifest's column order."""
    rows = len(request_features)
    matrix = np.empty((rows, len(columns)), dtype=np.float32)
    for out_column, source in enumerate(columns):
        if source.from_request:
            matrix[:, out_column] = request_features[:, source.column]
            continue
        block = blocks[source.block]
        for row in range(rows):
            view_row = block.row_of_request[row]
            matrix[row, out_column] = (block.defaults[source.column] if view_row < 0
                                       else block.values[view_row, source.column])
    return matrix


def _output_value(values: np.ndarray, row: int) -> float | list[float]:
    if values.ndim == 1:
        return float(values[row])
    return [float(value) for value in values[row]]


def encode_predictions(batch: PredictionBatch, sent_ms: int) -> list[bytes]:
    """One msgpack map per prediction, keys in the documented order."""
    encoded = []
    for row, request_id in enumerate(batch.ids):
        ok = batch.status[row] == "ok"
        error = batch.errors[row]
        prediction = {
            "id": request_id,
            "model": batch.model,
            "version": batch.version,
            "status": batch.status[row],
            "outputs": {name: _output_value(values, row) for name, values in batch.outputs.items()} if ok else {},
            "error": None if error is None else {"kind": error[0], "message": error[1]},
            "degraded": batch.degraded[row],
            "lineage": {
                **batch.lineage,
                "feature_ts_ms": {view: (int(ts[row]) or None) for view, ts in batch.feature_ts_ms.items()},
            },
            "timings_us": batch.timings_us,
            "received_ms": int(batch.received_ms[row]),
            "sent_ms": sent_ms,
        }
        encoded.append(msgpack.packb(prediction, use_bin_type=True))
    return encoded
