"""Every dead letter the worker publishes is built here, so each one carries the same headers.

A dead letter is published to ``<prefix>.<model>.dlq`` with the original key and, as its value, the original
bytes of what could not be answered: the whole message, or only the offending element of a batch message
(so a batch message of many bad elements costs about its own size in dead letters, never its size once per
element). The reason is in the headers (docs/wire-format.md, "Dead letter").
"""

from __future__ import annotations

import msgpack

from streamscore.fastpath import DecodeError
from streamscore.streams.clock import now_ms
from streamscore.streams.records import Inbound, Outbound
from streamscore.streams.wire import (
    HEADER_DESTINATION,
    HEADER_ELEMENT,
    HEADER_ERROR_KIND,
    HEADER_ERROR_MESSAGE,
    HEADER_FAILED_MS,
    HEADER_MODEL,
    HEADER_REQUEST_ID,
    HEADER_SOURCE,
    UNDELIVERABLE,
    bounded_letter,
)

PROCESSING_FAILED = "processing_failed"
"""The worker failed on this message alone (found by splitting its batch); the rest of the batch was answered."""

_MESSAGE_CHARS = 2000
"""Longest error message carried in a header (an exception's text can be anything)."""


class DeadLetters:
    """Builds the dead letters of one model."""

    def __init__(self, model: str, topic: str) -> None:
        self.model = model
        self.topic = topic

    def rejected(self, message: Inbound, error: DecodeError) -> Outbound:
        """A message (or one element of a batch message) the decoder or the screening refused."""
        value = message.value
        span = error.span
        if span is not None and value is not None:
            value = bytes(value[span[0]:span[1]])
        extra = [(HEADER_REQUEST_ID, error.request_id.encode())] if error.request_id is not None else []
        return self._letter(message, value, error.kind, error.detail, error.element_index, extra)

    def failed(self, message: Inbound, exc: BaseException) -> Outbound:
        """A message the worker failed on, whole (``processing_failed``), with its request id when it reads."""
        request_id = _request_id_of(message.value)
        extra = [(HEADER_REQUEST_ID, request_id.encode())] if request_id is not None else []
        return self._letter(message, message.value, PROCESSING_FAILED, f"{type(exc).__name__}: {exc}", -1, extra)

    def undeliverable(self, prediction: Outbound, error: BaseException) -> Outbound:
        """The dead letter that replaces a prediction Kafka will never take on its topic: the prediction itself,
        the topic and the reason in the headers."""
        topic, key, value = prediction[0], prediction[1], prediction[2]  # predictions are often plain tuples
        headers = [
            (HEADER_ERROR_KIND, UNDELIVERABLE.encode()),
            (HEADER_ERROR_MESSAGE, _clip(f"Kafka refused the prediction on topic {topic!r}: {error!r}")),
            (HEADER_MODEL, self.model.encode()),
            (HEADER_DESTINATION, topic.encode()),
            (HEADER_FAILED_MS, str(now_ms()).encode()),
        ]
        if key:
            headers.append((HEADER_REQUEST_ID, key))
        return Outbound(self.topic, *bounded_letter(key, value, headers))

    def _letter(self, message: Inbound, value: bytes | None, kind: str, detail: str, element: int,
                extra: list[tuple[str, bytes]]) -> Outbound:
        headers = [
            (HEADER_ERROR_KIND, kind.encode()),
            (HEADER_ERROR_MESSAGE, _clip(detail)),
            (HEADER_MODEL, self.model.encode()),
            (HEADER_ELEMENT, str(element).encode()),
            (HEADER_SOURCE, message.source.encode()),
            (HEADER_FAILED_MS, str(now_ms()).encode()),
            *extra,
        ]
        return Outbound(self.topic, *bounded_letter(message.key, value, headers))


def kind_of(letter: Outbound) -> str:
    """The error kind a dead letter carries."""
    for name, value in letter.headers or ():
        if name == HEADER_ERROR_KIND:
            return value.decode()
    return "unknown"


def _request_id_of(value: bytes | None) -> str | None:
    """The ``id`` of a single-request message, read the plain way (a failure path: never the hot path)."""
    try:
        request = msgpack.unpackb(value, raw=False, strict_map_key=False) if value else None
    except Exception:  # whatever it is, the dead letter goes out without the id
        return None
    request_id = request.get("id") if isinstance(request, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 256 else None


def _clip(text: str) -> bytes:
    return (text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "…").encode(errors="replace")
