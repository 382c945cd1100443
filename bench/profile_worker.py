"""Profile a worker under load and report the share of CPU time per pipeline stage.

Preloads a backlog of demo requests into a fresh topic prefix, starts `streamscore worker` under py-spy, lets
it drain the backlog, and classifies every stack sample by the innermost pipeline stage it is in. Writes
``bench/results/profile_<label>.json`` (relative to the current directory) and a short table. Needs py-spy
(``pip install py-spy``). Run from the repository root:

    .venv/bin/python -m streamscore_bench.profile_worker --label after --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

RESULTS = Path("bench/results")

# Innermost match wins: a stack is charged to the deepest frame that names a stage.
STAGES = [
    ("decode", ("decode_batch",)),
    ("features", ("FeatureStore.fetch", "FeatureStore._rows", "FeatureCache.", "CassandraStore.", "_ConcurrentRound",
                  "store.py", "cache.py", "cassandra/")),
    ("assemble", ("assemble",)),
    ("infer", ("ModelRuntime.run", "InferenceSession.run", "onnxruntime")),
    ("encode", ("encode_predictions",)),
    ("publish", ("Publisher.", "publish", "producer", "send_batch", "create_batch")),
    ("pipeline other", ("BatchPipeline.", "pipeline.py")),
    ("kafka consume", ("getmany", "fetcher.py", "consumer.py", "aiokafka")),
    ("faust/mode", ("faust/", "mode/")),
    ("asyncio", ("asyncio/",)),
]


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for stage, needles in STAGES:
            if any(needle in frame for needle in needles):
                return stage
    return "other"


async def preload(env: dict[str, str], count: int) -> None:
    from streamscore.settings import Settings
    from streamscore.streams import topics
    from streamscore.streams.client import Client, ensure_topics
    from streamscore_examples.fraud.requests import demo_requests

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        settings = Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    await ensure_topics(settings, [topics.requests(settings.topic_prefix, "fraud"),
                                   topics.predictions(settings.topic_prefix, "fraud")], settings.worker.partitions)
    async with Client(settings) as client:
        futures = [await client.send("fraud", request) for request in demo_requests(count, seed=23)]
        await asyncio.gather(*futures)


def _get(port: str | int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return response.read().decode()


def stage_seconds(port: str) -> dict[str, float]:
    """Per-stage time summed over all batches, from the worker's /metrics."""
    sums = {}
    for line in _get(port, "/metrics").splitlines():
        match = re.match(r'streamscore_stage_seconds_sum\{model="fraud",stage="(\w+)"\} (\S+)', line)
        if match:
            sums[match.group(1)] = float(match.group(2))
    return sums


def answered(port: str | int) -> int:
    try:
        return int(json.loads(_get(port, "/status"))["fraud"]["answered"])
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--seconds", type=int, default=20, help="How long py-spy records.")
    parser.add_argument("--purepython", action="store_true", help="Run the worker with the pure-Python twins.")
    args = parser.parse_args()
    port = "6099"
    env = {"STREAMSCORE_TOPIC_PREFIX": f"prof{uuid.uuid4().hex[:6]}", "STREAMSCORE_WORKER__WEB_PORT": port,
           "STREAMSCORE_PUREPYTHON": "1" if args.purepython else "0"}
    print(f"preloading {args.requests} requests under prefix {env['STREAMSCORE_TOPIC_PREFIX']}", file=sys.stderr)
    asyncio.run(preload(env, args.requests))
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"profile_{args.label}.collapsed"
    worker = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", "fraud"],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while answered(port) == 0:  # model load and group join happen before the backlog is touched
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit("the worker did not start answering")
            time.sleep(0.1)
        started, first = time.monotonic(), answered(port)
        subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(worker.pid),
                        "--duration", str(args.seconds), "--rate", "250", "--format", "raw", "--nonblocking",
                        "--output", str(raw)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed, done = time.monotonic() - started, answered(port)
        stages = stage_seconds(port)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    shares: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        shares[classify(stack)] += int(count)
    total = sum(shares.values()) or 1
    wall = {stage: round(seconds / elapsed, 4) for stage, seconds in stages.items()}
    report = {"label": args.label, "purepython": args.purepython, "requests": args.requests,
              "answered_per_s": round((done - first) / elapsed), "samples": total,
              "stage_share_of_wall_time": wall | {"outside the pipeline": round(1 - sum(wall.values()), 4)},
              "sampled_share": {stage: round(count / total, 4) for stage, count in shares.most_common()}}
    (RESULTS / f"profile_{args.label}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.label}: {report['answered_per_s']} answered/s")
    print(f"| stage | share of wall time ({args.label}) |\n|---|---|")
    for stage, share in report["stage_share_of_wall_time"].items():
        print(f"| {stage} | {share:.1%} |")


if __name__ == "__main__":
    main()
