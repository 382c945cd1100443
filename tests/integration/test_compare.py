"""`streamscore models compare` against the real Kafka: a few hundred synthetic shadow records (the workers'
format, msgpack, key = request id) in a fresh-prefix ``<prefix>.fraud.shadow`` topic of 3 partitions, the CLI run
as a subprocess; its table, PNG and JSON checked against numbers computed here from the same records."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.kafka import client_kwargs

MODEL = "fraud"
DECISIONS = ((0.3, "approve"), (0.7, "review"), (1.01, "decline"))


def _decision(score: float) -> str:
    return next(name for limit, name in DECISIONS if score < limit)


def _outputs(score: float) -> dict[str, Any]:
    return {"fraud_probability": score, "label": int(score >= 0.5), "decision": _decision(score),
            "scores": [1 - score, score]}


def synthetic() -> list[dict[str, Any]]:
    """200 requests answered by v1 and scored by v2 in shadow, 50 the other way, 60 answered by v1 with v3."""
    rng = np.random.default_rng(5)
    records = []
    for index, (answered, shadow) in enumerate([("1", "2")] * 200 + [("2", "1")] * 50 + [("1", "3")] * 60):
        first = float(rng.uniform(0, 1))
        second = float(np.clip(first + rng.normal(0, 0.08), 0, 1))
        records.append({"id": f"req-{index}", "model": MODEL, "version": shadow, "answered_version": answered,
                        "outputs": _outputs(second), "answered_outputs": _outputs(first),
                        "shadow_us": float(100 + index % 7), "batch_id": f"b{index // 32}",
                        "sent_ms": 1_700_000_000_000 + index})
    return records


def expected(records: list[dict[str, Any]]) -> dict[str, Any]:
    """v1 against v2, computed without the module under test."""
    v1, v2, us = [], [], []
    for record in records:
        if record["answered_version"] == "1" and record["version"] == "2":
            v1.append(record["answered_outputs"]), v2.append(record["outputs"])
        elif record["answered_version"] == "2" and record["version"] == "1":
            v1.append(record["outputs"]), v2.append(record["answered_outputs"])
        else:
            continue
        us.append(record["shadow_us"])
    x = np.array([o["fraud_probability"] for o in v1])
    y = np.array([o["fraud_probability"] for o in v2])
    absolute = np.abs(y - x)
    return {"count": len(x), "mean": absolute.mean(), "max": absolute.max(), "p50": np.quantile(absolute, 0.5),
            "p90": np.quantile(absolute, 0.9), "p99": np.quantile(absolute, 0.99), "corr": np.corrcoef(x, y)[0, 1],
            "label_agree": sum(a["label"] == b["label"] for a, b in zip(v1, v2, strict=True)),
            "label_10": sum(a["label"] == 1 and b["label"] == 0 for a, b in zip(v1, v2, strict=True)),
            "decision_agree": sum(a["decision"] == b["decision"] for a, b in zip(v1, v2, strict=True)),
            "shadow_us": float(np.mean(us))}


async def _admin(settings: Settings, action: Any) -> Any:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        return await action(admin)
    finally:
        await admin.close()


async def _produce(settings: Settings, records: list[dict[str, Any]]) -> None:
    topic = topics.shadow(settings.topic_prefix, MODEL)
    await _admin(settings, lambda admin: admin.create_topics([NewTopic(topic, 3, 1)]))
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
    await producer.start()
    try:
        for record in records:
            await producer.send(topic, msgpack.packb(record, use_bin_type=True), key=record["id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _delete(settings: Settings) -> None:
    topic = topics.shadow(settings.topic_prefix, MODEL)

    async def delete(admin: AIOKafkaAdminClient) -> None:
        if topic in await admin.list_topics():
            await admin.delete_topics([topic])

    await _admin(settings, delete)


@pytest.fixture
def settings(stack: Any) -> Iterator[Settings]:
    settings = Settings(topic_prefix=f"cmp{uuid.uuid4().hex[:8]}")
    yield settings
    asyncio.run(_delete(settings))


def cli(settings: Settings, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamscore", "models", "compare", *args], cwd=cwd,
                          env={**os.environ, "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix, **env},
                          capture_output=True, text=True, timeout=120)


def test_compare_table_png_and_json(settings: Settings, tmp_path: Path) -> None:
    records = synthetic()
    asyncio.run(_produce(settings, records))
    want = expected(records)
    done = cli(settings, tmp_path, MODEL, "1", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    topic = topics.shadow(settings.topic_prefix, MODEL)
    assert lines[0] == (f"fraud v1 against v2: 250 request(s) in {topic} (answered v1, shadow v2: 200, "
                        "answered v2, shadow v1: 50; 0 duplicate(s) dropped)")
    assert lines[1] == "numeric outputs (Δ = v2 - v1):"
    assert lines[2].split()[:2] == ["output", "count"]
    row = lines[3].split()
    assert row[:2] == ["fraud_probability", "250"]
    assert [float(cell) for cell in row[2:]] == pytest.approx(
        [want["mean"], want["max"], want["p50"], want["p90"], want["p99"], want["corr"]], abs=6e-5)
    assert any(line.split() == ["label", "250", f"{want['label_agree'] / 250:.4f}", str(250 - want["label_agree"])]
               for line in lines)
    assert any(line.split()[:2] == ["decision", "250"] for line in lines)
    assert "skipped scores: 250 pair(s), not a numeric scalar or a label (a list, or mixed types)" in lines
    assert f"mean shadow_us: {want['shadow_us']:.1f}" in done.stdout
    png, report = tmp_path / "compare-fraud-1-2.png", tmp_path / "compare-fraud-1-2.json"
    assert lines[-1] == "wrote compare-fraud-1-2.png and compare-fraud-1-2.json"  # --out: the current directory
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    assert (data["records"], data["scanned"], data["unreadable"], data["truncated"]) == (250, 310, 0, False)
    assert data["plotted"] == "fraud_probability"
    assert {(p["answered_version"], p["version"]): p["count"] for p in data["pairs"]} == \
        {("1", "2"): 200, ("2", "1"): 50, ("1", "3"): 60}
    fp = data["outputs"]["fraud_probability"]
    assert fp["count"] == want["count"] == 250
    assert fp["mean_abs_diff"] == pytest.approx(want["mean"], abs=1e-12)
    assert fp["max_abs_diff"] == pytest.approx(want["max"], abs=1e-12)
    assert fp["p50_abs_diff"] == pytest.approx(want["p50"], abs=1e-12)
    assert fp["p90_abs_diff"] == pytest.approx(want["p90"], abs=1e-12)
    assert fp["p99_abs_diff"] == pytest.approx(want["p99"], abs=1e-12)
    assert fp["correlation"] == pytest.approx(want["corr"], abs=1e-12)
    label = data["outputs"]["label"]
    assert label["agreement"] == pytest.approx(want["label_agree"] / 250)
    assert label["confusion"]["1"].get("0", 0) == want["label_10"]
    assert sum(n for row in label["confusion"].values() for n in row.values()) == 250
    assert data["outputs"]["decision"]["agreement"] == pytest.approx(want["decision_agree"] / 250)
    assert data["mean_shadow_us"] == pytest.approx(want["shadow_us"])

    limited = cli(settings, tmp_path, MODEL, "1", "2", "--max", "20", "--out", str(tmp_path / "small"))
    assert limited.returncode == 0, limited.stderr
    assert "20 request(s)" in limited.stdout and "stopped at --max 20" in limited.stdout
    assert json.loads((tmp_path / "small" / "compare-fraud-1-2.json").read_text())["records"] == 20

    missing = cli(settings, tmp_path, MODEL, "2", "4")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"Error: no shadow records of fraud v2 against v4 in {topic} (310 record(s) read); pairs present: "
        "answered v1, shadow v2: 200; answered v1, shadow v3: 60; answered v2, shadow v1: 50")


def test_compare_refusals(settings: Settings, tmp_path: Path) -> None:
    done = cli(settings, tmp_path, MODEL, "1", "2")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: no shadow records for fraud (no topic {topics.shadow(settings.topic_prefix, MODEL)}): deploy a "
        "shadow with `streamscore models shadow fraud V` first")
    down = cli(settings, tmp_path, MODEL, "1", "2", STREAMSCORE_KAFKA__BOOTSTRAP="127.0.0.1:1")
    assert down.returncode == 1
    assert len(down.stderr.strip().splitlines()) == 1
    assert down.stderr.startswith("Error: Kafka at 127.0.0.1:1 did not answer")
    assert not list(tmp_path.iterdir())
