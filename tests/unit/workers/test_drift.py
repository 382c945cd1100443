"""Drift against the training profile without servers: the statistics on a known shift and on none, the window
closing by count and by time, its report (shifted column flagged, defaulted and stale shares), the gauges, and a
version without a profile left unmonitored."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import MonitoringSettings, Settings, WorkerSettings
from streamscore.streams.clock import now_ms
from streamscore.streams.records import Inbound
from streamscore.workers import drift as drift_module
from streamscore.workers.drift import Drift, drift_statistics, p_value, psi
from streamscore.workers.pipeline import BatchPipeline
from streamscore.workers.profile import bin_index, build_profile, column_profile
from streamscore.workers.runtime import load_model
from streamscore.workers.stages import Serving
from tests.contract.artifacts import expected, register_onnx

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id", "ttl_s": 3600,
     "features": [{"name": "count", "type": "int", "default": 0},
                  {"name": "spend", "type": "float", "default": -1.0}]},
]})
CARDS = [f"c{i}" for i in range(50)]
TRAIN = 20_000


def _binned(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    return np.bincount(bin_index(np.asarray(edges), values), minlength=len(edges) + 1)


def test_a_shifted_sample_has_a_large_psi_and_a_small_p_value():
    rng = np.random.default_rng(4)
    profile = column_profile(rng.normal(0.0, 1.0, TRAIN))
    same = _binned(rng.normal(0.0, 1.0, 5000), profile.edges)
    shifted = _binned(rng.normal(0.7, 1.0, 5000), profile.edges)
    assert psi(np.asarray(profile.shares), same) < 0.02
    assert p_value(np.asarray(profile.shares), same) > 0.05
    assert psi(np.asarray(profile.shares), shifted) > 0.3
    assert p_value(np.asarray(profile.shares), shifted) < 1e-10
    # all columns in one call give what one column alone gives
    psis, p_values = drift_statistics(np.vstack([profile.shares] * 2), np.vstack([same, shifted]))
    assert psis.tolist() == [psi(np.asarray(profile.shares), same), psi(np.asarray(profile.shares), shifted)]
    assert p_values[0] > 0.05 and p_values[1] < 1e-10
    # a column with fewer bins, padded to the others' width, gives what it gives alone
    flag_shares, flag_counts = np.array([0.9, 0.1]), np.array([700, 300])
    padded_psi, padded_p = drift_statistics(
        np.vstack([profile.shares, np.pad(flag_shares, (0, 8))]), np.vstack([shifted, np.pad(flag_counts, (0, 8))]),
        np.array([10, 2]))
    assert padded_psi[1] == pytest.approx(psi(flag_shares, flag_counts), rel=1e-12)
    assert padded_p[1] == pytest.approx(p_value(flag_shares, flag_counts), rel=1e-9)
    assert padded_psi[0] == pytest.approx(psis[1], rel=1e-12) and padded_p[0] == pytest.approx(p_values[1])


def test_an_empty_bin_on_either_side_keeps_the_statistics_finite():
    shares = np.array([0.5, 0.5, 0.0])
    assert np.isfinite(psi(shares, np.array([0, 10, 90])))
    assert p_value(shares, np.array([0, 10, 90])) < 1e-10  # values where training had none
    assert psi(shares, np.array([0, 0, 0])) == 0.0 and p_value(shares, np.array([0, 0, 0])) == 1.0
    assert psi(np.array([1.0, 0.0]), np.array([50, 0])) < 1e-6  # as in training: every value in one bin
    assert p_value(np.array([1.0, 0.0]), np.array([50, 0])) > 0.5
    assert p_value(np.array([1.0]), np.array([50])) == 1.0  # one bin: nothing to test
    constant = column_profile(np.full(100, 3.0))  # a constant in training: any other value shows
    assert constant.shares == (0.0, 1.0, 0.0)
    assert p_value(np.asarray(constant.shares), _binned(np.array([3.0] * 90 + [4.0] * 10), constant.edges)) < 1e-6


# --- the stage in a pipeline ---------------------------------------------------------------------------------

def _profile() -> dict[str, Any]:
    rng = np.random.default_rng(9)
    amount = rng.lognormal(1.0, 0.5, TRAIN)
    spend = rng.choice(np.arange(len(CARDS), dtype=float), TRAIN)
    hour = rng.integers(0, 24, TRAIN).astype(float)
    with np.errstate(over="ignore"):  # as the model scores them (float32; saturated where exp overflows)
        scores = expected(np.column_stack([amount, spend, hour]).astype(np.float32))["p"]
    return build_profile({"amount": amount, "card.spend": spend, "hour": hour}, {"p": scores},
                         data_sha256="cd" * 32, code_version="test",
                         defaulted={"card.spend": np.zeros(TRAIN, dtype=bool)}).model_dump()


class Fixture:
    def __init__(self, tmp_path: Any, profile: bool = True, shadow: bool = False, **monitoring: Any) -> None:
        register_onnx(tmp_path, "1", **({"profile": _profile()} if profile else {}))
        self.runtime = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(), "1")
        self.store = FeatureStore(Settings(online_store="memory", cache="none"), VIEWS)
        self.store.connect()
        self.registry = CollectorRegistry()
        self.pipeline = BatchPipeline(self.runtime, self.store, "p", worker_id="w")
        if shadow:  # v2, the same model, scores every request in the dark
            register_onnx(tmp_path, "2", profile=_profile())
            self.pipeline.serving = Serving(self.runtime, shadows=(load_model(tmp_path, "tiny", VIEWS,
                                                                              WorkerSettings(), "2"),))
        settings = MonitoringSettings(**{"window_requests": 400, **monitoring})
        self.pipeline.add(Drift("p.tiny.monitoring", settings, self.registry, "tiny", "w"),
                          after="shadow" if shadow else "infer")
        self.rng = np.random.default_rng(1)
        self.sequence = 0

    async def fill(self, stale: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        old = now_ms() - 2 * 3600 * 1000
        await self.store.put("card", [(card, {"count": 1, "spend": float(i)}, old if card in stale else None)
                                      for i, card in enumerate(CARDS)])

    def batch(self, n: int, shift: float = 1.0, unknown: float = 0.0) -> list[Inbound]:
        messages = []
        for _ in range(n):
            self.sequence += 1
            card = f"new-{self.sequence}" if self.rng.random() < unknown else CARDS[self.rng.integers(len(CARDS))]
            request = {"id": f"r{self.sequence}", "entities": {"card_id": card},
                       "features": {"amount": float(self.rng.lognormal(1.0, 0.5)) * shift,
                                    "hour": float(self.rng.integers(0, 24))}}
            messages.append(Inbound(msgpack.packb(request), card.encode(), "p.tiny.requests", 0, self.sequence))
        return messages

    def run(self, messages: list[Inbound]) -> list[dict[str, Any]]:
        outcome = asyncio.run(self.pipeline.process(messages))
        return [msgpack.unpackb(value) for topic, _, value, _ in outcome.extra if topic == "p.tiny.monitoring"]


def test_the_window_closes_by_count_and_flags_the_shifted_column(tmp_path):
    tiny = Fixture(tmp_path)
    asyncio.run(tiny.fill())
    assert tiny.pipeline.stage_names.index("drift") == tiny.pipeline.stage_names.index("infer") + 1
    assert tiny.run(tiny.batch(300)) == []  # 300 of 400
    [report] = tiny.run(tiny.batch(300))  # 600: closes at the batch that reaches the count
    assert report["model"] == "tiny" and report["version"] == "1" and report["worker_id"] == "w"
    assert report["requests"] == 600 and report["window_start_ms"] <= report["window_end_ms"]
    assert set(report["columns"]) == {"amount", "card.spend", "hour"} and set(report["outputs"]) == {"p"}
    assert report["drifted_columns"] == [] and report["defaulted_share"] == 0.0 and report["stale_share"] == 0.0
    assert sum(report["columns"]["amount"]["counts"]) == 600
    assert report["columns"]["amount"]["p_value"] > 0.01 and report["columns"]["amount"]["psi"] < 0.1

    assert tiny.run(tiny.batch(300, shift=3.0)) == []  # a new window opened: 300 of 400
    [shifted] = tiny.run(tiny.batch(300, shift=3.0))
    amount = shifted["columns"]["amount"]
    assert "amount" in shifted["drifted_columns"] and amount["drifted"] and amount["psi"] > 1.0
    assert amount["p_value"] < 1e-10 and amount["mean"] == pytest.approx(3 * amount["training_mean"], rel=0.15)
    assert not shifted["columns"]["hour"]["drifted"] and not shifted["columns"]["card.spend"]["drifted"]
    assert shifted["requests"] == 600

    gauge = tiny.registry.get_sample_value
    assert gauge("streamscore_drift_psi", {"model": "tiny", "version": "1", "column": "amount"}) == amount["psi"]
    assert gauge("streamscore_drift_flagged", {"model": "tiny", "version": "1", "column": "amount"}) == 1.0
    assert gauge("streamscore_drift_pvalue", {"model": "tiny", "version": "1", "column": "hour"}) > 0.01
    assert gauge("streamscore_drift_windows_total", {"model": "tiny", "version": "1"}) == 2.0


def test_small_batches_held_back_for_binning_count_as_one_large_batch(tmp_path):
    one_large, one_by_one = Fixture(tmp_path / "large"), Fixture(tmp_path / "small")
    for fixture in (one_large, one_by_one):
        asyncio.run(fixture.fill())
    [expected_report] = one_large.run(one_large.batch(400))
    reports = [report for _ in range(400) for report in one_by_one.run(one_by_one.batch(1))]
    assert len(reports) == 1 and reports[0]["requests"] == 400  # the same requests (the fixtures' seeds)
    for part in ("columns", "outputs"):
        for name, column in expected_report[part].items():
            assert reports[0][part][name]["counts"] == column["counts"] and sum(column["counts"]) == 400
            assert reports[0][part][name]["mean"] == pytest.approx(column["mean"])


def test_a_shadow_version_gets_windows_of_its_own(tmp_path):
    tiny = Fixture(tmp_path, shadow=True)
    asyncio.run(tiny.fill())
    reports = tiny.run(tiny.batch(500, shift=3.0))
    by_version = {(report["version"], report["shadow"]): report for report in reports}
    assert set(by_version) == {("1", False), ("2", True)}
    production, shadow = by_version["1", False], by_version["2", True]
    assert shadow["requests"] == production["requests"] == 500
    assert shadow["outputs"]["p"]["counts"] == production["outputs"]["p"]["counts"]  # the same model
    assert "amount" in shadow["drifted_columns"]


def test_defaulted_and_stale_shares(tmp_path):
    tiny = Fixture(tmp_path)
    asyncio.run(tiny.fill(stale=set(CARDS[:25])))
    [report] = tiny.run(tiny.batch(500, unknown=0.3))
    unknown = report["columns"]["card.spend"]["default_share"]
    assert 0.2 < unknown < 0.4 and report["defaulted_share"] == unknown
    assert report["columns"]["amount"]["default_share"] is None  # a request feature: not known
    assert report["columns"]["card.spend"]["training_default_share"] == 0.0
    assert 0.25 < report["stale_share"] < 0.45  # half the known cards' rows are older than the view's ttl
    assert tiny.registry.get_sample_value("streamscore_stale_share", {"model": "tiny", "version": "1"}) == \
        report["stale_share"]


def test_the_window_closes_by_time(tmp_path, monkeypatch):
    tiny = Fixture(tmp_path, window_requests=10_000, window_s=5.0)
    asyncio.run(tiny.fill())
    assert tiny.run(tiny.batch(50)) == []
    later = now_ms() + 6000
    monkeypatch.setattr(drift_module, "now_ms", lambda: later)
    [report] = tiny.run(tiny.batch(50))
    assert report["requests"] == 100


def test_a_version_without_a_profile_is_not_monitored(tmp_path, caplog):
    tiny = Fixture(tmp_path, profile=False, window_requests=10)
    asyncio.run(tiny.fill())
    with caplog.at_level(logging.WARNING, "streamscore.workers.drift"):
        assert tiny.run(tiny.batch(50)) == [] and tiny.run(tiny.batch(50)) == []
    assert [record.getMessage() for record in caplog.records] == [
        "tiny v1: drift monitoring off for this version: its manifest has no training profile (register it with "
        "one: streamscore.workers.profile.build_profile)"]
    predictions = asyncio.run(tiny.pipeline.process(tiny.batch(5))).predictions
    assert len(predictions) == 5


def test_manifest_params_are_checked_as_settings():
    from streamscore.workers.stages import StageError, StageSpec, build_stage

    stage = build_stage(StageSpec(stage="drift", after="infer", params={"topic": "x.m.monitoring",
                                                                        "window_requests": 50}), None, "m")
    assert isinstance(stage, Drift) and stage.settings.window_requests == 50 and stage.topic == "x.m.monitoring"
    with pytest.raises(StageError, match="window_requests"):
        build_stage(StageSpec(stage="drift", params={"topic": "t", "window_requests": 0}), None, "m")
