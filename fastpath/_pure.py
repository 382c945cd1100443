"""Pure-Python twin of the compiled fast path: the reference semantics, and the fallback.

Same API and same results as ``_fast.pyx``; the parity tests hold the two together.

How a message is read (the contract of docs/wire-format.md, "Limits of the decoder"):

1. ``None`` is ``null_value`` (a Kafka tombstone); a value that is not bytes-like is ``undecodable``; no byte is
   ``empty_value``; more than ``max_message_bytes`` is ``too_large``.
2. Framing: the bytes must be exactly one complete msgpack object (``_frame``): every header and length inside
   the message, no reserved byte 0xc1, nothing after the object. Otherwise ``undecodable``, whole message. This
   walk keeps one counter of the objects still owed and no stack, so no nesting depth is too deep.
3. The requests are then read field by field. Only what the spec names is read (``id``, ``entities`` and the
   spec's join keys in it, ``features`` and the spec's features in it, ``deadline_ms``, ``sent_ms``, ``reply_to``,
   ``version``); every other value is skipped unread, whatever it holds (any depth, invalid UTF-8, any ext type,
   a map or array as a map key). A map key that is not a str (or not valid UTF-8) names no field. A str that is
   read must be valid UTF-8, or its field is in error.

Most messages take a quicker road to the same result: ``msgpack.unpackb`` (or an ``Unpacker`` for a batch
message, which also gives each element's byte offsets) builds the whole object when msgpack accepts it, and the
request checks run on the dicts. msgpack accepts a strict subset of what the rules above accept (it also checks
UTF-8, ext types and hashable keys everywhere, and stops at 1024 levels), and on that subset both roads give the
same result; anything msgpack refuses takes the byte walker (``_walk_message``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from streamscore.streams.topics import is_topic_name

from ._types import (
    BAD_ENTITIES,
    BAD_ENTITY,
    BAD_FEATURE,
    BAD_FEATURES,
    BAD_FIELD,
    BAD_ID,
    EMPTY_BATCH,
    EMPTY_VALUE,
    MISSING_ENTITY,
    MISSING_FEATURE,
    MISSING_ID,
    NO_DEADLINE,
    NOT_A_MAP,
    NULL_VALUE,
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
# Smallest magnitude that rounds to inf in float32: half-way between FLT_MAX and 2**128 (ties go to the even
# 2**128). Checked before the cast because numpy warns on an overflowing cast, and warnings are errors in tests.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_FIELDS = frozenset({"id", "entities", "features", "deadline_ms", "sent_ms", "reply_to", "version"})

NULL_DETAIL = "the message value is null (a Kafka tombstone); a request must be a msgpack map or array"
EMPTY_DETAIL = "the message value is empty (0 bytes); a request must be a msgpack map or array"
TRUNCATED_DETAIL = "not a valid msgpack message: truncated (it ends inside an object)"


class _Invalid(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class _InvalidText:
    """A msgpack str whose bytes are not valid UTF-8 (only the byte walker meets one: msgpack refuses them)."""

    __slots__ = ()


_INVALID_TEXT = _InvalidText()
# Stand-ins for values that are only ever judged by their type: their content is skipped, never built.
_SOME_EXT = msgpack.ExtType(0, b"")
_SOME_TIMESTAMP = msgpack.Timestamp(0, 0)


def _type_name(value: Any) -> str:
    return "str" if value is _INVALID_TEXT else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float32(value: Any, name: str) -> np.float32:
    if not _is_number(value):
        raise _Invalid(BAD_FEATURE, f"feature {name!r} must be a number, got {_type_name(value)}")
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
    if request_id is _INVALID_TEXT:
        raise _Invalid(BAD_ID, "'id' is not valid UTF-8")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= spec.max_str_len:
        raise _Invalid(BAD_ID, f"'id' must be a non-empty str of at most {spec.max_str_len} characters")
    return request_id


def _read_entities(request: dict, spec: DecodeSpec) -> list[str]:
    entities = request.get("entities", {})
    if not isinstance(entities, dict):
        raise _Invalid(BAD_ENTITIES, f"'entities' must be a map, got {_type_name(entities)}")
    keys = []
    for name in spec.entity_keys:
        if name not in entities:
            raise _Invalid(MISSING_ENTITY, f"entity key {name!r} is missing from 'entities'")
        value = entities[name]
        if isinstance(value, int) and not isinstance(value, bool):
            keys.append(str(value))
        elif isinstance(value, str) and 0 < len(value) <= spec.max_str_len:
            keys.append(value)
        elif value is _INVALID_TEXT:
            raise _Invalid(BAD_ENTITY, f"entity key {name!r} is not valid UTF-8")
        else:
            raise _Invalid(BAD_ENTITY, f"entity key {name!r} must be an int or a non-empty str of at most "
                                       f"{spec.max_str_len} characters")
    return keys


def _read_features(request: dict, spec: DecodeSpec, row: np.ndarray) -> None:
    features = request.get("features", {})
    if not isinstance(features, dict):
        raise _Invalid(BAD_FEATURES, f"'features' must be a map, got {_type_name(features)}")
    column = 0
    for feature in spec.request_features:
        if feature.name not in features:
            if feature.default is None:
                raise _Invalid(MISSING_FEATURE, f"request feature {feature.name!r} is missing and has no default")
            row[column:column + feature.size] = feature.default
        elif feature.size == 1:
            value = features[feature.name]
            if isinstance(value, list):  # a one-element list stands for its number
                if len(value) != 1:
                    raise _Invalid(BAD_FEATURE, f"feature {feature.name!r} must be a number or a list of one "
                                                f"number, got a list of {len(value)}")
                value = value[0]
            row[column] = _as_float32(value, feature.name)
        else:
            values = features[feature.name]
            if not isinstance(values, list) or len(values) != feature.size:
                raise _Invalid(BAD_FEATURE, f"feature {feature.name!r} must be a list of {feature.size} numbers")
            for offset, value in enumerate(values):
                row[column + offset] = _as_float32(value, feature.name)
        column += feature.size


def _read_int(request: dict, name: str, absent: int) -> int:
    value = request.get(name)
    if value is None:
        return absent
    if not isinstance(value, int) or isinstance(value, bool) or not _INT64_MIN <= value <= _INT64_MAX:
        raise _Invalid(BAD_FIELD, f"{name!r} must be an int64 (epoch milliseconds)")
    return value


def _read_str(request: dict, name: str, spec: DecodeSpec) -> str | None:
    value = request.get(name)
    if value is None:
        return None
    if value is _INVALID_TEXT:
        raise _Invalid(BAD_FIELD, f"{name!r} is not valid UTF-8")
    if not isinstance(value, str) or not 0 < len(value) <= spec.max_str_len:
        raise _Invalid(BAD_FIELD, f"{name!r} must be a non-empty str of at most {spec.max_str_len} characters")
    return value


def _read_reply_to(request: dict, spec: DecodeSpec) -> str | None:
    topic = _read_str(request, "reply_to", spec)
    if topic is not None and not is_topic_name(topic):
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
        self.element: list[int] = []
        self.span: list[tuple[int, int]] = []
        self.errors: list[DecodeError] = []

    def error(self, message_index: int, kind: str, detail: str) -> None:
        """An error of the whole message."""
        self.errors.append(DecodeError(message_index, -1, kind, detail))

    def add(self, request: Any, message_index: int, element_index: int, span: tuple[int, int]) -> None:
        """One request (a single-map message: element_index -1) or one element of a batch message."""
        at = span if element_index >= 0 else None
        if not isinstance(request, dict):
            self.errors.append(DecodeError(message_index, element_index, NOT_A_MAP,
                                           f"a request must be a msgpack map, got {_type_name(request)}", None, at))
            return
        request_id = None
        row = np.zeros(self.spec.feature_columns, dtype=np.float32)
        try:
            request_id = _read_id(request, self.spec)
            keys = _read_entities(request, self.spec)
            _read_features(request, self.spec, row)
            deadline, sent = _read_int(request, "deadline_ms", NO_DEADLINE), _read_int(request, "sent_ms", 0)
            reply_to, version = _read_reply_to(request, self.spec), _read_str(request, "version", self.spec)
        except _Invalid as invalid:
            self.errors.append(DecodeError(message_index, element_index, invalid.kind, invalid.detail, request_id,
                                           at))
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
        self.element.append(element_index)
        self.span.append(span)

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
            element=np.array(self.element, dtype=np.int32),
            span=np.array(self.span, dtype=np.int64).reshape(len(self.span), 2),
        )


# ------------------------------------------------------------------------------------------------------------
# The byte walker: framing, skipping and reading without msgpack (any depth)
# ------------------------------------------------------------------------------------------------------------

# What each first byte is, as (form, a, b):
#   _FIXED: the object is ``a`` bytes in all and opens ``b`` more objects (fixmap/fixarray; 0 for the rest);
#   _SIZED: a payload of the length in the ``a`` bytes after the head, after ``b`` more header bytes (ext type);
#   _COUNTED: a container of the count in the ``a`` bytes after the head, each counted entry ``b`` objects;
#   _RESERVED: 0xc1.
_FIXED, _SIZED, _COUNTED, _RESERVED = range(4)


def _head_table() -> tuple[tuple[int, int, int], ...]:
    table: list[tuple[int, int, int]] = []
    for head in range(256):
        if head <= 0x7F or head >= 0xE0 or head in (0xC0, 0xC2, 0xC3):
            table.append((_FIXED, 1, 0))  # fixint, nil, bool
        elif head <= 0x8F:
            table.append((_FIXED, 1, 2 * (head & 0x0F)))  # fixmap
        elif head <= 0x9F:
            table.append((_FIXED, 1, head & 0x0F))  # fixarray
        elif head <= 0xBF:
            table.append((_FIXED, 1 + (head & 0x1F), 0))  # fixstr
        elif head == 0xC1:
            table.append((_RESERVED, 0, 0))
        elif head <= 0xC6:
            table.append((_SIZED, 1 << (head - 0xC4), 0))  # bin 8/16/32
        elif head <= 0xC9:
            table.append((_SIZED, 1 << (head - 0xC7), 1))  # ext 8/16/32: then the type byte
        elif head <= 0xD3:
            table.append((_FIXED, {0xCA: 5, 0xCB: 9}.get(head, 1 + (1 << (head & 3))), 0))  # float, (u)int 8..64
        elif head <= 0xD8:
            table.append((_FIXED, 2 + (1 << (head - 0xD4)), 0))  # fixext 1..16
        elif head <= 0xDB:
            table.append((_SIZED, 1 << (head - 0xD9), 0))  # str 8/16/32
        else:
            table.append((_COUNTED, 2 if head in (0xDC, 0xDE) else 4, 1 if head <= 0xDD else 2))  # array, map
    return tuple(table)


_HEADS = _head_table()


def _frame(data: bytes) -> str | None:
    """None when ``data`` is exactly one complete msgpack object, else why not (the first problem met reading
    front to back). Counts the objects still owed; no stack, so any depth is fine."""
    size, pos, owed = len(data), 0, 1
    heads = _HEADS
    while owed:
        if pos >= size:
            return TRUNCATED_DETAIL
        form, a, b = heads[data[pos]]
        owed -= 1
        if form == _FIXED:
            pos += a
            owed += b
        elif form == _RESERVED:
            return f"not a valid msgpack message: the reserved byte 0xc1 at offset {pos}"
        elif pos + 1 + a > size:
            return TRUNCATED_DETAIL
        elif form == _SIZED:
            pos += 1 + a + b + int.from_bytes(data[pos + 1:pos + 1 + a], "big")
        else:
            owed += b * int.from_bytes(data[pos + 1:pos + 1 + a], "big")
            pos += 1 + a
        if pos > size:
            return TRUNCATED_DETAIL
    if pos != size:
        return f"not a valid msgpack message: {size - pos} trailing byte(s) after the object"
    return None


def _skip(data: bytes, pos: int) -> int:
    """Offset just past the object at ``pos`` of a framed message, without building it (one counter, no stack)."""
    owed = 1
    heads = _HEADS
    while owed:
        form, a, b = heads[data[pos]]
        owed -= 1
        if form == _FIXED:
            pos += a
            owed += b
        elif form == _SIZED:
            pos += 1 + a + b + int.from_bytes(data[pos + 1:pos + 1 + a], "big")
        else:
            owed += b * int.from_bytes(data[pos + 1:pos + 1 + a], "big")
            pos += 1 + a
    return pos


def _container(data: bytes, pos: int) -> tuple[int, int, int]:
    """(1 array / 2 map / 0 other, entries, offset of the first entry) of the object at ``pos``."""
    head = data[pos]
    if 0x80 <= head <= 0x9F:
        return (2 if head <= 0x8F else 1), head & 0x0F, pos + 1
    if 0xDC <= head <= 0xDF:
        width = 2 if head in (0xDC, 0xDE) else 4
        return (1 if head <= 0xDD else 2), int.from_bytes(data[pos + 1:pos + 1 + width], "big"), pos + 1 + width
    return 0, 0, pos


_INT_FORMATS = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
                0xCA: ">f", 0xCB: ">d"}


def _scalar(data: bytes, pos: int) -> tuple[Any, int]:
    """The value at ``pos`` as msgpack would give it, where a check only looks at scalars: a map or array is an
    empty stand-in (its content skipped), an ext a stand-in of its type, a str of invalid UTF-8 _INVALID_TEXT."""
    head = data[pos]
    if head <= 0x7F:
        return head, pos + 1
    if head >= 0xE0:
        return head - 0x100, pos + 1
    if head <= 0x9F or 0xDC <= head <= 0xDF:
        return ({} if head <= 0x8F or head >= 0xDE else []), _skip(data, pos)
    if head <= 0xBF or 0xD9 <= head <= 0xDB:
        width = 0 if head <= 0xBF else 1 << (head - 0xD9)
        length = head & 0x1F if head <= 0xBF else int.from_bytes(data[pos + 1:pos + 1 + width], "big")
        start = pos + 1 + width
        try:
            return data[start:start + length].decode("utf-8"), start + length
        except UnicodeDecodeError:
            return _INVALID_TEXT, start + length
    if head == 0xC0:
        return None, pos + 1
    if head in (0xC2, 0xC3):
        return head == 0xC3, pos + 1
    if head in _INT_FORMATS:
        fmt = _INT_FORMATS[head]
        return struct.unpack_from(fmt, data, pos + 1)[0], pos + 1 + struct.calcsize(fmt)
    end = _skip(data, pos)  # bin, ext, fixext
    if 0xC4 <= head <= 0xC6:
        width = 1 << (head - 0xC4)
        return data[pos + 1 + width:end], end
    type_byte = data[pos + 1] if head >= 0xD4 else data[pos + 1 + (1 << (head - 0xC7))]
    return (_SOME_TIMESTAMP if type_byte == 0xFF else _SOME_EXT), end


def _key(data: bytes, pos: int) -> tuple[str | None, int]:
    """A map key: its str, or None when it is not a valid UTF-8 str (such a key names nothing)."""
    head = data[pos]
    if 0xA0 <= head <= 0xBF or 0xD9 <= head <= 0xDB:
        key, end = _scalar(data, pos)
        return (key if isinstance(key, str) else None), end
    return None, _skip(data, pos)


def _walk_map(data: bytes, pos: int, wanted: Any, read: Any) -> tuple[Any, int]:
    """The map at ``pos`` as a dict of the ``wanted`` str keys only (each value by ``read``; the last of a
    repeated key wins), or the object's stand-in when it is not a map."""
    kind, entries, at = _container(data, pos)
    if kind != 2:
        return _scalar(data, pos)
    found: dict[str, Any] = {}
    for _ in range(entries):
        key, at = _key(data, at)
        if key is not None and key in wanted:
            found[key], at = read(data, at)
        else:
            at = _skip(data, at)
    return found, at


def _numbers(data: bytes, pos: int) -> tuple[Any, int]:
    """A feature's value: an array as a list of its scalars, anything else as a scalar."""
    kind, entries, start = _container(data, pos)
    if kind != 1:
        return _scalar(data, pos)
    values = []
    for _ in range(entries):
        value, start = _scalar(data, start)
        values.append(value)
    return values, start


class _Walker:
    """Reads requests out of a framed message, building only what the request checks look at."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.entity_keys = frozenset(spec.entity_keys)
        self.feature_names = frozenset(feature.name for feature in spec.request_features)

    def request(self, data: bytes, pos: int) -> tuple[Any, int]:
        """The object at ``pos`` and the offset past it: a map as a dict of its request fields (the last of a
        repeated key wins), anything else as its stand-in."""
        kind, entries, at = _container(data, pos)
        if kind != 2:
            return _scalar(data, pos)
        found: dict[str, Any] = {}
        for _ in range(entries):
            key, at = _key(data, at)
            if key == "entities":
                found[key], at = _walk_map(data, at, self.entity_keys, _scalar)
            elif key == "features":
                found[key], at = _walk_map(data, at, self.feature_names, _numbers)
            elif key in _FIELDS:
                found[key], at = _scalar(data, at)
            else:
                at = _skip(data, at)
        return found, at


# ------------------------------------------------------------------------------------------------------------
# decode_batch
# ------------------------------------------------------------------------------------------------------------

_ARRAY_HEADS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_Elements = list[tuple[Any, int, tuple[int, int]]]
"""(the request object, its index in a batch message or -1, its byte span) per request of one message."""


def _quick(data: bytes, spec: DecodeSpec) -> tuple[str, str] | _Elements | None:
    """The message read by msgpack, or None when msgpack refuses it (the byte walker then decides)."""
    try:
        if data[0] not in _ARRAY_HEADS:
            return [(msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True), -1, (0, len(data)))]
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True, max_buffer_size=len(data))
        unpacker.feed(data)
        count = unpacker.read_array_header()
        if count == 0 or count > spec.max_requests_per_message:
            for _ in range(count):
                unpacker.skip()
            return _batch_error(count, spec) if unpacker.tell() == len(data) else None
        elements: _Elements = []
        start = unpacker.tell()
        for index in range(count):
            request = unpacker.unpack()
            end = unpacker.tell()
            elements.append((request, index, (start, end)))
            start = end
        return elements if start == len(data) else None
    except Exception:  # msgpack raises several unrelated classes for what it refuses
        return None


def _batch_error(count: int, spec: DecodeSpec) -> tuple[str, str]:
    if count == 0:
        return EMPTY_BATCH, "a msgpack array with no request"
    return TOO_LARGE, f"{count} requests in one message, over the limit of {spec.max_requests_per_message}"


def _walk_message(data: bytes, spec: DecodeSpec, walker: _Walker) -> tuple[str, str] | _Elements:
    """The message read by the byte walker: the rules themselves, at any depth."""
    problem = _frame(data)
    if problem is not None:
        return UNDECODABLE, problem
    kind, count, pos = _container(data, 0)
    if kind != 1:
        return [(walker.request(data, 0)[0], -1, (0, len(data)))]
    if count == 0 or count > spec.max_requests_per_message:
        return _batch_error(count, spec)
    elements: _Elements = []
    for index in range(count):
        request, end = walker.request(data, pos)
        elements.append((request, index, (pos, end)))
        pos = end
    return elements


def _message_bytes(message: Any) -> bytes | tuple[str, str]:
    """The bytes of one message value, or the (kind, detail) of a value that has none to decode."""
    if type(message) is bytes:
        return message
    if message is None:
        return NULL_VALUE, NULL_DETAIL
    try:
        return bytes(memoryview(message))
    except Exception:  # not bytes-like (TypeError), a released memoryview (ValueError), a failing exporter
        return UNDECODABLE, f"not a valid msgpack message: a message value must be bytes, got {type(message).__name__}"


def _check_spec(spec: DecodeSpec) -> None:
    for feature in spec.request_features:
        if feature.size < 0:
            raise ValueError(f"request feature {feature.name!r} has size {feature.size}: a size is at least 0")


def decode_batch(messages: Sequence[bytes | None], spec: DecodeSpec) -> DecodedBatch:
    """Decode raw request messages (single requests or msgpack arrays of them) into columns.

    Never raises for a message: each bad message (or bad element of a batch message) becomes one DecodeError.
    The rules are in this module's docstring and in docs/wire-format.md ("Limits of the decoder").
    """
    _check_spec(spec)
    columns = _Columns(spec, capacity=len(messages))
    walker: _Walker | None = None
    for message_index, message in enumerate(messages):
        data = _message_bytes(message)
        if isinstance(data, tuple):
            columns.error(message_index, *data)
            continue
        if not data:
            columns.error(message_index, EMPTY_VALUE, EMPTY_DETAIL)
            continue
        if len(data) > spec.max_message_bytes:
            columns.error(message_index, TOO_LARGE, f"message of {len(data)} bytes is over the limit of "
                                                    f"{spec.max_message_bytes}")
            continue
        outcome = _quick(data, spec)
        if outcome is None:
            walker = walker or _Walker(spec)
            outcome = _walk_message(data, spec, walker)
        if isinstance(outcome, tuple):
            columns.error(message_index, *outcome)
            continue
        for request, element_index, span in outcome:
            columns.add(request, message_index, element_index, span)
    return columns.batch()


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


def _output_value(values: np.ndarray, row: int) -> float | str | list[float] | list[str]:
    """A number (or list of numbers) per row; strings for a label output (numpy str or object arrays)."""
    convert: Any = str if values.dtype.kind in "UO" else float
    if values.ndim == 1:
        return convert(values[row])
    return [convert(value) for value in values[row]]


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
