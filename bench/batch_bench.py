"""Batch scoring throughput: ``score --engine local`` and Spark ``local[2]`` against the same feature store, and
how Spark's time grows with the rows.

``python -m streamscore_bench.batch_bench`` (the local stack up) fills a scratch keyspace with the demo's feature
rows (10k cards, 1k merchants, ``examples/fraud/data.py``), registers the demo model in a scratch library,
generates ``--rows`` demo requests (the demo's transaction generator) and writes the first 100k, 300k and all of
them as parquet. Then, in one run: the local engine on the largest file, and one Spark session (``local[2]``) on
each size. A warm-up run of the local engine on the smallest file first fills the Redis cache, so every
measured run reads features the same way (cache hits, Cassandra for what expired), and a warm-up Spark run of
20k rows starts the executors' Python workers (each loads the model once) before the measured Spark runs.
Rows/s is rows over the run's own wall time (read, score, write, count); Spark's session start is measured
apart, as is each run's scoring-and-writing phase. Writes ``batch.{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from streamscore.settings import Settings
from streamscore_examples.fraud.data import generate_feature_rows, generate_transactions, write_views
from streamscore_examples.fraud.model import build_and_register
from streamscore_examples.fraud.requests import FEATURE_SEED

from .fastpath_bench import machine_info

MODEL = "fraud"
WARM_UP_ROWS = 20_000
"""Rows of Spark's warm-up run: the first job of a session starts the executors' Python workers and loads the
model in each; the measured runs are the ones after it."""


def _settings(scratch: Path, run: str) -> Settings:
    base = Settings()
    return Settings(models_dir=scratch / "models", views_file=scratch / "views.json", topic_prefix=f"bb{run}",
                    cassandra=base.cassandra.model_copy(update={"keyspace": f"bench_batch_{run}"}),
                    worker=base.worker.model_copy(update={"device": "cpu"}))


async def _fill(settings: Settings, rows: dict[str, dict[str, dict[str, Any]]]) -> None:
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import load_views

    store = FeatureStore(settings, load_views(settings.views_file))
    store.connect()
    try:
        for view, entities in rows.items():
            items = list(entities.items())
            for start in range(0, len(items), 2000):
                await store.put(view, [(entity, values, None) for entity, values in items[start:start + 2000]])
    finally:
        await store.close()


def _requests(rows: dict[str, dict[str, dict[str, Any]]], count: int, scratch: Path,
              sizes: list[int]) -> dict[int, Path]:
    transactions = generate_transactions(rows, count, seed=13, with_labels=False, unknown_rate=0.01)
    table = pa.table({"id": [f"bb-{i}" for i in range(count)],
                      "card_id": [t["card_id"] for t in transactions],
                      "merchant_id": [t["merchant_id"] for t in transactions],
                      "amount": [t["amount"] for t in transactions], "hour": [t["hour"] for t in transactions],
                      "is_foreign": [t["is_foreign"] for t in transactions]})
    paths = {}
    for size in sizes:
        paths[size] = scratch / f"requests-{size}.parquet"
        pq.write_table(table.slice(0, size), paths[size], row_group_size=65536)
    return paths


def _drop_keyspace(settings: Settings) -> None:
    from cassandra.cluster import Cluster

    cluster = Cluster(settings.cassandra.hosts, port=settings.cassandra.port)
    try:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}")
    finally:
        cluster.shutdown()


def run(rows_total: int, out_dir: Path, master: str) -> dict[str, Any]:
    from streamscore.workers.batch import run_local
    from streamscore.workers.spark_job import run_spark, spark_session

    run_id = uuid.uuid4().hex[:8]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as folder:
        scratch = Path(folder)
        settings = _settings(scratch, run_id)
        write_views(settings.views_file)
        feature_rows = generate_feature_rows(FEATURE_SEED)
        asyncio.run(_fill(settings, feature_rows))
        build_and_register(settings.models_dir, seed=7, n_train=20_000, max_iter=100)
        sizes = sorted({size for size in (100_000, 300_000, rows_total) if size <= rows_total})
        paths = _requests(feature_rows, rows_total, scratch, [WARM_UP_ROWS, *sizes])
        try:
            print(f"warm-up: local engine on {sizes[0]} rows", flush=True)
            run_local(settings, MODEL, paths[sizes[0]], scratch / "warm.parquet", "1")
            print(f"local engine on {rows_total} rows", flush=True)
            local = run_local(settings, MODEL, paths[rows_total], scratch / "local.parquet", "1")
            began = time.monotonic()
            session = spark_session(master)
            session_s = time.monotonic() - began
            spark_runs = []
            try:
                print(f"warm-up: spark {master} on {WARM_UP_ROWS} rows", flush=True)
                warm_up = run_spark(settings, MODEL, str(paths[WARM_UP_ROWS]), str(scratch / "spark-warm.parquet"),
                                    "1", spark=session)
                for size in sizes:
                    print(f"spark {master} on {size} rows", flush=True)
                    summary = run_spark(settings, MODEL, str(paths[size]), str(scratch / f"spark-{size}.parquet"),
                                        "1", spark=session)
                    spark_runs.append(summary)
            finally:
                session.stop()
        finally:
            _drop_keyspace(settings)
    results: dict[str, Any] = {
        "rows": rows_total, "master": master, "spark_session_start_s": round(session_s, 2),
        "spark_warm_up": _figures(warm_up),
        "local": _figures(local),
        "spark": [_figures(summary) for summary in spark_runs],
        "machine": {**machine_info(("pyspark", "pyarrow", "onnxruntime")), "load_average_before": load_before},
        "note": "CPU shared with other work on the machine during the run (see load averages): figures are "
                "ratios within this run, not capacity",
    }
    results["spark_vs_local_rows_per_s"] = round(results["spark"][-1]["rows_per_s"] / results["local"]["rows_per_s"],
                                                 2)
    _write(results, out_dir)
    return results


def _figures(summary: Any) -> dict[str, Any]:
    return {"rows": summary.rows, "lost": summary.lost, "answered": summary.answered, "degraded": summary.degraded,
            "duration_s": summary.duration_s, "rows_per_s": summary.rows_per_s, **summary.details}


def markdown(results: dict[str, Any]) -> str:
    local = results["local"]
    lines = ["| engine | rows | wall s | rows/s | scoring + writing s | lost |", "|---|---:|---:|---:|---:|---:|",
             f"| local (one process) | {local['rows']:,} | {local['duration_s']:.1f} | {local['rows_per_s']:,.0f} | "
             f"- | {local['lost']} |"]
    for spark in results["spark"]:
        lines.append(f"| Spark {results['master']} | {spark['rows']:,} | {spark['duration_s']:.1f} | "
                     f"{spark['rows_per_s']:,.0f} | {spark.get('score_and_write_s', 0):.1f} | {spark['lost']} |")
    machine = results["machine"]
    lines += ["", f"Spark session start (JVM, once per run): {results['spark_session_start_s']:.1f} s, not in the "
                  "Spark rows above. Spark on the largest input against the local engine: "
                  f"{results['spark_vs_local_rows_per_s']:.2f}x the rows/s.",
              f"{machine['cpu']} ({machine['cpu_count']} CPUs), load average "
              f"{machine['load_average_before'][0]:.1f} before and {machine['load_average'][0]:.1f} after: "
              f"{results['note']}. Python {machine['python']}, pyspark {machine.get('pyspark')}, "
              f"pyarrow {machine.get('pyarrow')}.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (growth, rates) = plt.subplots(1, 2, figsize=(10, 4))
    spark = results["spark"]
    growth.plot([s["rows"] for s in spark], [s["duration_s"] for s in spark], "o-", label="Spark run (wall)")
    growth.plot([s["rows"] for s in spark], [s.get("score_and_write_s", 0) for s in spark], "s--",
                label="Spark scoring + writing")
    growth.set_xlabel("rows")
    growth.set_ylabel("seconds")
    growth.set_title(f"Spark {results['master']}: time against rows")
    growth.legend()
    names = ["local", *(f"Spark {s['rows'] // 1000}k" for s in spark)]
    values = [results["local"]["rows_per_s"], *(s["rows_per_s"] for s in spark)]
    rates.bar(names, values, color=["tab:green", *["tab:blue"] * len(spark)])
    rates.set_ylabel("rows/s")
    rates.set_title(f"rows/s (local engine on {results['local']['rows']:,} rows)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "batch.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "batch.md").write_text(markdown(results))
    plot(results, out_dir / "batch.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Requests of the largest run.")
    parser.add_argument("--master", default="local[2]", help="Spark master of the Spark runs.")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    results = run(args.rows, args.out, args.master)
    print(markdown(results))


if __name__ == "__main__":
    main()
