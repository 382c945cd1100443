"""The prediction log against a real worker, Kafka and Cassandra: the sampled share and the debug flag decide what
is logged; ``explain`` prints a logged prediction's columns and sources; ``replay`` scores the logged vector again
with the artifact of its lineage and finds the same score, and refuses a tampered or missing artifact."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from streamscore.featurestore.cassandra import connect
from streamscore.featurestore.views import load_views
from streamscore.streams.client import Client
from streamscore.workers import predlog

from .conftest import MODEL, Deployment, request

pytestmark = pytest.mark.usefixtures("worker")


def _cli(deployment: Deployment, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamscore", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **deployment.env, **(env or {})})


def _wait_logged(deployment: Deployment, request_id: str, timeout: float = 20.0) -> predlog.LoggedPrediction:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predlog.read_logged(deployment.settings, request_id, MODEL)
        if found:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"{request_id} was not logged within {timeout} s")


async def _predict(deployment: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    async with Client(deployment.settings) as client:
        return await client.predict(MODEL, body, timeout=20)


def test_the_sampled_share_and_every_debug_request_are_logged(deployment: Deployment) -> None:
    share = deployment.settings.prediction_log.share
    run = uuid.uuid4().hex[:6]
    ids, sampled = [], set()
    while len(sampled) < 3 or len(ids) < 300:
        request_id = f"s-{run}-{len(ids)}"
        ids.append(request_id)
        if predlog.fnv1a(request_id) < share * 2**32:
            sampled.add(request_id)
    marker = f"s-{run}-debug"
    batch = [request(request_id, "card-2", "merchant-3") for request_id in ids]
    batch.append(request(marker, "card-2", "merchant-3", debug=True))

    async def send() -> None:
        async with Client(deployment.settings) as client:
            await client.produce(MODEL, batch)

    asyncio.run(send())
    _wait_logged(deployment, marker)  # one message, one batch: the rest of it was offered with it
    cluster, session = connect(deployment.settings.cassandra)
    try:
        select = session.prepare(f"SELECT id, debug FROM {predlog.table_of(deployment.settings)} WHERE id IN ?")
        rows = session.execute(select, ([*ids, marker],))
        logged = {row[0]: row[1] for row in rows}
    finally:
        cluster.shutdown()
    assert logged == {**dict.fromkeys(sampled, False), marker: True}


def test_explain_and_replay_a_logged_prediction(deployment: Deployment, tmp_path: Path) -> None:
    request_id = f"explain-{uuid.uuid4().hex[:6]}"
    prediction = asyncio.run(_predict(deployment, request(request_id, "card-1", "merchant-nowhere", 77.5,
                                                          debug=True)))
    logged = _wait_logged(deployment, request_id)
    assert logged.outputs["fraud_probability"] == prediction["outputs"]["fraud_probability"]
    assert logged.outputs["decision"] == prediction["outputs"]["decision"]
    assert logged.lineage["batch_id"] == prediction["lineage"]["batch_id"]
    assert logged.input_values[logged.input_names.index("amount")] == 77.5

    explained = _cli(deployment, "explain", request_id)
    assert explained.returncode == 0, explained.stderr
    lines = explained.stdout.splitlines()
    amount = next(line for line in lines if line.strip().startswith("amount "))
    assert "77.5" in amount and amount.rstrip().endswith("request")
    card = next(line for line in lines if "card_stats.chargebacks_90d" in line)
    stamp = logged.feature_ts["card_stats"]
    assert stamp > 0 and "view card_stats, row event time" in card and str(stamp) in card
    assert "default of view merchant_stats" in next(line for line in lines if "merchant_stats.risk_category" in line)
    assert f"v{logged.version}" in lines[0] and "artifact_sha256=" + logged.lineage["artifact_sha256"] in lines[-1]

    replayed = _cli(deployment, "replay", request_id)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "same outputs (within 1e-06)" in replayed.stdout
    assert "fraud_probability: logged" in replayed.stdout

    library = tmp_path / "models"
    shutil.copytree(deployment.settings.models_dir, library)
    copied = deployment.settings.model_copy(update={"models_dir": library})
    views = load_views(deployment.settings.views_file)
    results = predlog.replay(copied, logged, views)
    assert {r.output for r in results} == {"fraud_probability", "label"} and all(r.same for r in results)
    assert next(r for r in results if r.output == "fraud_probability").difference <= 1e-6

    artifact = library / MODEL / logged.version / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\x00")
    with pytest.raises(predlog.LogError, match="sha256"):
        predlog.replay(copied, logged, views)
    tampered = _cli(deployment, "replay", request_id, env={"STREAMSCORE_MODELS_DIR": str(library)})
    assert tampered.returncode != 0 and "sha256" in tampered.stderr
    shutil.rmtree(library / MODEL / logged.version)
    with pytest.raises(predlog.LogError, match="artifact is gone"):
        predlog.replay(copied, logged, views)


def test_an_id_that_was_not_logged_says_why(deployment: Deployment) -> None:
    assert predlog.read_logged(deployment.settings, "never-sent-" + uuid.uuid4().hex) == []
    message = predlog.not_logged_message(deployment.settings, "never-sent", None)
    assert "share of 0.01" in message and '"debug": true' in message
