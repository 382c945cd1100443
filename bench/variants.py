"""Optimized variants of the demo's fraud model against their parent: what each costs to run and what it changes.

``python -m streamscore_bench.variants`` trains the demo model (``--n-train``, default 20000, seed 7) into a
scratch library (or takes ``--models-dir`` with ``--version``), makes its int8 variant (ONNX Runtime dynamic
quantization) and its distilled student (trained on the parent's scores over the demo's training inputs),
both through ``streamscore.workers.variants`` as ``streamscore models optimize`` does, and writes into ``--out``
(default ``bench/results``, relative to the current directory) ``variants.json`` (every figure, the manifests'
``made_by``, the machine), ``variants.md`` (the table) and ``variants.png`` (held-out scores of each variant
against the parent's; µs per request per batch size). ``--quick`` is a seconds-long smoke run.

Per version: ONNX Runtime alone (no pipeline) µs per request at batch 1, 256 and 2048 on the CPU provider with
one intra-op thread (a worker's ``intra_op_threads`` default: one process per core), best of repeats; artifact
size; max and mean |score - parent score| and ROC AUC on the demo's seeded held-out set (20000 labelled
transactions); agreement with the parent of the 0.5 label and of the demo's approve/review/decline decision
(thresholds 0.3/0.7, the manifest's ``threshold_decision`` stage).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from streamscore.workers import variants
from streamscore.workers.library import read_manifest, version_dir
from streamscore_bench.fastpath_bench import machine_info
from streamscore_examples.fraud.model import MODEL_NAME, N_HOLDOUT, build_and_register, holdout_set, training_set

RESULTS = Path("bench/results")
SEED = 7


def plot(models_dir: Path, compared: list[str], rows: list[dict[str, Any]], inputs: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = {version: variants.load_version(models_dir, MODEL_NAME, version).run(inputs)["fraud_probability"]
              for version in compared}
    parent = compared[0]
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(12, 5))
    for version, colour in zip(compared[1:], ("tab:orange", "tab:green"), strict=False):
        scatter.scatter(scores[parent], scores[version], s=3, alpha=0.35, color=colour, label=f"v{version}")
    scatter.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    for threshold in (0.3, 0.7):
        scatter.axvline(threshold, color="lightgrey", linewidth=0.6)
        scatter.axhline(threshold, color="lightgrey", linewidth=0.6)
    scatter.set(xlabel=f"parent v{parent} fraud_probability", ylabel="variant fraud_probability",
                title=f"held-out scores ({len(inputs)} transactions)", xlim=(0, 1), ylim=(0, 1))
    scatter.legend(markerscale=4)
    batches = list(rows[0]["us_per_request"])
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        positions = np.arange(len(batches)) + (index - (len(rows) - 1) / 2) * width
        values = [row["us_per_request"][batch] for batch in batches]
        drawn = bars.bar(positions, values, width, label=f"v{row['version']}")
        bars.bar_label(drawn, fmt="%.3g", fontsize=7)
    bars.set_xticks(np.arange(len(batches)), [f"batch {batch}" for batch in batches])
    bars.set(yscale="log", ylabel="µs per request (log)",
             title="ONNX Runtime alone, CPU, 1 intra-op thread (best of repeats)")
    bars.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(models_dir: Path, version: str, seed: int, n_train: int, n_holdout: int, out: Path, *, quick: bool,
        trained: dict[str, Any] | None) -> dict[str, Any]:
    started = time.perf_counter()
    train_inputs, _ = training_set(seed, n_train)
    inputs, labels = holdout_set(seed, n_holdout)
    made = [variants.quantize_int8(models_dir, MODEL_NAME, version),
            variants.distill(models_dir, MODEL_NAME, version, train_inputs)]
    compared = [version, *(manifest.version for manifest in made)]
    repeats, min_seconds = (2, 0.01) if quick else (7, 0.2)
    rows = variants.compare(models_dir, MODEL_NAME, compared, inputs, labels, repeats=repeats,
                            min_seconds=min_seconds)
    parent = read_manifest(version_dir(models_dir, MODEL_NAME, version))
    report = {
        "benchmark": "variants",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "model": MODEL_NAME,
        "parent": {"version": version, "summary": parent.description.summary, "trained": trained},
        "variants": {manifest.version: manifest.made_by.model_dump() if manifest.made_by else None
                     for manifest in made},
        "heldout": {"rows": n_holdout, "seed": seed, "positives": int(labels.sum())},
        "distill_inputs": {"rows": n_train, "what": f"the demo's training set, training_set({seed}, {n_train})"},
        "timing": {"statistic": "best of repeats", "repeats": repeats, "min_seconds_per_repeat": min_seconds,
                   "provider": "CPUExecutionProvider", "intra_op_threads": variants.MEASURE_SETTINGS.intra_op_threads},
        "table": rows,
        "machine": machine_info(("onnxruntime", "onnxruntime-gpu", "onnx", "scikit-learn", "skl2onnx")),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot(models_dir, compared, rows, inputs[:4_000], out / "variants.png")
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "variants.json").write_text(json.dumps(report, indent=2) + "\n")
    info = report["machine"]
    table = variants.markdown_table(rows)
    (out / "variants.md").write_text(
        f"# Optimized variants of the demo's fraud model\n\n"
        f"Parent v{version}: {parent.description.summary}\n\n"
        f"Held-out: {n_holdout} labelled transactions (seed {seed}); the student trained on the parent's scores "
        f"over {n_train} training inputs. µs per request: ONNX Runtime alone, CPU provider, 1 intra-op thread, "
        f"best of {repeats} repeats. Agreement: share of held-out rows with the parent's label (0.5) and "
        f"decision (approve < 0.3 <= review < 0.7 <= decline).\n\n{table}\n"
        f"{info['cpu']} ({info['cpu_count']} CPUs, load average {info['load_average'][0]:.1f}), Python "
        f"{info['python']}, onnxruntime {info['onnxruntime-gpu']}, scikit-learn {info['scikit-learn']}, "
        f"skl2onnx {info['skl2onnx']}.\n")
    print(table, end="")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (numbers are rough)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for variants.json, .md and .png")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="an existing library holding 'fraud' (default: train one into a scratch folder)")
    parser.add_argument("--version", default="1", help="the parent version (with --models-dir)")
    parser.add_argument("--seed", type=int, default=SEED, help="the demo's seed (training and held-out sets)")
    parser.add_argument("--n-train", type=int, default=None, help="training rows (default 20000; quick 3000)")
    args = parser.parse_args(argv)
    n_train = args.n_train or (3_000 if args.quick else 20_000)
    n_holdout = 2_000 if args.quick else N_HOLDOUT
    if args.models_dir is not None:
        run(args.models_dir, args.version, args.seed, n_train, n_holdout, args.out, quick=args.quick, trained=None)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        max_iter = 20 if args.quick else 300
        build_and_register(Path(scratch), args.seed, n_train=n_train, max_iter=max_iter)
        run(Path(scratch), "1", args.seed, n_train, n_holdout, args.out, quick=args.quick,
            trained={"seed": args.seed, "n_train": n_train, "max_iter": max_iter})
    return 0


if __name__ == "__main__":
    sys.exit(main())
