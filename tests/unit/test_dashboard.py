"""The Grafana dashboard (deploy/compose/grafana/dashboards/streamscore.json), checked against what the code
exports: every metric a panel's PromQL names is one a registry built by the real classes collects (the worker's
registry with the stages that register metrics in it, the values read at scrape time, and the monitor's), every
label a query matches, groups by or shows is one of its metrics' labels, and every metric those registries
collect is on the dashboard. Also that the JSON is a dashboard Grafana loads:
uid, title, schemaVersion, and panels with a datasource, targets and a place on the grid."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from prometheus_client import CollectorRegistry

from streamscore.featurestore.store import FeatureStore
from streamscore.settings import MonitoringSettings, Settings
from streamscore.streams.delivery import BatchDelivery
from streamscore.workers import app as worker_app
from streamscore.workers.drift import Drift
from streamscore.workers.metrics import WorkerMetrics
from streamscore.workers.monitor import MonitorMetrics
from streamscore.workers.pipeline import BatchPipeline
from streamscore.workers.predlog import LogWriter, PredictionLog
from streamscore.workers.stages import StageSpec
from tests.unit.workers.test_pipeline import NoViews, TinyRuntime

DASHBOARD = Path(__file__).parents[2] / "deploy" / "compose" / "grafana" / "dashboards" / "streamscore.json"

FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln",
    "log2", "log10", "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def metrics_of(expr: str) -> set[str]:
    """The metric names a PromQL expression reads; raises on a call of a function PromQL does not have."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, e.g. model=~"$model"
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, e.g. [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)  # label lists
    names = set()
    for found in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = found.groups()
        if name in FUNCTIONS or name in KEYWORDS:
            continue
        assert call is None, f"{name}() is no PromQL function (in {expr!r})"
        names.add(name)
    return names


def exported(registry: CollectorRegistry) -> dict[str, str]:
    """Every sample name the registry serves -> the name of its metric family."""
    names = {}
    for family in registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.name
    return names


def worker_registry(sockets: list[socket.socket]) -> CollectorRegistry:
    """The registry of a worker as ``create_app`` fills it: the worker's metrics, the pipeline's stages (shadow,
    a manifest stage, the prediction log, drift), the values read at scrape time and the HTTP endpoint's."""
    metrics = WorkerMetrics()
    settings = Settings(topic_prefix="p", online_store="memory", cache="redis", http={"port": 0})
    registry = metrics.registry
    decision = StageSpec(stage="threshold_decision", after="infer",
                         params={"score": "score", "thresholds": [0.5], "labels": ["approve", "decline"]})
    runtime = TinyRuntime(manifest=SimpleNamespace(sha256="ab" * 32, stages=(decision,)))
    pipeline = BatchPipeline(runtime, NoViews(), "p", worker_id="w", registry=registry)  # type: ignore[arg-type]
    pipeline.add_from_manifest(registry)
    pipeline.add(PredictionLog(writer=LogWriter(settings, registry)))  # what predlog.attach places, unshared
    pipeline.add(Drift("p.tiny.monitoring", MonitoringSettings(), registry, "tiny", "w"), after="shadow")
    store = FeatureStore(settings, {})  # a Redis cache tier, not connected: the scrape reads its counters
    scorer = worker_app.ModelScorer(pipeline, metrics)
    scorer.delivery = BatchDelivery(settings, {})
    app = faust.App("dashboard-test", broker="kafka://127.0.0.1:1")
    worker_app._declare_reporting(app, {"tiny": scorer}, store, metrics, None, None)  # type: ignore[arg-type]
    channel = SimpleNamespace(put=None)
    listen = worker_app.listen
    try:  # the endpoint's socket is opened (on a free port) and closed by the caller: no server starts
        worker_app.listen = lambda http: sockets.append(listen(http)) or sockets[-1]  # type: ignore[assignment]
        worker_app._declare_http(app, settings, {"tiny": scorer}, {"p.tiny.requests": channel}, store, metrics, None)
    finally:
        worker_app.listen = listen  # type: ignore[assignment]
    return registry


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


@pytest.fixture(scope="module")
def registries() -> list[CollectorRegistry]:
    loop = asyncio.new_event_loop()  # the Faust app and the delivery service want a loop of their own
    asyncio.set_event_loop(loop)
    sockets: list[socket.socket] = []
    try:
        return [worker_registry(sockets), MonitorMetrics().registry]
    finally:
        for sock in sockets:
            sock.close()
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture(scope="module")
def served(registries: list[CollectorRegistry]) -> dict[str, str]:
    return {name: family for registry in registries for name, family in exported(registry).items()}


@pytest.fixture(scope="module")
def labels(registries: list[CollectorRegistry], served: dict[str, str]) -> dict[str, set[str]]:
    """Sample name -> its label names. Only the metric objects know them before a first sample is made:
    prometheus_client keeps each collector with the sample names it serves in ``_collector_to_names`` (the
    values read at scrape time are not there: they have no labels)."""
    found: dict[str, set[str]] = {name: set() for name in served}
    for registry in registries:
        for collector, names in registry._collector_to_names.items():
            for name in names:
                declared = getattr(collector, "_labelnames", None) or getattr(collector, "labelnames", ())
                found[name] = set(declared) | ({"le"} if name.endswith("_bucket") else set())
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of the query variables."""
    found = [(f"panel {panel['title']!r}", target["expr"]) for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            assert metric, f"variable {variable['name']}: {query!r} is not label_values(metric, label)"
            found.append((f"variable {variable['name']!r}", metric.group(1)))
    return found


def test_the_extractor_finds_metric_names_and_refuses_unknown_functions() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(streamscore_stage_seconds_bucket{model=~"$model"}'
            '[$__rate_interval]))) / ignoring (version) group_left sum(streamscore_x) or vector(0)')
    assert metrics_of(expr) == {"streamscore_stage_seconds_bucket", "streamscore_x"}
    assert metrics_of("streamscore_alert_open == 1") == {"streamscore_alert_open"}
    with pytest.raises(AssertionError, match="rates"):
        metrics_of("rates(streamscore_predictions_total[1m])")


def test_the_registries_hold_what_the_code_registers(served: dict[str, str]) -> None:
    # the names the extractor is checked against, as prometheus_client serves them (a renamed metric is missing)
    assert {"streamscore_predictions_total", "streamscore_stage_seconds_bucket", "streamscore_cache_hits",
            "streamscore_shadow_abs_diff_bucket", "streamscore_decisions_total", "streamscore_drift_psi",
            "streamscore_prediction_log_rows_total", "streamscore_http_waiting_rows", "streamscore_live_auc",
            "streamscore_alert_open", "streamscore_batches_in_flight"} <= set(served)
    assert "streamscore_predictions" not in served and "streamscore_live_auc_total" not in served


def test_every_query_names_a_metric_the_code_exports(dashboard: dict[str, Any], served: dict[str, str]) -> None:
    for where, expr in queries(dashboard):
        names = metrics_of(expr)
        assert names, f"{where}: {expr!r} reads no metric"
        for name in names:
            assert name in served, f"{where} queries {name}, which neither the worker nor the monitor exports"


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any], served: dict[str, str]) -> None:
    shown = {served[name] for _, expr in queries(dashboard) for name in metrics_of(expr)}
    missing = sorted(set(served.values()) - shown)
    assert not missing, f"metrics on no panel of {DASHBOARD.name} (add a panel for each): {missing}"


def test_the_dashboard_is_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "streamscore" and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids, f"panel id {panel['id']} repeated"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")) and grid["x"] + grid["w"] <= 24
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), f"panel {panel['title']!r}: refIds repeated"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]


def test_every_label_a_query_matches_groups_or_shows_is_one_its_metrics_have(
        dashboard: dict[str, Any], labels: dict[str, set[str]]) -> None:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', target["expr"])
            names = metrics_of(expr)
            have = set().union(*(labels[name] for name in names))
            for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
                matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
                assert matched <= labels[metric], f"panel {panel['title']!r}: {metric} has no label " \
                                                  f"{sorted(matched - labels[metric])}"
            grouped = {label.strip() for listed in re.findall(
                r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
                for label in listed.split(",") if label.strip()}
            shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert grouped | shown <= have, f"panel {panel['title']!r}: no metric of {sorted(names)} has the " \
                                            f"labels {sorted((grouped | shown) - have)}"
