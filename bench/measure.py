"""Measuring through Kafka: readiness probes, and drain results from the predictions' own timestamps.

Nothing here runs while a process under test drains a backlog except a poll of the predictions topic's end
offsets twice a second (a metadata request, no records): the records are read once the drain is over, and
the rate comes from the timestamps the worker's producer put on them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streamscore.settings import Settings
from streamscore.streams.client import tail_consumer
from streamscore.streams.kafka import client_kwargs

from . import BenchFailed
from .processes import Process
from .workload import new_producer

PROBE_ROUND_S = 10.0


@dataclass
class DrainResult:
    """One backlog drained by the process(es) under test."""

    phase: str
    requests: int
    messages: int
    batch_size: int
    answered: int
    """Distinct request ids of the phase that got a prediction."""
    duplicates: int
    """Predictions beyond the first for an id (at-least-once repeats; 0 unless something restarted)."""
    first_ms: int
    """Kafka timestamp of the phase's first prediction."""
    last_ms: int
    load_s: float
    """How long loading the backlog took (the process under test was frozen meanwhile)."""
    wait_s: float
    """Wall time from thaw until the harness saw every prediction (or gave up)."""
    per_worker: dict[str, int] = field(default_factory=dict)
    """Predictions per lineage worker id."""
    cpu: dict[str, Any] = field(default_factory=dict)
    """Cores used during the drain, per process and by the rest of the machine (``CpuMeter``)."""

    @property
    def span_s(self) -> float:
        return max(self.last_ms - self.first_ms, 1) / 1000

    @property
    def eps(self) -> float:
        """Requests answered per second over the span of the predictions' timestamps."""
        return self.answered / self.span_s if self.answered > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "span_s": round(self.span_s, 3), "eps": round(self.eps, 1)}


def worker_of(value: bytes) -> str:
    """The lineage worker id of a packed prediction ('?' when it has none)."""
    prediction = msgpack.unpackb(value, raw=False, strict_map_key=False)
    lineage = prediction.get("lineage") if isinstance(prediction, dict) else None
    return str(lineage.get("worker_id", "?")) if isinstance(lineage, dict) else "?"


class PredictionTopic:
    """A group-less reader of a predictions topic, from the end offsets it had when opened."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None
        self._start: dict[TopicPartition, int] = {}

    async def open(self) -> PredictionTopic:
        self._consumer = await tail_consumer(self.settings, self.topic)
        self._start = {tp: await self._consumer.position(tp) for tp in self._consumer.assignment()}
        return self

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("PredictionTopic.open() was not awaited")
        return self._consumer

    async def produced(self) -> int:
        """Messages written to the topic since it was opened (end offsets only: no records are fetched)."""
        ends = await self.consumer.end_offsets(list(self._start))
        return sum(ends[tp] - start for tp, start in self._start.items())

    async def poll(self, timeout_ms: int = 500) -> list[ConsumerRecord]:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=20_000)
        return [record for records in batches.values() for record in records]

    async def read_to_end(self) -> list[ConsumerRecord]:
        """Every record from the current position up to the end offsets as of now."""
        ends = await self.consumer.end_offsets(list(self._start))
        records: list[ConsumerRecord] = []
        while await self._behind(ends):
            records.extend(await self.poll())
        return records

    async def _behind(self, ends: dict[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await self.consumer.position(tp) < end:
                return True
        return False


def summarize(phase: str, records: Sequence[ConsumerRecord], requests: int, messages: int, batch_size: int,
              load_s: float, wait_s: float) -> DrainResult:
    ours = [record for record in records if record.key is not None and record.key.startswith(f"{phase}-".encode())]
    ids = Counter(record.key for record in ours)
    stamps = [record.timestamp for record in ours]
    return DrainResult(phase=phase, requests=requests, messages=messages, batch_size=batch_size, answered=len(ids),
                       duplicates=len(ours) - len(ids), first_ms=min(stamps, default=0),
                       last_ms=max(stamps, default=0), load_s=round(load_s, 3), wait_s=round(wait_s, 3),
                       per_worker=dict(Counter(worker_of(record.value) for record in ours)))


def check_alive(processes: Sequence[Process]) -> None:
    for process in processes:
        if not process.running():
            raise BenchFailed(f"{process.name} exited with code {process.returncode}; the end of its log "
                              f"({process.log_path}):\n{process.log_tail()}")


async def wait_for_leaders(settings: Settings, names: Sequence[str], timeout_s: float = 30.0) -> None:
    """Wait until every partition of freshly created topics has a leader (a consumer assigned to one without
    a leader logs fetch errors until it has)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            described = await admin.describe_topics(list(names))
            if all(entry.get("error_code") == 0 and entry["partitions"]
                   and all(partition["leader"] >= 0 for partition in entry["partitions"]) for entry in described):
                return
            if time.monotonic() > deadline:
                raise BenchFailed(f"topics {list(names)} have no leader for every partition after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def wait_ready(settings: Settings, requests_topic: str, predictions_topic: str, processes: Sequence[Process],
                     partitions: int, probe: Callable[[str], dict[str, Any]], timeout_s: float = 180.0) -> int:
    """Probe every partition until one round is answered in full by as many distinct workers as there are
    processes (so each has its partitions and no rebalance is pending); returns the rounds it took."""
    reader = await PredictionTopic(settings, predictions_topic).open()
    producer = new_producer(settings)
    await producer.start()
    deadline = time.monotonic() + timeout_s
    try:
        for round_number in range(1, 10_000):
            check_alive(processes)
            ids = {f"probe{round_number}-{partition}": partition for partition in range(partitions)}
            for request_id, partition in ids.items():
                value = msgpack.packb(probe(request_id), use_bin_type=True)
                await producer.send(requests_topic, value, key=request_id.encode(), partition=partition)
            workers = await _answers(reader, set(ids), processes)
            if len(workers) == len(ids) and len(set(workers.values())) >= len(processes):
                return round_number
            if time.monotonic() > deadline:
                raise BenchFailed(f"{', '.join(p.name for p in processes)} did not answer probes on all "
                                  f"{partitions} partitions within {timeout_s:.0f} s (last round: "
                                  f"{len(workers)} answered by {sorted(set(workers.values()))}); logs: "
                                  f"{', '.join(str(p.log_path) for p in processes)}")
        raise AssertionError("unreachable")
    finally:
        await producer.stop()
        await reader.close()


async def _answers(reader: PredictionTopic, ids: set[str], processes: Sequence[Process]) -> dict[str, str]:
    """Worker id per answered probe id, after all are answered or PROBE_ROUND_S."""
    answered: dict[str, str] = {}
    round_deadline = time.monotonic() + PROBE_ROUND_S
    while len(answered) < len(ids) and time.monotonic() < round_deadline:
        check_alive(processes)
        for record in await reader.poll(timeout_ms=200):
            request_id = record.key.decode() if record.key else ""
            if request_id in ids:
                answered[request_id] = worker_of(record.value)
    return answered


async def wait_drained(reader: PredictionTopic, expected: int, processes: Sequence[Process], timeout_s: float,
                       stall_s: float, progress: Callable[[int], None]) -> bool:
    """Wait until ``expected`` predictions were written since the reader was opened; False when none came for
    ``stall_s`` or ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    seen, last_change = await reader.produced(), time.monotonic()
    while seen < expected:
        if time.monotonic() > deadline or time.monotonic() - last_change > stall_s:
            return False
        check_alive(processes)
        await asyncio.sleep(0.5)
        now_seen = await reader.produced()
        if now_seen != seen:
            progress(now_seen - seen)
            seen, last_change = now_seen, time.monotonic()
    return True
