"""What a shadow version costs a worker: drain throughput with no shadow against one, in one run.

``python -m streamscore_bench.shadow_cost`` (after ``make demo``, which leaves the demo's feature rows in
Cassandra and its model in ``demo-data/models``) copies the demo model into a scratch library as v1 and v2
(the same artifact, so the shadow's cost is the pipeline's and the runtime's, not a bigger model's), starts one
worker under a fresh topic prefix, and drains a backlog of ``--requests`` demo requests three times: warm-up
(fills the cache), production only (v2, the newest), and with v1 deployed as shadow (``streamscore models
shadow``). Requests/s is answered / (last - first prediction's Kafka timestamp). Writes
``shadow_cost.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import Client, partitions_of
from streamscore.streams.kafka import client_kwargs
from streamscore.workers.deployments import read_deployment
from streamscore_examples.fraud.requests import demo_requests

MODEL = "fraud"


async def _drain(settings: Settings, requests: list[dict[str, Any]], timeout: float = 300.0) -> float:
    """Produce the backlog, wait for every answer; requests/s from the predictions' Kafka timestamps."""
    topic = topics.predictions(settings.topic_prefix, MODEL)
    partitions = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:  # resolve the end now: predictions produced after this point are ours
        await consumer.position(partition)
    wanted = {request["id"] for request in requests}
    stamps: list[int] = []
    async with Client(settings) as client:
        await client.produce_many(MODEL, requests)
    deadline = time.monotonic() + timeout
    try:
        while wanted and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    request_id = msgpack.unpackb(record.value)["id"]
                    if request_id in wanted:
                        wanted.discard(request_id)
                        stamps.append(record.timestamp)
    finally:
        await consumer.stop()
    if wanted:
        raise RuntimeError(f"{len(wanted)} requests not answered within {timeout:.0f} s")
    return len(stamps) / max(1e-3, (max(stamps) - min(stamps)) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--library", type=Path, default=Path("demo-data/models"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="shadow-cost-"))
    source = args.library / MODEL / "1"
    if not source.is_dir():
        sys.exit(f"no demo model in {source}: run `make demo` first")
    for version in ("1", "2"):
        shutil.copytree(source, scratch / MODEL / version)
        manifest = json.loads((scratch / MODEL / version / "manifest.json").read_text())
        (scratch / MODEL / version / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    env = {**os.environ, "STREAMSCORE_TOPIC_PREFIX": f"shadowcost-{uuid.uuid4().hex[:6]}",
           "STREAMSCORE_MODELS_DIR": str(scratch), "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": "1",
           "STREAMSCORE_WORKER__WEB_PORT": "16190"}
    settings = Settings(**{key: value for key, value in Settings().model_dump().items()
                           if key not in ("topic_prefix", "models_dir")},
                        topic_prefix=env["STREAMSCORE_TOPIC_PREFIX"], models_dir=scratch)
    log = open(scratch / "worker.log", "wb")  # noqa: SIM115 - open for the worker's lifetime
    worker = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(15)  # the worker joins its group
        backlog = list(demo_requests(args.requests, seed=11, id_prefix="warm"))
        warm = asyncio.run(_drain(settings, backlog))
        print(f"warm-up: {warm:,.0f} requests/s")
        plain = asyncio.run(_drain(settings, list(demo_requests(args.requests, seed=11, id_prefix="plain"))))
        print(f"production only: {plain:,.0f} requests/s")
        subprocess.run([sys.executable, "-m", "streamscore", "models", "shadow", MODEL, "1"], env=env, check=True)
        while asyncio.run(read_deployment(settings, MODEL)) is None:
            time.sleep(0.2)
        time.sleep(3)  # three reload checks: the worker took the shadow
        shadowed = asyncio.run(_drain(settings, list(demo_requests(args.requests, seed=11, id_prefix="shadow"))))
        print(f"with one shadow: {shadowed:,.0f} requests/s ({shadowed / plain:.2f} of production only)")
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
    result = {"requests": args.requests, "warm_up_rps": warm, "production_only_rps": plain,
              "one_shadow_rps": shadowed, "ratio": shadowed / plain,
              "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "shadow_cost.md").write_text(
        "# One shadow version against none (one worker, one run, backlogs drained)\n\n"
        "| run | requests | requests/s |\n|---|---:|---:|\n"
        f"| production only | {args.requests:,} | {plain:,.0f} |\n"
        f"| production + one shadow | {args.requests:,} | {shadowed:,.0f} |\n\n"
        f"ratio: {shadowed / plain:.2f} ({result['date']}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n")


if __name__ == "__main__":
    main()
