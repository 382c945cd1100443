"""What the drift stage costs a worker: drain throughput with drift monitoring off and on, in one run.

``python -m streamscore_bench.drift_cost`` (after ``make demo``, which leaves the demo's feature rows in Cassandra
and its model in ``demo-data/models``) copies the demo model into two scratch libraries: one without a training
profile (the drift stage has nothing to watch: monitoring off) and one with it (the manifest's profile, or one
made here from the demo's training matrix and the artifact's own scores on it: monitoring on). Both hold the same
artifact, so the difference is the drift stage's work.

Each drain preloads ``--requests`` demo requests (the same ones each time) while no worker runs, then starts a
fresh worker on one of the libraries (window ``--window-requests``) and lets it drain the backlog: the worker
competes with nothing but the servers, and no producer runs beside it. Every drain uses the same topic prefix,
so the worker group goes on from its committed offsets and the feature cache (keyed by the prefix) is warm
after the warm-up drain, as in production. Requests/s is answered / (last - first prediction's
Kafka timestamp). Each round drains once off and once on, off first in even rounds and on first in odd ones (a
trend in the machine's load cancels out), ``--rounds`` rounds. Writes ``drift_cost.{json,md,png}`` into
``--out``: the median of each, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import partitions_of
from streamscore.streams.kafka import client_kwargs
from streamscore_examples.fraud.requests import demo_requests

from .profile_worker import answered, preload
from .shadow_cost import MODEL


def demo_profile(version_dir: Path, seed: int, n_train: int) -> dict[str, Any]:
    """The version's training profile: its manifest's, or one made from the demo's training matrix (seed,
    n_train) and the artifact's own scores on it (what the recipe records at registration)."""
    import numpy as np
    import onnxruntime as ort

    from streamscore.workers.profile import build_profile, data_sha256
    from streamscore_examples.fraud.data import COLUMNS, feature_matrix, labels
    from streamscore_examples.fraud.model import defaulted_masks, training_data

    manifest = json.loads((version_dir / "manifest.json").read_text())
    if manifest.get("profile"):
        return manifest["profile"]
    rows, transactions = training_data(seed, n_train)
    features = feature_matrix(transactions, rows)
    session = ort.InferenceSession(str(version_dir / manifest["artifact"]), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {manifest["onnx_input"]: features})
    profile = build_profile({name: features[:, i] for i, name in enumerate(COLUMNS)},
                            {"fraud_probability": probabilities[:, 1], "label": np.asarray(label)},
                            data_sha256=data_sha256(features, labels(transactions)),
                            params={"recipe": "streamscore_examples.fraud.model", "seed": seed, "n_train": n_train},
                            defaulted=defaulted_masks(transactions, rows))
    return profile.model_dump()


def _libraries(source: Path, scratch: Path, seed: int, n_train: int) -> dict[str, Path]:
    """By mode: a library holding the demo model as v1, without its training profile (off) or with it (on)."""
    profile = demo_profile(source, seed, n_train)
    libraries = {}
    for mode in ("off", "on"):
        libraries[mode] = scratch / mode
        shutil.copytree(source, libraries[mode] / MODEL / "1")
        path = libraries[mode] / MODEL / "1" / "manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, "version": "1", "profile": profile if mode == "on" else None}))
    return libraries


def pipeline_cost(library: Path, views_file: Path, batches: int, window_requests: int) -> dict[str, Any]:
    """The same pipeline (v2, the in-memory store holding the demo's rows) with the drift stage and without,
    batch after batch in alternating order on the same 2048 demo requests: seconds per batch, median of each."""
    import msgpack
    from prometheus_client import CollectorRegistry

    from streamscore.settings import MonitoringSettings, WorkerSettings
    from streamscore.streams.records import Inbound
    from streamscore.workers.drift import Drift
    from streamscore.workers.pipeline import BatchPipeline
    from streamscore.workers.runtime import load_model

    from .pipeline_gap import demo_memory_store

    store = demo_memory_store(views_file)
    views = store.views
    runtime = load_model(library, MODEL, views, WorkerSettings(), "1")
    plain, watched = (BatchPipeline(runtime, store, "bench", worker_id="bench") for _ in range(2))
    for pipeline in (plain, watched):
        pipeline.add_from_manifest(None)
    watched.add(Drift("bench.fraud.monitoring", MonitoringSettings(window_requests=window_requests),
                      CollectorRegistry(), MODEL, "bench"), after="infer")
    messages = [Inbound(msgpack.packb(request), b"k", "bench.fraud.requests", 0, offset)
                for offset, request in enumerate(demo_requests(2048, seed=11, id_prefix="component"))]
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    stage_us: list[int] = []
    for index in range(batches + 5):
        for mode, pipeline in (("off", plain), ("on", watched))[:: 1 if index % 2 == 0 else -1]:
            started = time.perf_counter()
            outcome = asyncio.run(pipeline.process(messages))
            if index >= 5:  # after a warm-up
                seconds[mode].append(time.perf_counter() - started)
                if mode == "on":
                    stage_us.append(outcome.timings_us["drift"])
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    return {"batches": batches, "batch_requests": len(messages), "median_off_s": off, "median_on_s": on,
            "ratio": off / on, "drift_stage_median_us": statistics.median(stage_us),
            "drift_stage_mean_us": statistics.fmean(stage_us)}


def _stage_seconds(port: int) -> dict[str, float]:
    """Seconds spent per pipeline stage so far (the worker's streamscore_stage_seconds sums at /metrics)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.labels["stage"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "streamscore_stage_seconds" for sample in family.samples
            if sample.name == "streamscore_stage_seconds_sum"}


async def _prediction_ends(settings: Settings) -> dict[TopicPartition, int]:
    """The end offset of each partition of the predictions topic under the settings' prefix ({} before any)."""
    topic = topics.predictions(settings.topic_prefix, MODEL)
    partitions = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
    if not partitions:
        return {}
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def _prediction_stamps(settings: Settings, count: int, since: dict[TopicPartition, int],
                             timeout: float = 60.0) -> list[int]:
    """The Kafka timestamps of ``count`` predictions under the settings' prefix, from the offsets ``since``."""
    topic = topics.predictions(settings.topic_prefix, MODEL)
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, since.get(tp, 0))
        stamps: list[int] = []
        deadline = time.monotonic() + timeout
        while len(stamps) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                stamps.extend(record.timestamp for record in records)
        return stamps
    finally:
        await consumer.stop()


def drain(library: Path, prefix: str, requests: int, window_requests: int, port: int, log: Path,
          timeout: float = 300.0) -> tuple[float, dict[str, float], int]:
    """Preload ``requests`` under ``prefix`` (no worker runs: the backlog waits after the group's committed
    offsets), start a worker on ``library``, wait until it answered them all: (requests/s from the predictions'
    Kafka timestamps, seconds per stage at its /metrics, drift windows logged as drifted)."""
    env = {"STREAMSCORE_TOPIC_PREFIX": prefix, "STREAMSCORE_MODELS_DIR": str(library),
           "STREAMSCORE_WORKER__WEB_PORT": str(port),
           "STREAMSCORE_MONITORING__WINDOW_REQUESTS": str(window_requests)}
    settings = Settings(**{key: value for key, value in Settings().model_dump().items()
                           if key not in ("topic_prefix", "models_dir", "monitoring")},
                        topic_prefix=prefix, models_dir=library)
    since = asyncio.run(_prediction_ends(settings))
    asyncio.run(preload(env, requests))
    with open(log, "wb") as output:
        worker = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL],
                                  env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while answered(port) < requests:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not answer {requests} requests: see {log}")
                time.sleep(0.5)
            stages = _stage_seconds(port)
        finally:
            worker.terminate()
            worker.wait(60)
    stamps = asyncio.run(_prediction_stamps(settings, requests, since))
    drifted = log.read_text(errors="replace").count("drift in ")
    return len(stamps) / max(1e-3, (max(stamps) - min(stamps)) / 1000), stages, drifted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300_000, help="Per drain (long enough to trust: seconds).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of each (off, on), alternating.")
    parser.add_argument("--window-requests", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--library", type=Path, default=Path("demo-data/models"))
    parser.add_argument("--seed", type=int, default=7, help="The demo model's training seed (profile made here).")
    parser.add_argument("--n-train", type=int, default=60_000)
    parser.add_argument("--component-batches", type=int, default=200,
                        help="Batches of 2048 through the pipeline alone, with drift and without (each).")
    parser.add_argument("--port", type=int, default=16191, help="The worker's web port.")
    args = parser.parse_args()
    source = args.library / MODEL / "1"
    if not source.is_dir():
        sys.exit(f"no demo model in {source}: run `make demo` first")
    scratch = Path(tempfile.mkdtemp(prefix="drift-cost-"))
    libraries = _libraries(source, scratch, args.seed, args.n_train)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    drift_share: list[float] = []
    """Per drain with drift on: the drift stage's share of the pipeline's time (from /metrics)."""
    windows = 0
    prefix = f"driftcost-{uuid.uuid4().hex[:6]}"  # one for every drain: the cache (keyed by it) stays warm
    warm, _, _ = drain(libraries["off"], prefix, args.requests, args.window_requests, args.port,
                       scratch / "warm-up.log")
    print(f"warm-up: {warm:,.0f} requests/s")
    for round_number in range(args.rounds):
        for mode in ("off", "on") if round_number % 2 == 0 else ("on", "off"):  # ABBA: a trend cancels out
            rate, stages, drifted = drain(libraries[mode], prefix, args.requests, args.window_requests, args.port,
                                          scratch / f"worker-{mode}-{round_number}.log")
            rates[mode].append(rate)
            if mode == "on":
                drift_share.append(stages.get("drift", 0.0) / max(1e-9, sum(stages.values())))
                windows += drifted
            print(f"round {round_number + 1}, drift {mode}: {rate:,.0f} requests/s")
    component = pipeline_cost(libraries["on"], Settings().views_file, args.component_batches, args.window_requests)
    print(f"pipeline alone: {component['ratio']:.3f} of the batches/s with drift on "
          f"(drift stage {component['drift_stage_mean_us']:.0f} us per batch of 2048 on average)")
    _write(args, warm, rates, drift_share, windows, component)


def _write(args: argparse.Namespace, warm: float, rates: dict[str, list[float]], drift_share: list[float],
           drifted_windows: int, component: dict[str, Any]) -> None:
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    share = statistics.median(drift_share)
    result = {"requests": args.requests, "rounds": args.rounds, "window_requests": args.window_requests,
              "warm_up_rps": warm, "drift_off_rps": rates["off"], "drift_on_rps": rates["on"],
              "median_off_rps": off, "median_on_rps": on, "ratio": on / off,
              "round_ratios": [b / a for a, b in zip(rates["off"], rates["on"], strict=True)],
              "drift_stage_share_of_pipeline_time": drift_share, "median_drift_stage_share": share,
              "windows_logged_drifted": drifted_windows, "pipeline_alone": component,
              "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(f"| {round_number + 1} | {a:,.0f} | {b:,.0f} | {b / a:.3f} |\n"
                   for round_number, (a, b) in enumerate(zip(rates["off"], rates["on"], strict=True)))
    (args.out / "drift_cost.md").write_text(
        "# Drift monitoring off against on (one worker, one run, backlogs drained, rounds off/on and on/off)\n\n"
        f"{args.requests:,} demo requests preloaded per drain, then drained by a fresh worker (no producer beside "
        f"it); drift window {args.window_requests:,} requests.\n\n"
        "| round | drift off (requests/s) | drift on (requests/s) | on / off |\n|---:|---:|---:|---:|\n"
        f"{rows}| median | {off:,.0f} | {on:,.0f} | {on / off:.3f} |\n\n"
        f"cost: {100 * (1 - on / off):.1f}% of the throughput (target: at most 5%). The drift stage's own share "
        f"of the pipeline's time with drift on (streamscore_stage_seconds at /metrics, same rounds): median "
        f"{100 * share:.1f}% ({', '.join(f'{100 * value:.1f}%' for value in drift_share)}).\n\n"
        f"The pipeline alone (no Kafka; in-memory feature store with the demo's rows; {component['batches']} batches "
        f"of {component['batch_requests']} each way, alternating): median {1000 * component['median_off_s']:.1f} ms "
        f"per batch without drift, {1000 * component['median_on_s']:.1f} ms with: {component['ratio']:.3f} of the "
        f"batches/s; the drift stage itself {component['drift_stage_mean_us']:.0f} us per batch on average "
        f"(median {component['drift_stage_median_us']:.0f} us; window closes included).\n\n"
        f"{result['date']}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} (the machine's other work "
        "moves throughput between rounds: read the ratio against the per-round spread)\n")
    _plot(args.out / "drift_cost.png", rates, on / off)


def _plot(path: Path, rates: dict[str, list[float]], ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    rounds = range(1, len(rates["off"]) + 1)
    width = 0.38
    axis.bar([r - width / 2 for r in rounds], rates["off"], width, label="drift off")
    axis.bar([r + width / 2 for r in rounds], rates["on"], width, label="drift on")
    axis.set_xlabel("round")
    axis.set_ylabel("requests/s")
    axis.set_xticks(list(rounds))
    axis.set_title(f"Worker throughput, drift stage off vs on (median ratio {ratio:.3f})")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
