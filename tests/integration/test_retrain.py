"""Retraining against real Kafka and Cassandra: labels on the labels topic joined with the prediction log train a
new version, registered with its parent, profile and training data sha256, and put in shadow; too few labelled
rows is refused with the counts."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import ensure_topics
from streamscore.streams.kafka import client_kwargs
from streamscore.workers.deployments import read_deployment
from streamscore.workers.library import read_manifest
from streamscore.workers.predlog import LogWriter, column_names
from streamscore.workers.retrain import RetrainError, retrain
from streamscore_examples.fraud.data import write_views
from streamscore_examples.fraud.model import build_and_register, holdout_set

pytestmark = pytest.mark.usefixtures("stack")
MODEL = "fraud"
LOGGED = 240


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(topic_prefix=f"rt{run}", models_dir=tmp_path / "models", views_file=tmp_path / "views.json",
                    cassandra={"keyspace": f"retrain_{run}"}, **overrides)


def _log(settings: Settings, inputs: np.ndarray, ids: list[str]) -> None:
    manifest = read_manifest(settings.models_dir / MODEL / "1")
    names = column_names(manifest)
    sources = [["request" if "." not in name else f"view:{name.split('.')[0]}" for name in names],
               # every other row: the merchant was unknown, its columns the view's defaults
               ["default:merchant_stats" if name.startswith("merchant_stats.") else "request" for name in names]]
    writer = LogWriter(settings)
    writer.offer(MODEL, [(request_id, MODEL, "1", 1, 1, False, {}, names, row.tolist(), sources[index % 2], {},
                          "{}", {"artifact_sha256": manifest.sha256})
                         for index, (request_id, row) in enumerate(zip(ids, inputs, strict=True))])
    writer.close(timeout_s=30)
    assert writer.written == len(ids)


async def _labels(settings: Settings, labels: list[tuple[str, object]]) -> None:
    topic = topics.labels(settings.topic_prefix, MODEL)
    await ensure_topics(settings, [topic], partitions=2)
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka))
    await producer.start()
    try:
        for request_id, label in labels:
            await producer.send(topic, msgpack.packb({"id": request_id, "label": label, "event_ms": 1}),
                                key=request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


def test_retrain_registers_a_version_from_the_log_and_its_labels_and_shadows_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    write_views(settings.views_file)
    build_and_register(settings.models_dir, seed=5, n_train=2000, max_iter=40)
    inputs, targets = holdout_set(5, LOGGED)
    ids = [f"r-{i}" for i in range(LOGGED)]
    _log(settings, inputs, ids)
    asyncio.run(_labels(settings, [*zip(ids, targets.tolist(), strict=True), ("never-logged", 1), ("r-0", 2)]))

    lines: list[str] = []
    version = retrain(settings, MODEL, progress=lines.append)

    assert version == "2"
    manifest = read_manifest(settings.models_dir / MODEL / "2")
    assert (manifest.parent, manifest.made_by.method) == ("1", "retrain")
    params = manifest.made_by.params
    assert (params["rows_from_log"], params["rows_original"]) == (LOGGED, 0)
    profile = manifest.profile
    assert profile is not None and profile.rows == LOGGED
    assert profile.data_sha256 == params["training_data_sha256"]
    assert abs(profile.columns["amount"].mean - float(inputs[:, 0].mean())) < 1e-3
    assert profile.columns["merchant_stats.risk_category"].default_share == 0.5
    assert profile.columns["card_stats.txn_count_24h"].default_share == 0.0
    state = asyncio.run(read_deployment(settings, MODEL))
    assert state is not None and (state.production, state.shadow) == ("1", ("2",))
    assert any(f"{LOGGED} of them in the prediction log" in line for line in lines)
    assert any("1 unreadable" in line for line in lines), lines
    json.dumps(params)  # JSON values only

    again = retrain(settings, MODEL, with_training_data=True, deploy=None)
    assert again == "3" and read_manifest(settings.models_dir / MODEL / "3").made_by.params["rows_original"] == 2000


def test_too_few_labelled_rows_is_refused_with_the_counts(tmp_path: Path) -> None:
    settings = _settings(tmp_path, retrain={"min_rows": 50})
    write_views(settings.views_file)
    build_and_register(settings.models_dir, seed=5, n_train=1000, max_iter=5)
    inputs, _ = holdout_set(5, 10)
    _log(settings, inputs, [f"f-{i}" for i in range(10)])
    asyncio.run(_labels(settings, [(f"f-{i}", i % 2) for i in range(30)]))

    with pytest.raises(RetrainError, match=r"10 in the prediction log \(of 30 labelled ids\), 50 needed"):
        retrain(settings, MODEL)
