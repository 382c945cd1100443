"""Batch-level delivery of request messages into the worker's Faust agents.

Faust's stream layer does per-message work at several levels (a future per message in the consumer's drain,
the conductor's per-message dispatch, an Event per message, per-event stream iteration) and hands messages
from the consumer thread to the agents one by one; on a 2-core machine that bounds a worker at a few thousand
events/s, far below what the Kafka client can do. So the request topics are consumed here, below the stream
layer, by a service that lives inside the Faust app (its lifecycle, its web server, its CLI and signals):

- one aiokafka consumer in the app's event loop (no thread hand-off), in a Kafka consumer group (membership
  and rebalancing are Kafka's), reading with ``getmany`` in batches bounded by size and time;
- each batch goes to its model's Faust agent as ONE event on an in-memory channel;
- the agent runs the pipeline and queues the predictions and dead letters as producer batches
  (``create_batch``/``send_batch``), without waiting for the acknowledgement, so the next batch overlaps it;
- offsets are committed per batch, in order, only after Kafka acknowledged every message of that batch;
- on partition revocation, every batch in flight is finished and committed before the partitions go
  (the rebalance waits for it): no loss, repeats only within at-least-once.

The trade-off: Faust's per-message sensors and its stream operators (group_by, tables, windows) do not see
these messages; streamscore reports its own counters and stage timings (``/status`` on the web server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from streamscore.settings import Settings
from streamscore.workers.pipeline import Inbound, Outbound

from .kafka import client_kwargs

log = logging.getLogger(__name__)

_RETRY_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class Flight:
    """One batch between its fetch and its commit."""

    records: list[Inbound]
    next_offsets: dict[TopicPartition, int]
    acked: asyncio.Future
    fetched_at: float = field(default_factory=time.monotonic)


class BatchPublisher:
    """Publishes a batch's messages as producer batches, one per (topic, partition), and resolves one future
    once Kafka acknowledged all of them. Batches that fail are sent again (only those) until they succeed,
    so the future only ever resolves when everything is acknowledged."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._partitions: dict[str, int] = {}
        self.resent = 0

    async def publish(self, messages: Sequence[Outbound]) -> asyncio.Future:
        groups = await self._group(messages)
        sends = [await self._send(topic, partition, group) for (topic, partition), group in groups.items()]
        return asyncio.ensure_future(self._confirm(sends))

    async def _group(self, messages: Sequence[Outbound]) -> dict[tuple[str, int], list[Outbound]]:
        groups: dict[tuple[str, int], list[Outbound]] = {}
        counts = self._partitions
        for message in messages:
            topic, key = message[0], message[1]  # Outbound or a plain tuple of the same shape
            count = counts.get(topic) or await self._partition_count(topic)
            # crc32 is C-speed and deterministic: repeats of a prediction (same key) land on one partition
            partition = zlib.crc32(key) % count if key else 0
            groups.setdefault((topic, partition), []).append(message)
        return groups

    async def _partition_count(self, topic: str) -> int:
        partitions = await self.producer.partitions_for(topic)
        self._partitions[topic] = len(partitions)
        return len(partitions)

    async def _send(self, topic: str, partition: int, group: list[Outbound]
                    ) -> tuple[str, int, list[Outbound], list[asyncio.Future]]:
        futures, builder = [], self.producer.create_batch()
        for _, key, value, headers in group:
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                # full: send it and start another
                futures.append(await self.producer.send_batch(builder, topic, partition=partition))
                builder = self.producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)
        futures.append(await self.producer.send_batch(builder, topic, partition=partition))
        return topic, partition, group, futures

    async def _confirm(self, sends: list[tuple[str, int, list[Outbound], list[asyncio.Future]]]) -> None:
        attempt = 0
        while sends:
            failed = []
            for topic, partition, group, futures in sends:
                results = await asyncio.gather(*futures, return_exceptions=True)
                errors = [result for result in results if isinstance(result, BaseException)]
                if errors:
                    failed.append((topic, partition, group, errors[0]))
            if not failed:
                return
            delay = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]
            log.warning("%d producer batches were not acknowledged (%r); sending them again in %.2f s",
                        len(failed), failed[0][3], delay)
            attempt += 1
            await asyncio.sleep(delay)
            self.resent += sum(len(group) for _, _, group, _ in failed)
            sends = [await self._send(topic, partition, group, ) for topic, partition, group, _ in failed]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, delivery: BatchDelivery) -> None:
        self.delivery = delivery

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if revoked:
            await self.delivery.drain(f"{len(revoked)} partitions revoked")

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %d partitions: %s", len(assigned), sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class BatchDelivery(mode.Service):
    """Consumes the request topics in batches and hands each batch to its model's agent (see module doc)."""

    def __init__(self, settings: Settings, channels: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.channels = channels
        """Request topic -> the Faust channel its model's agent reads batches from."""
        worker = settings.worker
        self.batch_max = worker.batch_max
        self.window_ms = worker.batch_window_ms
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: BatchPublisher | None = None
        self.flights: deque[Flight] = deque()
        self._flight_added = asyncio.Event()
        self._room = asyncio.Semaphore(worker.max_batches_in_flight)
        self.committed_batches = 0
        self.commit_failures = 0

    async def on_start(self) -> None:
        kafka = client_kwargs(self.settings.kafka)
        self.producer = AIOKafkaProducer(**kafka, acks="all", linger_ms=1, max_batch_size=1 << 20,
                                         max_request_size=8 << 20, enable_idempotence=False)
        await self.producer.start()
        self.publisher = BatchPublisher(self.producer)
        self.consumer = AIOKafkaConsumer(
            **kafka,
            group_id=f"{self.settings.topic_prefix}-workers",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_max,
            fetch_max_wait_ms=self.window_ms,
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=16 << 20,
        )
        await self.consumer.start()
        self.consumer.subscribe(sorted(self.channels), listener=_Rebalance(self))

    async def on_stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain("stopping"), timeout=30)
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    @mode.Service.task
    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        while not self.should_stop:
            try:
                fetched = await self.consumer.getmany(timeout_ms=max(self.window_ms, 1), max_records=self.batch_max)
            except KafkaError as exc:
                log.warning("fetch failed (%r); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            by_topic: dict[str, list[tuple[TopicPartition, list[Any]]]] = {}
            for tp, records in fetched.items():
                by_topic.setdefault(tp.topic, []).append((tp, records))
            for topic, parts in by_topic.items():
                await self._dispatch(topic, parts)

    async def _dispatch(self, topic: str, parts: list[tuple[TopicPartition, list[Any]]]) -> None:
        records = [Inbound(record.value, record.key, record.topic, record.partition, record.offset)
                   for _, batch in parts for record in batch]
        next_offsets = {tp: batch[-1].offset + 1 for tp, batch in parts}
        await self._room.acquire()
        flight = Flight(records, next_offsets, asyncio.get_running_loop().create_future())
        self.flights.append(flight)
        self._flight_added.set()
        await self.channels[topic].put(flight)

    @mode.Service.task
    async def _commit_loop(self) -> None:
        """Commits flights strictly in fetch order, each once its batch is acknowledged."""
        while not (self.should_stop and not self.flights):  # keeps committing while a stop drains
            if not self.flights:
                self._flight_added.clear()
                await self._flight_added.wait()
                continue
            flight = self.flights[0]
            await asyncio.shield(flight.acked)
            offsets = dict(flight.next_offsets)
            self.flights.popleft()
            self._room.release()
            while self.flights and self.flights[0].acked.done():  # coalesce ready flights into one commit
                offsets.update(self.flights.popleft().next_offsets)
                self._room.release()
            await self._commit(offsets)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        try:
            await self.consumer.commit(offsets)
            self.committed_batches += 1
        except (CommitFailedError, KafkaError) as exc:
            # the partitions moved on (rebalance): their new owner re-reads from the last commit; repeats only
            self.commit_failures += 1
            log.warning("offset commit failed (%r); those requests may be answered again", exc)

    async def drain(self, why: str) -> None:
        """Wait until every batch in flight is acknowledged and committed."""
        if not self.flights:
            return
        started = time.monotonic()
        count = len(self.flights)
        while self.flights:
            await asyncio.sleep(0.005)
        log.info("%s: drained %d batches in flight in %.0f ms", why, count, 1000 * (time.monotonic() - started))
