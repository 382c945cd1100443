"""What a worker costs at idle and per small batch: CPU of one worker process, from /proc, in one run.

``python -m streamscore_bench.batch_cost`` (after ``make demo``: the demo's model and feature rows) starts one
worker on the demo model under a topic prefix of its own, warms it (the Redis cache and the model session: the
load phase's entities are sent once first; then, after the idle phase, once more for the worker's near cache,
whose entries live ``redis.near_cache_ttl_s``), then measures its CPU (user + system, all threads,
``/proc/<pid>/stat``):

- **idle**: ``--idle-s`` seconds with no traffic: the share of one core it uses;
- **light load**: ``--rate`` requests per second for ``--seconds`` seconds, one request per message, paced by
  the wall clock from this process (each request is its own batch in the worker at that rate: the worker's
  ``streamscore_batch_messages`` count says how many batches it made). CPU per batch is the load phase's CPU
  minus what idling would have cost over the same time, divided by the batches.

With ``--profile`` (py-spy must be installed), a second load phase like the first runs under py-spy (blocking
sampling at 100 Hz with native frames: exact stacks, and idle told from busy by where a thread waits; the CPU
figures are the first, unsampled phase's), and the report
lists the functions with the largest share of the samples (inclusive: a function and what it calls) and
charges each sample to one part of the per-batch path (``PARTS``, innermost match wins), so a cut can be aimed
and checked. Writes ``<--name>.{json,md,png}`` (``batch_cost`` by default) into ``--out``; the settings of the
worker are the environment's (``STREAMSCORE_WORKER__EVENT_LOOP=asyncio`` ... measures what a setting saves).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaProducer

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import ensure_topics
from streamscore.streams.kafka import client_kwargs
from streamscore_examples.fraud.requests import demo_requests

from .processes import process_cpu_s
from .profile_worker import answered

MODEL = "fraud"

PARTS = [
    ("decode", ("decode_batch", "decode_request")),
    ("features: cache (Redis)", ("FeatureCache.", "featurestore/cache.py", "redis/")),
    ("features: other", ("FeatureStore.", "featurestore/store.py", "cassandra/")),
    ("assemble", ("assemble",)),
    ("infer", ("ModelRuntime.run", "InferenceSession.run", "onnxruntime")),
    ("drift", ("workers/drift.py",)),
    ("prediction log", ("workers/predlog.py",)),
    ("encode", ("encode_predictions",)),
    ("metrics", ("prometheus_client/", "workers/metrics.py")),
    ("pipeline other", ("workers/pipeline.py", "workers/stages.py")),
    ("publish and commit", ("streams/delivery.py", "aiokafka/producer", "send_batch", "create_batch",
                            "aiokafka/consumer/group_coordinator", "commit")),
    ("fetch", ("aiokafka/consumer/fetcher.py", "aiokafka/consumer/consumer.py", "getmany")),
    ("kafka client other", ("aiokafka/",)),
    ("faust/mode", ("faust/", "mode/")),
    ("event loop", ("asyncio/", "selectors.py")),
]
"""Parts of the per-batch path, each by needles in a frame's text: a sample is charged to the innermost frame
that matches one (a Redis call made by the feature cache is the cache's), the generic ones last."""


GENERIC = ("kafka client other", "faust/mode", "event loop")
"""Parts a sample is charged to only when no other part's frame is on its stack (a socket write made for a
Redis call is the cache's, one made for a produce request is publishing's)."""
LOOP_RUNNERS = ("execute_from_commandline", "run_until_complete", "run_forever")
"""A sample whose innermost Python frame is one of these is in the event loop's own C code (uvloop's)."""


IDLE_LEAVES = ("Condition.wait", "concurrent/futures/thread.py", "ServiceThread._start_thread",
               "LibevLoop._run_loop", "Event.wait", "Queue.get")
"""Innermost frames of a thread that waits (a worker's helper threads: the prediction log's writer, the
executor, the watchdog, Cassandra's I/O loop): py-spy samples them, but they use no CPU."""


def busy(frames: list[str]) -> bool:
    return not (frames and any(leaf in frames[-1] for leaf in IDLE_LEAVES))


def classify(frames: list[str]) -> str:
    if frames and any(runner in frames[-1] for runner in LOOP_RUNNERS):
        return "event loop"
    fallback = None
    for frame in reversed(frames):
        for part, needles in PARTS:
            if any(needle in frame for needle in needles):
                if part not in GENERIC:
                    return part
                fallback = fallback or part
    return fallback or "other"


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def _batches(port: int) -> int:
    match = re.search(r'^streamscore_batch_messages_count\{model="fraud"\} (\S+)$', _get(port, "/metrics"), re.M)
    return int(float(match.group(1))) if match else 0


async def _send(settings: Settings, requests: list[dict[str, Any]], rate: float) -> float:
    """One request per message at ``rate`` (paced by the wall clock); returns how far behind schedule the
    sender ever fell (s)."""
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all", linger_ms=0)
    await producer.start()
    topic = topics.requests(settings.topic_prefix, MODEL)
    behind = 0.0
    try:
        started = time.perf_counter()
        futures = []
        for index, request in enumerate(requests):
            due = started + index / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            behind = max(behind, time.perf_counter() - due)
            request["sent_ms"] = int(time.time() * 1000)
            futures.append(await producer.send(topic, msgpack.packb(request), key=request["id"].encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return behind


def _top_functions(raw: Path, limit: int) -> tuple[int, list[tuple[str, float]], dict[str, float]]:
    """(samples, the functions with the largest inclusive share, share per part) of a py-spy raw profile."""
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if ".py" in frame or ".pyx" in frame]
        if not busy(frames):
            continue
        total += count
        parts[classify(frames)] += count
        for function in {re.sub(r":\d+\)$", ")", frame) for frame in frames}:
            inclusive[function] += count
    total = max(total, 1)
    skip = ("<module>", "runpy", "click/", "run_worker", "cli.py", "mode/worker.py", "run_forever", "_run_once",
            "run_until_complete", "Handle._run", "Thread.", "threading.py")
    top = [(function, count / total) for function, count in inclusive.most_common()
           if not any(needle in function for needle in skip)][:limit]
    return total, top, {part: count / total for part, count in parts.most_common()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` rounds, each measuring the worker and the passthrough (a fresh process each, in alternating
    order), the worker's last round profiled when asked; medians of each, and their ratio per round."""
    rounds: list[dict[str, dict[str, Any]]] = []
    kinds = ["worker", "passthrough"] if args.passthrough else ["worker"]
    for number in range(args.rounds):
        measured: dict[str, dict[str, Any]] = {}
        for kind in kinds if number % 2 == 0 else kinds[::-1]:
            print(f"== round {number + 1} of {args.rounds}: {kind}", flush=True)
            measured[kind] = measure(args, kind == "passthrough",
                                     profile=args.profile and kind == "worker" and number == args.rounds - 1)
        rounds.append(measured)
    result: dict[str, Any] = {
        "rounds": rounds, "rate": args.rate, "seconds": args.seconds, "idle_s": args.idle_s,
        "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "label": args.label,
    }
    for kind in kinds:
        result[kind] = {key: statistics.median(measured[kind][key] for measured in rounds)
                        for key in ("idle_share_of_a_core", "cpu_ms_per_batch", "cpu_ms_per_batch_with_idle")}
    if args.passthrough:
        ratios = [measured["worker"]["cpu_ms_per_batch"] / measured["passthrough"]["cpu_ms_per_batch"]
                  for measured in rounds]
        result["worker_over_passthrough"] = {"per_round": ratios, "median": statistics.median(ratios)}
    profiled = rounds[-1]["worker"].get("profile")
    if profiled:
        result["profile"] = profiled
    return result


def measure(args: argparse.Namespace, passthrough: bool, profile: bool) -> dict[str, Any]:
    prefix = f"batchcost-{uuid.uuid4().hex[:6]}"
    env = {"STREAMSCORE_TOPIC_PREFIX": prefix, "STREAMSCORE_WORKER__WEB_PORT": str(args.port),
           "STREAMSCORE_MODELS_DIR": str(args.library)}
    settings = Settings(**{key: value for key, value in Settings().model_dump().items()
                           if key not in ("topic_prefix", "models_dir")}, topic_prefix=prefix,
                        models_dir=args.library)
    asyncio.run(ensure_topics(settings, [topics.requests(prefix, MODEL), topics.predictions(prefix, MODEL)],
                              settings.worker.partitions))
    scratch = Path(tempfile.mkdtemp(prefix="batch-cost-"))
    log = open(scratch / "worker.log", "wb")  # noqa: SIM115 - open for the worker's lifetime
    stats = scratch / "passthrough.json"
    command = [sys.executable, "-m", "streamscore", "worker", "--model", MODEL]
    if passthrough:  # the Kafka client alone, committing and producing as the worker does
        command = [sys.executable, "-m", "streamscore_bench.baselines", "raw-passthrough", "--model", MODEL,
                   "--commit-interval-ms", str(settings.worker.commit_interval_ms), "--linger-ms", "0",
                   "--stats-file", str(stats), *(["--uvloop"] if settings.worker.event_loop == "uvloop" else [])]
    counts = _Counts(args.port, stats if passthrough else None)
    raw = scratch / "profile.txt"
    worker = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not counts.ready():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not get ready: {scratch / 'worker.log'}")
            time.sleep(0.5)
        count = int(args.rate * args.seconds)
        print(f"warming: {count} requests (the load phase's entities: Redis is filled from Cassandra)", flush=True)
        _warm(settings, args, counts, count, 1)
        time.sleep(3)  # the last batch's commit and the prediction log's flush
        print(f"idle: {args.idle_s:.0f} s", flush=True)
        idle_cpu, idle_started = process_cpu_s(worker.pid), time.monotonic()
        time.sleep(args.idle_s)
        idle_share = (process_cpu_s(worker.pid) - idle_cpu) / (time.monotonic() - idle_started)  # type: ignore[operator]
        print(f"warming again: {count} requests (the worker's near cache, whose entries live "
              f"{settings.redis.near_cache_ttl_s:.0f} s, holds them from Redis)", flush=True)
        _warm(settings, args, counts, count, 2)
        print(f"light load: {args.rate:.0f} requests/s for {args.seconds:.0f} s", flush=True)
        requests = list(demo_requests(count, seed=6, id_prefix="load"))
        batches_before, answered_before = counts.batches(), counts.answered()
        load_cpu, load_started = process_cpu_s(worker.pid), time.monotonic()
        behind = asyncio.run(_send(settings, requests, args.rate))
        while counts.answered() < answered_before + len(requests) and time.monotonic() - load_started < 300:
            time.sleep(0.05)
        load_s = time.monotonic() - load_started
        load_cpu_s = process_cpu_s(worker.pid) - load_cpu  # type: ignore[operator]
        batches = counts.batches() - batches_before
        if profile:  # a second load phase, sampled: the figures above are the unsampled phase's
            _warm(settings, args, counts, count, 3)  # the near cache's entries outlived by the first phase
            print(f"profiled load: {args.rate:.0f} requests/s for {args.seconds:.0f} s under py-spy", flush=True)
            spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--pid", str(worker.pid), "--duration", str(int(args.seconds) + 60), "--rate",
                                    "100", "--native", "--format", "raw", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            profiled_before = counts.answered()
            asyncio.run(_send(settings, list(demo_requests(count, seed=6, id_prefix="profiled")), args.rate))
            while counts.answered() < profiled_before + count and time.monotonic() - load_started < 600:
                time.sleep(0.05)
            spy.send_signal(2)
            spy.wait(60)
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
    result: dict[str, Any] = {
        "idle_share_of_a_core": idle_share, "requests": len(requests), "batches": batches, "load_phase_s": load_s,
        "load_cpu_s": load_cpu_s, "cpu_ms_per_batch": 1000 * (load_cpu_s - idle_share * load_s) / max(1, batches),
        "cpu_ms_per_batch_with_idle": 1000 * load_cpu_s / max(1, batches),
        "sender_most_behind_ms": round(1000 * behind, 1), "load_avg": os.getloadavg()[0],
    }
    if profile and raw.is_file():
        samples, top, parts = _top_functions(raw, 25)
        result["profile"] = {"samples": samples, "top_inclusive": top, "parts": parts}
    return result


class _Counts:
    """Batches made and requests answered so far: the worker's, from its web port; the passthrough's, from the
    file it rewrites every half second."""

    def __init__(self, port: int, stats: Path | None) -> None:
        self.port, self.stats = port, stats

    def _read(self) -> dict[str, int]:
        assert self.stats is not None
        for _ in range(20):  # rewritten as it is read, now and then
            with contextlib.suppress(OSError, ValueError):
                return json.loads(self.stats.read_text())
            time.sleep(0.05)
        raise SystemExit(f"the passthrough's counts cannot be read from {self.stats}")

    def ready(self) -> bool:
        if self.stats is not None:
            return self.stats.is_file()
        try:
            return bool(json.loads(_get(self.port, "/readyz")).get("ready"))
        except (OSError, ValueError):
            return False

    def answered(self) -> int:
        if self.stats is None:
            return answered(self.port)
        time.sleep(0.5)  # the file is at most half a second old
        return self._read()["requests"]

    def batches(self) -> int:
        return _batches(self.port) if self.stats is None else self._read()["batches"]


def _warm(settings: Settings, args: argparse.Namespace, counts: _Counts, count: int, round_: int) -> None:
    before = counts.answered()
    asyncio.run(_send(settings, list(demo_requests(count, seed=6, id_prefix=f"warm{round_}")), args.warm_rate))
    deadline = time.monotonic() + 120
    while counts.answered() < before + count:
        if time.monotonic() > deadline:
            raise SystemExit(f"warming: {counts.answered() - before} of {count} requests answered in 120 s")
        time.sleep(0.2)


def _write(result: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    worker, rounds = result["worker"], result["rounds"]
    lines = [
        f"# A worker's CPU at idle and per one-request batch ({result['label']})\n",
        f"{result['date']}, {result['machine']['cores']} cores; {len(rounds)} rounds, each a fresh worker and a "
        f"fresh raw aiokafka passthrough (consume, produce, commit every "
        f"{Settings().worker.commit_interval_ms} ms, the same event loop: the Kafka client alone) in alternating "
        f"order; {result['rate']:.0f} one-request messages/s for {result['seconds']:.0f} s; medians.\n",
        "| measure | worker | passthrough | target |\n|---|---:|---:|---:|",
    ]
    passthrough = result.get("passthrough", {})

    def cell(values: dict[str, Any], key: str, scale: float, unit: str) -> str:
        return f"{scale * values[key]:.2f}{unit}" if key in values else ""

    lines += [
        f"| idle, share of one core ({result['idle_s']:.0f} s) | {cell(worker, 'idle_share_of_a_core', 100, '%')} | "
        f"{cell(passthrough, 'idle_share_of_a_core', 100, '%')} | 2% |",
        f"| CPU per one-request batch, beyond idle | {cell(worker, 'cpu_ms_per_batch', 1, ' ms')} | "
        f"{cell(passthrough, 'cpu_ms_per_batch', 1, ' ms')} | 1 ms |",
        f"| the same, idle included | {cell(worker, 'cpu_ms_per_batch_with_idle', 1, ' ms')} | "
        f"{cell(passthrough, 'cpu_ms_per_batch_with_idle', 1, ' ms')} | |",
    ]
    ratio = result.get("worker_over_passthrough")
    if ratio:
        lines.append(f"| worker / passthrough, per batch (median of the rounds' ratios) | {ratio['median']:.2f} | | |")
    lines += ["", "| round | kind | CPU ms per batch (beyond idle) | idle | batches | sender most behind | load |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for number, measured in enumerate(rounds, 1):
        for kind, values in measured.items():
            lines.append(f"| {number} | {kind} | {values['cpu_ms_per_batch']:.2f} | "
                         f"{100 * values['idle_share_of_a_core']:.2f}% | {values['batches']:,} | "
                         f"{values['sender_most_behind_ms']} ms | {values['load_avg']:.1f} |")
    profile = result.get("profile")
    if profile:
        per_batch = rounds[-1]["worker"]["cpu_ms_per_batch_with_idle"]
        lines += ["", f"## Where the worker's CPU went (its last round, a second load phase under py-spy, "
                      f"{profile['samples']:,} busy samples)\n",
                  "| part of the per-batch path | share of samples | ms per batch |", "|---|---:|---:|"]
        lines += [f"| {part} | {100 * share:.1f}% | {share * per_batch:.2f} |"
                  for part, share in profile["parts"].items()]
        lines += ["", "| function (inclusive) | share of samples |", "|---|---:|"]
        lines += [f"| `{function[:110]}` | {100 * share:.1f}% |" for function, share in profile["top_inclusive"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(out / f"{name}.png", result)


def _plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = result.get("profile")
    figure, axes = plt.subplots(1, 2 if profile else 1, figsize=(13 if profile else 6, 5), squeeze=False)
    axis = axes[0][0]
    kinds = [kind for kind in ("worker", "passthrough") if kind in result]
    for offset, kind in enumerate(kinds):
        values = [measured[kind]["cpu_ms_per_batch"] for measured in result["rounds"] if kind in measured]
        axis.scatter([offset] * len(values), values, alpha=0.6)
        axis.hlines(result[kind]["cpu_ms_per_batch"], offset - 0.25, offset + 0.25)
    axis.axhline(1.0, linestyle=":", color="grey", label="target 1 ms")
    axis.set_xticks(range(len(kinds)), kinds)
    axis.set_ylim(bottom=0)
    axis.set_ylabel("CPU ms per one-request batch (beyond idle)")
    axis.set_title(f"{result['rate']:.0f} one-request batches/s: rounds and medians")
    axis.legend()
    if profile:
        parts = profile["parts"]
        names = list(parts)[::-1]
        per_batch = result["rounds"][-1]["worker"]["cpu_ms_per_batch_with_idle"]
        axis = axes[0][1]
        axis.barh(names, [parts[name] * per_batch for name in names])
        axis.set_xlabel("CPU ms per one-request batch")
        axis.set_title(f"Worker, by part of the per-batch path ({per_batch:.2f} ms, last round)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--idle-s", type=float, default=15.0)
    parser.add_argument("--warm-rate", type=float, default=2_000.0)
    parser.add_argument("--profile", action="store_true", help="Sample the load phase with py-spy.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                        help="Skip the raw aiokafka passthrough (streamscore_bench.baselines) measured beside the "
                             "worker in each round: what the Kafka client alone costs per one-request batch "
                             "(consume, produce, commit at the worker's interval, same event loop).")
    parser.add_argument("--label", default="main")
    parser.add_argument("--library", type=Path, default=Path("demo-data/models"))
    parser.add_argument("--port", type=int, default=16193, help="The worker's web port.")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="batch_cost", help="File name of the results (NAME.json, .md, .png).")
    args = parser.parse_args()
    if not (args.library / MODEL).is_dir():
        sys.exit(f"no demo model in {args.library / MODEL}: run `make demo` first")
    result = run(args)
    _write(result, args.out, args.name)
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
