"""``streamscore demo --lifecycle``: the model flow on live traffic, two workers, one run.

What it shows, while requests stream at a steady rate through two worker processes (one consumer group):

1. the demo's v1 is production; two cheaper variants are registered from it: ``1-int8`` (ONNX Runtime's
   dynamic int8 quantization) and ``1-distilled`` (a small student trained on v1's scores);
2. both variants run as **shadow**: they score every request with the same feature values, in the same
   batches, in the dark; the shadow records are read back and compared with production's answers (the table
   of ``streamscore models compare``, and its PNG);
3. ``1-distilled`` becomes a **canary** at weight 0.2: the share it answers is measured, and every request
   is checked against the stable hash of its card (the same card always meets the same version);
4. it is **promoted**, then **rolled back**: the time from the rollback's return to the first prediction made
   by the restored v1 is measured in each worker;
5. each version is promoted in turn and a backlog is sent as fast as possible: worker throughput per version,
   in one table with runtime µs per request, score difference to the parent and held-out AUC.

Every change goes through the same functions as ``streamscore models ...`` (and is logged in the deployment's
history with who and when). The run uses topics of its own (``<prefix>-life-<run>.*``) so it starts from a clean
deployment; its figures go to ``<data_dir>/lifecycle/`` (JSON, markdown, PNGs). Nothing may be lost: the run
fails when a request is unanswered or a canary request met the wrong version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import Client, ensure_topics, tail_consumer
from streamscore.streams.wire import unpack
from streamscore.workers import compare, deployments, variants
from streamscore.workers.library import ModelError, read_manifest
from streamscore.workers.stages import canary_share

from .data import generate_transactions
from .model import build_and_register, holdout_set, training_set
from .requests import FEATURE_SEED, as_request
from .run import MODEL, DemoFailed, fill_views, stack_up, stop_process

Echo = Callable[[str], None]

WORKERS = 2
RELOAD_S = 1.0
"""Reload interval of the demo's workers: how often they read the deployment."""
CANARY_WEIGHT = 0.2
BURST = 20_000
"""Requests of each max-throughput burst (one per version)."""


@dataclass
class Seen:
    """A prediction as the subscriber saw it."""

    version: str
    worker: str
    card: str
    status: str
    arrived: float
    """time.monotonic() when it arrived."""


@dataclass
class Live:
    """The predictions of the run, collected while it goes."""

    predictions: dict[str, Seen] = field(default_factory=dict)
    cards: dict[str, str] = field(default_factory=dict)

    def since(self, started: float) -> list[Seen]:
        return [seen for seen in self.predictions.values() if seen.arrived >= started]


def run_lifecycle(settings: Settings, rate: float, echo: Echo = print) -> dict[str, Any]:
    started = time.monotonic()
    run = uuid.uuid4().hex[:6]
    prefix = f"{settings.topic_prefix}-life-{run}"
    life = settings.model_copy(update={"topic_prefix": prefix})
    out = settings.data_dir / "lifecycle"
    out.mkdir(parents=True, exist_ok=True)
    echo(f"== 1/7 local stack (this run's topics: {prefix}.*)")
    stack_up(settings, echo)
    echo("== 2/7 feature views and rows, the fraud model v1, and two cheaper variants of it")
    rows = fill_views(settings)
    manifest, _ = build_and_register(settings.models_dir)
    made = _variants(settings, manifest.version, echo)
    echo("== 3/7 two workers (reload interval 1 s)")
    workers = [_start_worker(life, index) for index in range(WORKERS)]
    try:
        result = asyncio.run(_scenario(life, rows, rate, made, out, echo))
    finally:
        for worker in workers:
            stop_process(worker)
    echo("== 7/7 cost against accuracy of each version")
    table = _versions_table(settings, [manifest.version, *made], result)
    echo(table)
    (out / "versions.md").write_text(f"# fraud: versions compared on the demo's traffic\n\n{table}")
    (out / "lifecycle.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    _plot_timeline(result, out / "lifecycle.png")
    echo(f"wrote {out / 'lifecycle.json'}, {out / 'versions.md'}, {out / 'lifecycle.png'} and the shadow "
         f"comparison PNGs; inspect the run with STREAMSCORE_TOPIC_PREFIX={prefix} streamscore models show {MODEL}")
    echo(f"lifecycle demo finished in {time.monotonic() - started:.0f} s")
    problems = result["problems"]
    if problems:
        raise DemoFailed("; ".join(problems))
    return result


def _variants(settings: Settings, parent: str, echo: Echo) -> list[str]:
    """Register 1-int8 and 1-distilled once (the same parent, the same seeds: the same artifacts each run)."""
    made = []
    for suffix, build in (("int8", lambda: variants.quantize_int8(settings.models_dir, MODEL, parent)),
                          ("distilled", lambda: variants.distill(settings.models_dir, MODEL, parent,
                                                                 training_set(FEATURE_SEED, 20_000)[0]))):
        version = f"{parent}-{suffix}"
        folder = settings.models_dir / MODEL / version
        try:
            existing = read_manifest(folder) if folder.is_dir() else None
        except ModelError:
            existing = None
        if existing is None or existing.parent != parent:
            existing = build()
        made.append(existing.version)
        how = existing.made_by.method if existing.made_by else "?"
        echo(f"   {MODEL} v{existing.version}: {how} of v{parent} (sha256 {existing.sha256[:12]}…)")
    return made


def _start_worker(settings: Settings, index: int) -> subprocess.Popen:
    log_path = settings.data_dir / f"lifecycle-worker-{index}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    env = {**os.environ, "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
           "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": str(RELOAD_S),
           "STREAMSCORE_WORKER__WEB_PORT": str(settings.worker.web_port + 10 + index),
           "STREAMSCORE_WORKER__WORKER_ID": f"worker-{index}"}
    return subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL],
                            stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _requests(rows: Any, run: str, seed: int) -> Iterator[dict[str, Any]]:
    """Endless demo requests, ids ``life-<run>-<n>``."""
    index = 0
    while True:
        for transaction in generate_transactions(rows, 10_000, seed + index, with_labels=False):
            yield as_request(f"life-{run}-{index}", transaction)
            index += 1


async def _scenario(settings: Settings, rows: Any, rate: float, made: list[str], out: Path,
                    echo: Echo) -> dict[str, Any]:
    live = Live()
    canary = made[-1]  # the distilled variant
    marks: list[tuple[float, str]] = []
    problems: list[str] = []
    result: dict[str, Any] = {"rate": rate, "workers": WORKERS, "reload_interval_s": RELOAD_S, "marks": marks,
                              "problems": problems}
    await deployments.ensure_topic(settings, MODEL)
    prefix = settings.topic_prefix
    await ensure_topics(settings, [topics.requests(prefix, MODEL), topics.predictions(prefix, MODEL)],
                        settings.worker.partitions)
    consumer = await tail_consumer(settings, topics.predictions(settings.topic_prefix, MODEL))
    collector = asyncio.create_task(_collect(consumer, live))
    run = uuid.uuid4().hex[:6]
    stop = asyncio.Event()
    sent: list[str] = []
    origin = time.monotonic()

    def mark(what: str) -> float:
        now = time.monotonic()
        marks.append((now - origin, what))
        echo(f"   t={now - origin:5.1f} s  {what}")
        return now

    async def change(fn: deployments.ChangeFn) -> float:
        old, new = await deployments.change_deployment(settings, MODEL, fn, by="demo --lifecycle")
        return mark(deployments.describe_change(old, new))

    try:
        async with Client(settings) as client:
            await _until_answered(client, settings)
            echo(f"== 4/7 live traffic at {rate:.0f} requests/s through {WORKERS} workers; shadow, compare")
            producer = asyncio.create_task(_stream(client, _requests(rows, run, 4242), rate, stop, live, sent))
            mark("streaming; production v1")
            await asyncio.sleep(4)
            for version in made:
                await change(lambda state, library, v=version: deployments.shadow(state, v, library))
            await asyncio.sleep(10)
            result["shadow"] = await _compare_shadows(settings, made, run, out, echo)
            for version in made:
                await change(lambda state, library, v=version: deployments.retire(state, v, library))
            echo(f"== 5/7 canary v{canary} at weight {CANARY_WEIGHT}, promote, roll back")
            took = await change(lambda state, library: deployments.canary(state, canary, CANARY_WEIGHT, library))
            await asyncio.sleep(3 * RELOAD_S)  # every worker took it
            window = time.monotonic()
            await asyncio.sleep(10)
            result["canary"] = _canary_split(live, canary, window, time.monotonic(), problems, echo)
            result["canary"]["taken_after_s"] = window - took
            promoted = await change(lambda state, library: deployments.promote(state, canary, library))
            await asyncio.sleep(6)
            result["promote_s"] = _switch_times(live, promoted, "1", gone=True)
            rolled = await change(lambda state, library: deployments.rollback(state, library))
            await asyncio.sleep(6)
            result["rollback_s"] = _switch_times(live, rolled, "1", gone=False)
            for worker, seconds in sorted(result["rollback_s"].items()):
                echo(f"   rollback -> first prediction by the restored v1 from {worker}: {seconds:.2f} s")
            if len(result["rollback_s"]) < WORKERS:
                problems.append(f"only {sorted(result['rollback_s'])} served v1 again after the rollback")
            stop.set()
            await producer
            mark(f"stopped streaming: {len(sent)} requests sent")
            result["live"] = await _settle(live, sent, problems, echo)
            echo("== 6/7 worker throughput of each version (a backlog of "
                 f"{BURST} requests each, as fast as possible)")
            result["throughput"] = {}
            for version in ["1", *made]:
                state = await deployments.read_deployment(settings, MODEL)
                if state is None or state.production != version:
                    await change(lambda s, library, v=version: deployments.promote(s, v, library))
                await asyncio.sleep(3 * RELOAD_S)
                result["throughput"][version] = await _burst(client, live, rows, version, run, problems)
                echo(f"   v{version}: {result['throughput'][version]:.0f} predictions/s")
            await change(lambda s, library: deployments.promote(s, "1", library))
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await consumer.stop()
    result["timeline"] = _timeline(live, origin)
    return result


async def _collect(consumer: Any, live: Live) -> None:
    while True:
        for records in (await consumer.getmany(timeout_ms=200, max_records=4096)).values():
            arrived = time.monotonic()
            for record in records:
                prediction = unpack(record.value)
                request_id = prediction.get("id")
                if request_id in live.cards and request_id not in live.predictions:
                    live.predictions[request_id] = Seen(
                        str(prediction.get("version")), str(prediction.get("lineage", {}).get("worker_id")),
                        live.cards[request_id], str(prediction.get("status")), arrived)


async def _until_answered(client: Client, settings: Settings, timeout_s: float = 120.0) -> None:
    """Both workers joined and answering: a few predict() round trips."""
    from streamscore.streams.client import PredictTimeout

    deadline = time.monotonic() + timeout_s
    probe = as_request("probe", {"card_id": "card-1", "merchant_id": "merchant-1", "amount": 10.0, "hour": 12.0,
                                 "is_foreign": 0.0})
    while time.monotonic() < deadline:
        try:
            await client.predict(MODEL, {**probe, "id": f"probe-{uuid.uuid4().hex[:8]}"}, timeout=5.0)
            await asyncio.sleep(3)  # the second worker's join settles the group
            return
        except PredictTimeout:
            continue
    raise DemoFailed(f"the workers did not answer within {timeout_s:.0f} s; see "
                     f"{settings.data_dir}/lifecycle-worker-*.log")


async def _stream(client: Client, requests: Iterator[dict[str, Any]], rate: float, stop: asyncio.Event,
                  live: Live, sent: list[str]) -> None:
    def until_stopped() -> Iterator[dict[str, Any]]:
        for request in requests:
            if stop.is_set():
                return
            live.cards[request["id"]] = request["entities"]["card_id"]
            sent.append(request["id"])
            yield request

    await client.produce_many(MODEL, until_stopped(), rate, window=200)


async def _compare_shadows(settings: Settings, made: list[str], run: str, out: Path, echo: Echo) -> dict[str, Any]:
    summaries = {}
    for version in made:
        read = await compare.read_shadow(settings, MODEL, "1", version, max_records=1_000_000)
        records = [record for record in read.records if str(record.get("id", "")).startswith(f"life-{run}-")]
        if not records:
            echo(f"   no shadow records of v{version} yet")
            continue
        # off the event loop: the live stream and its subscriber go on meanwhile
        summary = await asyncio.to_thread(compare.summarize, records, "1", version)
        echo(f"-- shadow v{version} against production v1: {summary['records']} requests")
        echo(compare.table(summary).rstrip())
        await asyncio.to_thread(compare.plot, records, summary, out / f"compare-fraud-1-{version}.png", MODEL)
        summaries[version] = summary
    return summaries


def _canary_split(live: Live, canary: str, start: float, end: float, problems: list[str],
                  echo: Echo) -> dict[str, Any]:
    window = [seen for seen in live.since(start) if seen.arrived < end and seen.status == "ok"]
    on_canary = canary_share([seen.card for seen in window], CANARY_WEIGHT)
    got = np.array([seen.version == canary for seen in window])
    wrong = int((got != on_canary).sum())
    share = float(got.mean()) if len(got) else 0.0
    echo(f"   canary window: {len(window)} predictions, v{canary} answered {100 * share:.2f}% (weight "
         f"{100 * CANARY_WEIGHT:.0f}%, the cards' hash says {100 * float(on_canary.mean()):.2f}%); "
         f"{wrong} met another version than their card's hash")
    if wrong:
        problems.append(f"{wrong} canary-window requests met another version than their card's hash")
    return {"predictions": len(window), "canary_share": share, "hash_share": float(on_canary.mean()),
            "mismatched": wrong}


def _switch_times(live: Live, at: float, version: str, gone: bool) -> dict[str, float]:
    """Per worker: seconds from ``at`` to its first prediction by ``version`` (gone=False), or to its last one
    (gone=True: the time the version stopped answering there)."""
    times: dict[str, float] = {}
    for seen in sorted(live.since(at), key=lambda seen: seen.arrived):
        if seen.version != version:
            continue
        if gone:
            times[seen.worker] = seen.arrived - at
        else:
            times.setdefault(seen.worker, seen.arrived - at)
    return times


async def _settle(live: Live, sent: list[str], problems: list[str], echo: Echo, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(request_id not in live.predictions for request_id in sent):
        await asyncio.sleep(0.5)
    lost = [request_id for request_id in sent if request_id not in live.predictions]
    by_version = Counter(live.predictions[request_id].version for request_id in sent if request_id in live.predictions)
    by_worker = Counter(live.predictions[request_id].worker for request_id in sent if request_id in live.predictions)
    echo(f"   {len(sent) - len(lost)}/{len(sent)} answered (lost {len(lost)}); by version: "
         + ", ".join(f"v{v} {n}" for v, n in sorted(by_version.items()))
         + "; by worker: " + ", ".join(f"{w} {n}" for w, n in sorted(by_worker.items())))
    if lost:
        problems.append(f"{len(lost)} of {len(sent)} live requests unanswered, e.g. {lost[:3]}")
    return {"sent": len(sent), "lost": len(lost), "by_version": dict(by_version), "by_worker": dict(by_worker)}


async def _burst(client: Client, live: Live, rows: Any, version: str, run: str, problems: list[str]) -> float:
    burst_id = f"{run}-burst-{version}"
    requests = [as_request(f"life-{burst_id}-{index}", transaction)
                for index, transaction in enumerate(generate_transactions(rows, BURST, 99, with_labels=False))]
    for request in requests:
        live.cards[request["id"]] = request["entities"]["card_id"]
    started = time.monotonic()
    with tqdm(total=len(requests), unit="req", desc=f"v{version}", leave=False) as progress:
        await client.produce_many(MODEL, requests, None, progress.update, window=1000)
    deadline = time.monotonic() + 60
    ids = [request["id"] for request in requests]
    while time.monotonic() < deadline and any(request_id not in live.predictions for request_id in ids):
        await asyncio.sleep(0.2)
    answered = [live.predictions[request_id] for request_id in ids if request_id in live.predictions]
    if len(answered) < len(ids):
        problems.append(f"burst of v{version}: {len(ids) - len(answered)} of {len(ids)} unanswered")
    others = sum(seen.version != version for seen in answered)
    if others:
        problems.append(f"burst of v{version}: {others} predictions by another version")
    last = max((seen.arrived for seen in answered), default=started + 1)
    return len(answered) / max(1e-3, last - started)


def _timeline(live: Live, origin: float) -> dict[str, dict[int, int]]:
    """Predictions per second of the run, by version: {version: {second: count}}."""
    counts: dict[str, Counter[int]] = {}
    for seen in live.predictions.values():
        counts.setdefault(seen.version, Counter())[int(seen.arrived - origin)] += 1
    return {version: dict(sorted(counter.items())) for version, counter in sorted(counts.items())}


def _versions_table(settings: Settings, versions: list[str], result: dict[str, Any]) -> str:
    inputs, labels = holdout_set(FEATURE_SEED)
    rows = variants.compare(settings.models_dir, MODEL, versions, inputs, labels, batches=(1, 256))
    shadow = result.get("shadow", {})
    head = ["version", "made by", "µs/req @1", "µs/req @256", "worker req/s", "live label agree",
            "live p99 |Δscore|", "held-out max |Δscore|", "held-out AUC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in rows:
        version = row["version"]
        live = shadow.get(version, {}).get("outputs", {})
        decision = live.get("label", {}).get("agreement")
        p99 = live.get("fraud_probability", {}).get("p99_abs_diff")
        throughput = result.get("throughput", {}).get(version)
        made = f"{row['method']} of v{row['parent']}" if row["method"] else "(parent)"
        lines.append("| " + " | ".join([
            version, made, f"{row['us_per_request']['1']:.2f}", f"{row['us_per_request']['256']:.3f}",
            "-" if throughput is None else f"{throughput:.0f}",
            "-" if decision is None else f"{100 * decision:.2f}%", "-" if p99 is None else f"{p99:.4f}",
            f"{row['max_abs_diff']:.4f}", f"{row['auc']:.4f}"]) + " |")
    result["versions"] = rows
    return "\n".join(lines) + "\n"


def _plot_timeline(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(12, 5))
    last = max((max(counts) for counts in result["timeline"].values() if counts), default=0)
    seconds = list(range(last + 1))
    for version, counts in result["timeline"].items():
        axes.step(seconds, [counts.get(second, 0) for second in seconds], where="post", label=f"v{version}",
                  linewidth=1.2)
    for at, what in result["marks"]:
        axes.axvline(at, color="grey", linewidth=0.6, linestyle="--")
        axes.text(at, axes.get_ylim()[1] * 0.98, what[:40], rotation=90, va="top", ha="right", fontsize=7)
    axes.set(xlabel="seconds since the stream started", ylabel="predictions per second",
             title=f"fraud: predictions per second by version ({result['workers']} workers)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
