"""Unit tests of what the scenarios forced into the delivery path, without a broker: messages Kafka will never
take are replaced by dead letters instead of retried forever, a resend that cannot even be queued is tried
again, a flight is acknowledged only once Kafka has all of its messages, a failing batch is split down to the
message at fault, dead letters fit the broker's limit, and Faust's flow control leaves the flights alone."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import (
    InvalidTopicError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
)

from streamscore.streams import delivery
from streamscore.streams.delivery import BatchPublisher, Flight
from streamscore.streams.records import Inbound, Outbound
from streamscore.streams.wire import (
    DEAD_LETTER_MAX_BYTES,
    HEADER_ORIGINAL_BYTES,
    HEADER_ORIGINAL_SHA256,
    KEPT_VALUE_BYTES,
    bounded_letter,
)
from streamscore.workers.deadletters import DeadLetters
from streamscore.workers.pipeline import BatchOutcome

DLQ = "p.m.dlq"


class FakeBuilder:
    def __init__(self, limit: int) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []
        self.limit = limit

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any, headers: Any) -> object | None:
        if len(self.records) >= self.limit:
            return None
        self.records.append((key, value))
        return object()


@dataclass
class FakeProducer:
    """Accepts batches unless ``refuse(topic, records)`` returns an error for them."""

    refuse: Any = None
    batch_limit: int = 100
    partitions: dict[str, int] = field(default_factory=lambda: {"p.m.predictions": 2, DLQ: 2, "reply": 1})
    cluster_answers: bool = True
    unknown_wait_s: float = 0.0
    sent: list[tuple[str, int, list[tuple[bytes | None, bytes]]]] = field(default_factory=list)
    send_failures: int = 0
    """send_batch raises this many times first (the accumulator full, the broker away)."""

    @property
    def client(self) -> FakeProducer:
        return self

    async def fetch_all_metadata(self) -> None:
        if not self.cluster_answers:
            raise KafkaConnectionError("no broker")

    async def partitions_for(self, topic: str) -> set[int]:
        if topic not in self.partitions:
            await asyncio.sleep(self.unknown_wait_s or 3600)
        return set(range(self.partitions[topic]))

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder(self.batch_limit)

    async def send_batch(self, builder: FakeBuilder, topic: str, partition: int) -> asyncio.Future:
        if self.send_failures:
            self.send_failures -= 1
            raise KafkaTimeoutError("accumulator full")
        future = asyncio.get_running_loop().create_future()
        error = self.refuse(topic, builder.records) if self.refuse else None
        if error is None:
            self.sent.append((topic, partition, builder.records))
            future.set_result(None)
        else:
            future.set_exception(error)
        return future


def letter_for(message: Any, error: BaseException) -> Outbound | None:
    """The substitute of the tests: own topics are retried, the others become dead letters."""
    if message[0] in ("p.m.predictions", DLQ):
        return None
    return Outbound(DLQ, message[1], message[2], [("streamscore-error-kind", b"undeliverable")])


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(delivery, "_RETRY_BACKOFF_S", (0.0, 0.01))
    yield


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_a_topic_kafka_refuses_gets_dead_letters_instead_of_endless_retries() -> None:
    producer = FakeProducer(refuse=lambda topic, _: InvalidTopicError() if topic == "reply" else None)

    async def scenario() -> None:
        publisher = BatchPublisher(producer)
        acked = await publisher.publish([Outbound("p.m.predictions", b"a", b"1"), Outbound("reply", b"b", b"2")],
                                        letter_for)
        await acked
        assert publisher.substituted == 1
        # the topic is remembered: the next prediction for it goes straight to the dead-letter topic
        await (await publisher.publish([Outbound("reply", b"c", b"3")], letter_for))

    run(scenario())
    topics = [(topic, [value for _, value in records]) for topic, _, records in producer.sent]
    assert ("p.m.predictions", [b"1"]) in topics
    assert [value for topic, values in topics if topic == DLQ for value in values] == [b"2", b"3"]


def test_a_message_too_large_is_found_alone_and_only_it_dead_lettered() -> None:
    def refuse(topic: str, records: list[tuple[bytes | None, bytes]]) -> BaseException | None:
        return MessageSizeTooLargeError() if topic == "reply" and any(len(v) > 100 for _, v in records) else None

    producer = FakeProducer(refuse=refuse)

    async def scenario() -> None:
        publisher = BatchPublisher(producer)
        await (await publisher.publish([Outbound("reply", b"a", b"small"), Outbound("reply", b"b", b"x" * 200),
                                        Outbound("reply", b"c", b"small too")], letter_for))

    run(scenario())
    delivered = {(topic, value) for topic, _, records in producer.sent for _, value in records}
    assert delivered == {("reply", b"small"), ("reply", b"small too"), (DLQ, b"x" * 200)}


def test_own_topics_are_retried_until_kafka_takes_them() -> None:
    refusals = iter([MessageSizeTooLargeError(), MessageSizeTooLargeError(), None])
    producer = FakeProducer(refuse=lambda topic, _: next(refusals))

    async def scenario() -> None:
        publisher = BatchPublisher(producer)
        await (await publisher.publish([Outbound(DLQ, b"k", b"letter")], letter_for))
        assert publisher.substituted == 0 and publisher.resent == 2

    run(scenario())
    assert [(topic, records) for topic, _, records in producer.sent] == [(DLQ, [(b"k", b"letter")])]


def test_a_resend_that_cannot_be_queued_is_tried_again_not_dropped() -> None:
    refusals = iter([KafkaConnectionError("broker away"), None, None])
    producer = FakeProducer(refuse=lambda topic, _: next(refusals))

    async def scenario() -> None:
        publisher = BatchPublisher(producer)
        acked = await publisher.publish([Outbound("p.m.predictions", b"k", b"v")], letter_for)
        producer.send_failures = 2  # the next two sends raise instead of returning a future
        await acked

    run(scenario())
    assert [records for _, _, records in producer.sent] == [[(b"k", b"v")]]


def test_a_new_topic_without_metadata_is_unwritable_only_while_the_cluster_answers() -> None:
    async def scenario(cluster_answers: bool) -> list[Any]:
        producer = FakeProducer(cluster_answers=cluster_answers, unknown_wait_s=0)
        publisher = BatchPublisher(producer, topic_wait_s=0.05)
        await (await publisher.publish([Outbound("missing.topic", b"k", b"v")], letter_for))
        return producer.sent

    assert [topic for topic, _, _ in run(scenario(True))] == [DLQ]


def test_while_no_broker_answers_a_publication_waits_and_retries_never_dead_letters() -> None:
    async def scenario() -> tuple[bool, int, list[Any]]:
        producer = FakeProducer(cluster_answers=False, unknown_wait_s=0)
        publisher = BatchPublisher(producer, topic_wait_s=0.01)
        acked = await publisher.publish([Outbound("missing.topic", b"k", b"v")], letter_for)  # never raises
        await asyncio.sleep(0.3)
        return acked.done(), publisher.failures, producer.sent

    done, failures, sent = run(scenario())
    assert not done and failures >= 2 and sent == []  # the broker is away: not the topic's fault


def test_an_own_topic_slow_to_answer_is_asked_again_at_once() -> None:
    async def scenario() -> list[Any]:
        producer = FakeProducer(partitions={DLQ: 1})
        publisher = BatchPublisher(producer, topic_wait_s=0.05)
        acked = await publisher.publish([Outbound("p.m.predictions", b"k", b"v")], letter_for)
        await asyncio.sleep(0.2)  # no metadata yet, and no substitute for it: retried, not dead-lettered
        assert not acked.done() and publisher.failures >= 1
        producer.partitions["p.m.predictions"] = 2  # the metadata arrives
        await acked
        return producer.sent

    assert [topic for topic, _, _ in run(scenario())] == ["p.m.predictions"]


# --------------------------------------------------------------------------------------------- the agent


class FakePublisher:
    """Acknowledges every publication at once and keeps what was published."""

    def __init__(self) -> None:
        self.published: list[list[Any]] = []

    async def publish(self, messages: list[Any], substitute: Any = None) -> asyncio.Future:
        self.published.append(messages)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class FakePipeline:
    """Fails any batch holding a poison message; ``broken`` makes every call fail, even on one message."""

    dlq_topic = DLQ
    predictions_topic = "p.m.predictions"
    letters = DeadLetters("m", DLQ)

    class model:  # stands in for the runtime attribute
        name = "m"

    def __init__(self, broken: BaseException | None = None) -> None:
        self.calls = 0
        self.broken = broken

    async def process(self, batch: list[Inbound]) -> BatchOutcome:
        self.calls += 1
        if self.broken is not None:
            raise self.broken
        if any(message.value == b"poison" for message in batch):
            raise ValueError("poison")
        predictions = [Outbound("p.m.predictions", message.value, b"prediction") for message in batch]
        shadow = [Outbound("p.m.shadow", message.value, b"shadow record") for message in batch]
        return BatchOutcome(predictions, [], len(batch), 0, {"decode": 1}, by_version={"1": len(batch)},
                            status_by_version={"1": {"ok": len(batch)}}, extra=shadow)


def make_agent(pipeline: FakePipeline | None = None) -> tuple[Any, FakePublisher]:
    from streamscore.workers.app import ModelScorer
    from streamscore.workers.metrics import WorkerMetrics

    agent = ModelScorer(pipeline or FakePipeline(), WorkerMetrics())
    publisher = FakePublisher()

    class Delivery:  # at_least_once: what BatchDelivery.publish does, with the fake publisher
        async def publish(self, flight: Any, messages: list[Any], substitute: Any = None) -> asyncio.Future:
            return await publisher.publish(messages, substitute)

    agent.delivery = Delivery()
    agent.delivery.publisher = publisher
    return agent, publisher


def kinds(messages: list[Any]) -> list[str]:
    return [dict(message[3] or [])["streamscore-error-kind"].decode() for message in messages if message[3]]


def test_a_flight_is_acknowledged_once_its_publication_is() -> None:
    async def scenario() -> FakePublisher:
        agent, publisher = make_agent()
        flight = Flight([Inbound(b"r1")], {}, asyncio.get_running_loop().create_future())
        await agent.handle(flight)
        await asyncio.wait_for(asyncio.shield(flight.acked), 5)
        assert flight.state == "acknowledged"
        return publisher

    publisher = run(scenario())
    assert [(message[0], message[1]) for message in publisher.published[0]] == [("p.m.predictions", b"r1"),
                                                                                ("p.m.shadow", b"r1")]


@pytest.mark.parametrize("failure", [ValueError("bug"), TypeError("object of type 'NoneType' has no len()"),
                                     RuntimeError("stage down")])
def test_a_batch_ends_dead_lettered_whatever_the_pipeline_raises(monkeypatch: pytest.MonkeyPatch,
                                                                  failure: BaseException) -> None:
    from streamscore.workers import app

    monkeypatch.setattr(app, "_PIPELINE_ATTEMPTS", 1)
    batch = [Inbound(b"r1", b"k1", "t", 0, 1), Inbound(None, b"tombstone", "t", 0, 2)]

    async def scenario() -> tuple[Flight, FakePublisher]:
        agent, publisher = make_agent(FakePipeline(broken=failure))
        flight = Flight(batch, {}, asyncio.get_running_loop().create_future())
        await agent.handle(flight)
        await asyncio.wait_for(asyncio.shield(flight.acked), 5)
        return flight, publisher

    flight, publisher = run(scenario())
    (published,) = publisher.published
    assert kinds(published) == ["processing_failed", "processing_failed"]
    assert [(message[1], message[2]) for message in published] == [(b"k1", b"r1"), (b"tombstone", None)]
    assert flight.acked.done()


def test_an_exception_outside_the_pipeline_still_ends_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    agent, publisher = make_agent()

    def broken_isolation(*args: Any) -> Any:
        raise RuntimeError("isolation itself failed")

    monkeypatch.setattr(agent, "_process", broken_isolation)

    async def scenario() -> Flight:
        flight = Flight([Inbound(b"r1", b"k", "t", 0, 5)], {}, asyncio.get_running_loop().create_future())
        await agent.handle(flight)
        await asyncio.wait_for(asyncio.shield(flight.acked), 5)
        return flight

    run(scenario())
    (published,) = publisher.published
    assert kinds(published) == ["processing_failed"]
    assert dict(published[0][3])["streamscore-source"] == b"t/0/5"


def test_a_poison_message_is_dead_lettered_alone_and_the_rest_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamscore.workers import app

    monkeypatch.setattr(app, "_PIPELINE_ATTEMPTS", 1)
    batch = [Inbound(f"r{index}".encode(), topic="t", partition=0, offset=index) for index in range(9)]
    batch.insert(5, Inbound(b"poison", topic="t", partition=0, offset=99))

    async def scenario() -> BatchOutcome:
        agent, _ = make_agent()
        return await agent._process(batch)

    outcome = run(scenario())
    assert outcome.answered == 9 and len(outcome.predictions) == 9
    assert [letter.value for letter in outcome.dead_letters] == [b"poison"]
    assert dict(outcome.dead_letters[0].headers or [])["streamscore-error-kind"] == b"processing_failed"
    # what the halves published beside their answers survives the split, and their counts add up
    assert sorted(record.key for record in outcome.extra) == sorted(f"r{index}".encode() for index in range(9))
    assert outcome.by_version == {"1": 9} and outcome.status_by_version == {"1": {"ok": 9}}


# ------------------------------------------------------------------------------------- letters, channel


def test_a_dead_letter_over_the_broker_limit_is_cut_and_says_so() -> None:
    value = b"v" * (DEAD_LETTER_MAX_BYTES + 10)
    key, kept, headers = bounded_letter(b"k" * 5000, value, [("streamscore-error-kind", b"too_large")])

    assert len(kept) == KEPT_VALUE_BYTES and value.startswith(kept) and key == b"k" * 1024
    named = dict(headers)
    assert named[HEADER_ORIGINAL_BYTES] == str(len(value)).encode()
    assert named[HEADER_ORIGINAL_SHA256] == hashlib.sha256(value).hexdigest().encode()
    small = (b"k", b"small", [("a", b"b")])
    assert bounded_letter(*small) == small
    tombstone = (b"k", None, [("a", b"b")])
    assert bounded_letter(*tombstone) == tombstone


def test_faust_flow_control_neither_blocks_nor_clears_flights() -> None:
    import faust

    from streamscore.workers.app import FlightChannel

    async def scenario() -> list[str]:
        app = faust.App("flight-channel-test", broker="kafka://127.0.0.1:1")
        channel = FlightChannel(app, maxsize=4)
        app.flow_control.suspend()  # what Faust does when its own group rebalances
        await asyncio.wait_for(channel.queue.put("flight-1"), 1)
        app.flow_control.clear()
        app.flow_control.resume()
        return [channel.queue.get_nowait()]

    assert run(scenario()) == ["flight-1"]


def test_a_group_that_cannot_be_queued_is_sent_again_alone_and_the_others_are_not_repeated() -> None:
    producer = FakeProducer(partitions={"p.m.predictions": 2, DLQ: 2})
    failures = {"left": 2}

    async def scenario() -> BatchPublisher:
        publisher = BatchPublisher(producer)
        send = producer.send_batch

        async def flaky(builder: FakeBuilder, topic: str, partition: int) -> asyncio.Future:
            if topic == DLQ and failures["left"]:
                failures["left"] -= 1
                raise KafkaTimeoutError("accumulator full")
            return await send(builder, topic, partition)

        producer.send_batch = flaky  # type: ignore[method-assign]
        await (await publisher.publish([Outbound("p.m.predictions", b"a", b"1"), Outbound(DLQ, b"b", b"2")],
                                       letter_for))
        return publisher

    publisher = run(scenario())
    delivered = [(topic, value) for topic, _, records in producer.sent for _, value in records]
    assert sorted(delivered) == [(DLQ, b"2"), ("p.m.predictions", b"1")]  # each exactly once
    assert publisher.resent == 2 and publisher.failures == 0


# ------------------------------------------------------------------------------------------- commit interval


class RecordingConsumer:
    """Records each commit request: (monotonic time, offsets by partition)."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, dict[Any, int]]] = []

    async def commit(self, offsets: dict[Any, int]) -> None:
        import time

        self.commits.append((time.monotonic(), dict(offsets)))


def _delivery(interval_ms: int) -> Any:
    from streamscore.settings import Settings, WorkerSettings

    batch_delivery = delivery.BatchDelivery(Settings(worker=WorkerSettings(commit_interval_ms=interval_ms,
                                                                           max_batches_in_flight=64)), {})
    batch_delivery.consumer = RecordingConsumer()
    return batch_delivery


async def _acknowledge_one_by_one(batch_delivery: Any, flights: int, gap_s: float) -> list[Flight]:
    """``flights`` one-message batches of partition 0, each acknowledged ``gap_s`` after the previous; the
    commit loop runs meanwhile. Returns them once every one is acknowledged (the loop still running)."""
    from aiokafka import TopicPartition

    loop = asyncio.get_running_loop()
    made = []
    for offset in range(flights):
        flight = Flight([], {TopicPartition("p.m.requests", 0): offset + 1}, loop.create_future())
        batch_delivery.flights.append(flight)
        batch_delivery._flight_added.set()
        made.append(flight)
        await asyncio.sleep(gap_s)
        flight.acked.set_result(None)
    return made


def _committed_offsets(consumer: RecordingConsumer) -> list[int]:
    return [next(iter(offsets.values())) for _, offsets in consumer.commits]


def test_light_traffic_commits_once_per_interval_not_per_batch() -> None:
    async def scenario() -> tuple[list[int], float]:
        batch_delivery = _delivery(100)
        committing = asyncio.create_task(delivery.BatchDelivery._commit_loop(batch_delivery))
        started = asyncio.get_running_loop().time()
        await _acknowledge_one_by_one(batch_delivery, 50, 0.005)  # 200 batches a second for 0.25 s
        await asyncio.sleep(0.3)  # the interval after the last batch: its offset is committed without a new one
        committing.cancel()
        return _committed_offsets(batch_delivery.consumer), started

    offsets, _ = run(scenario())

    assert offsets[-1] == 50, "the last acknowledged batch's offset was not committed once its interval was up"
    assert len(offsets) <= 6, f"{len(offsets)} commits for 50 batches in 0.25 s at a 100 ms interval"
    assert offsets == sorted(offsets), "offsets went backwards"


def test_no_offset_is_committed_before_its_batch_is_acknowledged() -> None:
    async def scenario() -> list[int]:
        from aiokafka import TopicPartition

        batch_delivery = _delivery(100)
        committing = asyncio.create_task(delivery.BatchDelivery._commit_loop(batch_delivery))
        loop = asyncio.get_running_loop()
        first, second, stuck = (Flight([], {TopicPartition("p.m.requests", 0): offset}, loop.create_future())
                                for offset in (1, 2, 3))
        batch_delivery.flights.extend([first, second, stuck])
        batch_delivery._flight_added.set()
        first.acked.set_result(None)  # committed at once (no commit yet)
        await asyncio.sleep(0.01)
        second.acked.set_result(None)  # deferred to the interval
        await asyncio.sleep(0.4)  # the stuck batch's ack never comes: the second's offset goes at the interval
        committing.cancel()
        return _committed_offsets(batch_delivery.consumer)

    assert run(scenario()) == [1, 2]


def test_a_drain_commits_the_deferred_offsets_at_once() -> None:
    async def scenario() -> tuple[list[int], float]:
        batch_delivery = _delivery(10_000)  # an interval the drain must not wait for
        committing = asyncio.create_task(delivery.BatchDelivery._commit_loop(batch_delivery))
        await _acknowledge_one_by_one(batch_delivery, 3, 0.001)
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        await batch_delivery.drain("partitions revoked")
        took = asyncio.get_running_loop().time() - started
        committing.cancel()
        return _committed_offsets(batch_delivery.consumer), took

    offsets, took = run(scenario())

    assert offsets[-1] == 3 and took < 1.0


def test_interval_zero_commits_after_each_batch() -> None:
    async def scenario() -> list[int]:
        batch_delivery = _delivery(0)
        committing = asyncio.create_task(delivery.BatchDelivery._commit_loop(batch_delivery))
        await _acknowledge_one_by_one(batch_delivery, 5, 0.02)
        await asyncio.sleep(0.05)
        committing.cancel()
        return _committed_offsets(batch_delivery.consumer)

    assert run(scenario()) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------- rebalance


class Channel:
    def __init__(self) -> None:
        self.flights: list[Flight] = []

    async def put(self, flight: Flight) -> None:
        self.flights.append(flight)


def test_a_batch_fetched_before_a_revocation_is_left_to_the_partitions_next_owner() -> None:
    """The revocation's drain waits for the flights; a batch still between its fetch and its flight (waiting for
    room) when partitions were revoked is dropped, not answered after the drain by an owner that may no longer
    own its partitions (it was answered twice, committed twice under exactly_once)."""
    from aiokafka import ConsumerRecord, TopicPartition

    async def scenario() -> tuple[int, int, int]:
        from streamscore.settings import Settings

        channel = Channel()
        batch_delivery = delivery.BatchDelivery(Settings(), {"p.m.requests": channel})
        tp = TopicPartition("p.m.requests", 0)
        record = ConsumerRecord("p.m.requests", 0, 5, 0, 0, b"k", b"v", None, 1, 1, [])
        listener = delivery._Rebalance(batch_delivery)
        before = batch_delivery.revocations
        await listener.on_partitions_revoked([])  # a rebalance begins (nothing in flight to drain)
        await batch_delivery._dispatch("p.m.requests", [(tp, [record])], before)  # fetched before it
        during = batch_delivery.revocations
        await batch_delivery._dispatch("p.m.requests", [(tp, [record])], during)  # fetched while it runs
        dropped = len(channel.flights)
        batch_delivery.consumer = None  # at_least_once: no stable read on assignment
        await listener.on_partitions_assigned([tp])
        await batch_delivery._dispatch("p.m.requests", [(tp, [record])], batch_delivery.revocations)
        return dropped, len(channel.flights), batch_delivery.dropped_batches

    dropped, dispatched, counted = run(scenario())

    assert dropped == 0, "a batch fetched before or during the rebalance was dispatched"
    assert dispatched == 1 and counted == 2
