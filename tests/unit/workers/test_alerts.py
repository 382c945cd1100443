"""Alert rules (parsing, the value each reads from a report) and their episodes: raised once, cleared once."""

from __future__ import annotations

from typing import Any

import pytest

from streamscore.workers.alerts import AlertRule, judge, parse_rule, parse_rules


def accuracy(version: str, auc: float | None, count: int = 100, start: int = 0, **extra: Any) -> dict[str, Any]:
    return {"kind": "accuracy", "model": "fraud", "version": version, "window_start_ms": start,
            "window_end_ms": start + 1000, "count": count, "auc": auc, "precision": 0.8, "recall": 0.6,
            "mean_score": 0.1, "observed_rate": 0.04, "label_delay_ms": {"p50": 1500.0, "p90": 4000.0}, **extra}


def drift(version: str, columns: dict[str, dict[str, float]], **extra: Any) -> dict[str, Any]:
    return {"kind": "drift", "model": "fraud", "version": version, "window_start_ms": 0, "window_end_ms": 1000,
            "columns": columns, **extra}


@pytest.mark.parametrize(("text", "metric", "op", "threshold", "column"), [
    ("live_auc < 0.75", "live_auc", "<", 0.75, None),
    ("  recall<=0.5 ", "recall", "<=", 0.5, None),
    ("drift_psi[amount] > 0.2", "drift_psi", ">", 0.2, "amount"),
    ("drift_psi[*] >= 1e-1", "drift_psi", ">=", 0.1, "*"),
    ("drift_default_rate > 0.05", "drift_default_rate", ">", 0.05, None),
])
def test_a_rule_reads_from_its_text(text: str, metric: str, op: str, threshold: float, column: str | None) -> None:
    rule = parse_rule(text)

    assert (rule.metric, rule.op, rule.threshold, rule.column) == (metric, op, threshold, column)
    assert rule.title == rule.text


@pytest.mark.parametrize(("item", "says"), [
    ("live_auc 0.75", "is not '<metric> <op> <threshold>'"),
    ("live_auc < high", "is not a number"),
    ("live_auc == 0.75", "is not '<metric> <op> <threshold>'"),
    ("accuracy < 0.9", "unknown metric 'accuracy'"),
    ("live_auc[amount] < 0.7", "only drift_* metrics take a column"),
    ({"metric": "live_auc", "op": "<"}, "threshold"),
    ({"metric": "live_auc", "op": "!=", "threshold": 1}, "op"),
    ({"metric": "live_auc", "op": "<", "threshold": 1, "colour": "red"}, "colour"),
    (7, "give a string or an object"),
])
def test_a_bad_rule_is_refused_saying_what_is_wrong(item: Any, says: str) -> None:
    with pytest.raises(ValueError, match="alert rule") as raised:
        parse_rule(item)

    assert says in str(raised.value)


def test_two_rules_of_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two alert rules are named 'live_auc < 0\\.75'"):
        parse_rules(["live_auc < 0.75", {"metric": "live_auc", "op": "<", "threshold": 0.75}])


def test_each_metric_is_read_from_its_report_kind() -> None:
    report = accuracy("1", 0.7)

    assert parse_rule("live_auc < 0.75").value_in(report) == 0.7
    assert parse_rule("calibration_gap > 0.05").value_in(report) == pytest.approx(0.06)
    assert parse_rule("label_delay_p90_s > 3").value_in(report) == 4.0
    assert parse_rule("count < 10").value_in(report) == 100
    assert parse_rule("drift_psi[amount] > 0.2").value_in(report) is None  # an accuracy report has no drift
    shifted = drift("1", {"amount": {"psi": 0.3, "p_value": 0.01}, "hour": {"psi": 0.5}}, default_rate=0.07,
                    outputs={"fraud_probability": {"psi": 0.6}})
    assert parse_rule("drift_psi[amount] > 0.2").value_in(shifted) == 0.3
    assert parse_rule("drift_psi[fraud_probability] > 0.2").value_in(shifted) == 0.6
    assert parse_rule("drift_psi[*] > 0.2").value_in(shifted) == 0.6
    assert parse_rule("drift_p_value[hour] < 0.05").value_in(shifted) is None  # the column has no such statistic
    assert parse_rule("drift_default_rate > 0.05").value_in(shifted) == 0.07
    assert parse_rule("live_auc < 0.75").value_in(shifted) is None


def test_a_window_without_the_metric_or_under_min_count_is_not_judged() -> None:
    rule = AlertRule(metric="live_auc", op="<", threshold=0.75, min_count=50)

    assert rule.value_in(accuracy("1", None)) is None  # one class only: no AUC
    assert rule.value_in(accuracy("1", 0.5, count=49)) is None
    assert rule.value_in(accuracy("1", 0.5, count=50)) == 0.5


def test_an_episode_raises_once_and_clears_once_per_version() -> None:
    rules = parse_rules(["live_auc < 0.75", {"name": "bad recall", "metric": "recall", "op": "<", "threshold": 0.5}])
    episodes: dict[str, Any] = {}
    aucs = [0.9, 0.7, 0.6, None, 0.72, 0.8, 0.81, 0.5]

    events = [judge(rules, accuracy("1", auc, start=i * 1000), episodes, now_ms=10_000 + i)
              for i, auc in enumerate(aucs)]

    flat = [(e["state"], e["rule"], e["window_start_ms"], e["value"]) for batch in events for e in batch]
    assert flat == [("raised", "live_auc < 0.75", 1000, 0.7), ("cleared", "live_auc < 0.75", 5000, 0.8),
                    ("raised", "live_auc < 0.75", 7000, 0.5)]
    assert set(episodes) == {"live_auc < 0.75|1"}
    cleared = events[5][0]
    assert cleared["raised_ms"] == 10_001 and cleared["at_ms"] == 10_005
    assert cleared["model"] == "fraud" and cleared["version"] == "1" and cleared["report_kind"] == "accuracy"


def test_episodes_are_per_version() -> None:
    rules = parse_rules(["drift_psi[amount] > 0.2"])
    episodes: dict[str, Any] = {}

    first = judge(rules, drift("1", {"amount": {"psi": 0.4}}), episodes, 1)
    second = judge(rules, drift("2", {"amount": {"psi": 0.4}}), episodes, 2)
    again = judge(rules, drift("1", {"amount": {"psi": 0.9}}), episodes, 3)

    assert [e["version"] for e in first + second] == ["1", "2"] and again == []
    assert set(episodes) == {"drift_psi[amount] > 0.2|1", "drift_psi[amount] > 0.2|2"}


def test_an_open_episode_kept_outside_is_not_raised_again() -> None:
    """The monitor keeps episodes in a changelog-backed table: what it recovers after a restart is this map."""
    rules = parse_rules(["live_auc < 0.75"])
    recovered = {"live_auc < 0.75|1": {"raised_ms": 5, "value": 0.6}}

    assert judge(rules, accuracy("1", 0.5), recovered, 9) == []
    assert [e["state"] for e in judge(rules, accuracy("1", 0.9), recovered, 10)] == ["cleared"]
