"""Committed offsets read stable (``streams/offsets.py``), against the real broker: while a transaction holds
pending offsets for a group, the plain read (aiokafka's ``committed``) still answers the older offset, which is
how a worker assigned those partitions read a batch again under exactly_once; ``stable_committed`` waits until
the transaction ends and answers the offset it committed."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamscore.streams.offsets import stable_committed


async def _scenario(bootstrap: str) -> dict[str, object]:
    topic, group = f"stable-{uuid.uuid4().hex[:8]}", f"stable-group-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 2, 1)])
    await admin.close()
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"stable-{uuid.uuid4().hex[:8]}",
                                enable_idempotence=True)
    await producer.start()
    try:
        consumer.assign([tp0, tp1])
        await consumer.commit({tp0: 3})  # a plain commit first: partition 1 has none
        before = await stable_committed(consumer, group, [tp0, tp1], timeout_s=10)
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp0: 7, tp1: 2}, group)
        waiting = asyncio.create_task(stable_committed(consumer, group, [tp0, tp1], timeout_s=20))
        await asyncio.sleep(1.0)
        plain_while_open = await consumer.committed(tp0)
        pending_after_1s = not waiting.done()
        await producer.commit_transaction()
        after = await asyncio.wait_for(waiting, 20)
        return {"before": before, "plain_while_open": plain_while_open, "pending_after_1s": pending_after_1s,
                "after": after, "tp0": tp0, "tp1": tp1}
    finally:
        await producer.stop()
        await consumer.stop()


def test_offsets_pending_in_a_transaction_are_waited_for_not_read_old(kafka_bootstrap: str) -> None:
    result = asyncio.run(asyncio.wait_for(_scenario(kafka_bootstrap), 60))
    tp0, tp1 = result["tp0"], result["tp1"]

    assert result["before"] == {tp0: 3}  # no committed offset for partition 1: absent, not -1
    assert result["plain_while_open"] == 3, "the plain read no longer shows the race this module exists for"
    assert result["pending_after_1s"], "the stable read answered while the transaction held pending offsets"
    assert result["after"] == {tp0: 7, tp1: 2}
