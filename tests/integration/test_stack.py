"""The local stack's servers are real and talk their own protocols."""

from __future__ import annotations

import asyncio
import uuid

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cassandra.cluster import Session

from streamscore_stack import Stack


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def _produce_then_consume(bootstrap: str, topic: str, values: list[bytes]) -> list[tuple[bytes, bytes]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for index, value in enumerate(values):
            await producer.send_and_wait(topic, value, key=f"k{index}".encode(), partition=0)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=_unique("test-group"), auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        received: list[tuple[bytes, bytes]] = []
        while len(received) < len(values):
            batches = await asyncio.wait_for(consumer.getmany(timeout_ms=1000), timeout=60)
            received += [(m.key, m.value) for records in batches.values() for m in records]
        return received
    finally:
        await consumer.stop()


def test_kafka_round_trips_messages_in_order(kafka_bootstrap: str) -> None:
    values = [f"request-{index}".encode() for index in range(20)]

    received = asyncio.run(_produce_then_consume(kafka_bootstrap, _unique("stack-test"), values))

    assert received == [(f"k{index}".encode(), value) for index, value in enumerate(values)]


def test_cassandra_round_trips_rows(cassandra_session: Session) -> None:
    keyspace = _unique("stack_test")
    cassandra_session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    )
    try:
        cassandra_session.execute(f"CREATE TABLE {keyspace}.features (entity text PRIMARY KEY, score double)")
        insert = cassandra_session.prepare(f"INSERT INTO {keyspace}.features (entity, score) VALUES (?, ?)")
        for index in range(10):
            cassandra_session.execute(insert, (f"card-{index}", index / 10))

        rows = cassandra_session.execute(f"SELECT entity, score FROM {keyspace}.features")

        assert sorted((row.entity, row.score) for row in rows) == [(f"card-{i}", i / 10) for i in range(10)]
    finally:
        cassandra_session.execute(f"DROP KEYSPACE {keyspace}")


def test_redis_set_get(redis_client: redis.Redis) -> None:
    key = _unique("stack-test")

    redis_client.set(key, b"features", ex=60)

    assert redis_client.get(key) == b"features"
    redis_client.delete(key)


def test_status_shows_every_server_up_with_pid_and_version(stack: object) -> None:
    statuses = Stack(echo=lambda line: None).status()

    assert [status.name for status in statuses] == ["kafka", "cassandra", "redis"]
    for status in statuses:
        assert status.up, f"{status.name}: {status.detail}"
        assert status.pid is not None and status.pid > 0
        assert status.version, status.name
        assert status.log_file.is_file()
    versions = {status.name: status.version for status in statuses}
    assert versions["kafka"].startswith("4.")
    assert versions["cassandra"].startswith("5.0.")


def test_second_up_finds_everything_running(stack: object) -> None:
    lines: list[str] = []

    statuses = Stack(echo=lines.append).up()

    assert all(status.up for status in statuses)
    assert sum("already running" in line for line in lines) == 3
