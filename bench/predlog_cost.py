"""What the prediction log costs the hot path: the demo pipeline per batch, without and with the
``prediction_log`` stage, in one run.

``python -m streamscore_bench.predlog_cost`` trains a small demo fraud model into a scratch library, fills an
in-memory feature store with the demo's rows, and runs the real pipeline (decode, features, assemble, ONNX
Runtime, the decision stage, encode) on batches of ``--batch`` single-request messages, alternating a pipeline
without the stage and one with it (share 0.01, the default, and one ``debug: true`` request per batch), so both
meet the same machine load. The stage's writer only counts what it is handed: what is measured is what the batch
pays; the writing happens on the writer's own thread. Writes ``predlog_cost.{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import load_views
from streamscore.settings import Settings
from streamscore.streams.records import Inbound
from streamscore.workers.pipeline import BatchPipeline
from streamscore.workers.predlog import LogWriter, PredictionLog
from streamscore.workers.runtime import load_model
from streamscore_examples.fraud.data import generate_feature_rows, write_views
from streamscore_examples.fraud.model import build_and_register
from streamscore_examples.fraud.requests import demo_requests

MODEL = "fraud"


class CountingWriter(LogWriter):
    """Counts the rows it is handed; writes nothing (the bench measures the batch's side)."""

    def offer(self, model: str, rows: list[tuple]) -> bool:
        self.queued += len(rows)
        return True


async def _store(settings: Settings, rows: dict[str, dict[str, dict[str, Any]]]) -> FeatureStore:
    store = FeatureStore(settings, load_views(settings.views_file))
    store.connect(create_schema=True)
    for view, entities in rows.items():
        await store.put(view, [(entity, values, None) for entity, values in entities.items()])
    return store


def _batches(count: int, size: int) -> list[list[Inbound]]:
    requests = list(demo_requests(count * size, seed=11, id_prefix="bench"))
    batches = []
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        chunk[size // 2] = {**chunk[size // 2], "debug": True}
        batches.append([Inbound(msgpack.packb(request), b"k", "t", 0, i) for i, request in enumerate(chunk)])
    return batches


def _plot(without: np.ndarray, with_log: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.boxplot([without / 1000, with_log / 1000], showfliers=False)
    axis.set_xticks([1, 2], ["without the stage", "with prediction_log"])
    axis.set_ylabel("pipeline time per batch (ms)")
    axis.set_title("The prediction log's cost on the hot path (one run)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--share", type=float, default=0.01, help="Share of the requests logged (the default's).")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="predlog-cost-"))
    settings = Settings(online_store="memory", cache="none", models_dir=scratch / "models",
                        views_file=scratch / "views.json")
    write_views(settings.views_file)
    build_and_register(settings.models_dir, seed=5, n_train=4000, max_iter=60)
    store = asyncio.run(_store(settings, generate_feature_rows(3)))
    runtime = load_model(settings.models_dir, MODEL, store.views, settings.worker)
    plain = BatchPipeline(runtime, store, "bench", worker_id="bench")
    logged = BatchPipeline(runtime, store, "bench", worker_id="bench")
    for pipeline in (plain, logged):
        pipeline.add_from_manifest(None)
    writer = CountingWriter(settings)
    logged.add(PredictionLog(share=args.share, writer=writer))
    batches = _batches(args.rounds + 5, args.batch)
    times: dict[str, list[float]] = {"without": [], "with": []}
    stage_us: list[int] = []
    stage_share: list[float] = []

    async def run() -> None:
        for round_number, batch in enumerate(batches):
            for name, pipeline in (("without", plain), ("with", logged)):
                started = time.perf_counter_ns()
                outcome = await pipeline.process(batch)
                if round_number >= 5:  # warm-up rounds left out
                    times[name].append((time.perf_counter_ns() - started) / 1000)
                    if name == "with":  # the stage's share of its own batch: the same load on both
                        stage_us.append(outcome.timings_us["prediction_log"])
                        stage_share.append(stage_us[-1] / max(1, sum(outcome.timings_us.values())))

    asyncio.run(run())
    without, with_log = np.asarray(times["without"]), np.asarray(times["with"])
    result = {"batch": args.batch, "rounds": args.rounds, "share": args.share, "debug_per_batch": 1,
              "median_us_without": float(np.median(without)), "median_us_with": float(np.median(with_log)),
              "median_stage_us": float(np.median(stage_us)),
              "median_stage_share_of_batch": float(np.median(stage_share)),
              "throughput_ratio": float(np.median(without) / np.median(with_log)),
              "rows_logged_per_batch": writer.queued / max(1, len(stage_us) + 5),
              "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predlog_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "predlog_cost.md").write_text(
        f"# The prediction log on the hot path (batches of {args.batch}, {args.rounds} rounds, one run)\n\n"
        "| pipeline | median per batch (µs) |\n|---|---:|\n"
        f"| without the stage | {result['median_us_without']:,.0f} |\n"
        f"| with `prediction_log` (share {args.share:g}, one debug request) | {result['median_us_with']:,.0f} |\n"
        f"| of which the stage | {result['median_stage_us']:,.0f} |\n\n"
        f"the stage's share of its batch's time (median of per-batch shares): "
        f"{100 * result['median_stage_share_of_batch']:.1f}%; throughput ratio of the medians (with / without, "
        f"noisier: the two runs of a round meet different load): {result['throughput_ratio']:.3f} ({result['date']}, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n")
    _plot(without, with_log, args.out / "predlog_cost.png")
    print((args.out / "predlog_cost.md").read_text())


if __name__ == "__main__":
    main()
