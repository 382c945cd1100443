"""Live accuracy of one version over one window: the joined (score, label) pairs in, the report map out.

The statistics are scikit-learn's (``sklearn.metrics``): ROC AUC, precision and recall at the decision
threshold, the Brier score. Calibration is a few equal-width reliability bins of the score (mean score against
the observed rate in each); the label delay is quantiles of label event time minus prediction time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5
"""Decision threshold when neither the settings nor the manifest give one."""


def window_report(scores: Sequence[float], labels: Sequence[int], delays_ms: Sequence[float], threshold: float,
                  bins: int = 5) -> dict[str, Any]:
    """The accuracy part of a report (``docs/wire-format.md``, ``kind: accuracy``) for one window's pairs."""
    # imported at the first report, not at start: scikit-learn takes seconds to import, a restart should not wait
    from sklearn.metrics import brier_score_loss, precision_score, recall_score, roc_auc_score

    score = np.asarray(scores, dtype=np.float64)
    label = np.asarray(labels, dtype=np.int64)
    if score.shape != label.shape or score.ndim != 1 or len(score) == 0:
        raise ValueError(f"need as many scores as labels, at least one: got {score.shape} and {label.shape}")
    decision = (score >= threshold).astype(np.int64)
    both_classes = 0 < int(label.sum()) < len(label)
    return {
        "count": len(label),
        "positives": int(label.sum()),
        "auc": float(roc_auc_score(label, score)) if both_classes else None,
        "threshold": float(threshold),
        "precision": _or_none(precision_score(label, decision, zero_division=np.nan)),
        "recall": _or_none(recall_score(label, decision, zero_division=np.nan)),
        "brier": float(brier_score_loss(label, np.clip(score, 0.0, 1.0), pos_label=1)),
        "mean_score": float(score.mean()),
        "observed_rate": float(label.mean()),
        "calibration": reliability_bins(score, label, bins),
        "label_delay_ms": delay_quantiles(delays_ms),
    }


def reliability_bins(score: np.ndarray, label: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """Equal-width bins over 0..1 (a score of exactly 1 in the last): count, mean score and observed rate of
    each bin that holds a pair."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    score_sums = np.bincount(which, weights=score, minlength=bins)
    label_sums = np.bincount(which, weights=label, minlength=bins)
    return [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(counts[i]),
             "mean_score": float(score_sums[i] / counts[i]), "observed_rate": float(label_sums[i] / counts[i])}
            for i in np.flatnonzero(counts)]


def delay_quantiles(delays_ms: Sequence[float]) -> dict[str, float]:
    delays = np.asarray(delays_ms, dtype=np.float64)
    if len(delays) == 0:
        return {}
    p50, p90, p99 = np.quantile(delays, [0.5, 0.9, 0.99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(delays.max())}


def _or_none(value: Any) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def decision_of(models_dir: Path, model: str, version: str) -> tuple[str | None, float | None]:
    """(score output, threshold) of a version, read from its manifest's ``threshold_decision`` stage: its
    ``score`` and the lowest threshold of its last label (where e.g. ``decline`` begins); (first output, None)
    without such a stage; (None, None) when the version is not in the library or its manifest does not read."""
    from .library import ModelError, read_manifest

    try:
        manifest = read_manifest(Path(models_dir) / model / version)
    except ModelError:
        return None, None
    for spec in manifest.stages:
        thresholds = spec.params.get("thresholds")
        if spec.stage == "threshold_decision" and isinstance(thresholds, list) and thresholds:
            return str(spec.params.get("score", manifest.outputs[0].name)), float(thresholds[-1])
    return manifest.outputs[0].name, None
