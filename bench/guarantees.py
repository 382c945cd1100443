"""at_least_once against exactly_once, in one run: drain throughput, latency at a fixed rate, and repeats
across SIGKILLs.

``python -m streamscore_bench.guarantees`` (after ``make demo``, which leaves the demo's feature rows in
Cassandra and its model in ``demo-data/models``) runs, for each ``worker.processing_guarantee``, one worker
under a fresh topic prefix: a warm-up backlog, a drained backlog of ``--requests`` (requests/s from the
predictions' Kafka timestamps), ``--seconds`` at ``--rate`` requests/s (end-to-end latency, send to the
prediction read with ``read_committed``, as the SDK reads), then ``--crash-requests`` streamed at
``--crash-rate`` while the worker is SIGKILLed twice and restarted: every id answered, and the repeats a
``read_committed`` reader sees. Writes ``guarantees.{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from aiokafka import AIOKafkaConsumer

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import Client, PredictTimeout, ensure_topics, tail_consumer
from streamscore_examples.fraud.requests import demo_requests

from .shadow_cost import _drain

MODEL = "fraud"
GUARANTEES = ("at_least_once", "exactly_once")


class Worker:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


async def _answering(settings: Settings, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with Client(settings) as client:
        probe = next(demo_requests(1, seed=1, id_prefix="probe"))
        while time.monotonic() < deadline:
            try:
                await client.predict(MODEL, {**probe, "id": f"probe-{uuid.uuid4().hex}"}, timeout=5.0)
                return
            except PredictTimeout:
                continue
    raise RuntimeError("the worker did not answer")


async def _reader(settings: Settings) -> AIOKafkaConsumer:
    """The predictions topic from its end, read_committed (the SDK's tail consumer)."""
    return await tail_consumer(settings, topics.predictions(settings.topic_prefix, MODEL))


async def _fixed_rate(settings: Settings, rate: float, seconds: float) -> dict[str, float]:
    requests = list(demo_requests(int(rate * seconds), seed=12, id_prefix=f"rate-{uuid.uuid4().hex[:4]}"))
    sent: dict[str, float] = {request["id"]: 0.0 for request in requests}
    latencies: list[float] = []
    consumer = await _reader(settings)

    async def collect() -> None:
        while len(latencies) < len(requests):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                now = time.time() * 1000
                for record in records:
                    request_id = msgpack.unpackb(record.value)["id"]
                    if sent.get(request_id):
                        latencies.append(now - sent.pop(request_id))

    collector = asyncio.create_task(collect())
    try:
        async with Client(settings) as client:
            started = time.monotonic()
            for index, request in enumerate(requests):
                ahead = started + index / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                sent[request["id"]] = time.time() * 1000
                await client.send(MODEL, request)
        await asyncio.wait_for(collector, 60)
    finally:
        collector.cancel()
        await consumer.stop()
    values = np.array(latencies)
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "answered": len(latencies), "sent": len(requests)}


async def _crash(settings: Settings, worker: Worker, count: int, rate: float) -> dict[str, int]:
    requests = list(demo_requests(count, seed=13, id_prefix=f"crash-{uuid.uuid4().hex[:4]}"))
    wanted = {request["id"] for request in requests}
    counts: Counter[str] = Counter()
    consumer = await _reader(settings)

    async def collect() -> None:
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    request_id = msgpack.unpackb(record.value)["id"]
                    if request_id in wanted:
                        counts[request_id] += 1

    collector = asyncio.create_task(collect())
    try:
        async with Client(settings) as client:
            sending = asyncio.create_task(client.produce_many(MODEL, requests, rate, window=200))
            for share in (0.3, 0.6):
                while len(counts) < share * count:
                    await asyncio.sleep(0.05)
                worker.kill()
                worker.start()
            await sending
        deadline = time.monotonic() + 120
        while len(counts) < len(wanted) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # repeats arriving late are counted too
    finally:
        collector.cancel()
        await consumer.stop()
    return {"sent": count, "answered": len(counts), "lost": len(wanted) - len(counts),
            "duplicated": sum(n - 1 for n in counts.values()), "kills": 2}


def run(guarantee: str, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"eos-{guarantee.split('_')[0]}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "STREAMSCORE_TOPIC_PREFIX": prefix, "STREAMSCORE_WORKER__PROCESSING_GUARANTEE": guarantee,
           "STREAMSCORE_WORKER__WORKER_ID": f"bench-{guarantee}", "STREAMSCORE_WORKER__WEB_PORT": "16191"}
    settings = Settings(**{key: value for key, value in Settings().model_dump().items() if key != "topic_prefix"},
                        topic_prefix=prefix)
    asyncio.run(ensure_topics(settings, [topics.requests(prefix, MODEL), topics.predictions(prefix, MODEL)],
                              settings.worker.partitions))
    args.out.mkdir(parents=True, exist_ok=True)
    worker = Worker(env, Path(tempfile.gettempdir()) / f"guarantees-{guarantee}-worker.log")
    worker.start()
    try:
        asyncio.run(_answering(settings))
        asyncio.run(_drain(settings, list(demo_requests(args.requests // 4, seed=11, id_prefix=f"warm-{prefix}"))))
        drained = asyncio.run(_drain(settings, list(demo_requests(args.requests, seed=11, id_prefix=f"d-{prefix}"))))
        print(f"{guarantee}: drain {drained:,.0f} requests/s")
        latency = asyncio.run(_fixed_rate(settings, args.rate, args.seconds))
        print(f"{guarantee}: at {args.rate:g}/s p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms")
        crash = asyncio.run(_crash(settings, worker, args.crash_requests, args.crash_rate))
        print(f"{guarantee}: {crash}")
    finally:
        worker.stop()
    return {"drain_rps": drained, "latency": latency, "crash": crash}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--crash-requests", type=int, default=20_000)
    parser.add_argument("--crash-rate", type=float, default=1_000.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    results = {guarantee: run(guarantee, args) for guarantee in GUARANTEES}
    result = {"results": results, "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (args.out / "guarantees.json").write_text(json.dumps(result, indent=2) + "\n")
    base, eos = results["at_least_once"], results["exactly_once"]
    rows = [f"| {name} | {r['drain_rps']:,.0f} | {r['latency']['p50_ms']:.1f} | {r['latency']['p99_ms']:.1f} | "
            f"{r['crash']['sent']:,} | {r['crash']['answered']:,} | {r['crash']['duplicated']} | {r['crash']['lost']} |"
            for name, r in results.items()]
    (args.out / "guarantees.md").write_text(
        "# Processing guarantees, one run (one worker each, the same stack)\n\n"
        f"drain: {args.requests:,} requests backlog; latency: {args.rate:g} requests/s for {args.seconds:g} s, "
        f"send -> prediction read with read_committed; crash: {args.crash_requests:,} requests at "
        f"{args.crash_rate:g}/s, the worker SIGKILLed twice and restarted.\n\n"
        "| guarantee | drain requests/s | p50 ms | p99 ms | crash: sent | answered | duplicated | lost |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"exactly_once / at_least_once drain throughput: {eos['drain_rps'] / base['drain_rps']:.2f}; "
        f"p99 ratio {eos['latency']['p99_ms'] / base['latency']['p99_ms']:.2f} ({result['date']}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}: the machine is shared with the stack)\n")
    _plot(results, args.out / "guarantees.png")
    print((args.out / "guarantees.md").read_text())


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(names, [results[n]["drain_rps"] for n in names], color=["tab:blue", "tab:orange"])
    axes[0].set(title="drain throughput", ylabel="requests/s")
    axes[1].bar(names, [results[n]["latency"]["p99_ms"] for n in names], color=["tab:blue", "tab:orange"])
    axes[1].set(title="p99 latency at the fixed rate", ylabel="ms")
    axes[2].bar(names, [results[n]["crash"]["duplicated"] for n in names], color=["tab:blue", "tab:orange"])
    axes[2].set(title="repeats seen across 2 SIGKILLs", ylabel="predictions")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
