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
- offsets are committed in order, only after Kafka acknowledged every message of their batch, at most every
  ``worker.commit_interval_ms`` (one commit covers every batch acknowledged meanwhile);
- on partition revocation, every batch in flight is finished and committed before the partitions go
  (the rebalance waits for it): no loss, repeats only within at-least-once.

The trade-off: Faust's per-message sensors and its stream operators (group_by, tables, windows) do not see
these messages; streamscore reports its own counters and stage timings (``/status`` on the web server).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from streamscore.settings import Settings

from . import topics
from .kafka import client_kwargs
from .offsets import stable_committed
from .records import Inbound, Outbound

log = logging.getLogger(__name__)

_RETRY_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def transactional_id(settings: Settings) -> str:
    """exactly_once: ``<prefix>-worker-<worker_id>`` (worker_id defaults to host:pid)."""
    worker_id = settings.worker.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    return f"{settings.topic_prefix}-worker-{worker_id}"


@dataclass
class Flight:
    """One batch between its fetch and its commit."""

    records: list[Inbound]
    next_offsets: dict[TopicPartition, int]
    acked: asyncio.Future
    fetched_at: float = field(default_factory=time.monotonic)
    state: str = "queued"
    """Where the batch is: queued (for its agent), scoring, publishing, acknowledged; for the stall report."""
    in_transaction: bool = False
    """exactly_once: its offsets are committed in the transaction of its messages, not by the consumer."""

    def describe(self) -> str:
        partitions = ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in self.next_offsets))
        return (f"a batch of {len(self.records)} messages from {partitions or '-'} fetched "
                f"{time.monotonic() - self.fetched_at:.1f} s ago is still {self.state}")


_Send = tuple[str, int, list[Outbound], list[asyncio.Future]]
"""A producer batch queued: topic, partition, its messages and the futures of its sends."""


def _failed(exc: BaseException) -> asyncio.Future:
    """A send's future that failed before Kafka saw it (retried like one Kafka refused)."""
    future: asyncio.Future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _backoff(attempt: int) -> float:
    return _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]


Substitute = Callable[[Outbound, BaseException], "Outbound | None"]
"""What to publish instead of a message Kafka will never take (a dead letter saying why), or None to keep
trying (the worker's own topics: an operator has to fix those, and nothing is dropped meanwhile)."""

_NEVER_ACCEPTED = (InvalidTopicError, TopicAuthorizationFailedError, MessageSizeTooLargeError,
                   RecordListTooLargeError)
"""Broker answers after which a producer batch is refused however often it is sent again: retrying it would
hold its partitions, and every commit behind them, forever (a poison message)."""
_UNWRITABLE_MEMORY_S = 60.0
"""How long a topic found unwritable is not asked about again (a flood naming it costs one metadata wait)."""


class BatchPublisher:
    """Publishes a batch's messages as producer batches, one per (topic, partition), and resolves one future
    once Kafka acknowledged all of them. Batches that fail are sent again (only those) until they succeed,
    so the future only ever resolves when everything is acknowledged.

    Except for messages Kafka will never take (a topic that is invalid, internal, missing or not writable, a
    message over the broker's size limit): those are handed to ``substitute`` and its replacement (a dead
    letter) is published instead, so one bad destination cannot stall the worker."""

    def __init__(self, producer: AIOKafkaProducer, topic_wait_s: float = 5.0) -> None:
        self.producer = producer
        self.topic_wait_s = topic_wait_s
        """Longest wait for a new topic's metadata before asking whether the cluster answers at all."""
        self._partitions: dict[str, int] = {}
        self._unwritable: dict[str, tuple[BaseException, float]] = {}
        self.resent = 0
        self.substituted = 0
        self.failures = 0
        """Batches whose publication failed as a whole and was started again."""

    async def publish(self, messages: Sequence[Outbound], substitute: Substitute | None = None) -> asyncio.Future:
        """Queue the messages as producer batches and return a future that resolves once Kafka acknowledged
        every one of them. Never raises and never gives up: whatever fails (no metadata while the broker is
        away, a send refused, an unexpected error) is tried again with backoff, the one retry policy of the
        worker. A worker that cannot get its messages out for long is stopped by its progress watchdog, so
        it is restarted rather than left waiting silently."""
        try:
            sends = await self._queue(messages, substitute)
        except Exception as exc:
            log.warning("could not queue %d messages (%r); trying again", len(messages), exc)
            sends = None
        return asyncio.ensure_future(self._deliver(messages, substitute, sends))

    async def _queue(self, messages: Sequence[Outbound], substitute: Substitute | None) -> list[_Send]:
        """Group by (topic, partition) and send each group. A group that cannot even be queued gets a failed
        future instead, so only that group is sent again: the groups Kafka took are never repeated."""
        groups = await self.group(messages, substitute)
        sends = []
        for (topic, partition), group in groups.items():
            try:
                sends.append(await self.send(topic, partition, group))
            except Exception as exc:
                sends.append((topic, partition, group, [_failed(exc)]))
        return sends

    async def _deliver(self, messages: Sequence[Outbound], substitute: Substitute | None,
                       sends: list[_Send] | None) -> None:
        for attempt in itertools.count():
            try:
                if sends is None:
                    sends = await self._queue(messages, substitute)
                await self._confirm(sends, substitute)
                return
            except Exception as exc:  # the whole batch again (repeats are within at-least-once)
                delay = _backoff(attempt)
                log.warning("publishing %d messages failed (%r); trying again in %.2f s", len(messages), exc,
                            delay)
                self.failures += 1
                sends = None
                await asyncio.sleep(delay)

    async def group(self, messages: Sequence[Outbound], substitute: Substitute | None
                     ) -> dict[tuple[str, int], list[Outbound]]:
        counts = self._partitions
        new_topics = {message[0] for message in messages} - counts.keys()
        if new_topics:
            unwritable = await self._learn(new_topics)
            if unwritable:
                messages = self._substituted(messages, unwritable, substitute)
                self._remember_unwritable(unwritable)
                await self._learn({message[0] for message in messages} - counts.keys(), must=True)
        groups: dict[tuple[str, int], list[Outbound]] = {}
        for message in messages:
            topic, key = message[0], message[1]  # Outbound or a plain tuple of the same shape
            # crc32 is C-speed and deterministic: repeats of a prediction (same key) land on one partition
            partition = zlib.crc32(key) % counts[topic] if key else 0
            groups.setdefault((topic, partition), []).append(message)
        return groups

    async def _learn(self, topics: set[str], must: bool = False) -> dict[str, BaseException]:
        """Learn the partition counts of new topics; return the ones Kafka will not take, with why. When no
        broker answers at all, nothing is any topic's fault: that raises, and the caller tries again later."""
        now = time.monotonic()
        known_bad = {topic: self._unwritable[topic][0] for topic in topics
                     if topic in self._unwritable and self._unwritable[topic][1] > now}
        asked = sorted(topics - known_bad.keys())
        results = await asyncio.gather(*(self._partition_count(topic) for topic in asked), return_exceptions=True)
        failed = {topic: result for topic, result in zip(asked, results, strict=True)
                  if isinstance(result, BaseException)}
        if failed:
            if must:
                raise next(iter(failed.values()))
            await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.topic_wait_s)
        return {**known_bad, **failed}

    def _remember_unwritable(self, unwritable: dict[str, BaseException]) -> None:
        """Topics whose messages were replaced: not asked about again for a while. (Only those: a topic of the
        worker's own that was slow to answer is asked again at once, never held as unwritable.)"""
        now = time.monotonic()
        if len(self._unwritable) > 10_000:
            self._unwritable.clear()
        for topic, error in unwritable.items():
            if topic not in self._unwritable or self._unwritable[topic][1] <= now:
                log.warning("topic %r cannot be written (%r): its messages are dead-lettered for %.0f s", topic,
                            error, _UNWRITABLE_MEMORY_S)
                self._unwritable[topic] = (error, now + _UNWRITABLE_MEMORY_S)

    async def _partition_count(self, topic: str) -> int:
        try:
            partitions = await asyncio.wait_for(self.producer.partitions_for(topic), self.topic_wait_s)
        except TimeoutError:
            raise UnknownTopicOrPartitionError(f"no metadata for topic {topic!r} within {self.topic_wait_s} s"
                                               ) from None
        self._partitions[topic] = len(partitions)
        return len(partitions)

    def _substituted(self, messages: Sequence[Outbound], unwritable: dict[str, BaseException],
                     substitute: Substitute | None) -> list[Outbound]:
        """The messages with those for unwritable topics replaced; raises when one has no replacement."""
        result = []
        for message in messages:
            error = unwritable.get(message[0])
            replacement = message if error is None else substitute(message, error) if substitute else None
            if replacement is None:
                raise unwritable[message[0]]
            result.append(replacement)
        self.substituted += len(messages) - sum(1 for message in messages if message[0] not in unwritable)
        return result

    async def send(self, topic: str, partition: int, group: list[Outbound]
                    ) -> _Send:
        futures, builder = [], self.producer.create_batch()
        for _, key, value, headers in group:
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                # full: send it and start another
                futures.append(await self.producer.send_batch(builder, topic, partition=partition))
                builder = self.producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)
        futures.append(await self.producer.send_batch(builder, topic, partition=partition))
        return topic, partition, group, futures

    async def _confirm(self, sends: list[_Send],
                       substitute: Substitute | None) -> None:
        attempt, last_failed = 0, len(sends) + 1
        while sends:
            failed = []
            for topic, partition, group, futures in sends:
                results = await asyncio.gather(*futures, return_exceptions=True)
                errors = [result for result in results if isinstance(result, BaseException)]
                if errors:
                    failed.append((topic, partition, group, errors[0]))
            if not failed:
                return
            if len(failed) < last_failed:  # progress: start the backoff again
                attempt = 0
            last_failed = len(failed)
            delay = _backoff(attempt)
            log.warning("%d producer batches were not acknowledged (%r); sending them again in %.2f s",
                        len(failed), failed[0][3], delay)
            attempt += 1
            await asyncio.sleep(delay)
            sends = await self._resend(failed, substitute)

    async def _resend(self, failed: list[tuple[str, int, list[Outbound], BaseException]],
                      substitute: Substitute | None) -> list[_Send]:
        """Send failed groups again. A group Kafka will never take goes out as its substitutes (a group that is
        too large is first sent one message per batch, to find the message at fault). Never raises (the broker
        may be away): what could not even be queued fails its future, and the next round retries it."""
        sends = []
        for topic, partition, group, error in failed:
            try:
                sends += await self._resend_group(topic, partition, group, error, substitute)
            except Exception as exc:
                log.warning("could not queue %d messages for %s/%d again (%r)", len(group), topic, partition, exc)
                sends.append((topic, partition, group, [_failed(exc)]))
        return sends

    async def _resend_group(self, topic: str, partition: int, group: list[Outbound], error: BaseException,
                            substitute: Substitute | None
                            ) -> list[_Send]:
        if isinstance(error, MessageSizeTooLargeError | RecordListTooLargeError) and len(group) > 1:
            return [await self.send(topic, partition, [message]) for message in group]
        if isinstance(error, _NEVER_ACCEPTED) and substitute is not None:
            replacements = [substitute(message, error) for message in group]
            if all(replacement is not None for replacement in replacements):
                if isinstance(error, InvalidTopicError | TopicAuthorizationFailedError):
                    self._unwritable[topic] = (error, time.monotonic() + _UNWRITABLE_MEMORY_S)
                    self._partitions.pop(topic, None)
                log.warning("Kafka refuses %d messages for %s (%r): publishing their dead letters instead",
                            len(group), topic, error)
                self.substituted += len(group)
                groups = await self.group([r for r in replacements if r is not None], None)
                return [await self.send(new_topic, new_partition, new_group)
                        for (new_topic, new_partition), new_group in groups.items()]
        self.resent += len(group)
        return [await self.send(topic, partition, group)]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, delivery: BatchDelivery) -> None:
        self.delivery = delivery

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.delivery.revocations += 1  # a batch fetched before this is not dispatched after it (``_dispatch``)
        self.delivery.rebalancing = True
        if revoked:
            await self.delivery.drain(f"{len(revoked)} partitions revoked")

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if self.delivery.exactly_once:
            await self.delivery.seek_to_stable_offsets(assigned)
        self.delivery.rebalancing = False
        self.delivery.assigned = len(assigned)
        self.delivery.joined = True
        kept = set(assigned)
        self.delivery.committed_offsets = {tp: offset for tp, offset in self.delivery.committed_offsets.items()
                                           if tp in kept}
        log.info("assigned %d partitions: %s", len(assigned), sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class BatchDelivery(mode.Service):
    """Consumes the request topics in batches and hands each batch to its model's agent (see module doc).

    It also keeps what the progress watchdog reads: since when work has been waiting without a commit
    (``waiting_since``), when the fetch loop last came round (``fetch_beat``), and the oldest batch in flight."""

    def __init__(self, settings: Settings, channels: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.channels = channels
        """Request topic -> the Faust channel its model's agent reads batches from."""
        worker = settings.worker
        self.batch_max = worker.batch_max
        self.fetch_wait_ms = worker.fetch_wait_ms
        self.exactly_once = worker.processing_guarantee == "exactly_once"
        self._transactions = asyncio.Lock()
        """exactly_once: one transaction at a time, in the order the batches asked (the lock is FIFO)."""
        self.transactions = 0
        self.aborted_transactions = 0
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: BatchPublisher | None = None
        self.flights: deque[Flight] = deque()
        self._flight_added = asyncio.Event()
        self._room = asyncio.Semaphore(worker.max_batches_in_flight)
        self.committed_batches = 0
        self.commit_failures = 0
        self.assigned = 0
        self.joined = False
        """True once the consumer group gave this consumer its first assignment (possibly empty)."""
        self.committed_offsets: dict[TopicPartition, int] = {}
        """The last offsets this consumer committed, by assigned partition (its consumer lag: end - committed)."""
        self.waiting_since: float | None = None
        """monotonic time since which batches (or offsets) have been waiting with no commit; None when idle."""
        self.fetch_beat = time.monotonic()
        """monotonic time the fetch loop last came round (or was legitimately waiting for room)."""
        self.waiting_for_room = False
        self._unsent_offsets: dict[TopicPartition, int] = {}
        """Offsets of acknowledged batches not committed yet: deferred to the commit interval, or a commit that
        failed (tried again)."""
        self.commit_interval_s = worker.commit_interval_ms / 1000
        self._last_commit = 0.0
        """monotonic time of the last commit request."""
        self._flushing = 0
        """Drains under way (a revocation, a stop): offsets are committed at once, not at the interval."""
        self._commit_failed = False
        self.revocations = 0
        """Rebalances that revoked this consumer's partitions so far."""
        self.rebalancing = False
        """Between a revocation and the next assignment: nothing fetched is dispatched."""
        self.dropped_batches = 0
        """Batches fetched before a revocation and dropped unprocessed (their partitions' next owner, maybe this
        consumer again, reads them from the committed offsets)."""
        self._fetching = True
        self._fetch_stopped = asyncio.Event()

    @property
    def group_id(self) -> str:
        return topics.worker_group(self.settings.topic_prefix)

    async def on_start(self) -> None:
        kafka = client_kwargs(self.settings.kafka)
        worker = self.settings.worker
        transactional: dict[str, Any] = {}
        if self.exactly_once:
            transactional = {"transactional_id": transactional_id(self.settings),
                             "transaction_timeout_ms": worker.transaction_timeout_ms}
        # linger 0: a batch's messages go as producer batches made whole (send_batch), ready as they are; a
        # linger would only hold each for its time (and wake the sender twice). Batches for one broker that
        # come while a request to it is in flight still leave together, in its next request.
        self.producer = AIOKafkaProducer(**kafka, acks="all", linger_ms=0, max_batch_size=1 << 20,
                                         max_request_size=8 << 20, enable_idempotence=self.exactly_once,
                                         **transactional)
        await self.producer.start()
        self.publisher = BatchPublisher(self.producer)
        self.consumer = AIOKafkaConsumer(
            **kafka,
            isolation_level="read_committed" if self.exactly_once else "read_uncommitted",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_max,
            fetch_max_wait_ms=self.fetch_wait_ms,
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=16 << 20,
        )
        await self.consumer.start()
        self.consumer.subscribe(sorted(self.channels), listener=_Rebalance(self))

    async def seek_to_stable_offsets(self, assigned: Sequence[TopicPartition]) -> None:
        """exactly_once: start each assigned partition at the group's committed offset read stable (after any
        transaction still holding its offsets ended: ``streams/offsets.py``), not at the offset before it. If
        that read fails, the consumer's own (plain) read is used, which may repeat a batch, never lose one."""
        assert self.consumer is not None
        timeout_s = self.settings.worker.transaction_timeout_ms / 1000 + 10
        started = time.monotonic()
        try:
            offsets = await stable_committed(self.consumer, self.group_id, assigned, timeout_s)
        except Exception as exc:
            log.warning("reading the committed offsets stable failed (%r): starting from the plain committed "
                        "offsets, which may repeat a batch whose transaction was just committed", exc)
            return
        for tp, offset in offsets.items():
            self.consumer.seek(tp, offset)
        waited = time.monotonic() - started
        if waited > 0.2:
            log.info("waited %.1f s for %d partitions' offsets held by a transaction", waited, len(assigned))

    async def publish(self, flight: Flight, messages: Sequence[Outbound],
                      substitute: Substitute | None = None) -> asyncio.Future:
        """Publish a batch's messages; the future resolves once Kafka has all of them (at_least_once), or once
        they and the batch's offsets are committed in one transaction (exactly_once). Never raises."""
        assert self.publisher is not None
        if not self.exactly_once:
            return await self.publisher.publish(messages, substitute)
        flight.in_transaction = True
        return asyncio.ensure_future(self._transaction(flight, messages, substitute))

    async def _transaction(self, flight: Flight, messages: Sequence[Outbound], substitute: Substitute | None) -> None:
        """The batch's messages and offsets in one transaction, tried again (aborted first) until committed. A
        producer fenced by a newer one with the same transactional id stops trying: its partitions are someone
        else's (the batch stays uncommitted, and the watchdog stops the worker)."""
        assert self.producer is not None and self.publisher is not None
        async with self._transactions:
            for attempt in itertools.count():
                try:
                    await self._commit_in_transaction(flight, messages, substitute)
                    self.transactions += 1
                    return
                except ProducerFenced:
                    log.critical("this worker's transactional id %r is used by a newer worker: it stops publishing",
                                 transactional_id(self.settings))
                    raise
                except Exception as exc:
                    self.aborted_transactions += 1
                    with contextlib.suppress(Exception):
                        await self.producer.abort_transaction()
                    delay = _backoff(attempt)
                    log.warning("a transaction of %d messages failed (%r); trying again in %.2f s", len(messages),
                                exc, delay)
                    await asyncio.sleep(delay)

    async def _commit_in_transaction(self, flight: Flight, messages: Sequence[Outbound],
                                     substitute: Substitute | None) -> None:
        assert self.producer is not None and self.publisher is not None
        await self.producer.begin_transaction()
        groups = await self.publisher.group(messages, substitute)
        futures = []
        for (topic, partition), group in groups.items():
            futures += (await self.publisher.send(topic, partition, group))[3]
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
        await self.producer.send_offsets_to_transaction(flight.next_offsets, self.group_id)
        await self.producer.commit_transaction()

    @property
    def oldest_flight(self) -> Flight | None:
        return self.flights[0] if self.flights else None

    async def finish(self, timeout: float) -> bool:
        """Stop fetching, then wait (at most ``timeout`` in all) until the batches in flight are committed.
        True when everything fetched was committed."""
        self._fetching = False
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._fetch_stopped.wait(), max(0.0, deadline - time.monotonic()))
            await asyncio.wait_for(self.drain("stopping"), max(0.0, deadline - time.monotonic()))
        if self.flights:
            log.warning("stopping with %d batches not committed (%s): they will be read again",
                        len(self.flights), self.flights[0].describe())
        return not self.flights

    async def on_stop(self) -> None:
        budget = self.settings.worker.shutdown_timeout_s
        await self.finish(budget / 2)
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), budget / 4)
                except Exception as exc:
                    log.warning("%s did not stop cleanly (%r)", type(client).__name__, exc)

    @mode.Service.task
    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        try:
            await self._fetch_until_stopped()
        finally:
            self._fetch_stopped.set()

    async def _fetch_until_stopped(self) -> None:
        assert self.consumer is not None
        while self._fetching and not self.should_stop:
            self.fetch_beat = time.monotonic()
            try:
                revocations = self.revocations
                fetched = await self.consumer.getmany(timeout_ms=self.fetch_wait_ms, max_records=self.batch_max)
                by_topic: dict[str, list[tuple[TopicPartition, list[Any]]]] = {}
                for tp, records in fetched.items():
                    by_topic.setdefault(tp.topic, []).append((tp, records))
                for topic, parts in by_topic.items():
                    await self._dispatch(topic, parts, revocations)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the fetch loop never dies: the watchdog would only see silence
                log.warning("fetch failed (%r); retrying", exc, exc_info=not isinstance(exc, KafkaError))
                await asyncio.sleep(0.5)

    async def _dispatch(self, topic: str, parts: list[tuple[TopicPartition, list[Any]]],
                        revocations: int | None = None) -> None:
        """Hand a fetched batch to its agent as a flight. A batch whose fetch began before a revocation
        (``revocations``: the count then) or that comes while a rebalance runs is not: the revocation's drain did
        not wait for it. Its partitions that this consumer owns after the rebalance are sought back to the
        batch's first offset (fetched again, in order); the others are read by their new owner from the
        committed offsets. Processed here, it was answered twice (under exactly_once, committed twice: seen at a
        worker's join in the cluster soak); dropped without the seek, a kept partition skipped it."""
        records = [Inbound(record.value, record.key, record.topic, record.partition, record.offset)
                   for _, batch in parts for record in batch]
        next_offsets = {tp: batch[-1].offset + 1 for tp, batch in parts}
        self.waiting_for_room = True
        try:
            await self._room.acquire()
        finally:
            self.waiting_for_room = False
            self.fetch_beat = time.monotonic()
        if revocations is not None and (revocations != self.revocations or self.rebalancing):
            self._room.release()
            self.dropped_batches += 1
            kept = self.consumer.assignment() if self.consumer is not None else set()
            for tp, batch in parts:  # a partition this consumer (still, or again) owns: fetched again from here
                if tp in kept:
                    self.consumer.seek(tp, batch[0].offset)  # type: ignore[union-attr]
            log.info("a batch of %d messages fetched across a rebalance is fetched again (partitions kept) or "
                     "left to the partitions' new owner", len(records))
            return
        flight = Flight(records, next_offsets, asyncio.get_running_loop().create_future())
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        self.flights.append(flight)
        self._flight_added.set()
        await self.channels[topic].put(flight)

    @mode.Service.task
    async def _commit_loop(self) -> None:
        """Commits flights strictly in fetch order, each once its batch is acknowledged. Never dies: a commit
        that fails is tried again with the next one (offsets only move forward)."""
        while not (self.should_stop and not self.flights):  # keeps committing while a stop drains
            try:
                await self._commit_next()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the commit loop failed; carrying on")
                await asyncio.sleep(0.5)

    async def _commit_next(self) -> None:
        if not self.flights:
            if self._unsent_offsets:  # deferred to the interval (or a commit that failed): due, or a new batch
                self._flight_added.clear()
                due = self._commit_due()
                if not self._flushing and due > time.monotonic():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._flight_added.wait(), due - time.monotonic())
                    if self.flights:
                        return
                await self._commit({})
                return
            self.waiting_since = None
            self._flight_added.clear()
            await self._flight_added.wait()
            return
        flight = self.flights[0]
        # asyncio.wait, not await: cancelling this loop (a stop) must not cancel the flight's future
        if self._unsent_offsets and not flight.acked.done():  # earlier offsets wait: not past their interval
            due = 0.0 if self._flushing else self._commit_due() - time.monotonic()
            done, _ = await asyncio.wait((flight.acked,), timeout=max(0.0, due))
            if not done:
                await self._commit({})
                return
        if not flight.acked.done():
            await asyncio.wait((flight.acked,))
        offsets = dict(flight.next_offsets)
        committed = flight.in_transaction
        self.flights.popleft()
        self._room.release()
        while self.flights and self.flights[0].acked.done():  # coalesce ready flights into one commit
            committed &= self.flights[0].in_transaction
            offsets.update(self.flights.popleft().next_offsets)
            self._room.release()
        if committed:  # exactly_once: the offsets went with the batches' transactions
            self.committed_batches += 1
            self.committed_offsets.update(offsets)
            self.waiting_since = time.monotonic() if self.flights else None
            return
        if not self._flushing and time.monotonic() - self._last_commit < self.commit_interval_s:
            self._unsent_offsets.update(offsets)  # committed with a later batch's, or when the interval is up
            return
        await self._commit(offsets)

    def _commit_due(self) -> float:
        """When the offsets waiting are to be committed: the interval after the last commit (half a second at
        least after one that failed)."""
        return self._last_commit + max(self.commit_interval_s, 0.5 if self._commit_failed else 0.0)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        offsets = {**self._unsent_offsets, **offsets}
        self._last_commit = time.monotonic()
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # the partitions moved on (rebalance): their new owner re-reads from the last commit; repeats only
            self.commit_failures += 1
            self._unsent_offsets, self._commit_failed = {}, False
            log.warning("offset commit failed (%r); those requests may be answered again", exc)
        except Exception as exc:  # the broker away, or anything else: committed with the next batch
            self.commit_failures += 1
            self._unsent_offsets, self._commit_failed = offsets, True
            log.warning("offset commit failed (%r); trying again with the next one", exc)
        else:
            self.committed_batches += 1
            self.committed_offsets.update(offsets)
            self._unsent_offsets, self._commit_failed = {}, False
            self.waiting_since = time.monotonic() if self.flights else None

    async def drain(self, why: str) -> None:
        """Wait until every batch in flight is acknowledged and committed (offsets deferred to the commit
        interval included: committed now)."""
        if not self.flights and not self._unsent_offsets:
            return
        started = time.monotonic()
        count = len(self.flights)
        self._flushing += 1
        self._flight_added.set()  # the commit loop stops waiting for the interval
        try:
            while self.flights or (self._unsent_offsets and not self._commit_failed):
                await asyncio.sleep(0.005)
        finally:
            self._flushing -= 1
        log.info("%s: drained %d batches in flight in %.0f ms", why, count, 1000 * (time.monotonic() - started))
