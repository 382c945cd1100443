"""The heavy fraud model: registered beside the light one with the same inputs, outputs and stages, served by
the worker's runtime with the scikit-learn pipeline's scores, and its weights counted as the manifest says."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamscore.settings import WorkerSettings
from streamscore.workers.library import read_manifest, version_dir
from streamscore.workers.runtime import load_model
from streamscore_examples.fraud.data import fraud_views
from streamscore_examples.fraud.deep import DEEP_HIDDEN, DEEP_MODEL_NAME, build_and_register_deep, weight_count
from streamscore_examples.fraud.model import MODEL_NAME, build_and_register, holdout_set, offline_scores


def test_the_heavy_model_sits_beside_the_light_one_and_scores_as_trained(tmp_path: Path) -> None:
    light, _ = build_and_register(tmp_path, 3, n_train=2_000, max_iter=5)
    deep, pipeline = build_and_register_deep(tmp_path, 3, n_train=2_000, hidden=(48, 32, 16), epochs=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == [MODEL_NAME, DEEP_MODEL_NAME]
    assert deep == read_manifest(version_dir(tmp_path, DEEP_MODEL_NAME))
    assert (deep.inputs, deep.outputs, deep.stages, deep.onnx_input) == (light.inputs, light.outputs, light.stages,
                                                                         light.onnx_input)
    assert "14 -> 48 -> 32 -> 16 -> 2 (2850 weights)" in deep.description.summary

    inputs, _ = holdout_set(3, 3_000)
    views = {view.name: view for view in fraud_views()}
    served = load_model(tmp_path, DEEP_MODEL_NAME, views, WorkerSettings(device="cpu")).run(inputs)
    np.testing.assert_allclose(served["fraud_probability"], offline_scores(pipeline, inputs), atol=1e-5)
    assert set(np.unique(served["label"])) <= {0, 1}


def test_the_default_heavy_model_has_millions_of_weights() -> None:
    assert weight_count((32, 16)) == 14 * 32 + 32 + 32 * 16 + 16 + 16 * 2 + 2
    assert weight_count(DEEP_HIDDEN) == 1_590_786
