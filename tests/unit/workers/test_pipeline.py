"""The pipeline as a list of stages, without servers: the built-in order, stages of one's own placed by name
and timed, a stage's rejection as a dead letter, expiry, a model failure, and the example decision stage."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamscore import fastpath
from streamscore.streams.records import Inbound
from streamscore.workers.pipeline import BatchPipeline
from streamscore.workers.stages import (
    STAGES,
    ScoringBatch,
    StageError,
    StageSpec,
    ThresholdDecision,
    build_stage,
    place,
    register_stage,
)

SPEC = fastpath.DecodeSpec((), (fastpath.RequestFeature("amount"),))


@dataclass
class TinyRuntime:
    """Scores the request feature ``amount`` as itself (or fails when told to)."""

    name: str = "tiny"
    version: str = "1"
    views: list[Any] = field(default_factory=list)
    decode_spec: fastpath.DecodeSpec = SPEC
    columns: list[fastpath.InputColumn] = field(default_factory=lambda: [fastpath.InputColumn(True, 0, 0)])
    manifest: Any = field(default_factory=lambda: SimpleNamespace(sha256="ab" * 32, stages=()))
    provider: str = "CPUExecutionProvider"
    fail: bool = False

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        if self.fail:
            raise RuntimeError("the model is broken")
        return {"score": inputs[:, 0].astype(np.float32)}


class NoViews:
    async def fetch(self, view_names: list[str], entity_columns: list[list[str]]) -> list[Any]:
        assert view_names == [] and entity_columns == []
        return []


def message(request_id: str, amount: float, **extra: Any) -> Inbound:
    return Inbound(msgpack.packb({"id": request_id, "features": {"amount": amount}, **extra}), b"k", "t", 0, 7)


def pipeline(runtime: TinyRuntime | None = None) -> BatchPipeline:
    return BatchPipeline(runtime or TinyRuntime(), NoViews(), "p", worker_id="w")  # type: ignore[arg-type]


def predictions(outcome: Any) -> list[dict[str, Any]]:
    return [msgpack.unpackb(value) for _, _, value, _ in outcome.predictions]


def test_the_built_in_stages_run_in_order_and_each_is_timed() -> None:
    scoring = pipeline()
    outcome = asyncio.run(scoring.process([message("a", 0.25), message("b", 0.75)]))

    assert scoring.stage_names == ["decode", "screen", "route", "features", "assemble", "infer", "shadow",
                                   "encode"]
    assert list(outcome.timings_us) == scoring.stage_names
    assert [(p["id"], p["status"], p["outputs"]["score"]) for p in predictions(outcome)] == [
        ("a", "ok", 0.25), ("b", "ok", 0.75)]
    assert predictions(outcome)[0]["lineage"]["batch_id"] == "w/1"


class Doubler:
    """A stage of one's own after infer: rewrites an output."""

    name = "double"

    async def __call__(self, batch: ScoringBatch) -> None:
        batch.outputs["score"] = batch.outputs["score"] * 2


class RejectNegative:
    """A stage of one's own before features: refuses rows by a business rule."""

    name = "no-negatives"

    async def __call__(self, batch: ScoringBatch) -> None:
        assert batch.decoded is not None
        rows = [row for row in batch.live.tolist() if batch.decoded.features[row, 0] < 0]
        batch.reject(rows, "refused_by_rule", "amount must not be negative")


def test_stages_of_ones_own_are_placed_by_name_timed_and_seen_in_the_outputs() -> None:
    scoring = pipeline()
    scoring.add(Doubler(), after="infer")
    scoring.add(RejectNegative(), before="features")
    batch = [message("a", 0.25), message("neg", -1.0), Inbound(msgpack.packb([
        {"id": "e0", "features": {"amount": 1.0}}, {"id": "e1", "features": {"amount": -2.0}}]), b"k", "t", 0, 8)]
    outcome = asyncio.run(scoring.process(batch))

    assert scoring.stage_names == ["decode", "screen", "route", "no-negatives", "features", "assemble", "infer",
                                   "double", "shadow", "encode"]
    assert set(outcome.timings_us) == set(scoring.stage_names)
    assert {p["id"]: p["outputs"]["score"] for p in predictions(outcome)} == {"a": 0.5, "e0": 2.0}
    letters = {dict(letter.headers)["streamscore-request-id"]: dict(letter.headers) for letter in outcome.dead_letters}
    assert set(letters) == {b"neg", b"e1"}
    assert letters[b"neg"]["streamscore-element"] == b"-1"
    assert letters[b"e1"]["streamscore-element"] == b"1"
    assert letters[b"e1"]["streamscore-error-kind"] == b"refused_by_rule"
    element_letter = next(letter for letter in outcome.dead_letters
                          if dict(letter.headers)["streamscore-request-id"] == b"e1")
    assert msgpack.unpackb(element_letter.value) == {"id": "e1", "features": {"amount": -2.0}}


def test_placing_a_stage_refuses_unknown_anchors_and_duplicate_names() -> None:
    stages = pipeline().stages
    with pytest.raises(StageError, match="no stage named 'nope'"):
        place(stages, Doubler(), after="nope")
    with pytest.raises(StageError, match="already in the pipeline"):
        place(place(stages, Doubler()), Doubler())
    with pytest.raises(StageError, match="not both"):
        place(stages, Doubler(), before="infer", after="infer")
    assert [stage.name for stage in place(stages, Doubler())][-1] == "double"


def test_expired_and_failed_rows_are_answered_with_their_status() -> None:
    outcome = asyncio.run(pipeline().process([message("old", 1.0, deadline_ms=0), message("new", 1.0)]))
    assert {p["id"]: p["status"] for p in predictions(outcome)} == {"old": "expired", "new": "ok"}
    assert outcome.expired == 1 and outcome.errored == 0

    failing = asyncio.run(pipeline(TinyRuntime(fail=True)).process([message("x", 1.0)]))
    (prediction,) = predictions(failing)
    assert prediction["status"] == "error" and prediction["error"]["kind"] == "inference_failed"
    assert failing.errored == 1 and prediction["outputs"] == {}


def test_the_threshold_decision_labels_scores_and_counts_them() -> None:
    registry = CollectorRegistry()
    spec = StageSpec(stage="threshold_decision", after="infer",
                     params={"score": "score", "thresholds": [0.3, 0.7], "labels": ["approve", "review", "decline"]})
    scoring = pipeline()
    scoring.add(build_stage(spec, registry, "tiny"), spec.before, spec.after)
    amounts = [0.1, 0.3, 0.5, 0.7, 0.95]
    outcome = asyncio.run(scoring.process([message(f"r{i}", amount) for i, amount in enumerate(amounts)]))

    decisions = [p["outputs"]["decision"] for p in predictions(outcome)]
    assert decisions == ["approve", "review", "review", "decline", "decline"]
    counted = {labels["decision"]: value for labels, value in
               ((sample.labels, sample.value) for metric in registry.collect() for sample in metric.samples
                if sample.name == "streamscore_decisions_total")}
    assert counted == {"approve": 1.0, "review": 2.0, "decline": 2.0}


def test_a_manifest_stage_that_is_not_registered_or_misconfigured_says_what_to_do() -> None:
    with pytest.raises(StageError, match=r"not registered; known: .*threshold_decision"):
        build_stage(StageSpec(stage="nope"), None, "m")
    with pytest.raises(StageError, match="one label more than thresholds"):
        build_stage(StageSpec(stage="threshold_decision",
                              params={"score": "s", "thresholds": [0.5], "labels": ["a"]}), None, "m")


def test_registered_stages_can_be_named_by_manifests() -> None:
    @register_stage("test_constant")
    class Constant:
        name = "constant"

        def __init__(self, value: float, registry: Any = None, model: str = "") -> None:
            self.value = value

        async def __call__(self, batch: ScoringBatch) -> None:
            batch.outputs["constant"] = np.full(len(batch.status), self.value)

    try:
        scoring = pipeline()
        scoring.add(build_stage(StageSpec(stage="test_constant", params={"value": 4.0}), None, "tiny"),
                    after="infer")
        (prediction,) = predictions(asyncio.run(scoring.process([message("a", 1.0)])))
        assert prediction["outputs"]["constant"] == 4.0
    finally:
        STAGES.pop("test_constant")


def test_decision_stage_refuses_unsorted_thresholds() -> None:
    with pytest.raises(ValueError, match="ascending"):
        ThresholdDecision("s", [0.7, 0.3], ["a", "b", "c"])


def test_a_canary_takes_its_weight_by_a_stable_hash_of_the_primary_key_and_pins_are_honoured() -> None:
    from streamscore.workers.stages import Serving, canary_share

    spec = fastpath.DecodeSpec(("card_id",), (fastpath.RequestFeature("amount"),))
    production = TinyRuntime(version="1", decode_spec=spec)
    canary = TinyRuntime(version="2", decode_spec=spec, manifest=SimpleNamespace(sha256="cd" * 32, stages=()))

    class Views:
        async def fetch(self, view_names: list[str], entity_columns: list[list[str]]) -> list[Any]:
            return []

    scoring = BatchPipeline(production, Views(), "p", worker_id="w")  # type: ignore[arg-type]
    scoring.serving = Serving(production, canary, 0.3)
    cards = [f"card-{i}" for i in range(20_000)]
    batch = [Inbound(msgpack.packb({"id": f"r{i}", "entities": {"card_id": card}, "features": {"amount": 1.0}}))
             for i, card in enumerate(cards)]
    batch.append(Inbound(msgpack.packb({"id": "pinned", "entities": {"card_id": "card-0"},
                                        "features": {"amount": 1.0}, "version": "2"})))
    batch.append(Inbound(msgpack.packb({"id": "retired", "entities": {"card_id": "card-0"},
                                        "features": {"amount": 1.0}, "version": "0"})))
    outcome = asyncio.run(scoring.process(batch))

    by_id = {p["id"]: p for p in predictions(outcome)}
    on_canary = canary_share(cards, 0.3)
    assert abs(on_canary.mean() - 0.3) < 0.01  # the weight, within 1%
    assert [by_id[f"r{i}"]["version"] for i in range(len(cards))] == ["2" if c else "1" for c in on_canary]
    assert {by_id["r0"]["lineage"]["artifact_sha256"], by_id["r1"]["lineage"]["artifact_sha256"]} <= {
        "ab" * 32, "cd" * 32}
    assert by_id["pinned"]["version"] == "2"
    assert dict(outcome.dead_letters[0].headers)["streamscore-error-kind"] == b"unknown_version"
    assert outcome.by_version == {"1": int((~on_canary).sum()), "2": int(on_canary.sum()) + 1}
    again = asyncio.run(scoring.process(batch[:100]))  # the same card always meets the same version
    assert {p["id"]: p["version"] for p in predictions(again)} == {f"r{i}": by_id[f"r{i}"]["version"]
                                                                   for i in range(100)}


@dataclass
class HalfRuntime(TinyRuntime):
    """A shadow candidate: scores amount / 2."""

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"score": (inputs[:, 0] / 2).astype(np.float32)}


def test_a_shadow_scores_the_same_rows_in_the_dark_and_is_compared_live() -> None:
    from streamscore.workers.stages import Serving

    registry = CollectorRegistry()
    production = TinyRuntime(version="1")
    shadow = HalfRuntime(version="2", manifest=SimpleNamespace(sha256="ef" * 32, stages=()))
    scoring = BatchPipeline(production, NoViews(), "p", worker_id="w", registry=registry)  # type: ignore[arg-type]
    scoring.serving = Serving(production, shadows=(shadow,))
    outcome = asyncio.run(scoring.process([message("a", 0.5), message("b", 0.25), message("old", 1.0, deadline_ms=1)]))

    assert {p["id"]: (p["version"], p["outputs"].get("score")) for p in predictions(outcome)} == {
        "a": ("1", 0.5), "b": ("1", 0.25), "old": ("1", None)}
    records = {key: msgpack.unpackb(value) for topic, key, value, _ in outcome.extra}
    assert {topic for topic, *_ in outcome.extra} == {"p.tiny.shadow"}
    assert set(records) == {b"a", b"b"}  # only what was scored: the expired request has no shadow record
    assert records[b"a"]["version"] == "2" and records[b"a"]["answered_version"] == "1"
    assert records[b"a"]["outputs"] == {"score": 0.25} and records[b"a"]["answered_outputs"] == {"score": 0.5}
    samples = {(sample.name, sample.labels.get("le")): sample.value for metric in registry.collect()
               for sample in metric.samples}
    assert samples[("streamscore_shadow_abs_diff_count", None)] == 2
    assert samples[("streamscore_shadow_abs_diff_sum", None)] == pytest.approx(0.25 + 0.125)
    assert samples[("streamscore_shadow_requests_total", None)] == 2


def test_metrics_split_predictions_latency_and_errors_by_version() -> None:
    from streamscore.workers.metrics import WorkerMetrics
    from streamscore.workers.stages import Serving

    spec = fastpath.DecodeSpec(("card_id",), (fastpath.RequestFeature("amount"),))
    production = TinyRuntime(version="1", decode_spec=spec)
    broken = TinyRuntime(version="2", decode_spec=spec, fail=True, manifest=SimpleNamespace(sha256="cd" * 32,
                                                                                           stages=()))

    class Views:
        async def fetch(self, view_names: list[str], entity_columns: list[list[str]]) -> list[Any]:
            return []

    scoring = BatchPipeline(production, Views(), "p", worker_id="w")  # type: ignore[arg-type]
    scoring.serving = Serving(production, broken, 0.5)
    batch = [Inbound(msgpack.packb({"id": f"r{i}", "entities": {"card_id": f"card-{i}"}, "features": {"amount": 1.0}}))
             for i in range(400)]
    outcome = asyncio.run(scoring.process(batch))
    versions = {p["id"]: (p["version"], p["status"]) for p in predictions(outcome)}
    on_canary = sum(version == "2" for version, _ in versions.values())
    assert 150 < on_canary < 250 and all(status == ("error" if version == "2" else "ok")
                                         for version, status in versions.values())
    assert outcome.status_by_version == {"1": {"ok": 400 - on_canary}, "2": {"error": on_canary}}
    assert set(outcome.runtime_s_by_version) == {"1"} and outcome.inference_failures_by_version == {"2": 1}

    metrics = WorkerMetrics()
    metrics.observe_batch("m", len(batch), outcome)
    text = metrics.render().decode()
    assert f'streamscore_version_predictions_total{{model="m",status="ok",version="1"}} {400 - on_canary}.0' in text
    assert f'streamscore_version_predictions_total{{model="m",status="error",version="2"}} {on_canary}.0' in text
    assert 'streamscore_version_inference_failures_total{model="m",version="2"} 1.0' in text
    assert 'streamscore_version_inference_seconds_count{model="m",version="1"} 1.0' in text
    assert 'streamscore_version_batch_seconds_count{model="m",version="2"} 1.0' in text


def test_model_info_keeps_one_series_per_model() -> None:
    from streamscore.workers.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.serve_model("a", "1", "aa", "CPUExecutionProvider")
    metrics.serve_model("b", "3", "bb", "CPUExecutionProvider")
    metrics.serve_model("a", "2", "cc", "CPUExecutionProvider")
    lines = [line for line in metrics.render().decode().splitlines() if line.startswith("streamscore_model_info{")]
    assert len(lines) == 2
    assert any('model="a"' in line and 'version="2"' in line for line in lines)
    assert any('model="b"' in line and 'version="3"' in line for line in lines)
