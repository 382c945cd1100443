"""Failover scenarios against the cluster profile (``stack up --cluster``: three Kafka nodes, three Cassandra
nodes, topics and keyspace replicated 3, Cassandra read and written at QUORUM), while requests stream through
two workers of one group:

- ``broker_failover``: the broker leading most of the request and prediction partitions SIGKILLed, restarted
  ``down_s`` later;
- ``cassandra_failover``: one Cassandra node SIGKILLed, restarted ``down_s`` later (the workers run without the
  Redis cache here, so every feature read goes to Cassandra and the failure is felt);
- ``rolling_restart``: the three brokers stopped (SIGTERM) and started again one by one, each once the previous
  one's partitions are fully in sync again.

Each returns a ``Tally`` whose notes carry ``degraded`` (answers with a degraded feature, goal 0 with RF 3 and
quorum), ``p50/p99_before_ms`` and ``p50/p99_during_ms`` (request sent to prediction read, for the requests sent
in the ``BEFORE_S`` seconds before the failure and during its window: from the kill until the node is back and,
for brokers, every partition in sync again) and ``max_during_ms``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiokafka import AIOKafkaClient

from streamscore.streams.kafka import client_kwargs

from .harness import Collector, Load, Scenario, Tally, TestCluster, request_messages, tally, wait_for
from .scenarios import _finish, in_flight_bound, streaming

BEFORE_S = 15.0
"""The latency before a failure is that of the requests sent in the last this many seconds before it."""


async def _metadata(scenario: Scenario) -> Any:
    client = AIOKafkaClient(**client_kwargs(scenario.settings.kafka))
    await client.bootstrap()
    try:
        return await client.fetch_all_metadata()
    finally:
        await client.close()


def _topics(scenario: Scenario) -> list[str]:
    return [scenario.requests_topic, scenario.predictions_topic]


async def leading_broker(scenario: Scenario) -> int:
    """The node id leading most of the request and prediction partitions."""
    metadata = await _metadata(scenario)
    leaders: dict[int, int] = {}
    for topic in _topics(scenario):
        for partition in metadata.partitions_for_topic(topic) or ():
            leader = metadata.leader_for_partition(_tp(topic, partition))
            leaders[leader] = leaders.get(leader, 0) + 1
    return max(leaders, key=lambda node: leaders[node])


def _tp(topic: str, partition: int) -> Any:
    from aiokafka import TopicPartition

    return TopicPartition(topic, partition)


async def in_sync(scenario: Scenario, replicas: int = 3) -> bool:
    """Whether every partition of the scenario's topics and of the consumer offsets has ``replicas`` in sync."""
    metadata = await _metadata(scenario)
    for topic in [*_topics(scenario), scenario.dlq_topic, "__consumer_offsets"]:
        for partition in metadata.partitions_for_topic(topic) or ():
            state = metadata._partitions[topic][partition]
            if len(state.isr) < replicas:
                return False
    return True


async def wait_in_sync(scenario: Scenario, timeout: float = 120.0) -> float:
    started = time.monotonic()
    while not await in_sync(scenario):
        assert time.monotonic() - started < timeout, f"partitions not back in sync after {timeout:.0f} s"
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def latency_notes(load: Load, collector: Collector, windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """p99 and max of request-to-prediction latency (ms) for the requests sent in each window (wall clock)."""
    notes: dict[str, Any] = {}
    for name, (start, end) in windows.items():
        latencies = np.array([collector.arrived[request_id] - sent for request_id, sent in load.sent_at.items()
                              if start <= sent < end and request_id in collector.arrived]) * 1000
        if latencies.size:
            notes[f"p50_{name}_ms"] = round(float(np.percentile(latencies, 50)), 1)
            notes[f"p99_{name}_ms"] = round(float(np.percentile(latencies, 99)), 1)
            notes[f"max_{name}_ms"] = round(float(latencies.max()), 1)
            notes[f"n_{name}"] = int(latencies.size)
    return notes


def degraded(collector: Collector) -> int:
    return sum(1 for first in collector.first.values() if first["degraded"])


async def _stream_with(scenario: Scenario, count: int, rate: float, seed: int,
                       fault: Any, workers_env: dict[str, str] | None = None) -> Tally:
    """Two workers, ``count`` requests at ``rate``; ``fault(load, collector)`` runs once a fifth was answered and
    returns ``(notes, window)``: what it measured and the wall-clock window of the failure."""
    await scenario.create_topics()
    workers = [scenario.worker(label, **(workers_env or {})) for label in ("a", "b")]
    started = time.monotonic()
    async with streaming(scenario, *workers) as collector:
        load = Load(scenario.settings, scenario.requests_topic, rate)
        sending = asyncio.create_task(load.send_all(request_messages(scenario.prefix, count, scenario.library.cards,
                                                                     scenario.library.merchants, seed)))
        try:
            await wait_for(lambda: collector.answered > count // 5, 180, "a fifth of the requests answered")
            before_start = time.time()
            notes, window = await fault(load, collector)
            await sending
            await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=240)
        finally:
            await _finish(sending)
        for worker in workers:
            assert worker.alive, f"worker died:\n{worker.log_tail()}"
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    # before: the steady stream just before the failure (the workers' first seconds, caches cold, are left out)
    before_end = min(before_start, window[0])
    notes.update(latency_notes(load, collector, {"before": (before_end - BEFORE_S, before_end), "during": window}))
    result.notes.update(degraded=degraded(collector), repeat_bound=in_flight_bound(scenario, 2), **notes)
    return result


async def broker_failover(scenario: Scenario, cluster: TestCluster, count: int, rate: float, down_s: float = 15.0,
                          seed: int = 21) -> Tally:
    async def fault(load: Load, collector: Collector) -> tuple[dict[str, Any], tuple[float, float]]:
        node = await leading_broker(scenario)
        killed_at = time.time()
        await asyncio.to_thread(cluster.kill, f"kafka-{node}", signal.SIGKILL)
        mark = collector.answered
        resumed_s = await wait_for(lambda: collector.answered > mark + 100, 120, "answers with the broker down")
        await asyncio.sleep(max(0.0, down_s - (time.time() - killed_at)))
        await asyncio.to_thread(cluster.up)
        back_at = time.time()
        synced_s = await wait_in_sync(scenario)
        return ({"killed": f"kafka-{node}", "down_s": round(back_at - killed_at, 1),
                 "answers_resumed_after_s": round(resumed_s, 1), "in_sync_after_restart_s": round(synced_s, 1)},
                (killed_at, back_at + synced_s))

    return await _stream_with(scenario, count, rate, seed, fault)


async def cassandra_failover(scenario: Scenario, cluster: TestCluster, count: int, rate: float, node: int = 2,
                             down_s: float = 20.0, seed: int = 22) -> Tally:
    async def fault(load: Load, collector: Collector) -> tuple[dict[str, Any], tuple[float, float]]:
        killed_at = time.time()
        await asyncio.to_thread(cluster.kill, f"cassandra-{node}", signal.SIGKILL)
        await asyncio.sleep(down_s)
        restart = time.monotonic()
        await asyncio.to_thread(cluster.up)
        back_at = time.time()
        return ({"killed": f"cassandra-{node}", "down_s": round(back_at - killed_at, 1),
                 "node_restart_s": round(time.monotonic() - restart, 1), "cache": "none"}, (killed_at, back_at))

    return await _stream_with(scenario, count, rate, seed, fault, {"STREAMSCORE_CACHE": "none"})


async def rolling_restart(scenario: Scenario, cluster: TestCluster, count: int, rate: float,
                          nodes: Sequence[int] = (1, 2, 3), seed: int = 23) -> Tally:
    async def fault(load: Load, collector: Collector) -> tuple[dict[str, Any], tuple[float, float]]:
        started_at = time.time()
        steps = []
        for node in nodes:
            step = time.monotonic()
            await asyncio.to_thread(cluster.kill, f"kafka-{node}", signal.SIGTERM)
            stopped_s = time.monotonic() - step
            await asyncio.to_thread(cluster.up)
            synced_s = await wait_in_sync(scenario)
            steps.append({"node": node, "stop_s": round(stopped_s, 1), "total_s": round(time.monotonic() - step, 1),
                          "in_sync_s": round(synced_s, 1)})
        return {"steps": steps}, (started_at, time.time())

    return await _stream_with(scenario, count, rate, seed, fault)
