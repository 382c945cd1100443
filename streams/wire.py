"""Wire format v1, Python side (the batch decoder and encoder live in ``streamscore.fastpath``).

Requests and predictions are msgpack maps; see docs/wire-format.md for the schema. Dead letters carry the
original bytes unchanged, with the reason in headers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from streamscore.fastpath import DecodeError

WIRE_VERSION = "1"

HEADER_ERROR_KIND = "streamscore-error-kind"
HEADER_ERROR_MESSAGE = "streamscore-error-message"
HEADER_MODEL = "streamscore-model"
HEADER_ELEMENT = "streamscore-element"
HEADER_REQUEST_ID = "streamscore-request-id"
HEADER_SOURCE = "streamscore-source"
HEADER_FAILED_MS = "streamscore-failed-ms"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def pack_request(request: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bytes:
    """One request map, or a list of them (a batch message answered one prediction per element)."""
    return msgpack.packb(request, use_bin_type=True)


def unpack(value: bytes) -> Any:
    return msgpack.unpackb(value, raw=False, strict_map_key=False)


def dead_letter_headers(error: DecodeError, model: str, topic: str, partition: int, offset: int
                        ) -> list[tuple[str, bytes]]:
    headers = [
        (HEADER_ERROR_KIND, error.kind.encode()),
        (HEADER_ERROR_MESSAGE, error.detail.encode()),
        (HEADER_MODEL, model.encode()),
        (HEADER_ELEMENT, str(error.element_index).encode()),
        (HEADER_SOURCE, f"{topic}/{partition}/{offset}".encode()),
        (HEADER_FAILED_MS, str(now_ms()).encode()),
    ]
    if error.request_id is not None:
        headers.append((HEADER_REQUEST_ID, error.request_id.encode()))
    return headers


def headers_dict(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    return {name: value.decode(errors="replace") for name, value in headers or ()}
