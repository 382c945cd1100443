"""The heavy model (``fraud-deep``, 1.6 million weights) beside the light one (``fraud``): ONNX Runtime alone on
each device, and a worker serving the heavy model end to end.

``python -m streamscore_bench.heavy_model`` (part of ``make bench``) trains both models of the fraud demo into
a scratch library (``--models-dir`` takes a library holding both instead) and writes into ``--out`` (default
``bench/results``) ``<name>.json`` (every figure, the machine with its GPU), ``<name>.md`` (the table) and
``<name>.png`` (rows/s per batch size); ``--name`` defaults to ``heavy_model``.

- Runtime alone: ``ModelRuntime.run`` on the demo's held-out inputs (no Kafka, no features), rows/s at batch 256,
  1024 and 4096, best of repeats, for each device of ``--devices`` (default ``cpu``; ``cpu,cuda`` on a GPU
  machine): the CPU with one intra-op thread (a worker's default: one process per core) and with every core,
  the GPU through the worker's own GPU path (IOBinding, ``--device-batch-rows`` chunks).
- ``--e2e``: a ``streamscore worker`` serving the heavy model (registered as ``fraud`` in the bench's library, so
  the end-to-end harness of ``streamscore bench`` drives it unchanged: the real stack, 95% cache hits, messages of
  32 requests) on each device; requests/s over a drained backlog, and the ratio of that to the runtime alone at
  batch 4096 on the same device (1 means Kafka, features and the pipeline cost nothing beside the model).
- ``--quick``: a seconds-long smoke run on a small stand-in of the deep model (figures meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamscore.settings import Settings, WorkerSettings
from streamscore.workers import devices
from streamscore.workers.library import Manifest, read_manifest, register, version_dir
from streamscore.workers.runtime import load_model
from streamscore.workers.variants import measure
from streamscore_bench import BenchFailed
from streamscore_bench.fastpath_bench import machine_info
from streamscore_examples.fraud.data import fraud_views
from streamscore_examples.fraud.deep import (
    DEEP_EPOCHS,
    DEEP_HIDDEN,
    DEEP_MODEL_NAME,
    DEEP_TRAIN_ROWS,
    build_and_register_deep,
    weight_count,
)
from streamscore_examples.fraud.model import MODEL_NAME, build_and_register, holdout_set

log = logging.getLogger(__name__)

RESULTS = Path("bench/results")
BATCHES = (256, 1024, 4096)
SEED = 7
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "scikit-learn", "skl2onnx", "nvidia-cuda-runtime", "nvidia-cudnn-cu13",
            "nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12")


@dataclasses.dataclass(frozen=True)
class Config:
    """One way of running a model: the device and its threads."""

    device: Literal["cpu", "cuda"]
    threads: int
    device_batch_rows: int = 0

    @property
    def label(self) -> str:
        return "cuda" if self.device == "cuda" else f"cpu {self.threads} thread{'s' * (self.threads > 1)}"

    def settings(self) -> WorkerSettings:
        return WorkerSettings(device=self.device, intra_op_threads=self.threads,
                              device_batch_rows=self.device_batch_rows)


def configs(device_names: Sequence[str], device_batch_rows: int) -> list[Config]:
    chosen: list[Config] = []
    for device in device_names:
        if device == "cpu":
            chosen += [Config("cpu", threads) for threads in sorted({1, os.cpu_count() or 1})]
        elif device == "cuda":
            missing = devices.cuda_check()
            if missing:
                raise BenchFailed(devices.refusal("cuda", missing))
            chosen.append(Config("cuda", 1, device_batch_rows))
        else:
            raise BenchFailed(f"--devices: {device!r} is not cpu or cuda")
    return chosen


def runtime_alone(models_dir: Path, model: str, config: Config, inputs: np.ndarray, *, repeats: int,
                  min_seconds: float) -> dict[str, Any]:
    """Rows/s of ``run`` at each of ``BATCHES`` (best of repeats) for one model on one config."""
    views = {view.name: view for view in fraud_views()}
    runtime = load_model(models_dir, model, views, config.settings())
    rows_per_s = {}
    for batch in BATCHES:
        rows = np.ascontiguousarray(np.resize(inputs, (batch, inputs.shape[1])), dtype=np.float32)
        runtime.run(rows)
        timing = measure(lambda rows=rows: runtime.run(rows), batch, repeats, min_seconds)
        rows_per_s[batch] = round(1e6 / timing["best"], 1)
    return {"model": model, "config": config.label, "device": config.device, "threads": config.threads,
            "provider": runtime.provider, "device_note": runtime.device_note, "rows_per_s": rows_per_s}


def _register_as_fraud(source: Path, models_dir: Path) -> Manifest:
    """Registers the version folder ``source`` as model ``fraud`` (what the end-to-end harness serves)."""
    manifest = read_manifest(source).model_dump()
    return read_manifest(register(models_dir, source / manifest["artifact"], {**manifest, "name": MODEL_NAME}))


def _heavy_bench(source: Path, *args: Any) -> Any:
    """The harness of ``streamscore bench`` with ``source`` in the place of the demo model: its setup's call that
    trains and registers ``fraud`` registers ``source`` as ``fraud`` instead (the rest of the setup unchanged)."""
    from . import harness

    class HeavyBench(harness.Bench):
        async def setup(self) -> None:
            trains = harness.build_and_register
            setattr(harness, "build_and_register",  # noqa: B010 (a module function swapped for the setup only)
                    lambda models_dir, **_: (_register_as_fraud(source, models_dir), None))
            try:
                await super().setup()
            finally:
                setattr(harness, "build_and_register", trains)  # noqa: B010

    return HeavyBench(*args)


async def _drain_through_worker(bench: Any, config: Config, batch_max: int) -> dict[str, Any]:
    from .harness import STREAMSCORE
    from .processes import Processes, python_module

    with Processes(bench.scratch, dict(os.environ)) as processes:
        bench.processes = processes
        try:
            await bench.setup()
            variant = bench.variant(f"{STREAMSCORE}_{config.device}", features=True)
            variant.env |= {"STREAMSCORE_WORKER__BATCH_MAX": str(batch_max),
                            "STREAMSCORE_WORKER__DEVICE": config.device,
                            "STREAMSCORE_WORKER__INTRA_OP_THREADS": str(config.threads),
                            "STREAMSCORE_WORKER__DEVICE_BATCH_ROWS": str(config.device_batch_rows)}
            running = await bench.start(processes, variant, python_module("streamscore", "worker", "--model",
                                                                          MODEL_NAME))
            result = await bench.drain(variant, running, "heavy", bench.plan.requests, bench.plan.batch_size)
            processes.stop(*running)
            # Requests/s from thaw to the last prediction seen: with batches of seconds, the span of the
            # predictions' timestamps (what streamscore bench reports) leaves out the first batch's compute.
            return {**result.as_dict(), "served": bench.results["model"], "eps_span": round(result.eps, 1),
                    "eps": round(result.answered / result.wait_s, 1) if result.wait_s else 0.0}
        finally:
            processes.stop_all()
            await bench.cleanup()


def end_to_end(source: Path, config: Config, requests: int, echo: Callable[[str], None], *, quick: bool = False,
               batch_max: int = 128) -> dict[str, Any]:
    """Requests/s of a worker serving ``source`` (as ``fraud``) on ``config``, through the real stack."""
    from streamscore_stack import Stack, StackError

    from .harness import make_plan

    settings = Settings()
    try:
        stack = Stack(settings.stack, echo=echo).ensure_up()
    except StackError as exc:
        raise BenchFailed(str(exc)) from exc
    plan = make_plan(quick, requests)
    scratch = Path(tempfile.mkdtemp(prefix="streamscore-heavy-"))
    bench = _heavy_bench(source, settings, plan, scratch, echo,
                         {server.name: server.pid for server in stack if server.pid})
    started = time.monotonic()
    try:
        result = asyncio.run(_drain_through_worker(bench, config, batch_max))
    except BaseException:
        echo(f"logs of the benchmark's processes are kept in {scratch}")
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return {"config": config.label, "device": config.device, "threads": config.threads,
            "device_batch_rows": config.device_batch_rows, "messages_of": plan.batch_size,
            "worker_batch_max_messages": batch_max, **result,
            "seconds": round(time.monotonic() - started, 1)}


def with_ratios(result: dict[str, Any], runtime_rows_per_s: float) -> dict[str, Any]:
    """The end-to-end run against the runtime alone at batch 4096: the ratio of requests/s, and (on a shared
    machine, where the worker may get less than the core the runtime had) the same per core the worker used."""
    worker_cores = sum(cores for name, cores in result.get("cpu", {}).get("per_process_cores", {}).items()
                       if name.startswith("streamscore_"))
    per_core = result["eps"] / worker_cores if worker_cores else None
    return {**result, "runtime_rows_per_s": runtime_rows_per_s,
            "ratio": round(result["eps"] / runtime_rows_per_s, 3), "worker_cores": round(worker_cores, 2),
            "eps_per_worker_core": round(per_core, 1) if per_core else None,
            "ratio_per_worker_core": round(per_core / runtime_rows_per_s, 3) if per_core else None}


def gpu_info() -> list[dict[str, str]]:
    """Each GPU as nvidia-smi describes it (empty without one)."""
    query = "name,memory.total,driver_version,compute_cap"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(query.split(","), (field.strip() for field in line.split(",")), strict=False))
            for line in out.splitlines() if line.strip()]


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | weights | runs on | provider | rows/s @256 | rows/s @1k | rows/s @4k |",
             "|---|---:|---|---|---:|---:|---:|"]
    for row in report["runtime_alone"]:
        rates = row["rows_per_s"]
        lines.append(f"| {row['model']} | {report['weights'][row['model']]:,} | {row['config']} | "
                     f"{row['provider']} | {rates[256]:,.0f} | {rates[1024]:,.0f} | {rates[4096]:,.0f} |")
    if report["end_to_end"]:
        lines += ["", "| heavy model through a worker | requests/s | runtime alone @4k rows/s | end-to-end / "
                  "runtime alone | worker's cores | requests/s per worker core | per core / runtime alone |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["end_to_end"]:
            per_core = row.get("eps_per_worker_core")
            lines.append(f"| {row['config']} | {row['eps']:,.0f} | {row['runtime_rows_per_s']:,.0f} | "
                         f"{row['ratio']:.2f} | {row.get('worker_cores', 0):.2f} | "
                         f"{f'{per_core:,.0f}' if per_core else '-'} | "
                         f"{row['ratio_per_worker_core'] or 0:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["runtime_alone"]
    figure, axis = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        positions = np.arange(len(BATCHES)) + (index - (len(rows) - 1) / 2) * width
        drawn = axis.bar(positions, [row["rows_per_s"][batch] for batch in BATCHES], width,
                         label=f"{row['model']}, {row['config']}")
        axis.bar_label(drawn, fmt="%.3g", fontsize=7)
    axis.set_xticks(np.arange(len(BATCHES)), [f"batch {batch}" for batch in BATCHES])
    axis.set(yscale="log", ylabel="rows/s (log)", title="ONNX Runtime alone: the light and the heavy fraud model")
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _train(models_dir: Path, quick: bool) -> dict[str, Any]:
    hidden = (64, 64) if quick else DEEP_HIDDEN
    n_train, epochs = (2_000, 1) if quick else (DEEP_TRAIN_ROWS, DEEP_EPOCHS)
    build_and_register(models_dir, SEED, n_train=2_000 if quick else 20_000, max_iter=20 if quick else 300)
    build_and_register_deep(models_dir, SEED, n_train=n_train, hidden=hidden, epochs=epochs)
    return {"hidden": list(hidden), "n_train": n_train, "epochs": epochs}


def run(models_dir: Path, args: argparse.Namespace, chosen: list[Config], trained: dict[str, Any] | None
        ) -> dict[str, Any]:
    started = time.perf_counter()
    inputs, _ = holdout_set(SEED, 4_096)
    repeats, min_seconds = (2, 0.01) if args.quick else (5, 0.3)
    manifests = {model: read_manifest(version_dir(models_dir, model)) for model in (MODEL_NAME, DEEP_MODEL_NAME)}
    table = [runtime_alone(models_dir, model, config, inputs, repeats=repeats, min_seconds=min_seconds)
             for config in chosen for model in manifests]
    e2e = []
    if args.e2e:
        for config in chosen:
            if config.threads != 1 and config.device == "cpu":
                continue  # a worker runs one intra-op thread per process
            source = version_dir(models_dir, DEEP_MODEL_NAME)
            result = end_to_end(source, config, args.requests, print, quick=args.quick,
                                batch_max=args.worker_batch_max)
            alone = next(row for row in table if row["model"] == DEEP_MODEL_NAME and row["config"] == config.label)
            e2e.append(with_ratios(result, alone["rows_per_s"][4096]))
    report = {
        "benchmark": "heavy model",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "models": {model: {"version": manifest.version, "sha256": manifest.sha256,
                           "summary": manifest.description.summary} for model, manifest in manifests.items()},
        "weights": {MODEL_NAME: weight_count((32, 16)),
                    DEEP_MODEL_NAME: weight_count(trained["hidden"] if trained else DEEP_HIDDEN)},
        "trained": trained,
        "timing": {"statistic": "best of repeats", "repeats": repeats, "min_seconds_per_repeat": min_seconds,
                   "inputs": "the demo's held-out transactions (seed 7), repeated to the batch size"},
        "runtime_alone": table,
        "end_to_end": e2e,
        "machine": {**machine_info(PACKAGES), "gpus": gpu_info()},
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    _write(report, args.out, args.name)
    return report


def _write(report: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"{name}.png")
    info = report["machine"]
    gpus = ", ".join(f"{gpu['name']} ({gpu['memory.total']}, driver {gpu['driver_version']})"
                     for gpu in info["gpus"]) or "no GPU"
    table = markdown(report)
    deep = report["models"][DEEP_MODEL_NAME]["summary"]
    (out / f"{name}.md").write_text(
        f"# The heavy fraud model beside the light one{' (quick run: figures meaningless)' * report['quick']}\n\n"
        f"{DEEP_MODEL_NAME}: {deep}\n\n{MODEL_NAME}: {report['models'][MODEL_NAME]['summary']}\n\n"
        f"Rows/s: ONNX Runtime alone (`ModelRuntime.run`, no Kafka, no features), best of "
        f"{report['timing']['repeats']} repeats. Through a worker: one worker process drains a backlog of messages "
        f"of 32 requests through the real stack (features from Redis/Cassandra), batches of at most 128 messages (4096 "
        f"rows); requests/s from thaw to the last prediction.\n\n{table}\n"
        f"{info['cpu']} ({info['cpu_count']} CPUs, load average {info['load_average'][0]:.1f}); {gpus}; Python "
        f"{info['python']}, onnxruntime-gpu {info['onnxruntime-gpu']}.\n")
    print(table, end="")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (figures meaningless)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json, .md and .png")
    parser.add_argument("--name", default="heavy_model", help="file name of the results, without suffix")
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda (default cpu)")
    parser.add_argument("--device-batch-rows", type=int, default=4096,
                        help="worker.device_batch_rows on the GPU (default 4096)")
    parser.add_argument("--e2e", action="store_true", help="also a worker end to end (needs the local stack)")
    parser.add_argument("--requests", type=int, default=120_000, help="backlog of the end-to-end run")
    parser.add_argument("--worker-batch-max", type=int, default=128,
                        help="worker.batch_max of the end-to-end run, in messages of 32 (default 128: 4096 rows)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help=f"a library holding {MODEL_NAME} and {DEEP_MODEL_NAME} (default: a scratch one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        chosen = configs(args.devices.split(","), args.device_batch_rows)
        if args.models_dir is not None:
            run(args.models_dir, args, chosen, None)
            return 0
        with tempfile.TemporaryDirectory() as scratch:
            trained = _train(Path(scratch), args.quick)
            run(Path(scratch), args, chosen, trained)
    except BenchFailed as exc:
        print(f"heavy-model bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
