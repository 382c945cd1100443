"""The benchmark's two peers of the streamscore worker, each run as its own process:

    python -m streamscore_bench.baselines raw-passthrough --model fraud
    python -m streamscore_bench.baselines faust-per-event --model fraud

Both read the usual ``STREAMSCORE_*`` settings (topic prefix, Kafka, Cassandra keyspace, Redis, models dir,
views file), consume ``<prefix>.<model>.requests`` and publish one prediction per request, keyed by the
request id, to ``<prefix>.<model>.predictions``, with ``lineage.worker_id`` set so the harness can tell the
processes apart. They stop on SIGTERM or SIGINT.

- ``raw-passthrough`` (variant a): an aiokafka consumer in a group, ``getmany`` batches, ``msgpack.unpackb``
  per message, a minimal prediction map packed per request, producer batches per partition
  (``create_batch``/``send_batch``), commit once Kafka acknowledged them, two batches in flight. No features,
  no model: the most Python can move through Kafka on this machine, the ceiling for the others.
- ``faust-per-event`` (variant b): the straightforward Faust agent, ``async for value in stream`` doing the
  whole job per event: decode, fetch the request's features (FeatureStore: Redis MGET, Cassandra for misses),
  run ONNX Runtime on one row, encode, ``await predictions.send(...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import load_views
from streamscore.settings import Settings, get_settings
from streamscore.streams import topics
from streamscore.streams.kafka import client_kwargs, faust_broker, faust_credentials
from streamscore.workers.runtime import ModelRuntime, load_model

from .workload import Message, new_producer, send_partition

RAW_IN_FLIGHT = 2
"""Batches the passthrough lets wait for Kafka's acknowledgement while it already works on the next."""


def _worker_id(kind: str) -> str:
    return f"{kind}:{socket.gethostname()}:{os.getpid()}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- a. raw aiokafka passthrough ------------------------------------------------------------------------------

def _passthrough_messages(records: list[Any], model: str, worker_id: str) -> list[Message]:
    lineage = {"worker_id": worker_id}
    messages = []
    for record in records:
        decoded = msgpack.unpackb(record.value, raw=False, strict_map_key=False)
        for request in decoded if isinstance(decoded, list) else [decoded]:
            if not isinstance(request, dict) or not isinstance(request.get("id"), str):
                continue  # the benchmark only sends valid requests; a passthrough has no dead letters
            prediction = {"id": request["id"], "model": model, "status": "ok", "outputs": {}, "lineage": lineage,
                          "sent_ms": _now_ms()}
            messages.append((request["id"].encode(), msgpack.packb(prediction, use_bin_type=True)))
    return messages


async def raw_passthrough(settings: Settings, model: str, commit_interval_ms: int = 0, linger_ms: int = 5,
                          stats_file: Path | None = None) -> None:
    """``commit_interval_ms``: offsets committed at most this often (0: after every batch); ``stats_file``: the
    batches and requests so far, rewritten every half second (JSON)."""
    prefix = settings.topic_prefix
    predictions_topic = topics.predictions(prefix, model)
    worker_id = _worker_id("raw")
    consumer = AIOKafkaConsumer(topics.requests(prefix, model), **client_kwargs(settings.kafka),
                                group_id=f"{prefix}-raw-passthrough", enable_auto_commit=False,
                                auto_offset_reset="earliest", session_timeout_ms=30_000,
                                heartbeat_interval_ms=3_000, max_partition_fetch_bytes=4 << 20,
                                fetch_max_bytes=16 << 20)
    producer = new_producer(settings, linger_ms)
    stop = _stop_event()
    await producer.start()
    await consumer.start()
    in_flight: deque[tuple[list[asyncio.Future], dict[TopicPartition, int]]] = deque()
    commits = _Commits(consumer, commit_interval_ms / 1000)
    counts = {"batches": 0, "requests": 0}
    reporting = asyncio.ensure_future(_report(stats_file, counts)) if stats_file is not None else None
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=4096)
            futures: list[asyncio.Future] = []
            for tp, records in batches.items():
                messages = _passthrough_messages(records, model, worker_id)
                futures.extend(await send_partition(producer, predictions_topic, tp.partition, messages))
            if batches:
                in_flight.append((futures, {tp: records[-1].offset + 1 for tp, records in batches.items()}))
                counts["batches"] += 1
                counts["requests"] += sum(len(records) for records in batches.values())
            while in_flight and (len(in_flight) > RAW_IN_FLIGHT or not batches):
                await commits.acknowledged(*in_flight.popleft(), idle=not batches)
            if not batches:
                await commits.flush()
        while in_flight:
            await commits.acknowledged(*in_flight.popleft(), idle=True)
    finally:
        if reporting is not None:
            reporting.cancel()
        await consumer.stop()
        await producer.stop()


class _Commits:
    """Commit a batch's offsets once Kafka acknowledged its predictions (at-least-once, like the worker), at
    most every ``interval_s`` while batches keep coming (at once when none came)."""

    def __init__(self, consumer: AIOKafkaConsumer, interval_s: float) -> None:
        self.consumer, self.interval_s = consumer, interval_s
        self.waiting: dict[TopicPartition, int] = {}
        self.last = 0.0

    async def acknowledged(self, futures: list[asyncio.Future], offsets: dict[TopicPartition, int],
                           idle: bool) -> None:
        await asyncio.gather(*futures)
        self.waiting.update(offsets)
        if idle or time.monotonic() - self.last >= self.interval_s:
            await self.flush()

    async def flush(self) -> None:
        if self.waiting:
            self.last = time.monotonic()
            await self.consumer.commit(self.waiting)
            self.waiting = {}


async def _report(path: Path, counts: dict[str, int]) -> None:
    while True:
        path.write_text(json.dumps(counts))
        await asyncio.sleep(0.5)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


# --- b. per-event Faust agent ---------------------------------------------------------------------------------

class PerEventScorer:
    """One request at a time: its features from the store, one ONNX Runtime row, one prediction map."""

    def __init__(self, runtime: ModelRuntime, store: FeatureStore, worker_id: str) -> None:
        self.runtime = runtime
        self.store = store
        self.view_names = [view.name for view in runtime.views]
        self.lineage = {"artifact_sha256": runtime.manifest.sha256, "worker_id": worker_id}

    async def score(self, request: dict[str, Any]) -> dict[str, Any]:
        received_ms = _now_ms()
        entities = request.get("entities", {})
        fetched = await self.store.fetch(self.view_names,
                                         [[str(entities.get(view.entity, ""))] for view in self.runtime.views])
        view_rows = [view.block.values[view.block.row_of_request[0]] if view.block.row_of_request[0] >= 0
                     else view.block.defaults for view in fetched]
        features = request.get("features", {})
        request_values = [float(features.get(feature.name, feature.default or 0.0))
                          for feature in self.runtime.manifest.request_features]
        row = np.array([[request_values[column.column] if column.from_request
                         else view_rows[column.block][column.column] for column in self.runtime.columns]],
                       dtype=np.float32)
        outputs = self.runtime.run(row)
        return {
            "id": request["id"], "model": self.runtime.name, "version": self.runtime.version, "status": "ok",
            "outputs": {name: values[0].tolist() for name, values in outputs.items()},
            "degraded": [f"{view.view.name}:missing" for view in fetched if view.missing],
            "lineage": self.lineage, "received_ms": received_ms, "sent_ms": _now_ms(),
        }


def faust_per_event(settings: Settings, model: str) -> None:
    import faust

    views = load_views(settings.views_file)
    store = FeatureStore(settings, views)
    store.connect(create_schema=False)
    scorer = PerEventScorer(load_model(settings.models_dir, model, views, settings.worker), store,
                            _worker_id("faust"))
    prefix = settings.topic_prefix
    app = faust.App(f"{prefix}-faust-per-event", broker=faust_broker(settings.kafka),
                    broker_credentials=faust_credentials(settings.kafka), store="memory://",
                    key_serializer="raw", value_serializer="raw", topic_partitions=settings.worker.partitions,
                    topic_replication_factor=1, consumer_auto_offset_reset="earliest", web_enabled=False,
                    producer_acks=-1, producer_linger_ms=2)
    requests_topic = app.topic(topics.requests(prefix, model), key_type=bytes, value_type=bytes)
    predictions_topic = app.topic(topics.predictions(prefix, model), key_type=bytes, value_type=bytes)

    async def score(stream: Any) -> None:
        async for value in stream:
            prediction = await scorer.score(msgpack.unpackb(value, raw=False, strict_map_key=False))
            await predictions_topic.send(key=prediction["id"].encode(),
                                         value=msgpack.packb(prediction, use_bin_type=True))

    app.agent(requests_topic, name="score-per-event")(score)
    try:
        faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
    finally:
        with contextlib.suppress(Exception):
            store.online.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamscore_bench.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["raw-passthrough", "faust-per-event"])
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--commit-interval-ms", type=int, default=0,
                        help="raw-passthrough: commit at most this often (0: after every batch).")
    parser.add_argument("--linger-ms", type=int, default=5, help="raw-passthrough: its producer's linger.")
    parser.add_argument("--stats-file", type=Path, help="raw-passthrough: write its batch and request counts here.")
    parser.add_argument("--uvloop", action="store_true", help="raw-passthrough: run on uvloop (as the worker does).")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.kind == "raw-passthrough":
        if args.uvloop:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(raw_passthrough(settings, args.model, args.commit_interval_ms, args.linger_ms, args.stats_file))
    else:
        faust_per_event(settings, args.model)


if __name__ == "__main__":
    main()
