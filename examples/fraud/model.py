"""The demo's fraud model: a small scikit-learn MLP, exported to ONNX and registered in the model library.

Seeds: ``train(seed)`` scores transactions against ``generate_feature_rows(seed)`` (the rows the demo loads
into the feature store), trains on ``generate_transactions(rows, n_train, seed + TRAIN_OFFSET)`` and measures
AUC on ``seed + HOLDOUT_OFFSET``; the demo streams transactions from yet another seed.

The sklearn pipeline is not pickled into the library (nothing there unpickles): the demo trains in its own
process and keeps the pipeline in memory for the offline check of every streamed score.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from streamscore.workers.library import Manifest, read_manifest, register
from streamscore.workers.profile import TrainingProfile, build_profile, data_sha256

from .data import (
    COLUMNS,
    MODEL_INPUTS,
    FeatureRows,
    Transaction,
    feature_matrix,
    fraud_views,
    generate_feature_rows,
    generate_transactions,
    labels,
)

log = logging.getLogger(__name__)

MODEL_NAME = "fraud"
MODEL_VERSION = "1"
ONNX_INPUT = "input"
TRAIN_OFFSET = 1
HOLDOUT_OFFSET = 2
N_HOLDOUT = 20_000
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
"""ONNX opsets the export targets: well inside what onnxruntime >= 1.18 runs."""

OUTPUTS = [
    {"name": "fraud_probability", "onnx_output": "probabilities", "column": 1},
    {"name": "label", "onnx_output": "label"},
]


def _classifier(seed: int, max_iter: int) -> MLPClassifier:
    # Trained to convergence of the training loss (no early stopping: sklearn's early stopping scores the
    # validation split by accuracy, which on ~3% positives prefers "never fraud" and can keep a useless
    # first-epoch model). A fairly strong L2 penalty (alpha) stands in for it: it keeps the net from
    # overfitting the few positives, from 8k to 60k transactions, and converges in about 30-200 epochs.
    return MLPClassifier(hidden_layer_sizes=(32, 16), alpha=0.3, batch_size=256, learning_rate_init=1e-3,
                         max_iter=max_iter, tol=1e-4, n_iter_no_change=10, random_state=seed)


def training_data(seed: int, n_train: int = 60_000) -> tuple[FeatureRows, list[Transaction]]:
    """The feature rows and the labelled transactions ``train(seed, n_train)`` fits on."""
    rows = generate_feature_rows(seed)
    return rows, generate_transactions(rows, n_train, seed + TRAIN_OFFSET)


def training_set(seed: int, n_train: int = 60_000) -> tuple[np.ndarray, np.ndarray]:
    """The model-input matrix (float32, n_train x 14) and 0/1 labels ``train(seed, n_train)`` fits on."""
    rows, transactions = training_data(seed, n_train)
    return feature_matrix(transactions, rows), labels(transactions)


def holdout_set(seed: int, n: int = N_HOLDOUT) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh labelled transactions (seed ``seed + HOLDOUT_OFFSET``) against the same rows: inputs, labels."""
    rows = generate_feature_rows(seed)
    transactions = generate_transactions(rows, n, seed + HOLDOUT_OFFSET)
    return feature_matrix(transactions, rows), labels(transactions)


def train(seed: int, n_train: int = 60_000, *, max_iter: int = 300,
          data: tuple[np.ndarray, np.ndarray] | None = None) -> Pipeline:
    """Train StandardScaler + MLP on ``n_train`` labelled transactions (float32 features, as served);
    ``data``: ``training_set(seed, n_train)`` when already made."""
    features, targets = data if data is not None else training_set(seed, n_train)
    pipeline = make_pipeline(StandardScaler(), _classifier(seed, max_iter))
    started = time.perf_counter()
    with warnings.catch_warnings():
        # A model capped by max_iter (small test runs) is still a valid model to export and compare; the
        # log line below says so instead of failing the run.
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(features, targets)
    classifier = pipeline[-1]
    log.info("trained fraud MLP on %d transactions in %.1f s (%d epochs%s)", n_train,
             time.perf_counter() - started, classifier.n_iter_,
             ", stopped at max_iter" if classifier.n_iter_ >= max_iter else "")
    return pipeline


def holdout_auc(pipeline: Pipeline, seed: int, n: int = N_HOLDOUT) -> float:
    """ROC AUC on ``n`` fresh transactions (seed ``seed + HOLDOUT_OFFSET``) against the same rows."""
    features, targets = holdout_set(seed, n)
    return float(roc_auc_score(targets, offline_scores(pipeline, features)))


def offline_scores(pipeline: Pipeline, features: np.ndarray) -> np.ndarray:
    """Fraud probability per row of a ``feature_matrix``: what the served model must reproduce."""
    return np.asarray(pipeline.predict_proba(features)[:, 1])


def export_onnx(pipeline: Pipeline, path: Path) -> Path:
    """Write the pipeline as ONNX: input ``input`` float32 (n, 14); outputs ``label`` int64 (n,) and
    ``probabilities`` float32 (n, 2) (no ZipMap, so the worker reads a plain tensor)."""
    n_inputs = len(MODEL_INPUTS)
    onnx_model = convert_sklearn(
        pipeline,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, n_inputs]))],
        options={id(pipeline[-1]): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    path = Path(path)
    path.write_bytes(onnx_model.SerializeToString())
    return path


DECISION_STAGE = {"stage": "threshold_decision", "after": "infer",
                  "params": {"score": "fraud_probability", "thresholds": [0.3, 0.7],
                             "labels": ["approve", "review", "decline"]}}
"""The pipeline stage of the model's own: the fraud probability as a decision (approve below 0.3, review up to
0.7, decline from 0.7), in every prediction's outputs as ``decision`` and counted at /metrics."""


def defaulted_masks(transactions: list[Transaction], rows: FeatureRows) -> dict[str, np.ndarray]:
    """Per view column, the rows whose value was the view's default (their entity has no row), as the worker
    counts them. Request features get none: a worker cannot tell a default it filled in from a value sent."""
    masks: dict[str, np.ndarray] = {}
    for view in fraud_views():
        known = rows.get(view.name, {})
        unknown = np.array([str(txn[view.entity]) not in known for txn in transactions], dtype=bool)
        masks.update({f"{view.name}.{feature}": unknown for feature in view.feature_names})
    return masks


def training_profile(pipeline: Pipeline, seed: int, n_train: int, max_iter: int, rows: FeatureRows,
                     transactions: list[Transaction], features: np.ndarray) -> TrainingProfile:
    """The profile of the training data ``train(seed, n_train)`` fitted on (``training_data``; ``features``: its
    ``feature_matrix``), and of the model's scores on it."""
    targets = labels(transactions)
    scores = offline_scores(pipeline, features)
    return build_profile(
        {name: features[:, i] for i, name in enumerate(COLUMNS)},
        {"fraud_probability": scores, "label": np.asarray(pipeline.predict(features))},
        data_sha256=data_sha256(features, targets),
        params={"recipe": "streamscore_examples.fraud.model", "seed": seed, "n_train": n_train,
                "max_iter": max_iter, "classifier": "MLPClassifier(32, 16)", "alpha": 0.3},
        defaulted=defaulted_masks(transactions, rows),
    )


def _manifest(n_train: int, auc: float, profile: TrainingProfile | None = None) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "onnx_input": ONNX_INPUT,
        "inputs": MODEL_INPUTS,
        "outputs": OUTPUTS,
        "stages": [DECISION_STAGE],
        "description": {
            "domain": "card-payment fraud",
            "input_modality": "tabular: transaction amount, hour and foreign flag from the request, plus card "
                              "(card_stats) and merchant (merchant_stats) aggregates from the feature store",
            "result_kind": "probability that the transaction is fraudulent (0..1), and the 0/1 label at 0.5",
            "summary": f"StandardScaler + MLP (32, 16) trained on {n_train} synthetic transactions "
                       f"(streamscore_examples.fraud.data, ~3% fraud); held-out ROC AUC {auc:.3f} on {N_HOLDOUT}. "
                       "Demo model on synthetic data: not for real payments.",
        },
        "profile": None if profile is None else profile.model_dump(),
    }


def build_and_register(models_dir: Path, seed: int = 7, *, n_train: int = 60_000,
                       max_iter: int = 300) -> tuple[Manifest, Pipeline]:
    """Train, export and register ``fraud`` v1 in ``models_dir`` with its training profile; returns its manifest
    and the pipeline."""
    rows, transactions = training_data(seed, n_train)
    features = feature_matrix(transactions, rows)
    pipeline = train(seed, n_train, max_iter=max_iter, data=(features, labels(transactions)))
    auc = holdout_auc(pipeline, seed)
    log.info("fraud MLP held-out ROC AUC %.4f", auc)
    profile = training_profile(pipeline, seed, n_train, max_iter, rows, transactions, features)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export_onnx(pipeline, Path(scratch) / "model.onnx")
        version_dir = register(models_dir, onnx_path, _manifest(n_train, auc, profile))
    return read_manifest(version_dir), pipeline
