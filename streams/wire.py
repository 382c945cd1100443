"""Wire format v1, Python side (the batch decoder and encoder live in ``streamscore.fastpath``).

Requests and predictions are msgpack maps; see docs/wire-format.md for the schema. Dead letters carry the
original bytes unchanged, with the reason in headers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

WIRE_VERSION = "1"

HEADER_ERROR_KIND = "streamscore-error-kind"
HEADER_ERROR_MESSAGE = "streamscore-error-message"
HEADER_MODEL = "streamscore-model"
HEADER_ELEMENT = "streamscore-element"
HEADER_REQUEST_ID = "streamscore-request-id"
HEADER_SOURCE = "streamscore-source"
HEADER_FAILED_MS = "streamscore-failed-ms"
HEADER_DESTINATION = "streamscore-destination"
HEADER_ORIGINAL_BYTES = "streamscore-original-bytes"
HEADER_ORIGINAL_SHA256 = "streamscore-original-sha256"

UNDELIVERABLE = "undeliverable"
"""Dead-letter kind of a prediction Kafka would not take on its topic (a reply_to that is missing, not writable)."""

DEAD_LETTER_MAX_BYTES = 1_000_000
"""Largest key + value a dead letter carries unchanged. Kafka's default message.max.bytes is 1 MiB + 12, the
headers need room, and a request topic may take larger messages than the dead-letter topic: a dead letter
Kafka refused would be retried forever and stall its partitions, so larger ones are cut (see bounded_letter)."""
KEPT_VALUE_BYTES = 64 << 10
KEPT_KEY_BYTES = 1 << 10


def pack_request(request: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bytes:
    """One request map, or a list of them (a batch message answered one prediction per element)."""
    return msgpack.packb(request, use_bin_type=True)


def unpack(value: bytes) -> Any:
    return msgpack.unpackb(value, raw=False, strict_map_key=False)


def bounded_letter(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
                   ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """A dead letter's key, value and headers, cut to fit any broker's default limit: over
    ``DEAD_LETTER_MAX_BYTES`` the value keeps its first 64 KiB (and the key its first 1 KiB); the original
    size and sha256 of the value go in the headers. A null value (a tombstone) stays null."""
    if value is None or len(value) + len(key or b"") <= DEAD_LETTER_MAX_BYTES:
        return key, value, headers
    headers = [*headers, (HEADER_ORIGINAL_BYTES, str(len(value)).encode()),
               (HEADER_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode())]
    return (key[:KEPT_KEY_BYTES] if key else key), value[:KEPT_VALUE_BYTES], headers


def headers_dict(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    return {name: value.decode(errors="replace") for name, value in headers or ()}
