"""The worker's pipeline alone on one-request batches, back to back and with a pause between batches.

``python -m streamscore_bench.pipeline_gap`` (after ``make demo``: the demo's model) runs the pipeline a worker
builds for the demo model (the manifest's stages, drift and the prediction log; an in-memory feature store with
the demo's rows, no Kafka, no Redis) on one-request batches: ``--batches`` back to back, then the same with
``--gap-ms`` of sleep between two batches (200 batches/s leave about 5 ms between them), in alternating blocks.
Each batch's own time is measured around ``process`` only, so the pause is not in it: what the pause changes is
the state the core is left in (caches and branch predictors cold after it idled or ran another process).
Writes ``pipeline_gap.{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

MODEL = "fraud"


def demo_memory_store(views_file: Path) -> Any:
    """An in-memory feature store (no cache tier) holding the demo's feature rows."""
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import load_views
    from streamscore.settings import Settings
    from streamscore_examples.fraud.data import generate_feature_rows
    from streamscore_examples.fraud.requests import FEATURE_SEED

    store = FeatureStore(Settings(online_store="memory", cache="none"), load_views(views_file))
    store.connect()
    for view, rows in generate_feature_rows(FEATURE_SEED).items():
        asyncio.run(store.put(view, [(entity, values, None) for entity, values in rows.items()]))
    return store


def build(library: Path) -> Any:
    from prometheus_client import CollectorRegistry

    from streamscore.settings import Settings, WorkerSettings
    from streamscore.workers.drift import Drift
    from streamscore.workers.pipeline import BatchPipeline
    from streamscore.workers.predlog import attach
    from streamscore.workers.runtime import load_model

    settings = Settings(online_store="memory", cache="none")
    store = demo_memory_store(settings.views_file)
    views = store.views
    registry = CollectorRegistry()
    pipeline = BatchPipeline(load_model(library, MODEL, views, WorkerSettings(), None), store, "bench",
                             worker_id="bench", registry=registry)
    pipeline.add_from_manifest(registry)
    attach(pipeline, settings, registry)
    pipeline.add(Drift("bench.fraud.monitoring", settings.monitoring, registry, MODEL, "bench"), after="infer")
    return pipeline


async def measure(pipeline: Any, batches: int, gap_s: float, blocks: int) -> dict[str, list[float]]:
    from streamscore.streams.records import Inbound
    from streamscore_examples.fraud.requests import demo_requests

    requests = list(demo_requests(batches * blocks * 2 + 200, seed=11, id_prefix="gap"))
    messages = iter([Inbound(msgpack.packb(request), b"k", "bench.fraud.requests", 0, offset)]
                    for offset, request in enumerate(requests))
    for _ in range(200):  # warm-up: the model session, numpy's first calls
        await pipeline.process(next(messages))
    seconds: dict[str, list[float]] = {"back to back": [], "with a gap": []}
    for block in range(blocks * 2):
        mode = "back to back" if block % 2 == 0 else "with a gap"
        for _ in range(batches):
            if mode == "with a gap":
                await asyncio.sleep(gap_s)
            batch = next(messages)
            started = time.perf_counter()
            await pipeline.process(batch)
            seconds[mode].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=500, help="One-request batches per block.")
    parser.add_argument("--blocks", type=int, default=3, help="Blocks of each mode, alternating.")
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--library", type=Path, default=Path("demo-data/models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not (args.library / MODEL).is_dir():
        sys.exit(f"no demo model in {args.library / MODEL}: run `make demo` first")
    seconds = asyncio.run(measure(build(args.library), args.batches, args.gap_ms / 1000, args.blocks))
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    result = {"batches_per_mode": len(seconds["back to back"]), "gap_ms": args.gap_ms,
              "median_us": {mode: round(1e6 * value, 1) for mode, value in medians.items()},
              "p90_us": {mode: round(1e6 * statistics.quantiles(values, n=10)[-1], 1)
                         for mode, values in seconds.items()},
              "gap_over_back_to_back": medians["with a gap"] / medians["back to back"],
              "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline_gap.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The pipeline alone on one-request batches: back to back, and with a pause between batches\n",
             f"{result['date']}, {result['machine']['cores']} cores, load {result['machine']['load_avg'][0]:.1f}; "
             f"{result['batches_per_mode']:,} batches each way in alternating blocks, a {args.gap_ms:g} ms sleep "
             "between two batches in the second; the time of `process` alone.\n",
             "| batches | median us | p90 us |", "|---|---:|---:|"]
    lines += [f"| {mode} | {result['median_us'][mode]:.0f} | {result['p90_us'][mode]:.0f} |" for mode in seconds]
    lines.append(f"\nWith a gap / back to back (medians): {result['gap_over_back_to_back']:.2f}")
    (args.out / "pipeline_gap.md").write_text("\n".join(lines) + "\n")
    _plot(args.out / "pipeline_gap.png", seconds, args.gap_ms)
    print((args.out / "pipeline_gap.md").read_text())


def _plot(path: Path, seconds: dict[str, list[float]], gap_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.boxplot([[1e6 * value for value in values] for values in seconds.values()], showfliers=False)
    axis.set_xticks([1, 2], list(seconds))
    axis.set_ylabel("µs per one-request batch (process only)")
    axis.set_title(f"The pipeline alone: back to back, and with {gap_ms:g} ms between batches")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
