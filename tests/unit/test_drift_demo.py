"""The drift demo's pieces that need no stack: the shifted generator, and the series, timeline and plot built from
window reports (``examples/fraud/drift.py``; the whole run is ``streamscore demo --drift``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamscore_examples.fraud import drift
from streamscore_examples.fraud.data import (
    feature_matrix,
    fraud_logit,
    generate_feature_rows,
    generate_shifted_transactions,
    generate_transactions,
    labels,
    shifted_fraud_logit,
)


@pytest.fixture(scope="module")
def rows():
    return generate_feature_rows(7, n_cards=2000, n_merchants=200)


def _column(transactions, name):
    return np.array([txn[name] for txn in transactions])


def test_the_shift_moves_amount_and_foreign_share_and_is_seeded(rows):
    normal = generate_transactions(rows, 5000, 3)
    shifted = generate_shifted_transactions(rows, 5000, 3)
    assert shifted == generate_shifted_transactions(rows, 5000, 3)
    assert shifted != generate_shifted_transactions(rows, 5000, 4)
    tiny_normal, tiny_shifted = (np.mean(_column(t, "amount") < 5.0) for t in (normal, shifted))
    assert tiny_normal < 0.05 and tiny_shifted > 0.3
    assert np.median(_column(shifted, "amount")) < 0.5 * np.median(_column(normal, "amount"))
    foreign_normal, foreign_shifted = (np.mean(_column(t, "is_foreign")) for t in (normal, shifted))
    assert foreign_normal < 0.1 and foreign_shifted > 0.25
    # the same cards and merchants: the shift is in the request, not in the store
    assert [t["card_id"] for t in shifted] == [t["card_id"] for t in normal]


def test_the_shift_changes_the_label_function(rows):
    shifted = generate_shifted_transactions(rows, 8000, 5)
    features, targets = feature_matrix(shifted, rows), labels(shifted)
    new, old = shifted_fraud_logit(features), fraud_logit(features)
    tiny = features[:, 0] < 5.0
    # tiny amounts are the new fraud, which the old function does not single out
    assert targets[tiny].mean() > 3 * targets[~tiny].mean()
    assert new[tiny].mean() - new[~tiny].mean() > 2.0 > abs(old[tiny].mean() - old[~tiny].mean())
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(targets, new) > 0.75 > roc_auc_score(targets, old)
    assert labels(generate_shifted_transactions(rows, 8000, 5)).tolist() == targets.tolist()


def _drift_report(end_ms, amount_psi, version="1", shadow=False):
    return {"model": "fraud", "version": version, "shadow": shadow, "window_start_ms": end_ms - 3000,
            "window_end_ms": end_ms, "requests": 600,
            "columns": {"amount": {"psi": amount_psi}, "is_foreign": {"psi": amount_psi / 4}, "hour": {"psi": 0.01}},
            "outputs": {"fraud_probability": {"psi": amount_psi / 2}}}


def _watch():
    origin = 1_767_225_600_000
    watch = drift.Watch(origin_ms=origin)
    rng = np.random.default_rng(0)
    for index in range(400):
        shifted = index >= 200
        request_id = f"r-{index}"
        label = int(rng.random() < 0.3)
        watch.truth[request_id] = drift.Truth(label, shifted)
        watch.sent.append(request_id)
        watch.answered_ms[request_id] = origin + index * 100
        # v1 ranks well before the shift, badly after; v2 (shadow, after the shift) well
        watch.scores[request_id] = (0.6 * label + 0.4 * rng.random()) if not shifted else rng.random()
        if index >= 300:
            watch.shadow.setdefault("2", {})[request_id] = (0.7 * label + 0.3 * rng.random(), origin + index * 100)
    watch.drift_reports = [_drift_report(origin + 3000 * k, 0.02 if k < 7 else 1.5) for k in range(1, 14)]
    watch.drift_reports.append(_drift_report(origin + 33000, 0.05, version="2", shadow=True))
    watch.accuracy_reports = [{"kind": "accuracy", "version": "1", "window_start_ms": origin + 5000 * k,
                               "window_end_ms": origin + 5000 * (k + 1), "auc": 0.86 if k < 4 else 0.6,
                               "count": 50} for k in range(8)]
    watch.alerts = [{"state": "raised", "rule": drift.DRIFT_RULE, "version": "1", "value": 1.5,
                     "at_ms": origin + 21500},
                    {"state": "raised", "rule": drift.AUC_RULE, "version": "1", "value": 0.6, "at_ms": origin + 31000}]
    watch.marks = [(0.0, "streaming normal traffic"), (20.0, "population shifted: card testing"),
                   (21.5, "drift alert raised"), (31.0, "accuracy alert raised"), (29.0, "v2 deployed in shadow")]
    watch.labels_sent = 400
    watch.trained_by = "the monitor's --retrain-on hook"
    return watch


def test_result_timeline_and_plot_from_synthetic_reports(tmp_path):
    result = drift.build_result(_watch(), 100.0)
    assert result["problems"] == []
    amount = result["psi"]["amount"]
    assert [at for at, _ in amount] == [3.0 * k for k in range(1, 14)]  # v1's windows only: no shadow report
    assert amount[0][1] == 0.02 and amount[-1][1] == 1.5
    assert result["psi"]["fraud_probability"][-1][1] == 0.75
    assert [point["auc"] for point in result["auc"]["1"]][:5] == [0.86] * 4 + [0.6]
    assert result["auc"]["1"][0]["t"] == 2.5
    v2 = result["auc"]["2"]
    assert v2 and all(point["auc"] > 0.9 for point in v2) and sum(point["count"] for point in v2) == 100
    same = result["same_window"]["2"]
    assert same["requests"] == 100 and same["auc_v2"] > 0.9 > 0.75 > same["auc_v1"]
    lines = drift.timeline_lines(result)
    assert any("0.860 before the shift, down to 0.600" in line for line in lines)
    assert any("AUC v1" in line and "v2" in line for line in lines)
    json.dumps(result, default=str)
    drift.plot(result, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_promise_is_a_problem():
    watch = _watch()
    watch.alerts = [event for event in watch.alerts if event["rule"] != drift.DRIFT_RULE]
    watch.shadow.clear()
    del watch.answered_ms["r-7"]
    problems = drift.build_result(watch, 100.0)["problems"]
    assert len(problems) == 3
    assert "1 of 400 requests unanswered" in problems[0]
    assert drift.DRIFT_RULE in problems[1] and "shadow" in problems[2]
