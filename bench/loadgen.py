"""Latency measurement processes: an open-loop producer and a subscriber, each its own process.

    python -m streamscore_bench.loadgen open-loop --topic T --phase P --rate R --seconds S --out DIR ...
    python -m streamscore_bench.loadgen subscribe --topic T --phase P --expect N --out DIR ...

The producer is open-loop: it paces by the wall clock (request ``i`` is due at ``i / rate`` seconds), sends
whatever is due as producer batches without waiting for acknowledgements, and never slows down because
predictions are late. Each request's ``sent_ms`` is stamped when it is sent; the producer also keeps the
same instant in microseconds per request (``sent_us.npy``) and how far behind its schedule it ever fell
(``producer.json``), since a starved producer would hide latency.

The subscriber is assigned every partition of the predictions topic at its end before the producer starts
(``tail_consumer``), and records the arrival time (microseconds) of each request's first prediction
(``arrived_us.npy``, 0 where none came). The harness joins both files into an HDR histogram.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path

import msgpack
import numpy as np
from aiokafka import AIOKafkaProducer

from streamscore.settings import Settings, get_settings
from streamscore.streams.client import tail_consumer
from streamscore.streams.kafka import client_kwargs

from .workload import Workload, send_messages

SENT_FILE = "sent_us.npy"
ARRIVED_FILE = "arrived_us.npy"
TO_BROKER_FILE = "to_broker_us.npy"
"""Per producer batch: the broker's log-append time of the batch minus its send stamp (the request topic
appends with LogAppendTime, so the acknowledgement carries the broker's clock)."""
HOPS_FILE = "hops_ms.npy"
"""Per request (rows by index): the worker's ``received_ms`` and ``sent_ms`` stamps from the prediction and the
broker's log-append time of the prediction record (the predictions topic appends with LogAppendTime)."""
PRODUCER_FILE = "producer.json"
READY_FILE = "subscriber.ready"


def _now_us() -> int:
    return time.time_ns() // 1000


async def open_loop(settings: Settings, topic: str, phase: str, rate: float, seconds: float, batch_size: int,
                    cold_base: int, partitions: int, pool_size: int, out: Path, hot_only: bool = False) -> None:
    workload = Workload(pool_size, hot_only=hot_only)
    message_rate = rate / batch_size
    messages = max(1, round(rate * seconds / batch_size))
    sent_us = np.zeros(messages * batch_size, dtype=np.int64)
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all", linger_ms=1, max_batch_size=1 << 20,
                                max_request_size=4 << 20)
    await producer.start()
    futures: list[asyncio.Future] = []
    stamps: list[int] = []
    sent, most_behind_s = 0, 0.0
    started = time.perf_counter()
    try:
        while sent < messages:
            elapsed = time.perf_counter() - started
            due = min(messages, int(elapsed * message_rate) + 1)
            if due > sent:
                most_behind_s = max(most_behind_s, elapsed - sent / message_rate)
                stamp_us = _now_us()
                batch = [workload.message(phase, index * batch_size, batch_size, cold_base, stamp_us // 1000)
                         for index in range(sent, due)]
                sent_us[sent * batch_size:due * batch_size] = stamp_us
                queued = await send_messages(producer, topic, batch, partitions)
                futures.extend(queued)
                stamps.extend([stamp_us] * len(queued))
                sent = due
            await asyncio.sleep(max(0.0, started + sent / message_rate - time.perf_counter()))
        acknowledged = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    np.save(out / SENT_FILE, sent_us)
    appended_us = np.array([metadata.timestamp * 1000 for metadata in acknowledged], dtype=np.int64)
    np.save(out / TO_BROKER_FILE, appended_us - np.array(stamps, dtype=np.int64))
    summary = {"requests": int(sent_us.size), "messages": messages, "rate": rate, "seconds": seconds,
               "send_duration_s": round(time.perf_counter() - started, 3),
               "most_behind_schedule_ms": round(most_behind_s * 1000, 2)}
    (out / PRODUCER_FILE).write_text(json.dumps(summary))


async def subscribe(settings: Settings, topic: str, phase: str, expect: int, out: Path, timeout_s: float,
                    idle_s: float) -> None:
    consumer = await tail_consumer(settings, topic)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    arrived_us = np.zeros(expect, dtype=np.int64)
    hops_ms = np.zeros((expect, 3), dtype=np.int64)
    prefix = f"{phase}-".encode()
    count, deadline, last_arrival = 0, time.monotonic() + timeout_s, time.monotonic()
    (out / READY_FILE).write_text("ready\n")
    try:
        while count < expect and not stop.is_set() and time.monotonic() < deadline:
            if count and time.monotonic() - last_arrival > idle_s:
                break
            batches = await consumer.getmany(timeout_ms=100, max_records=20_000)
            now_us = _now_us()
            for records in batches.values():
                for record in records:
                    if record.key is None or not record.key.startswith(prefix):
                        continue
                    index = int(record.key[len(prefix):])
                    if 0 <= index < expect and not arrived_us[index]:
                        arrived_us[index] = now_us
                        prediction = msgpack.unpackb(record.value)
                        hops_ms[index] = (prediction.get("received_ms", 0), prediction.get("sent_ms", 0),
                                          record.timestamp)
                        count += 1
                        last_arrival = time.monotonic()
    finally:
        await consumer.stop()
        np.save(out / ARRIVED_FILE, arrived_us)
        np.save(out / HOPS_FILE, hops_ms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamscore_bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    producer = commands.add_parser("open-loop", help="send requests at a fixed rate")
    subscriber = commands.add_parser("subscribe", help="record the arrival of predictions")
    for command in (producer, subscriber):
        command.add_argument("--topic", required=True)
        command.add_argument("--phase", required=True, help="request ids are <phase>-<number>")
        command.add_argument("--out", type=Path, required=True, help="folder for the output files")
    producer.add_argument("--rate", type=float, required=True, help="requests per second")
    producer.add_argument("--seconds", type=float, required=True)
    producer.add_argument("--batch-size", type=int, default=1, help="requests per message")
    producer.add_argument("--cold-base", type=int, default=0, help="first cold entity number to use")
    producer.add_argument("--partitions", type=int, default=4)
    producer.add_argument("--pool-size", type=int, default=20_000)
    producer.add_argument("--hot-only", action="store_true", help="no cold (cache-missing) requests")
    subscriber.add_argument("--expect", type=int, required=True, help="requests 0..expect-1 of the phase")
    subscriber.add_argument("--timeout", type=float, default=600.0)
    subscriber.add_argument("--idle", type=float, default=10.0, help="stop after this long without a prediction")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.command == "open-loop":
        asyncio.run(open_loop(settings, args.topic, args.phase, args.rate, args.seconds, args.batch_size,
                              args.cold_base, args.partitions, args.pool_size, args.out, args.hot_only))
    else:
        asyncio.run(subscribe(settings, args.topic, args.phase, args.expect, args.out, args.timeout, args.idle))


if __name__ == "__main__":
    main()
