"""The client SDK: produce requests, subscribe to predictions, request/reply ``predict``.

    async with Client() as client:
        await client.produce("fraud", {"id": "t-1", "entities": {...}, "features": {"amount": 12.5}})
        prediction = await client.predict("fraud", {...}, timeout=5.0)
        async for prediction in client.subscribe("fraud"):
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import TopicAlreadyExistsError

from streamscore.settings import Settings, get_settings

from . import topics
from .clock import now_ms
from .kafka import client_kwargs, new_topic
from .wire import pack_request, unpack


class PredictTimeout(TimeoutError):
    """No prediction arrived in time; the request may still be answered later on the reply topic."""


def _stamped(request: Mapping[str, Any]) -> dict[str, Any]:
    return {**request, "sent_ms": request.get("sent_ms") or now_ms()}


class Client:
    def __init__(self, settings: Settings | None = None, client_id: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self._producer: AIOKafkaProducer | None = None
        self._replies: _ReplyListener | None = None
        self._replies_started = asyncio.Lock()
        """Concurrent first predict() calls start one reply listener, not one each (the others leaked)."""

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**client_kwargs(self.settings.kafka), acks="all", linger_ms=2,
                                          max_batch_size=1 << 20, max_request_size=4 << 20)
        try:
            await self._producer.start()
        except BaseException:  # no connection: release what start() opened before it raised
            await self._producer.stop()
            self._producer = None
            raise

    async def stop(self) -> None:
        if self._replies is not None:
            await self._replies.stop()
        if self._producer is not None:
            await self._producer.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("Client.start() was not called (or use `async with Client() as client`)")
        return self._producer

    async def produce(self, model: str, request: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                      key: str | bytes | None = None) -> None:
        """Send one request, or a list sent as one batch message; waits for Kafka's acknowledgement."""
        future = await self.send(model, request, key)
        await future

    async def send(self, model: str, request: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                   key: str | bytes | None = None) -> asyncio.Future:
        """Queue a request (or a batch message) and return the future of its acknowledgement."""
        if isinstance(request, Mapping):
            payload: Any = _stamped(request)
            key = key if key is not None else _default_key(request)
        else:
            payload = [_stamped(element) for element in request]
        encoded_key = key.encode() if isinstance(key, str) else key
        return await self.producer.send(topics.requests(self.settings.topic_prefix, model), pack_request(payload),
                                        key=encoded_key)

    async def produce_many(self, model: str, requests: Iterable[Any], rate: float | None = None,
                           progress: Callable[[int], object] | None = None, window: int = 1000) -> int:
        """Send many messages (each a request, or a list of them), pipelined, at ``rate`` per second (None: as
        fast as possible), waiting for Kafka's acknowledgements every ``window`` messages and reporting each
        acknowledged chunk to ``progress``; returns how many were sent. A request map without ``sent_ms`` gets
        it stamped in place at send time, so the caller can measure latency from it."""
        pending: list[asyncio.Future] = []
        sent, started = 0, time.monotonic()
        for request in requests:
            if rate:
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if isinstance(request, dict) and not request.get("sent_ms"):
                request["sent_ms"] = now_ms()
            pending.append(await self.send(model, request))
            sent += 1
            if len(pending) >= window:
                await self._acknowledged(pending, progress)
        await self._acknowledged(pending, progress)
        return sent

    @staticmethod
    async def _acknowledged(pending: list[asyncio.Future], progress: Callable[[int], object] | None) -> None:
        await asyncio.gather(*pending)
        if progress is not None:
            progress(len(pending))
        pending.clear()

    async def subscribe(self, model: str | None = None, topic: str | None = None, from_beginning: bool = False,
                        group_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Predictions of a model (or any topic) as they arrive, decoded."""
        name = topic or topics.predictions(self.settings.topic_prefix, model or "")
        consumer = AIOKafkaConsumer(name, **client_kwargs(self.settings.kafka), group_id=group_id,
                                    isolation_level="read_committed",
                                    auto_offset_reset="earliest" if from_beginning else "latest",
                                    enable_auto_commit=group_id is not None)
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=2048)
                for records in batches.values():
                    for record in records:
                        yield unpack(record.value)
        finally:
            await consumer.stop()

    async def predict(self, model: str, request: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send one request with ``reply_to`` set to this client's reply topic and wait for its prediction."""
        if "id" not in request:
            request = {**request, "id": uuid.uuid4().hex}
        replies = await self._reply_listener()
        waiter = replies.expect(str(request["id"]))
        try:
            delivered = await self.send(model, {**request, "reply_to": replies.topic})
            # one request waiting for its answer: sent at once, not after the producer's linger (which
            # produce_many keeps, to fill producer batches)
            await self.producer.flush()
            await delivered
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise PredictTimeout(f"no prediction for request {request['id']!r} of model {model!r} within "
                                 f"{timeout} s: is a worker running (`streamscore worker --model {model}`)?"
                                 ) from None
        finally:
            replies.forget(str(request["id"]))

    async def _reply_listener(self) -> _ReplyListener:
        async with self._replies_started:
            if self._replies is None:
                listener = _ReplyListener(self.settings, topics.replies(self.settings.topic_prefix, self.client_id))
                await listener.start()
                self._replies = listener
        return self._replies


def _default_key(request: Mapping[str, Any]) -> bytes | None:
    """The recommended key: the first entity id, so one worker keeps seeing the same entities."""
    entities = request.get("entities")
    if isinstance(entities, Mapping) and entities:
        return str(next(iter(entities.values()))).encode()
    return None


class _ReplyListener:
    """Consumes this client's reply topic (no group: assigned directly) and resolves waiting predict calls."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._waiters: dict[str, asyncio.Future] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await ensure_topics(self.settings, [self.topic], partitions=1)
        self._consumer = AIOKafkaConsumer(**client_kwargs(self.settings.kafka), enable_auto_commit=False,
                                          isolation_level="read_committed")
        await self._consumer.start()
        partition = TopicPartition(self.topic, 0)
        self._consumer.assign([partition])
        await self._consumer.seek_to_end(partition)
        await self._consumer.position(partition)
        self._task = asyncio.create_task(self._run())

    def expect(self, request_id: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    prediction = unpack(record.value)
                    waiter = self._waiters.get(str(prediction.get("id")))
                    if waiter is not None and not waiter.done():
                        waiter.set_result(prediction)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def ensure_topics(settings: Settings, names: Sequence[str], partitions: int) -> None:
    """Create topics that do not exist yet, replicated as ``kafka.topic_replication_factor`` says."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [new_topic(settings.kafka, name, partitions) for name in names if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            await _until_led(admin, [topic.name for topic in missing])
    finally:
        await admin.close()


async def _until_led(admin: AIOKafkaAdminClient, names: Sequence[str], timeout_s: float = 10.0) -> None:
    """Wait until every partition of the new topics has a leader: a client that reads them at once would
    otherwise meet "not found in cluster metadata" (logged as an error by the client) while they propagate."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = await admin.describe_topics(list(names))
        if all(entry.get("error_code") == 0 and entry["partitions"]
               and all(partition.get("leader", -1) >= 0 for partition in entry["partitions"])
               for entry in described):
            return
        await asyncio.sleep(0.05)


async def partitions_of(settings: Settings, topic: str) -> list[int]:
    """Partition numbers of an existing topic (empty when it does not exist). Never creates it: a metadata
    request that names a missing topic makes a broker with ``auto.create.topics.enable`` create it, with its
    default partitions and no compaction, so the listing is asked first."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            return []
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(p["partition"] for entry in described if entry.get("error_code") == 0
                  for p in entry["partitions"])


async def partition_count(settings: Settings, topic: str) -> int:
    """Partitions of ``topic``, 0 when it does not exist (never creating it, as ``partitions_of``)."""
    return len(await partitions_of(settings, topic))


async def tail_consumer(settings: Settings, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer assigned every partition of ``topic`` and positioned at its end, before the
    caller produces anything: nothing produced afterwards can be missed (unlike a 'latest' subscription,
    whose position is only taken once the assignment arrives)."""
    partitions = [TopicPartition(topic, number) for number in await partitions_of(settings, topic)]
    if not partitions:
        raise ValueError(f"topic {topic!r} does not exist")
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:
        await consumer.position(partition)
    return consumer
