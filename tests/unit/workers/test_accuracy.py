"""The accuracy report of a window against scikit-learn on the same pairs; the decision threshold of a manifest;
how labels and predictions are read (each bad label gets its dead-letter kind)."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, precision_score, recall_score, roc_auc_score

from streamscore.workers.accuracy import decision_of, window_report
from streamscore.workers.monitor import LabelError, Scored, read_label, read_prediction


def test_the_report_matches_sklearn_on_the_same_pairs() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.random(500) < 0.2).astype(int)
    scores = np.clip(0.3 * labels + rng.random(500) * 0.7, 0, 1)
    delays = rng.exponential(2000, 500)

    report = window_report(scores.tolist(), labels.tolist(), delays.tolist(), threshold=0.7, bins=4)

    decisions = (scores >= 0.7).astype(int)
    assert report["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert report["precision"] == pytest.approx(precision_score(labels, decisions), abs=1e-12)
    assert report["recall"] == pytest.approx(recall_score(labels, decisions), abs=1e-12)
    assert report["brier"] == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)
    assert report["count"] == 500 and report["positives"] == labels.sum()
    assert report["label_delay_ms"]["p90"] == pytest.approx(np.quantile(delays, 0.9))
    bins = report["calibration"]
    assert [b["lo"] for b in bins] == [0.0, 0.25, 0.5, 0.75] and sum(b["count"] for b in bins) == 500
    top = scores >= 0.75
    assert bins[-1]["mean_score"] == pytest.approx(scores[top].mean())
    assert bins[-1]["observed_rate"] == pytest.approx(labels[top].mean())


def test_a_one_class_window_has_no_auc_and_no_decision_has_no_precision() -> None:
    report = window_report([0.1, 0.2, 0.3], [0, 0, 0], [10, 20, 30], threshold=0.5)

    assert report["auc"] is None and report["precision"] is None and report["recall"] is None
    assert report["observed_rate"] == 0.0 and report["brier"] == pytest.approx((0.01 + 0.04 + 0.09) / 3)


def test_mismatched_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="as many scores as labels"):
        window_report([0.1, 0.2], [1], [], threshold=0.5)


def _write_manifest(models: Path, version: str, stages: list) -> None:
    folder = models / "fraud" / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "name": "fraud", "version": version, "sha256": "0" * 64,
        "inputs": [{"name": "amount", "source": "request"}],
        "outputs": [{"name": "fraud_probability", "onnx_output": "probabilities", "column": 1}],
        "description": {"domain": "d", "input_modality": "m", "result_kind": "r"}, "stages": stages}))


def test_the_threshold_is_where_the_last_decision_of_the_manifest_begins(tmp_path: Path) -> None:
    from streamscore_examples.fraud.model import DECISION_STAGE

    _write_manifest(tmp_path, "1", [DECISION_STAGE])
    _write_manifest(tmp_path, "2", [])

    assert decision_of(tmp_path, "fraud", "1") == ("fraud_probability", 0.7)
    assert decision_of(tmp_path, "fraud", "2") == ("fraud_probability", None)
    assert decision_of(tmp_path, "fraud", "3") == (None, None)


@pytest.mark.parametrize(("value", "kind"), [
    (None, "undecodable"), (b"", "undecodable"), (b"\xc1", "undecodable"),
    (msgpack.packb({"id": "a", "label": 1}) + b"\x00", "undecodable"),
    (msgpack.packb([1]), "bad_label"), (msgpack.packb({"label": 1}), "bad_label"),
    (msgpack.packb({"id": "", "label": 1}), "bad_label"), (msgpack.packb({"id": "a" * 257, "label": 1}), "bad_label"),
    (msgpack.packb({"id": "a", "label": 2}), "bad_label"), (msgpack.packb({"id": "a", "label": 1.0}), "bad_label"),
    (msgpack.packb({"id": "a", "label": "1"}), "bad_label"), (msgpack.packb({"id": "a"}), "bad_label"),
    (msgpack.packb({"id": "a", "label": 0, "event_ms": 1.5}), "bad_label"),
    (msgpack.packb({"id": "a", "label": 0, "event_ms": True}), "bad_label"),
])
def test_a_bad_label_gets_its_kind(value: bytes | None, kind: str) -> None:
    with pytest.raises(LabelError) as raised:
        read_label(value, 1000)

    assert raised.value.kind == kind


def test_a_label_reads_with_its_event_time_or_the_message_time() -> None:
    assert read_label(msgpack.packb({"id": "a", "label": 1, "event_ms": 5, "note": [1]}), 1000) == ("a", 1, 5)
    assert read_label(msgpack.packb({"id": "a", "label": False}), 1000) == ("a", 0, 1000)
    assert read_label(msgpack.packb({"id": "a", "label": True, "event_ms": None}), 1000) == ("a", 1, 1000)


def test_a_prediction_reads_its_score_or_says_why_not() -> None:
    def pack(**fields: object) -> bytes:
        return msgpack.packb({"id": "r", "version": "2", "status": "ok", "outputs": {"p": 0.25}, "sent_ms": 9,
                              **fields})

    output = {"2": "p"}.__getitem__
    assert read_prediction(pack(), 1, output) == Scored("r", "2", 0.25, 9)
    assert read_prediction(pack(outputs={"p": [0.5]}, sent_ms=None, received_ms=7), 1, output) == \
        Scored("r", "2", 0.5, 7)
    assert read_prediction(pack(status="expired"), 1, output) == "not_ok"
    assert read_prediction(pack(outputs={"q": 1.0}), 1, output) == "no_score"
    assert read_prediction(pack(outputs={"p": True}), 1, output) == "no_score"
    assert read_prediction(b"\xc1", 1, output) == "undecodable"
    assert read_prediction(msgpack.packb([1]), 1, output) == "not_a_prediction"
