"""How fast the monitor joins: a `streamscore monitor` process against the real Kafka, fed a backlog of
predictions and their labels, timed until every label is joined and until the window's report is out.

``python -m streamscore_bench.monitor_join [--pairs 20000]`` (the local stack up) starts a monitor on topics of
its own prefix, produces ``--pairs`` predictions (wire format, one version, all in one window) and one label each,
interleaved, and samples the monitor's ``streamscore_labels_joined_total`` every 0.2 s. Every message is a Faust
event and every join writes the join table's changelog, so this is the rate a monitor keeps up with. Writes
``monitor_join.{json,md,png}`` (joined labels over time) into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaProducer

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.kafka import client_kwargs

from .fastpath_bench import machine_info

MODEL = "bench"
PARTITIONS = 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def _joined(port: int) -> float:
    text = _get(port, "/metrics") or ""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("streamscore_labels_joined_total"))


async def _produce(settings: Settings, pairs: int) -> None:
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        sent_ms = int(time.time() * 1000)
        futures = []
        for i in range(pairs):
            key = f"r{i}".encode()
            partition = zlib.crc32(key) % PARTITIONS
            prediction = {"id": f"r{i}", "model": MODEL, "version": "1", "status": "ok",
                          "outputs": {"score": (i % 100) / 100}, "sent_ms": sent_ms}
            futures.append(await producer.send(topics.predictions(settings.topic_prefix, MODEL),
                                               msgpack.packb(prediction), key=key, partition=partition))
            futures.append(await producer.send(topics.labels(settings.topic_prefix, MODEL),
                                               msgpack.packb({"id": f"r{i}", "label": i % 2}), key=key,
                                               partition=partition))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def run(pairs: int, out: Path) -> dict[str, Any]:
    port = _free_port()
    prefix = f"mjoin{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "STREAMSCORE_TOPIC_PREFIX": prefix, "STREAMSCORE_WORKER__PARTITIONS": str(PARTITIONS),
           "STREAMSCORE_MONITORING__LABEL_HORIZON_S": "600", "STREAMSCORE_MONITORING__LABEL_WINDOW_S": "3600",
           "STREAMSCORE_MONITORING__SCORE_OUTPUT": "score", "STREAMSCORE_MONITORING__WEB_PORT": str(port),
           "STREAMSCORE_LOG_LEVEL": "WARNING"}
    out.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"{prefix}-monitor.log"
    with open(log_path, "w") as log:
        monitor = subprocess.Popen([sys.executable, "-m", "streamscore", "monitor", "--model", MODEL], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _get(port, "/status") is None:
            if monitor.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the monitor did not start: see {log_path}")
            time.sleep(0.3)
        time.sleep(3)  # its consumer group joined
        started = time.monotonic()
        asyncio.run(_produce(Settings(topic_prefix=prefix), pairs))
        produced_s = time.monotonic() - started
        samples: list[tuple[float, float]] = []
        while time.monotonic() - started < 600:
            samples.append((time.monotonic() - started, _joined(port)))
            if samples[-1][1] >= pairs:
                break
            time.sleep(0.2)
    finally:
        monitor.terminate()
        monitor.wait(timeout=30)
    elapsed = samples[-1][0]
    result = {"pairs": pairs, "events": 2 * pairs, "joined": samples[-1][1], "produce_s": round(produced_s, 2),
              "all_joined_s": round(elapsed, 2), "events_per_s": round(2 * pairs / elapsed),
              "pairs_per_s": round(pairs / elapsed), "machine": machine_info(("faust-streaming", "aiokafka")),
              "samples": samples}
    _write(result, out)
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    (out / "monitor_join.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "monitor_join.md").write_text(
        "# The monitor's join rate\n\n"
        f"{result['pairs']} predictions and {result['pairs']} labels (a backlog, produced in "
        f"{result['produce_s']} s), one `streamscore monitor` process, one run.\n\n"
        "| pairs | events | all joined after (s) | events/s | pairs/s |\n|---|---|---|---|---|\n"
        f"| {result['pairs']} | {result['events']} | {result['all_joined_s']} | {result['events_per_s']} | "
        f"{result['pairs_per_s']} |\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([t for t, _ in result["samples"]], [n for _, n in result["samples"]])
    axes.set_xlabel("seconds since the backlog started")
    axes.set_ylabel("labels joined")
    axes.set_title(f"monitor join: {result['pairs_per_s']} pairs/s ({result['events_per_s']} events/s)")
    figure.tight_layout()
    figure.savefig(out / "monitor_join.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    result = run(args.pairs, args.out)
    print(json.dumps({key: value for key, value in result.items() if key not in ("samples", "machine")}))


if __name__ == "__main__":
    main()
