"""Alert rules over window reports, and their episodes.

A rule is a metric, a comparison and a threshold (``live_auc < 0.75``, ``drift_psi[amount] > 0.2``), from the
``monitoring.alert_rules`` setting or a manifest's ``alert_rules``. Each report read (``kind: accuracy`` from the
monitor, ``kind: drift`` from the workers) is judged by the rules of its kind: a rule that starts holding for a
version raises an alert, one that stops holding clears it; in between nothing is published (one episode, two
events). A report without the rule's metric (an AUC of a one-class window, a column the report does not have, a
window under ``min_count`` pairs) leaves the episode as it is.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def _delay(quantile: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda report: _seconds(report.get("label_delay_ms", {}).get(quantile))


ACCURACY_METRICS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "live_auc": lambda report: report.get("auc"),
    "precision": lambda report: report.get("precision"),
    "recall": lambda report: report.get("recall"),
    "brier": lambda report: report.get("brier"),
    "observed_rate": lambda report: report.get("observed_rate"),
    "mean_score": lambda report: report.get("mean_score"),
    "calibration_gap": lambda report: (abs(report["mean_score"] - report["observed_rate"])
                                       if _number(report.get("mean_score")) and _number(report.get("observed_rate"))
                                       else None),
    "count": lambda report: report.get("count"),
    **{f"label_delay_{q}_s": _delay(q) for q in ("p50", "p90", "p99", "max")},
}
"""Metrics of ``kind: accuracy`` reports a rule may name. Every other rule names ``drift_<statistic>``."""

DRIFT_PREFIX = "drift_"
_OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt,
                                                  ">=": operator.ge}
_TEXT = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(?:\[\s*([^\]]+?)\s*\])?\s*(<=|>=|<|>)\s*(\S+)\s*$")


class AlertRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    """``live_auc``, ``precision``, ... (``ACCURACY_METRICS``) or ``drift_<statistic>`` (e.g. ``drift_psi``)."""
    op: Literal["<", "<=", ">", ">="]
    threshold: float
    column: str | None = None
    """Drift rules: the input column or output whose statistic is judged; ``*``: the largest over all of them;
    None: the report's top-level key ``<statistic>`` (e.g. ``drift_defaulted_share``)."""
    name: str | None = None
    """What events call the rule; default its text, e.g. ``live_auc < 0.75``."""
    min_count: int = Field(default=1, ge=1)
    """Accuracy rules: windows with fewer joined pairs are not judged."""

    @property
    def title(self) -> str:
        return self.name or self.text

    @property
    def text(self) -> str:
        column = f"[{self.column}]" if self.column is not None else ""
        return f"{self.metric}{column} {self.op} {self.threshold:g}"

    @property
    def kind(self) -> str:
        """The report kind the rule judges."""
        return "drift" if self.metric.startswith(DRIFT_PREFIX) else "accuracy"

    def value_in(self, report: Mapping[str, Any]) -> float | None:
        """The rule's metric in ``report`` (None: the report does not say, so the rule is not judged)."""
        if report.get("kind") != self.kind:
            return None
        if self.kind == "accuracy":
            count = report.get("count")
            if not isinstance(count, int) or count < self.min_count:
                return None
            value = ACCURACY_METRICS[self.metric](report)
        else:
            value = _drift_value(report, self.metric[len(DRIFT_PREFIX):], self.column)
        return float(value) if _number(value) else None

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


def parse_rule(item: str | Mapping[str, Any]) -> AlertRule:
    """A rule from its text (``"live_auc < 0.75"``, ``"drift_psi[amount] > 0.2"``) or its map; ValueError saying
    what is wrong otherwise."""
    if isinstance(item, str):
        match = _TEXT.match(item)
        if match is None:
            raise ValueError(f"alert rule {item!r} is not '<metric> <op> <threshold>' (e.g. 'live_auc < 0.75', "
                             "'drift_psi[amount] > 0.2'; op one of < <= > >=)")
        metric, column, op, threshold = match.groups()
        try:
            fields: Mapping[str, Any] = {"metric": metric, "column": column, "op": op, "threshold": float(threshold)}
        except ValueError:
            raise ValueError(f"alert rule {item!r}: threshold {threshold!r} is not a number") from None
    elif isinstance(item, Mapping):
        fields = item
    else:
        raise ValueError(f"alert rule {item!r}: give a string or an object")
    try:
        rule = AlertRule.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"alert rule {item!r}: {problems}") from None
    if rule.kind == "accuracy" and rule.metric not in ACCURACY_METRICS:
        raise ValueError(f"alert rule {item!r}: unknown metric {rule.metric!r}; accuracy metrics are "
                         f"{sorted(ACCURACY_METRICS)}, drift metrics drift_<statistic> (e.g. drift_psi)")
    if rule.kind == "accuracy" and rule.column is not None:
        raise ValueError(f"alert rule {item!r}: only drift_* metrics take a column")
    return rule


def parse_rules(items: Iterable[str | Mapping[str, Any]]) -> list[AlertRule]:
    """Rules in order; two rules of one name are refused (their episodes would be one)."""
    rules: list[AlertRule] = []
    for item in items:
        rule = parse_rule(item)
        if any(known.title == rule.title for known in rules):
            raise ValueError(f"two alert rules are named {rule.title!r}: give one of them a 'name'")
        rules.append(rule)
    return rules


def episode_key(rule: AlertRule, version: str) -> str:
    return f"{rule.title}|{version}"


def judge(rules: Iterable[AlertRule], report: Mapping[str, Any], episodes: MutableMapping[str, Any],
          now_ms: int) -> list[dict[str, Any]]:
    """Judge one report; return the alert events it makes (``docs/wire-format.md``, "Alert event") and record
    open episodes in ``episodes`` (``<rule>|<version>`` -> ``{"raised_ms", "value"}``): a rule already raised for
    the version raises nothing more until it has cleared."""
    events = []
    version = str(report.get("version"))
    for rule in rules:
        value = rule.value_in(report)
        if value is None:
            continue
        key = episode_key(rule, version)
        episode = episodes.get(key)
        if rule.holds(value) and episode is None:
            episodes[key] = {"raised_ms": now_ms, "value": value}
            events.append(_event(rule, "raised", value, report, now_ms, now_ms))
        elif not rule.holds(value) and episode is not None:
            del episodes[key]
            events.append(_event(rule, "cleared", value, report, int(episode["raised_ms"]), now_ms))
    return events


def _event(rule: AlertRule, state: str, value: float, report: Mapping[str, Any], raised_ms: int,
           now_ms: int) -> dict[str, Any]:
    return {"state": state, "rule": rule.title, "metric": rule.metric, "op": rule.op, "threshold": rule.threshold,
            "column": rule.column, "value": value, "model": report.get("model"), "version": report.get("version"),
            "window_start_ms": report.get("window_start_ms"), "window_end_ms": report.get("window_end_ms"),
            "report_kind": report.get("kind"), "raised_ms": raised_ms, "at_ms": now_ms}


def _drift_value(report: Mapping[str, Any], statistic: str, column: str | None) -> Any:
    if column is None:
        return report.get(statistic)
    columns = {name: stats for part in ("columns", "outputs") if isinstance(report.get(part), Mapping)
               for name, stats in report[part].items() if isinstance(stats, Mapping)}  # inputs, then outputs
    if column == "*":
        values: list[Any] = [stats.get(statistic) for stats in columns.values()]
        numbers = [float(value) for value in values if _number(value)]
        return max(numbers) if numbers else None
    stats = columns.get(column)
    return stats.get(statistic) if stats is not None else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


def _seconds(ms: Any) -> float | None:
    return ms / 1000.0 if _number(ms) else None
