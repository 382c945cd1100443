"""Latency measurement processes: an open-loop producer and a subscriber, each its own process, both on
librdkafka (confluent-kafka), a C client: the instrument takes little of the CPU it measures (the same producer and
subscriber on aiokafka took about half a core at 1,000 requests/s on the 2-core machine they shared with the
worker and the servers),
and it is a Kafka client the project did not write.

    python -m streamscore_bench.loadgen open-loop --topic T --phase P --rate R --seconds S --out DIR ...
    python -m streamscore_bench.loadgen subscribe --topic T --phase P --expect N --out DIR ...

The producer is open-loop: it paces by the wall clock (request ``i`` is due at ``i / rate`` seconds), sends
whatever is due as producer batches without waiting for acknowledgements, and never slows down because
predictions are late. Each request's ``sent_ms`` is stamped when it is sent; the producer also keeps the
same instant in microseconds per request (``sent_us.npy``) and how far behind its schedule it ever fell
(``producer.json``), since a starved producer would hide latency.

The subscriber is assigned every partition of the predictions topic at its end before the producer starts, and
records the arrival time (microseconds) of each request's first prediction (``arrived_us.npy``, 0 where none
came). The harness joins both files into an HDR histogram.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, Producer, TopicPartition

from streamscore.settings import Settings, get_settings

from .workload import Workload, partition_of

SENT_FILE = "sent_us.npy"
ARRIVED_FILE = "arrived_us.npy"
TO_BROKER_FILE = "to_broker_us.npy"
"""Per producer batch (the last message of each partition's share of what was due at once): the broker's
log-append time minus its send stamp (the request topic appends with LogAppendTime, so the delivery report
carries the broker's clock)."""
HOPS_FILE = "hops_ms.npy"
"""Per request (rows by index): the worker's ``received_ms`` and ``sent_ms`` stamps from the prediction and the
broker's log-append time of the prediction record (the predictions topic appends with LogAppendTime)."""
PRODUCER_FILE = "producer.json"
READY_FILE = "subscriber.ready"


def _now_us() -> int:
    return time.time_ns() // 1000


def rdkafka_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's settings for the cluster of ``settings.kafka`` (security included)."""
    kafka = settings.kafka
    config: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap, "security.protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL"):
        config["sasl.mechanism"] = kafka.sasl_mechanism
        config["sasl.username"] = kafka.sasl_username
        config["sasl.password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    for key, path in (("ssl.ca.location", kafka.ssl_cafile), ("ssl.certificate.location", kafka.ssl_certfile),
                      ("ssl.key.location", kafka.ssl_keyfile)):
        if path is not None:
            config[key] = str(path)
    return config


def open_loop(settings: Settings, topic: str, phase: str, rate: float, seconds: float, batch_size: int,
              cold_base: int, partitions: int, pool_size: int, out: Path, hot_only: bool = False) -> None:
    workload = Workload(pool_size, hot_only=hot_only)
    message_rate = rate / batch_size
    messages = max(1, round(rate * seconds / batch_size))
    sent_us = np.zeros(messages * batch_size, dtype=np.int64)
    # acks=all as the worker's own producer; a 1 ms linger, so requests due together leave together
    producer = Producer({**rdkafka_config(settings), "acks": "all", "linger.ms": 1, "enable.idempotence": False,
                         "queue.buffering.max.messages": 1_000_000, "message.max.bytes": 4 << 20})
    to_broker: list[int] = []
    failures: list[str] = []

    def delivered(stamp_us: int) -> Any:
        def report(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(str(error))
                return
            kind, appended_ms = message.timestamp()
            if kind == TIMESTAMP_LOG_APPEND_TIME:
                to_broker.append(appended_ms * 1000 - stamp_us)
        return report

    sent, most_behind_s = 0, 0.0
    started = time.perf_counter()
    while sent < messages:
        elapsed = time.perf_counter() - started
        due = min(messages, int(elapsed * message_rate) + 1)
        if due > sent:
            most_behind_s = max(most_behind_s, elapsed - sent / message_rate)
            stamp_us = _now_us()
            sent_us[sent * batch_size:due * batch_size] = stamp_us
            last_of_partition: dict[int, int] = {}
            group: list[tuple[bytes, bytes, int]] = []
            for index in range(sent, due):
                key, value = workload.message(phase, index * batch_size, batch_size, cold_base, stamp_us // 1000)
                partition = partition_of(key, partitions)
                last_of_partition[partition] = len(group)
                group.append((key, value, partition))
            # one delivery report per partition of what was due together (they leave as one producer batch
            # each): the client->broker hop, without a Python callback per message
            reported = set(last_of_partition.values())
            report = delivered(stamp_us)
            for position, (key, value, partition) in enumerate(group):
                while True:
                    try:
                        producer.produce(topic, value, key, partition=partition,
                                         on_delivery=report if position in reported else None)
                        break
                    except BufferError:  # the local queue is full: let deliveries drain it
                        producer.poll(0.01)
            sent = due
        producer.poll(0)
        time.sleep(max(0.0, started + sent / message_rate - time.perf_counter()))
    if producer.flush(120):
        failures.append(f"{len(producer)} requests still not delivered after 120 s")
    if failures:
        raise SystemExit(f"the load generator could not deliver {len(failures)} requests to {topic}: {failures[0]}")
    np.save(out / SENT_FILE, sent_us)
    np.save(out / TO_BROKER_FILE, np.array(to_broker, dtype=np.int64))
    summary = {"requests": int(sent_us.size), "messages": messages, "rate": rate, "seconds": seconds,
               "send_duration_s": round(time.perf_counter() - started, 3),
               "most_behind_schedule_ms": round(most_behind_s * 1000, 2)}
    (out / PRODUCER_FILE).write_text(json.dumps(summary))


def subscribe(settings: Settings, topic: str, phase: str, expect: int, out: Path, timeout_s: float,
              idle_s: float) -> None:
    consumer = Consumer({**rdkafka_config(settings), "group.id": f"loadgen-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         # the broker holds an empty fetch up to 100 ms and answers at once when a record comes;
                         # no back-off after an empty one (librdkafka's would hold the next fetch 500 ms)
                         "fetch.wait.max.ms": 100, "fetch.error.backoff.ms": 0})
    metadata = consumer.list_topics(topic, timeout=30).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise SystemExit(f"topic {topic!r} does not exist")
    # every partition at its end before the producer starts: nothing produced afterwards can be missed
    partitions = [TopicPartition(topic, number) for number in metadata.partitions]
    ends = [TopicPartition(topic, number, consumer.get_watermark_offsets(part, timeout=30)[1])
            for number, part in zip(metadata.partitions, partitions, strict=True)]
    consumer.assign(ends)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    arrived_us = np.zeros(expect, dtype=np.int64)
    hops_ms = np.zeros((expect, 3), dtype=np.int64)
    prefix = f"{phase}-".encode()
    count, deadline, last_arrival = 0, time.monotonic() + timeout_s, time.monotonic()
    (out / READY_FILE).write_text("ready\n")
    try:
        while count < expect and not stop.is_set() and time.monotonic() < deadline:
            if count and time.monotonic() - last_arrival > idle_s:
                break
            first = consumer.poll(0.1)  # consume() would wait for its count or its whole timeout
            if first is None:
                continue
            records = [first, *consumer.consume(num_messages=20_000, timeout=0)]
            now_us = _now_us()
            for record in records:
                key = record.key()
                if record.error() is not None or key is None or not key.startswith(prefix):
                    continue
                index = int(key[len(prefix):])
                if 0 <= index < expect and not arrived_us[index]:
                    arrived_us[index] = now_us
                    prediction = msgpack.unpackb(record.value())
                    hops_ms[index] = (prediction.get("received_ms", 0), prediction.get("sent_ms", 0),
                                      record.timestamp()[1])
                    count += 1
                    last_arrival = time.monotonic()
    finally:
        consumer.close()
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
        open_loop(settings, args.topic, args.phase, args.rate, args.seconds, args.batch_size, args.cold_base,
                  args.partitions, args.pool_size, args.out, args.hot_only)
    else:
        subscribe(settings, args.topic, args.phase, args.expect, args.out, args.timeout, args.idle)


if __name__ == "__main__":
    main()
