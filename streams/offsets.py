"""A consumer group's committed offsets, read stable: what exactly_once needs when partitions move.

With exactly_once, a worker commits a batch's consumed offsets inside the batch's transaction
(``send_offsets_to_transaction``). When the transaction commits, the transaction coordinator answers the worker
first and writes the commit markers (the one into ``__consumer_offsets`` included) just after. A worker that is
assigned those partitions in that gap and asks for the group's committed offsets the plain way gets the
offsets from before that transaction, so it reads that batch again, and its answers are published a second
time, committed. On the cluster profile, at the rebalance when a second worker joined, that happened to 27 of
50k requests.

Kafka's answer is OffsetFetch v7's ``require_stable`` (KIP-447): while a transaction holds pending offsets for a
partition, the broker answers ``UNSTABLE_OFFSET_COMMIT`` for it instead of the older offset, and the client asks
again. aiokafka asks with v3 at most, so the request is defined here from Kafka's schema (flexible version:
compact strings and arrays, tagged fields) with aiokafka's own protocol types, and sent to the group coordinator
through the consumer's client. ``BatchDelivery`` calls ``stable_committed`` on every assignment under
exactly_once and seeks each partition to what it returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, TypeAlias

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

UNSTABLE_OFFSET_COMMIT = 88
"""A transaction still holds pending offsets for the partition (Kafka's error code)."""
COORDINATOR_ERRORS = (14, 15, 16)
"""COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR: ask again."""


class OffsetFetchResponse_v7(Response):  # Kafka's protocol names
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("metadata", CompactString("utf-8")),
                ("error_code", Int16),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):  # Kafka's protocol names
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        ("topics", CompactArray(
            ("name", CompactString("utf-8")),
            ("partition_indexes", CompactArray(Int32)),
            ("tags", TaggedFields),
        )),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


_Struct: TypeAlias = OffsetFetchRequest_v7


class StableOffsetFetch(Request[_Struct]):
    """OffsetFetch with ``require_stable`` (v7; Kafka 2.5 and later)."""

    API_KEY = 9

    def __init__(self, group_id: str, partitions: Iterable[TopicPartition]) -> None:
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        self._group_id = group_id
        self._topics: list[tuple[str, list[int], dict[int, bytes]]] = [
            (topic, sorted(numbers), {}) for topic, numbers in sorted(by_topic.items())]

    def build(self, request_struct_class: type[_Struct]) -> _Struct:
        return request_struct_class(self._group_id, self._topics, True, {})


class UnstableOffsets(KafkaError):
    """The group's offsets for these partitions stayed pending in a transaction past the timeout."""


async def stable_committed(consumer: Any, group_id: str, partitions: Iterable[TopicPartition],
                           timeout_s: float) -> dict[TopicPartition, int]:
    """The group's committed offset of each partition that has one, asked of the group coordinator with
    ``require_stable`` until no transaction holds any pending (every 50 ms; ``UnstableOffsets`` after
    ``timeout_s``). ``consumer``: a started aiokafka consumer of the group (its client and coordinator)."""
    wanted = list(partitions)
    if not wanted:
        return {}
    client = consumer._client
    deadline = time.monotonic() + timeout_s
    while True:
        coordinator = consumer._coordinator
        node = getattr(coordinator, "coordinator_id", None)
        if node is None:
            node = await client.coordinator_lookup(0, group_id)  # 0: the group coordinator
        response = await client.send(node, StableOffsetFetch(group_id, wanted))
        offsets, pending = {}, []
        retry = response.error_code in COORDINATOR_ERRORS or response.error_code == UNSTABLE_OFFSET_COMMIT
        if response.error_code and not retry:
            raise for_code(response.error_code)(f"offset fetch for group {group_id}")
        for topic, parts, _ in response.topics:
            for index, offset, _epoch, _metadata, error, _ in parts:
                tp = TopicPartition(topic, index)
                if error == UNSTABLE_OFFSET_COMMIT:
                    pending.append(tp)
                elif error in COORDINATOR_ERRORS:
                    retry = True
                elif error:
                    raise for_code(error)(f"offset fetch of {topic}/{index} for group {group_id}")
                elif offset >= 0:
                    offsets[tp] = offset
        if not pending and not retry:
            return offsets
        if time.monotonic() > deadline:
            raise UnstableOffsets(f"offsets of {', '.join(f'{tp.topic}/{tp.partition}' for tp in pending)} for "
                                  f"group {group_id} still pending in a transaction after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
