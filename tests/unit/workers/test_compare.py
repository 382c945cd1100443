"""workers/compare.py without Kafka: synthetic shadow records, the numbers checked exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from streamscore.streams import topics
from streamscore.workers import compare as c


def record(rid: str, answered: str, shadow: str, answered_outputs: dict[str, Any], outputs: dict[str, Any],
           shadow_us: float) -> dict[str, Any]:
    return {"id": rid, "model": "fraud", "version": shadow, "answered_version": answered, "outputs": outputs,
            "answered_outputs": answered_outputs, "shadow_us": shadow_us, "batch_id": "b1", "sent_ms": 1}


# v1 = "1", v2 = "2"; p times 10: v1 [1, 3, 9], v2 [2, 5, 6]; r2 runs the other way (2 answered, 1 in shadow)
RECORDS = [
    record("r1", "1", "2", {"p": 0.1, "label": 0, "decision": "approve", "scores": [0.1], "only_answer": 1.0},
           {"p": 0.2, "label": 0, "decision": "approve", "scores": [0.2]}, 100.0),
    record("r2", "2", "1", {"p": 0.5, "label": 1, "decision": "review"},
           {"p": 0.3, "label": 0, "decision": "approve"}, 300.0),
    record("r3", "1", "2", {"p": 0.9, "label": 1, "decision": "decline"},
           {"p": 0.6, "label": 1, "decision": "review"}, 200.0),
    record("r4", "1", "3", {"p": 0.9}, {"p": 0.0}, 9999.0),  # another pair: ignored
    record("r1", "1", "2", {"p": 0.1}, {"p": 0.9}, 5000.0),  # a duplicate of r1: dropped
]


def test_summarize_numeric_exact() -> None:
    summary = c.summarize(RECORDS, "1", "2")
    assert summary["records"] == 3
    assert summary["duplicates"] == 1
    assert summary["directions"] == {"answered v1, shadow v2": 2, "answered v2, shadow v1": 1}
    p = summary["outputs"]["p"]
    assert p["kind"] == "numeric"
    assert p["count"] == 3
    assert p["non_finite"] == 0
    assert p["mean_abs_diff"] == pytest.approx(0.2, abs=1e-12)
    assert p["max_abs_diff"] == pytest.approx(0.3, abs=1e-12)
    assert p["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert p["p50_abs_diff"] == pytest.approx(0.2, abs=1e-12)
    assert p["p90_abs_diff"] == pytest.approx(0.28, abs=1e-12)  # linear: 0.2 + 0.8 * 0.1
    assert p["p99_abs_diff"] == pytest.approx(0.298, abs=1e-12)
    assert p["correlation"] == pytest.approx(11 / 13, abs=1e-12)  # 132 / sqrt(312 * 78)


def test_summarize_labels_and_shadow_us() -> None:
    summary = c.summarize(RECORDS, "1", "2")
    label = summary["outputs"]["label"]
    assert label == {"kind": "label", "count": 3, "agreement": pytest.approx(2 / 3), "disagree": 1,
                     "confusion": {"0": {"0": 1, "1": 1}, "1": {"1": 1}}}
    decision = summary["outputs"]["decision"]
    assert decision["agreement"] == pytest.approx(1 / 3)
    assert decision["confusion"] == {"approve": {"approve": 1, "review": 1}, "decline": {"review": 1}}
    assert summary["outputs"]["scores"]["kind"] == "skipped"
    assert summary["outputs"]["scores"]["count"] == 1
    assert "only_answer" not in summary["outputs"]  # present in one map only
    assert list(summary["outputs"]) == ["p", "label", "decision", "scores"]
    assert summary["mean_shadow_us"] == pytest.approx(200.0)
    assert summary["mean_shadow_us_by_version"] == {"1": pytest.approx(300.0), "2": pytest.approx(150.0)}


def test_orientation_swaps_with_the_arguments() -> None:
    forward, backward = c.summarize(RECORDS, "1", "2"), c.summarize(RECORDS, "2", "1")
    assert backward["outputs"]["p"]["mean_diff"] == pytest.approx(-forward["outputs"]["p"]["mean_diff"], abs=1e-12)
    assert backward["outputs"]["p"]["mean_abs_diff"] == pytest.approx(0.2)
    assert backward["outputs"]["label"]["confusion"] == {"0": {"0": 1}, "1": {"0": 1, "1": 1}}


def test_no_records_of_the_pair() -> None:
    summary = c.summarize(RECORDS, "1", "9")
    assert summary["records"] == 0
    assert summary["outputs"] == {}
    assert summary["mean_shadow_us"] is None
    assert not c.matches(RECORDS[0], "2", "2")


@pytest.mark.parametrize(("name", "pairs", "kind"), [
    ("fraud_probability", [(0.0, 1.0), (1.0, 0.0)], "numeric"),  # floats 0/1 stay scores
    ("label", [(0, 1), (1, 1)], "label"),
    ("is_fraud", [(True, False)], "label"),
    ("flag", [(0, 1), (1, 0)], "label"),  # ints 0/1 whatever the name
    ("decision", [(0, 2), (1, 1)], "label"),  # named decision: any int
    ("count", [(0, 5), (3, 1)], "numeric"),
    ("tier", [("a", "b")], "label"),
    ("mixed", [("a", 0.5)], "skipped"),
    ("vector", [([1.0], [2.0])], "skipped"),
])
def test_kind_of(name: str, pairs: list[tuple[Any, Any]], kind: str) -> None:
    assert c.kind_of(name, pairs) == kind


def test_non_finite_values_are_left_out() -> None:
    records = [record(f"n{i}", "1", "2", {"s": a}, {"s": b}, 1.0)
               for i, (a, b) in enumerate([(0.0, 1.0), (math.nan, 0.5), (2.0, math.inf), (4.0, 4.0)])]
    s = c.summarize(records, "1", "2")["outputs"]["s"]
    assert (s["count"], s["non_finite"]) == (2, 2)
    assert s["mean_abs_diff"] == pytest.approx(0.5)
    x, y = c.paired(records, "1", "2", "s")
    assert x.tolist() == [0.0, 4.0] and y.tolist() == [1.0, 4.0]
    only_nan = c.summarize([record("z", "1", "2", {"s": math.nan}, {"s": 1.0}, 1.0)], "1", "2")
    assert only_nan["outputs"]["s"]["count"] == 0 and only_nan["outputs"]["s"]["correlation"] is None


def test_constant_side_has_no_correlation() -> None:
    records = [record(f"k{i}", "1", "2", {"s": 0.5}, {"s": float(i)}, 1.0) for i in range(3)]
    assert c.summarize(records, "1", "2")["outputs"]["s"]["correlation"] is None


def test_paired_is_oriented_v1_v2() -> None:
    x, y = c.paired(RECORDS, "1", "2", "p")
    assert np.allclose(x, [0.1, 0.3, 0.9]) and np.allclose(y, [0.2, 0.5, 0.6])


def test_table_lines() -> None:
    lines = c.table(c.summarize(RECORDS, "1", "2")).splitlines()
    assert lines[0] == "numeric outputs (Δ = v2 - v1):"
    assert lines[1].split() == ["output", "count", "mean|Δ|", "max|Δ|", "p50|Δ|", "p90|Δ|", "p99|Δ|", "corr"]
    assert lines[2].split() == ["p", "3", "0.2000", "0.3000", "0.2000", "0.2800", "0.2980", "0.8462"]
    assert len(lines[1]) == len(lines[2])  # aligned
    assert "label outputs:" in lines
    assert any(line.split() == ["label", "3", "0.6667", "1"] for line in lines)
    assert any(line.split() == ["decision", "3", "0.3333", "2"] for line in lines)
    start = lines.index("confusion of decision (rows v1, columns v2):")
    assert lines[start + 1].split() == ["v1", "\\", "v2", "approve", "review"]
    assert lines[start + 2].split() == ["approve", "1", "1"]
    assert lines[start + 3].split() == ["decline", "0", "1"]
    assert "skipped scores: 1 pair(s), not a numeric scalar or a label (a list, or mixed types)" in lines
    assert lines[-1] == "mean shadow_us: 200.0 (by shadow version: v1 300.0, v2 150.0)"


def test_describe_pairs_and_decode() -> None:
    assert c.describe_pairs({("1", "2"): 3, ("1", "3"): 7}) == \
        "answered v1, shadow v3: 7; answered v1, shadow v2: 3"
    assert c._decode(msgpack.packb(RECORDS[0])) == RECORDS[0]
    assert c._decode(b"\xc1 not msgpack") is None
    assert c._decode(msgpack.packb([1, 2])) is None
    assert c.pair_of({"version": "2"}) is None
    assert topics.shadow("ss", "fraud") == "ss.fraud.shadow"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    summary = c.summarize(RECORDS, "1", "2")
    path = tmp_path / "compare.png"
    assert c.plot(RECORDS, summary, path, "fraud") == "p"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels_only = [record("l", "1", "2", {"label": 0}, {"label": 1}, 1.0)]
    assert c.plot(labels_only, c.summarize(labels_only, "1", "2"), tmp_path / "none.png", "fraud") is None
    assert (tmp_path / "none.png").exists()
