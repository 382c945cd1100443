"""Batch scoring against the real stack: the same requests through a real worker on Kafka and over HTTP (the
Open Inference Protocol), ``score --engine local`` and ``score --engine spark`` on local Spark give the same
scores, decisions, degraded marks and feature timestamps; no row is lost; a bad requests file is refused in
one line."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer
from click.testing import CliRunner

from streamscore import cli
from streamscore.settings import get_settings
from streamscore.streams import topics
from streamscore.streams.client import Client
from streamscore.streams.kafka import client_kwargs
from streamscore.streams.wire import unpack
from streamscore.workers.batch import BatchInputError, run_local
from streamscore_examples.fraud.data import generate_transactions

from .conftest import MODEL, Deployment, http_address, offline_scores_of

pytestmark = pytest.mark.usefixtures("worker")

TOLERANCE = 1e-6


def _requests(deployment: Deployment, count: int) -> list[dict[str, Any]]:
    """Demo transactions against the deployment's rows (card-7 excluded: another test changes its row), a few
    for cards and merchants the store does not know (degraded), and one without ``is_foreign`` (its default)."""
    rows = {view: {entity: values for entity, values in entities.items() if entity != "card-7"}
            for view, entities in deployment.rows.items()}
    run = uuid.uuid4().hex[:6]
    transactions = generate_transactions(rows, count, seed=21, with_labels=False, unknown_rate=0.05)
    requests = [{"id": f"b-{run}-{i}", "entities": {"card_id": t["card_id"], "merchant_id": t["merchant_id"]},
                 "features": {"amount": t["amount"], "hour": t["hour"], "is_foreign": t["is_foreign"]}}
                for i, t in enumerate(transactions)]
    del requests[0]["features"]["is_foreign"]
    return requests


def _table(requests: list[dict[str, Any]], bad: bool = True) -> pa.Table:
    """The requests as a parquet table; with ``bad``, two more rows the pipeline must reject: a NaN amount and
    a null card id."""
    def column(key: str, name: str) -> list[Any]:
        return [request[key].get(name) for request in requests]

    data: dict[str, list[Any]] = {"id": [r["id"] for r in requests], "card_id": column("entities", "card_id"),
                                  "merchant_id": column("entities", "merchant_id"),
                                  "amount": column("features", "amount"), "hour": column("features", "hour"),
                                  "is_foreign": column("features", "is_foreign")}
    if bad:
        for name, values in {"id": ["bad-nan", "bad-card"], "card_id": ["card-1", None],
                             "merchant_id": ["merchant-1", "merchant-1"], "amount": [math.nan, 10.0],
                             "hour": [1.0, 1.0], "is_foreign": [0.0, 0.0]}.items():
            data[name].extend(values)
    return pa.table(data)


async def _through_kafka(deployment: Deployment, requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each request produced to the worker's request topic; its prediction from the predictions topic."""
    topic = topics.predictions(deployment.settings.topic_prefix, MODEL)
    consumer = AIOKafkaConsumer(topic, **client_kwargs(deployment.settings.kafka), auto_offset_reset="latest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        await consumer.seek_to_end()
        async with Client(deployment.settings) as client:
            await client.produce_many(MODEL, requests)
        wanted, answers = {request["id"] for request in requests}, {}
        deadline = time.monotonic() + 60
        while not wanted <= answers.keys() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    prediction = unpack(record.value)
                    if prediction["id"] in wanted:
                        answers[prediction["id"]] = prediction
    finally:
        await consumer.stop()
    assert wanted <= answers.keys(), f"{len(wanted - answers.keys())} requests not answered through Kafka"
    return answers


def _through_http(deployment: Deployment, requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The requests as Open Inference Protocol calls (docs/http.md) from a plain HTTP client: one BYTES tensor per
    join key, one FP32 tensor per request feature, up to 150 rows a call (the first request, which leaves
    ``is_foreign`` out, alone in its call, without that tensor)."""
    url = f"http://{http_address(deployment)}/v2/models/{MODEL}/infer"
    answers: dict[str, dict[str, Any]] = {}
    for group in (requests[:1], *(requests[start:start + 150] for start in range(1, len(requests), 150))):
        inputs = [{"name": key, "datatype": "BYTES", "shape": [len(group)],
                   "data": [request["entities"][key] for request in group]} for key in ("card_id", "merchant_id")]
        inputs += [{"name": name, "datatype": "FP32", "shape": [len(group)],
                    "data": [request["features"][name] for request in group]}
                   for name in ("amount", "hour", "is_foreign") if all(name in r["features"] for r in group)]
        call = urllib.request.Request(url, data=json.dumps({"id": group[0]["id"], "inputs": inputs}).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=30) as response:
            answer = json.loads(response.read())
        outputs = {output["name"]: output["data"] for output in answer["outputs"]}
        parameters = answer["parameters"]
        degraded, lineage = json.loads(parameters["degraded"]), json.loads(parameters["lineage"])
        versions = json.loads(parameters["versions"])
        for row, request in enumerate(group):
            answers[request["id"]] = {"status": "ok", "version": versions[row], "degraded": degraded[row],
                                      "lineage": lineage[row],
                                      "outputs": {name: values[row] for name, values in outputs.items()}}
    return answers


async def _published(deployment: Deployment, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The predictions of these request ids on the predictions topic, read from its beginning."""
    consumer = AIOKafkaConsumer(topics.predictions(deployment.settings.topic_prefix, MODEL),
                                **client_kwargs(deployment.settings.kafka), auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    found: dict[str, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + 30
        while not ids <= found.keys() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    prediction = unpack(record.value)
                    if prediction["id"] in ids:
                        found[prediction["id"]] = prediction
    finally:
        await consumer.stop()
    assert ids <= found.keys(), f"{len(ids - found.keys())} predictions not on the predictions topic"
    return found


def _by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


def test_kafka_http_local_and_spark_give_the_same_predictions(deployment: Deployment, tmp_path: Path) -> None:
    requests = _requests(deployment, 300)
    kafka = asyncio.run(_through_kafka(deployment, requests))
    http = _through_http(deployment, requests)
    version = next(iter(kafka.values()))["version"]
    source = tmp_path / "requests.parquet"
    pq.write_table(_table(requests), source)

    local_summary = run_local(deployment.settings, MODEL, source, tmp_path / "local.parquet", version)
    from streamscore.workers.spark_job import run_spark

    spark_summary = run_spark(deployment.settings, MODEL, str(source), str(tmp_path / "spark.parquet"), version,
                              master="local[2]")
    for summary in (local_summary, spark_summary):
        assert (summary.rows, summary.output_rows, summary.lost) == (302, 302, 0), summary
        assert (summary.ok, summary.rejected) == (300, 2), summary
        assert summary.degraded == sum(1 for p in kafka.values() if p["degraded"]), summary

    local, spark = _by_id(tmp_path / "local.parquet"), _by_id(tmp_path / "spark.parquet")
    assert [row["id"] for row in pq.read_table(tmp_path / "local.parquet").to_pylist()] == \
        [r["id"] for r in requests] + ["bad-nan", "bad-card"]  # the local engine keeps the input's order
    ids = [request["id"] for request in requests]
    kafka_scores = np.array([kafka[i]["outputs"]["fraud_probability"] for i in ids])
    http_scores = np.array([http[i]["outputs"]["fraud_probability"] for i in ids])
    assert np.abs(http_scores - kafka_scores).max() <= TOLERANCE
    for request_id in ids:
        answer, prediction = http[request_id], kafka[request_id]
        assert (answer["version"], answer["degraded"]) == (prediction["version"], prediction["degraded"])
        assert answer["outputs"]["decision"] == prediction["outputs"]["decision"]
        assert answer["lineage"]["feature_ts_ms"] == prediction["lineage"]["feature_ts_ms"]
    for engine, rows in (("local", local), ("spark", spark)):
        scores = np.array([rows[i]["fraud_probability"] for i in ids])
        assert np.abs(scores - kafka_scores).max() <= TOLERANCE, engine
        for request_id in ids:
            row, prediction = rows[request_id], kafka[request_id]
            assert row["status"] == prediction["status"] == "ok"
            assert row["decision"] == prediction["outputs"]["decision"]
            assert row["degraded"] == prediction["degraded"], (engine, request_id)
            assert (row["version"], row["artifact_sha256"]) == (version, prediction["lineage"]["artifact_sha256"])
            for view, stamp in prediction["lineage"]["feature_ts_ms"].items():
                assert row[f"feature_ts_ms_{view}"] == stamp, (engine, request_id, view)
        assert (rows["bad-nan"]["status"], rows["bad-nan"]["error_kind"]) == ("rejected", "bad_feature")
        assert (rows["bad-card"]["status"], rows["bad-card"]["error_kind"]) == ("rejected", "missing_entity")
    assert np.abs(offline_scores_of(deployment, requests) - kafka_scores).max() <= 1e-5
    assert any(kafka[i]["degraded"] for i in ids) and not all(kafka[i]["degraded"] for i in ids)


def test_score_command_writes_the_summary_and_refuses_bad_files_in_one_line(deployment: Deployment,
                                                                            tmp_path: Path) -> None:
    requests = _requests(deployment, 20)
    good, missing, wrong = tmp_path / "good.parquet", tmp_path / "missing.parquet", tmp_path / "wrong.parquet"
    table = _table(requests, bad=False)
    pq.write_table(table, good)
    pq.write_table(table.drop_columns(["amount"]), missing)
    pq.write_table(table.set_column(table.schema.get_field_index("hour"), "hour",
                                    pa.array(["13"] * table.num_rows)), wrong)
    env = {**os.environ, **deployment.env}
    command = [sys.executable, "-m", "streamscore", "score", "--model", MODEL, "--output",
               str(tmp_path / "out.parquet")]
    done = subprocess.run([*command, "--input", str(good), "--to-topic"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["rows"], summary["answered"], summary["lost"]) == (20, 20, 0)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    published = asyncio.run(_published(deployment, {request["id"] for request in requests}))
    for row in pq.read_table(tmp_path / "out.parquet").to_pylist():  # --to-topic: the same predictions on Kafka
        prediction = published[row["id"]]
        assert prediction["outputs"]["fraud_probability"] == pytest.approx(row["fraud_probability"], abs=TOLERANCE)
        assert prediction["lineage"]["batch_id"] == row["batch_id"] and row["batch_id"].startswith("batch:")
    get_settings.cache_clear()  # the command reads the settings once per process: here, the deployment's
    try:
        refused = CliRunner().invoke(cli.main, [*command[3:], "--input", str(missing)], env=deployment.env)
    finally:
        get_settings.cache_clear()
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        f"Error: {missing}: column 'amount' is missing (the model's requests have columns: id, card_id, "
        "merchant_id, amount, hour (optional), is_foreign (optional); optional: deadline_ms, version)"]
    with pytest.raises(BatchInputError, match=r"column 'hour' is string, not a number") as raised:
        run_local(deployment.settings, MODEL, wrong, tmp_path / "never.parquet")
    assert "\n" not in str(raised.value)
