"""The fraud model's training recipe, as ``streamscore retrain`` calls it (``STREAMSCORE_RETRAIN__RECIPES`` and
``STREAMSCORE_RETRAIN__TRAINING_DATA`` name these two functions for ``fraud``).

``train`` fits the same scikit-learn pipeline as v1 (StandardScaler + MLP, ``model.py``) on the rows it is given
and exports it to ONNX; ``original_training_set`` regenerates the training data of a version from the seed and
size its training profile records (``data.py`` is a pure function of its seed).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from streamscore.workers.library import Manifest

from .model import _classifier, export_onnx, training_set

DEFAULT_SEED = 7
MAX_ITER = 300


def _recorded(base: Manifest) -> dict[str, Any]:
    profile = getattr(base, "profile", None)
    return dict(getattr(profile, "params", None) or {})


def train(inputs: np.ndarray, labels: np.ndarray, base: Manifest, artifact: Path) -> dict[str, Any]:
    """Fit StandardScaler + MLP (32, 16) on ``inputs`` / ``labels`` and write it to ``artifact`` (ONNX)."""
    recorded = _recorded(base)
    seed = int(recorded.get("seed", DEFAULT_SEED))
    max_iter = int(recorded.get("max_iter", MAX_ITER))
    classifier = _classifier(seed, max_iter)
    classifier.set_params(batch_size=min(classifier.batch_size, len(inputs)))  # a few hundred logged rows
    pipeline = make_pipeline(StandardScaler(), classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a small set capped by max_iter is still a model
        pipeline.fit(inputs, labels)
    export_onnx(pipeline, artifact)
    params = {"recipe": "streamscore_examples.fraud.retrain:train", "seed": seed, "max_iter": max_iter,
              "epochs": int(pipeline[-1].n_iter_), "classifier": "MLPClassifier(32, 16)", "alpha": 0.3}
    if "n_train" in recorded:  # the original training data stays the first version's: seed and size carried on
        params["n_train"] = int(recorded["n_train"])
    return params


def original_training_set(base: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and labels ``base`` was trained on, from the seed and size its profile records."""
    recorded = _recorded(base)
    if "seed" not in recorded or "n_train" not in recorded:
        raise ValueError(f"fraud v{base.version}'s manifest records no training seed and size (profile.params): "
                         "its training data cannot be made again")
    return training_set(int(recorded["seed"]), int(recorded["n_train"]))
