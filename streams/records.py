"""The two records of the transport: a consumed message and a message to publish."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Inbound:
    """One consumed message. ``value`` is None for a Kafka tombstone (a null value)."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1

    @property
    def source(self) -> str:
        """``topic/partition/offset``: where the message came from, as dead-letter headers name it."""
        return f"{self.topic}/{self.partition}/{self.offset}"


class Outbound(NamedTuple):
    """One message to publish (a tuple: thousands are made per second)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
