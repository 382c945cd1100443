"""Shapes shared by the compiled fast path and its pure-Python twin.

Both implementations take and return exactly these types, so the pipeline, the parity tests and mypy see one
interface (``FastPath`` below) whichever implementation is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# Error kinds carried by per-message (or per-element) decode errors. They become the dead letter's reason.
UNDECODABLE = "undecodable"  # not one complete msgpack object (truncated, 0xc1, trailing bytes), or not bytes
TOO_LARGE = "too_large"  # message over max_message_bytes, or an array over max_requests_per_message
NOT_A_MAP = "not_a_map"  # the message (or array element) is not a msgpack map
EMPTY_BATCH = "empty_batch"  # a msgpack array with no element
MISSING_ID = "missing_id"
BAD_ID = "bad_id"  # id not a non-empty str of at most max_str_len, or not valid UTF-8
BAD_ENTITIES = "bad_entities"  # `entities` present but not a map
MISSING_ENTITY = "missing_entity"  # a join key the model's views need is absent
BAD_ENTITY = "bad_entity"  # a join key that is not str/int, too long, or not valid UTF-8
BAD_FEATURES = "bad_features"  # `features` present but not a map
MISSING_FEATURE = "missing_feature"  # a request feature without a default is absent
BAD_FEATURE = "bad_feature"  # wrong type, wrong length, NaN or inf (in float32)
BAD_FIELD = "bad_field"  # deadline_ms / sent_ms not int64, reply_to / version not a valid str
NULL_VALUE = "null_value"  # the message value is null (a Kafka tombstone); a request must be a msgpack map or array
EMPTY_VALUE = "empty_value"  # the message value has no byte

ERROR_KINDS = (
    UNDECODABLE, TOO_LARGE, NOT_A_MAP, EMPTY_BATCH, MISSING_ID, BAD_ID, BAD_ENTITIES, MISSING_ENTITY,
    BAD_ENTITY, BAD_FEATURES, MISSING_FEATURE, BAD_FEATURE, BAD_FIELD, NULL_VALUE, EMPTY_VALUE,
)

NO_DEADLINE = (1 << 63) - 1
"""``DecodedBatch.deadline_ms`` of a request without a deadline (``deadline_ms`` absent or nil): INT64_MAX, so
``deadline_ms <= now`` is the whole expiry test (a deadline of 0 or below has always passed)."""


@dataclass(frozen=True)
class RequestFeature:
    """A request-time feature the model reads: ``size`` consecutive float32 columns."""

    name: str
    size: int = 1
    """1: the value must be a number (int or float, not bool), or a list of exactly one number. >1 (and 0): a list of
    exactly ``size`` numbers."""
    default: float | None = None
    """Used (in every column) when the feature is absent; None makes an absent feature an error."""


@dataclass(frozen=True)
class DecodeSpec:
    entity_keys: tuple[str, ...]
    """Join keys to extract, in this order (e.g. ("card_id", "merchant_id"))."""
    request_features: tuple[RequestFeature, ...]
    """Request features to extract, in column order."""
    max_message_bytes: int = 1 << 20
    max_requests_per_message: int = 4096
    max_str_len: int = 256
    """Longest id, entity key, reply_to or version accepted."""

    @property
    def feature_columns(self) -> int:
        return sum(feature.size for feature in self.request_features)


@dataclass
class DecodeError:
    message_index: int
    """Index of the raw message in the batch."""
    element_index: int
    """Index inside a msgpack-array message; -1 when the whole message is at fault."""
    kind: str
    """One of ERROR_KINDS."""
    detail: str
    """What was wrong, for a human reading the dead letter."""
    request_id: str | None = None
    """The request's id when it could be read."""
    span: tuple[int, int] | None = None
    """Byte offsets [start, end) of the element inside its message, for every element-level error
    (``element_index >= 0``): ``message[start:end]`` is the element's own msgpack. None when the whole message is
    at fault."""


@dataclass
class DecodedBatch:
    """Valid requests of a batch of messages in columnar form, plus one error per bad message/element."""

    ids: list[str]
    entities: list[list[str]]
    """One list per spec.entity_keys entry, each n long; int keys are turned into their decimal str."""
    features: np.ndarray
    """float32, shape (n, spec.feature_columns)."""
    deadline_ms: np.ndarray
    """int64, shape (n,): the request's deadline_ms; NO_DEADLINE (INT64_MAX) where absent or nil, so a deadline of
    0 or below is a deadline that has passed, not "no deadline"."""
    sent_ms: np.ndarray
    """int64, shape (n,), 0 where absent."""
    reply_to: list[str | None]
    version: list[str | None]
    source: np.ndarray
    """int32, shape (n,): index of the message each request came from."""
    errors: list[DecodeError] = field(default_factory=list)
    element: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """int32, shape (n,): index of the request inside its batch message; -1 when the message was a single map.
    (Defaults exist only so that older positional constructions stay valid; both decoders always fill it.)"""
    span: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    """int64, shape (n, 2): byte offsets [start, end) of the request inside its message; (0, len(message)) for a
    single-map message. ``message[start:end]`` is the request's own msgpack (what a dead letter of it carries)."""

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ViewBlock:
    """What the feature store returned for one view and one batch."""

    values: np.ndarray
    """float32, shape (rows, features of the view): one row per distinct entity found or defaulted."""
    row_of_request: np.ndarray
    """int32, shape (n,): row of ``values`` each request reads; -1 means use the defaults."""
    defaults: np.ndarray
    """float32, shape (features of the view,)."""


@dataclass(frozen=True)
class InputColumn:
    """Where one model input column comes from: a request-feature column or a view feature."""

    from_request: bool
    block: int
    """Index into the list of ViewBlocks (ignored when from_request)."""
    column: int
    """Column in DecodedBatch.features or in ViewBlock.values."""


@dataclass
class PredictionBatch:
    """Predictions of one batch, columnar; encoded into one msgpack map per row."""

    ids: list[str]
    model: str
    version: str
    status: list[str]
    """'ok' | 'expired' | 'error' per row."""
    outputs: dict[str, np.ndarray]
    """Output name -> array of shape (n,) or (n, k); rows that are not 'ok' are not read."""
    errors: list[tuple[str, str] | None]
    """(kind, message) per row, None when ok."""
    degraded: list[list[str]]
    lineage: dict[str, object]
    """Shared by every row: artifact_sha256, code_version, batch_id, worker_id."""
    feature_ts_ms: dict[str, np.ndarray]
    """View name -> int64 array (n,): event timestamp of the row used, 0 when a default was used."""
    timings_us: dict[str, int]
    received_ms: np.ndarray
    """int64 (n,)."""


class FastPath(Protocol):
    """The contract both implementations satisfy."""

    def decode_batch(self, messages: Sequence[bytes | None], spec: DecodeSpec) -> DecodedBatch: ...

    def assemble(
        self,
        request_features: np.ndarray,
        blocks: Sequence[ViewBlock],
        columns: Sequence[InputColumn],
    ) -> np.ndarray: ...

    def encode_predictions(self, batch: PredictionBatch, sent_ms: int) -> list[bytes]: ...
