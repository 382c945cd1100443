"""The fraud demo's data generator and model: determinism, defaults, and ONNX parity with scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from streamscore.workers.library import Manifest, ModelError, read_manifest, verified_artifact
from streamscore_examples.fraud import data
from streamscore_examples.fraud.model import build_and_register, export_onnx, offline_scores, train, training_set

SEED = 11
N_TRAIN = 8_000


@pytest.fixture(scope="module")
def rows() -> data.FeatureRows:
    return data.generate_feature_rows(SEED)


@pytest.fixture(scope="module")
def pipeline():
    return train(SEED, N_TRAIN)


@pytest.fixture(scope="module")
def heldout(rows) -> np.ndarray:
    return data.feature_matrix(data.generate_transactions(rows, 5_000, SEED + 50, unknown_rate=0.05), rows)


def model_training_matrix() -> np.ndarray:
    return training_set(SEED, N_TRAIN)[0]


# --- generator -----------------------------------------------------------------------------------------------

def test_rows_are_deterministic_in_the_seed(rows):
    assert data.generate_feature_rows(SEED) == rows
    assert data.generate_feature_rows(SEED + 1) != rows


def test_transactions_are_deterministic_in_the_seed(rows):
    first = data.generate_transactions(rows, 500, 3)
    assert data.generate_transactions(rows, 500, 3) == first
    assert data.generate_transactions(rows, 500, 4) != first


def test_labels_do_not_change_the_other_draws(rows):
    labelled = data.generate_transactions(rows, 300, 5)
    unlabelled = data.generate_transactions(rows, 300, 5, with_labels=False)
    assert [{k: v for k, v in txn.items() if k != "label"} for txn in labelled] == unlabelled
    assert all("label" not in txn for txn in unlabelled)


def test_rows_cover_every_id_with_python_native_values(rows):
    assert list(rows[data.CARD_VIEW]) == data.card_ids() == [f"card-{i}" for i in range(10_000)]
    assert list(rows[data.MERCHANT_VIEW]) == data.merchant_ids() == [f"merchant-{i}" for i in range(1_000)]
    views = {view.name: view for view in data.fraud_views()}
    python_type = {"int": int, "float": float, "bool": bool}
    for view_name, by_entity in rows.items():
        for row in list(by_entity.values())[:50]:
            assert list(row) == views[view_name].feature_names
            for feature in views[view_name].features:
                assert type(row[feature.name]) is python_type[feature.type], (view_name, feature.name)
    assert {row["risk_category"] for row in rows[data.MERCHANT_VIEW].values()} <= {0, 1, 2, 3, 4}


def test_fraud_base_rate_is_a_few_percent(rows):
    rate = data.labels(data.generate_transactions(rows, 20_000, 21)).mean()
    assert 0.015 < rate < 0.06


def test_transaction_fields(rows):
    transactions = data.generate_transactions(rows, 1_000, 8)
    assert set(transactions[0]) == {"card_id", "merchant_id", "amount", "hour", "is_foreign", "label"}
    assert all(txn["card_id"] in rows[data.CARD_VIEW] for txn in transactions)
    assert all(txn["amount"] > 0 and txn["hour"] in range(24) and txn["is_foreign"] in (0.0, 1.0)
               for txn in transactions)


# --- model inputs and the offline matrix ----------------------------------------------------------------------

def test_model_inputs_match_the_views():
    manifest_inputs = data.MODEL_INPUTS
    assert [spec["name"] for spec in manifest_inputs[:3]] == ["amount", "hour", "is_foreign"]
    assert manifest_inputs[0]["default"] is None
    view_inputs = [spec["name"] for spec in manifest_inputs[3:]]
    assert view_inputs == [f"{view.name}.{name}" for view in data.fraud_views() for name in view.feature_names]


def test_feature_matrix_uses_view_defaults_for_unknown_entities(rows):
    known_card = rows[data.CARD_VIEW]["card-3"]
    transactions = [
        {"card_id": "card-3", "merchant_id": "merchant-unknown", "amount": 12.5},
        {"card_id": "card-unknown", "merchant_id": "merchant-4", "amount": 99.0, "hour": 2.0, "is_foreign": 1.0},
    ]
    matrix = data.feature_matrix(transactions, rows)
    card_view, merchant_view = data.fraud_views()
    assert matrix.dtype == np.float32 and matrix.shape == (2, len(data.MODEL_INPUTS))
    np.testing.assert_array_equal(matrix[0, :3], [12.5, 12.0, 0.0])  # request defaults
    np.testing.assert_array_equal(matrix[0, 3:9], np.float32([float(v) for v in known_card.values()]))
    np.testing.assert_array_equal(matrix[0, 9:], np.float32(merchant_view.defaults))
    np.testing.assert_array_equal(matrix[1, 3:9], np.float32(card_view.defaults))
    merchant = rows[data.MERCHANT_VIEW]["merchant-4"]
    np.testing.assert_array_equal(matrix[1, 9:], np.float32([float(v) for v in merchant.values()]))


def test_feature_matrix_refuses_a_missing_amount(rows):
    with pytest.raises(ValueError, match="amount"):
        data.feature_matrix([{"card_id": "card-1", "merchant_id": "merchant-1"}], rows)


# --- model ----------------------------------------------------------------------------------------------------

def test_onnx_matches_sklearn(pipeline, heldout, tmp_path):
    session = ort.InferenceSession(str(export_onnx(pipeline, tmp_path / "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    onnx_label, onnx_probabilities = session.run(["label", "probabilities"], {"input": heldout})
    assert onnx_probabilities.dtype == np.float32 and onnx_probabilities.shape == (len(heldout), 2)
    assert onnx_label.dtype == np.int64
    np.testing.assert_allclose(onnx_probabilities[:, 1], offline_scores(pipeline, heldout), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(onnx_label, pipeline.predict(heldout))


def test_model_has_signal(pipeline, rows):
    from sklearn.metrics import roc_auc_score

    transactions = data.generate_transactions(rows, 10_000, SEED + 60)
    scores = offline_scores(pipeline, data.feature_matrix(transactions, rows))
    assert roc_auc_score(data.labels(transactions), scores) > 0.8


def test_build_and_register_writes_a_verifiable_version(tmp_path, heldout):
    manifest, pipeline = build_and_register(tmp_path, seed=SEED, n_train=N_TRAIN)
    version_dir = tmp_path / "fraud" / "1"
    assert isinstance(manifest, Manifest) and read_manifest(version_dir) == manifest
    assert manifest.onnx_input == "input" and [o.name for o in manifest.outputs] == ["fraud_probability", "label"]
    assert [spec.name for spec in manifest.inputs] == [spec["name"] for spec in data.MODEL_INPUTS]
    assert "AUC" in manifest.description.summary
    profile = manifest.profile  # every input column and output, on the training data
    assert profile is not None and profile.rows == N_TRAIN and list(profile.columns) == manifest.column_names
    assert list(profile.outputs) == ["fraud_probability", "label"] and profile.params["seed"] == SEED
    assert profile.columns["card_stats.txn_count_24h"].default_share == 0.0  # training: every card is known
    assert profile.columns["amount"].default_share is None and len(profile.columns["amount"].shares) == 10
    assert profile.outputs["fraud_probability"].mean == pytest.approx(float(np.mean(offline_scores(
        pipeline, model_training_matrix()))), rel=1e-4)
    manifest.input_columns({view.name: view for view in data.fraud_views()})  # every input resolves
    artifact = verified_artifact(version_dir, manifest)
    assert artifact == version_dir / "model.onnx"
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {manifest.onnx_input: heldout})[0]
    np.testing.assert_allclose(probabilities[:, 1], offline_scores(pipeline, heldout), rtol=0, atol=1e-5)

    Path(artifact).write_bytes(artifact.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="sha256"):
        verified_artifact(version_dir, manifest)
