"""Micro-benchmark of the fast path: compiled vs its pure-Python twin vs a straightforward msgpack + numpy path.

``python -m streamscore_bench.fastpath_bench`` (``make bench-fastpath``; ``--quick`` for a seconds-long smoke run,
``--out DIR`` for another folder). Writes ``fastpath.json`` and ``fastpath.md`` into ``bench/results`` (relative to
the current directory; ``make`` runs from the repository root) and prints the table: microseconds per request for
decode+assemble and for encode, at batch sizes 1, 64 and 512.

Request shape: 10 scalar request features, 2 entity keys, id / sent_ms / deadline_ms; the model input is those
10 columns plus 6 features from each of 2 view blocks. Each timing is timeit-style: a loop long enough to be
measured, repeated; the table shows the best repeat (the least disturbed by other work on the machine) and the
JSON keeps the median too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from streamscore.fastpath import _fast, _pure
from streamscore.fastpath._types import (
    DecodedBatch,
    DecodeSpec,
    InputColumn,
    PredictionBatch,
    RequestFeature,
    ViewBlock,
)
from streamscore.workers.variants import measure

RESULTS = Path("bench/results")
BATCH_SIZES = (1, 64, 512)
FEATURE_NAMES = tuple(f"f{index}" for index in range(10))
ENTITY_KEYS = ("card_id", "merchant_id")
VIEW_WIDTH = 6
SPEC = DecodeSpec(entity_keys=ENTITY_KEYS, request_features=tuple(RequestFeature(name) for name in FEATURE_NAMES))
COLUMNS = ([InputColumn(True, 0, column) for column in range(len(FEATURE_NAMES))]
           + [InputColumn(False, block, column) for block in range(2) for column in range(VIEW_WIDTH)])


# ------------------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------------------


def make_messages(count: int, rng: np.random.Generator) -> list[bytes]:
    base_ms = 1_700_000_000_000
    return [msgpack.packb({
        "id": f"req-{index:010d}",
        "entities": {"card_id": f"card-{rng.integers(100_000)}", "merchant_id": int(rng.integers(10_000))},
        "features": {name: float(value) for name, value in zip(FEATURE_NAMES, rng.normal(size=10), strict=True)},
        "sent_ms": base_ms + index,
        "deadline_ms": base_ms + index + 500,
    }) for index in range(count)]


def make_blocks(count: int, rng: np.random.Generator) -> list[ViewBlock]:
    """Two views; about one request in ten has no row (its defaults are used)."""
    blocks = []
    for rows in (max(1, count // 2), max(1, count // 8)):
        row_of_request = rng.integers(0, rows, size=count).astype(np.int32)
        row_of_request[rng.random(count) < 0.1] = -1
        blocks.append(ViewBlock(values=rng.normal(size=(rows, VIEW_WIDTH)).astype(np.float32),
                                row_of_request=row_of_request, defaults=np.zeros(VIEW_WIDTH, np.float32)))
    return blocks


def make_predictions(decoded: DecodedBatch, rng: np.random.Generator) -> PredictionBatch:
    count = len(decoded)
    return PredictionBatch(
        ids=decoded.ids, model="fraud", version="3", status=["ok"] * count,
        outputs={"score": rng.random(count).astype(np.float32)}, errors=[None] * count,
        degraded=[[] if index % 10 else ["merchants:default"] for index in range(count)],
        lineage={"artifact_sha256": "a" * 64, "code_version": "0.1.0", "batch_id": "b-0001", "worker_id": "w-1"},
        feature_ts_ms={"cards": np.full(count, 1_700_000_000_000, np.int64),
                       "merchants": np.where(np.arange(count) % 10, 1_699_999_000_000, 0).astype(np.int64)},
        timings_us={"decode": 40, "features": 900, "assemble": 20, "infer": 300, "encode": 30},
        received_ms=decoded.sent_ms + 2,
    )


# ------------------------------------------------------------------------------------------------------------
# The straightforward path: what one writes without a fast path
# ------------------------------------------------------------------------------------------------------------


def naive_decode_assemble(messages: list[bytes], blocks: list[ViewBlock]) -> np.ndarray:
    """``msgpack.unpackb`` per message, a Python walk of each dict into a numpy row, numpy gathers."""
    features = np.empty((len(messages), len(FEATURE_NAMES)), np.float32)
    ids, cards, merchants, deadlines, sent = [], [], [], [], []
    for row, message in enumerate(messages):
        request = msgpack.unpackb(message, raw=False, strict_map_key=False)
        ids.append(request["id"])
        entities = request["entities"]
        cards.append(str(entities["card_id"]))
        merchants.append(str(entities["merchant_id"]))
        values = request["features"]
        features[row] = [values[name] for name in FEATURE_NAMES]
        deadlines.append(request.get("deadline_ms", 0))
        sent.append(request.get("sent_ms", 0))
    parts = [features]
    for block in blocks:
        gathered = block.values[np.maximum(block.row_of_request, 0)]
        parts.append(np.where((block.row_of_request < 0)[:, None], block.defaults, gathered))
    return np.hstack(parts).astype(np.float32, copy=False)


def naive_encode(batch: PredictionBatch, sent_ms: int) -> list[bytes]:
    """``msgpack.packb`` of one dict per prediction."""
    scores = batch.outputs["score"].tolist()
    timestamps = {view: values.tolist() for view, values in batch.feature_ts_ms.items()}
    received = batch.received_ms.tolist()
    return [msgpack.packb({
        "id": request_id, "model": batch.model, "version": batch.version, "status": batch.status[row],
        "outputs": {"score": scores[row]}, "error": None, "degraded": batch.degraded[row],
        "lineage": {**batch.lineage, "feature_ts_ms": {view: ts[row] or None for view, ts in timestamps.items()}},
        "timings_us": batch.timings_us, "received_ms": received[row], "sent_ms": sent_ms,
    }) for row, request_id in enumerate(batch.ids)]


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


def check_same_results(messages: list[bytes], blocks: list[ViewBlock], predictions: PredictionBatch) -> None:
    """The numbers compare equal work: every path produces the same matrix and the same bytes."""
    compiled = _fast.assemble(_fast.decode_batch(messages, SPEC).features, blocks, COLUMNS)
    twin = _pure.assemble(_pure.decode_batch(messages, SPEC).features, blocks, COLUMNS)
    naive = naive_decode_assemble(messages, blocks)
    if not (np.array_equal(compiled, twin) and np.array_equal(compiled, naive)):
        raise AssertionError("decode+assemble paths disagree")
    if not _fast.encode_predictions(predictions, 1) == _pure.encode_predictions(predictions, 1) == \
            naive_encode(predictions, 1):
        raise AssertionError("encode paths disagree")


def run_size(count: int, repeats: int, min_seconds: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(count)
    messages, blocks = make_messages(count, rng), make_blocks(count, rng)
    predictions = make_predictions(_fast.decode_batch(messages, SPEC), rng)
    check_same_results(messages, blocks, predictions)
    decode_paths = {
        "compiled": lambda: _fast.assemble(_fast.decode_batch(messages, SPEC).features, blocks, COLUMNS),
        "twin": lambda: _pure.assemble(_pure.decode_batch(messages, SPEC).features, blocks, COLUMNS),
        "naive": lambda: naive_decode_assemble(messages, blocks),
    }
    encode_paths = {
        "compiled": lambda: _fast.encode_predictions(predictions, 1_700_000_000_100),
        "twin": lambda: _pure.encode_predictions(predictions, 1_700_000_000_100),
        "naive": lambda: naive_encode(predictions, 1_700_000_000_100),
    }
    rows = []
    for stage, paths in (("decode+assemble", decode_paths), ("encode", encode_paths)):
        timings = {name: measure(call, count, repeats, min_seconds) for name, call in paths.items()}
        rows.append({
            "batch": count, "stage": stage,
            "us_per_request": {name: timing["best"] for name, timing in timings.items()},
            "median_us_per_request": {name: timing["median"] for name, timing in timings.items()},
            "speedup_vs_twin": timings["twin"]["best"] / timings["compiled"]["best"],
            "speedup_vs_naive": timings["naive"]["best"] / timings["compiled"]["best"],
        })
    return rows


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    """The installed version of ``distribution``, without importing it (Cython is only a build dependency)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(packages: tuple[str, ...] = ("Cython",)) -> dict[str, Any]:
    """The machine and the versions of ``packages`` (installed versions, read without importing them); the
    micro-benchmarks' report header (bench/variants.py uses it too)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):  # not Linux: keep platform's guess
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform(),
        "python": sys.version.split()[0], "numpy": np.__version__,
        **{name.lower(): _version(name) for name in packages},
    }


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "| batch | stage | compiled µs/req | twin µs/req | naive µs/req | vs twin | vs naive |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        timing = row["us_per_request"]
        lines.append(f"| {row['batch']} | {row['stage']} | {timing['compiled']:.3f} | {timing['twin']:.2f} | "
                     f"{timing['naive']:.2f} | {row['speedup_vs_twin']:.1f}x | {row['speedup_vs_naive']:.1f}x |")
    lines.append("")
    lines.append(f"Best of repeats; {info['cpu']} ({info['cpu_count']} CPUs, load average "
                 f"{info['load_average'][0]:.1f} at the end), Python {info['python']}, numpy {info['numpy']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (numbers are rough)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for fastpath.json and fastpath.md")
    args = parser.parse_args(argv)
    repeats, min_seconds = (2, 0.002) if args.quick else (11, 0.05)
    started = time.perf_counter()
    rows = [row for count in BATCH_SIZES for row in run_size(count, repeats, min_seconds)]
    info = {**machine_info(), "msgpack": msgpack.version, "compiled_module": _fast.__file__}
    headline = next(row for row in rows if row["batch"] == 512 and row["stage"] == "decode+assemble")
    encode = next(row for row in rows if row["batch"] == 512 and row["stage"] == "encode")
    report = {
        "benchmark": "fastpath",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "batch_size": 512,
        "us_per_request": headline["us_per_request"]["compiled"],
        "speedup_vs_twin": headline["speedup_vs_twin"],
        "speedup_vs_naive": headline["speedup_vs_naive"],
        "encode_us_per_request": encode["us_per_request"]["compiled"],
        "encode_speedup_vs_twin": encode["speedup_vs_twin"],
        "encode_speedup_vs_naive": encode["speedup_vs_naive"],
        "request_shape": {"request_features": len(FEATURE_NAMES), "entity_keys": len(ENTITY_KEYS),
                          "view_blocks": 2, "view_features": VIEW_WIDTH, "model_inputs": len(COLUMNS)},
        "timing": {"statistic": "best of repeats", "repeats": repeats, "min_seconds_per_repeat": min_seconds},
        "table": rows,
        "machine": info,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fastpath.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows, info)
    (args.out / "fastpath.md").write_text("# Fast path micro-benchmark\n\n" + table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
