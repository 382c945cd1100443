"""A heavy model of the same fraud task: ``fraud-deep``, a deep MLP with 1.6 million weights, beside the demo's
light ``fraud`` (a 32-16 MLP, 1.1 thousand weights) in the model library.

Same inputs, outputs, decision stage and manifest shape as ``fraud`` (a worker serves either the same way, and
the same requests score on both); StandardScaler + ``MLPClassifier`` with hidden layers (1024, 1024, 512) by
default, trained briefly (a few epochs over the demo's training set: it is there to cost real compute per row,
about 3.2 MFLOP, which is what a GPU is for), exported to ONNX with skl2onnx as ``fraud`` is.

``build_and_register_deep(models_dir)`` trains and registers it; ``hidden=`` makes a smaller one (tests).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from streamscore.workers.library import Manifest, read_manifest, register

from .data import MODEL_INPUTS
from .model import DECISION_STAGE, N_HOLDOUT, ONNX_INPUT, OUTPUTS, export_onnx, holdout_auc, training_set

log = logging.getLogger(__name__)

DEEP_MODEL_NAME = "fraud-deep"
DEEP_MODEL_VERSION = "1"
DEEP_HIDDEN = (1024, 1024, 512)
"""Hidden layers of the heavy model: 14 -> 1024 -> 1024 -> 512 -> 2, 1.6 million weights."""
DEEP_EPOCHS = 4
DEEP_TRAIN_ROWS = 20_000


def weight_count(hidden: Sequence[int], n_inputs: int = len(MODEL_INPUTS), n_outputs: int = 2) -> int:
    """Weights and biases of an MLP ``n_inputs -> *hidden -> n_outputs``."""
    sizes = [n_inputs, *hidden, n_outputs]
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(sizes))


def train_deep(seed: int, n_train: int = DEEP_TRAIN_ROWS, *, hidden: Sequence[int] = DEEP_HIDDEN,
               epochs: int = DEEP_EPOCHS) -> Pipeline:
    """StandardScaler + a deep MLP, ``epochs`` passes of Adam over ``n_train`` of the demo's transactions."""
    features, targets = training_set(seed, n_train)
    classifier = MLPClassifier(hidden_layer_sizes=tuple(hidden), alpha=1e-3, batch_size=512,
                               learning_rate_init=5e-4, max_iter=epochs, random_state=seed)
    pipeline = make_pipeline(StandardScaler(), classifier)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # stopped after a few epochs on purpose
        pipeline.fit(features, targets)
    log.info("trained %s MLP %s (%d weights) on %d transactions in %.1f s (%d epochs)", DEEP_MODEL_NAME,
             tuple(hidden), weight_count(hidden), n_train, time.perf_counter() - started, classifier.n_iter_)
    return pipeline


def _deep_manifest(hidden: Sequence[int], n_train: int, epochs: int, auc: float) -> dict[str, Any]:
    layers = " -> ".join(str(size) for size in (len(MODEL_INPUTS), *hidden, 2))
    return {
        "name": DEEP_MODEL_NAME,
        "version": DEEP_MODEL_VERSION,
        "onnx_input": ONNX_INPUT,
        "inputs": MODEL_INPUTS,
        "outputs": OUTPUTS,
        "stages": [DECISION_STAGE],
        "description": {
            "domain": "card-payment fraud",
            "input_modality": "tabular: transaction amount, hour and foreign flag from the request, plus card "
                              "(card_stats) and merchant (merchant_stats) aggregates from the feature store",
            "result_kind": "probability that the transaction is fraudulent (0..1), and the 0/1 label at 0.5",
            "summary": f"StandardScaler + deep MLP {layers} ({weight_count(hidden)} weights), {epochs} epochs on "
                       f"{n_train} synthetic transactions (streamscore_examples.fraud.data, ~3% fraud); held-out "
                       f"ROC AUC {auc:.3f} on {N_HOLDOUT}. The heavy model of the GPU benchmark; demo model on "
                       "synthetic data: not for real payments.",
        },
    }


def build_and_register_deep(models_dir: Path, seed: int = 7, *, n_train: int = DEEP_TRAIN_ROWS,
                            hidden: Sequence[int] = DEEP_HIDDEN, epochs: int = DEEP_EPOCHS
                            ) -> tuple[Manifest, Pipeline]:
    """Train, export and register ``fraud-deep`` v1 in ``models_dir``; returns its manifest and the pipeline."""
    pipeline = train_deep(seed, n_train, hidden=hidden, epochs=epochs)
    auc = holdout_auc(pipeline, seed)
    log.info("%s held-out ROC AUC %.4f", DEEP_MODEL_NAME, auc)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export_onnx(pipeline, Path(scratch) / "model.onnx")
        version_dir = register(models_dir, onnx_path, _deep_manifest(hidden, n_train, epochs, auc))
    return read_manifest(version_dir), pipeline
