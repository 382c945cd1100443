"""The worker's Open Inference Protocol endpoint (docs/http.md), checked with a client made for the protocol
(tritonclient's InferenceServerClient) against a real worker and the real stack: the same scores as the Kafka
path, health, metadata, bad input, and overload."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from streamscore.streams.client import Client
from streamscore_examples.fraud.run import stop_process

from .conftest import MODEL, Deployment, _free_port, http_address, offline_scores_of, request

pytestmark = pytest.mark.usefixtures("worker")

FEATURES = ("amount", "hour", "is_foreign")


def _inputs(requests: list[dict[str, Any]], binary: bool = False) -> list[triton.InferInput]:
    """The requests as the protocol's input tensors: BYTES per join key, FP32 per request feature, shape [N]."""
    tensors = []
    for key in ("card_id", "merchant_id"):
        tensor = triton.InferInput(key, [len(requests)], "BYTES")
        tensor.set_data_from_numpy(np.array([r["entities"][key] for r in requests], dtype=object), binary_data=binary)
        tensors.append(tensor)
    for name in FEATURES:
        tensor = triton.InferInput(name, [len(requests)], "FP32")
        tensor.set_data_from_numpy(np.array([r["features"][name] for r in requests], dtype=np.float32),
                                   binary_data=binary)
        tensors.append(tensor)
    return tensors


async def _kafka_predictions(deployment: Deployment, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with Client(deployment.settings) as client:
        return list(await asyncio.gather(*(client.predict(MODEL, r, timeout=30) for r in requests)))


def test_tritonclient_infer_gives_the_kafka_paths_scores(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    cards = [card for card in deployment.rows["card_stats"] if card != "card-7"][:11]
    merchants = list(deployment.rows["merchant_stats"])
    requests = [request(f"h-{run}-{i}", cards[i], merchants[i % len(merchants)], 3.0 + 17.25 * i) for i in range(11)]
    requests.append(request(f"h-{run}-unknown", f"card-nobody-{run}", merchants[0], 99.5))
    client = triton.InferenceServerClient(http_address(deployment))

    result = client.infer(MODEL, _inputs(requests), request_id=f"call-{run}")
    binary = client.infer(MODEL, _inputs(requests, binary=True))
    kafka = asyncio.run(_kafka_predictions(deployment, requests))

    scores = result.as_numpy("fraud_probability")
    assert scores.dtype == np.float32 and scores.shape == (len(requests),)
    np.testing.assert_array_equal(scores, np.array([p["outputs"]["fraud_probability"] for p in kafka], np.float32))
    np.testing.assert_array_equal(binary.as_numpy("fraud_probability"), scores)
    assert [_text(d) for d in result.as_numpy("decision")] == [p["outputs"]["decision"] for p in kafka]
    assert [_text(d) for d in binary.as_numpy("decision")] == [p["outputs"]["decision"] for p in kafka]
    np.testing.assert_allclose(scores[:-1], offline_scores_of(deployment, requests[:-1]), atol=1e-5, rtol=0)
    response = result.get_response()
    assert response["id"] == f"call-{run}" and response["model_name"] == MODEL
    parameters = response["parameters"]
    assert json.loads(parameters["degraded"]) == [p["degraded"] for p in kafka]
    assert json.loads(parameters["degraded"])[-1] == [f"card_stats:missing:card-nobody-{run}"]
    lineage = json.loads(parameters["lineage"])
    assert {row["artifact_sha256"] for row in lineage} == {kafka[0]["lineage"]["artifact_sha256"]}
    assert [row["feature_ts_ms"] for row in lineage] == [p["lineage"]["feature_ts_ms"] for p in kafka]
    assert json.loads(parameters["versions"]) == [p["version"] for p in kafka]
    row_ids = json.loads(parameters["row_ids"])
    assert len(set(row_ids)) == len(requests) and all(row_id.startswith("http-") for row_id in row_ids)


def test_health_metadata_and_model_readiness(deployment: Deployment) -> None:
    client = triton.InferenceServerClient(http_address(deployment))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("no-such-model")
    version = client.get_model_metadata(MODEL)["versions"][0]
    assert client.is_model_ready(MODEL, version) and not client.is_model_ready(MODEL, "999")
    metadata = client.get_model_metadata(MODEL)
    inputs = {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}
    assert inputs == {"card_id": "BYTES", "merchant_id": "BYTES", "amount": "FP32", "hour": "FP32",
                      "is_foreign": "FP32"}
    outputs = {tensor["name"]: tensor["datatype"] for tensor in metadata["outputs"]}
    assert outputs["fraud_probability"] == "FP32" and outputs["decision"] == "BYTES"


async def _post(address: str, path: str, body: bytes | str, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as session, session.post(f"http://{address}{path}", data=body,
                                                                headers=headers) as response:
        return response.status, await response.json(content_type=None), response.headers


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _good_inputs(rows: int = 1) -> list[dict[str, Any]]:
    return [_tensor("card_id", "BYTES", [rows], ["card-1"] * rows),
            _tensor("merchant_id", "BYTES", [rows], ["merchant-1"] * rows),
            *(_tensor(name, "FP32", [rows, 1], [[1.0]] * rows) for name in FEATURES)]


def _with(inputs: list[dict[str, Any]], name: str, **change: Any) -> list[dict[str, Any]]:
    return [{**tensor, **change} if tensor["name"] == name else tensor for tensor in inputs]


@pytest.mark.parametrize(("case", "body", "status", "says"), [
    ("not JSON", "{inputs: nope", 400, "not JSON"),
    ("no inputs", {"id": "x"}, 400, "'inputs'"),
    ("unknown input", {"inputs": [*_good_inputs(), _tensor("amuont", "FP32", [1], [1.0])]}, 400,
     "unknown input 'amuont'"),
    ("missing input", {"inputs": _good_inputs()[1:]}, 400, "input 'card_id' is missing"),
    ("wrong datatype", {"inputs": _with(_good_inputs(), "amount", datatype="BYTES", data=["1"])}, 400,
     "'amount' has datatype BYTES"),
    ("shape and data disagree", {"inputs": _with(_good_inputs(), "hour", shape=[2])}, 400,
     "shape [2] holds 2 values, data has 1"),
    ("rows disagree", {"inputs": [*_good_inputs(2)[:4], _tensor("is_foreign", "FP32", [1], [0.0])]}, 400,
     "batch dimension"),
    ("a string as a number", {"inputs": _with(_good_inputs(), "amount", data=["12"])}, 400, "'12' is not a number"),
    ("wrong inner shape", {"inputs": _with(_good_inputs(), "amount", shape=[1, 3], data=[1.0, 2.0, 3.0])}, 400,
     "takes [N] or [N, 1]"),
    ("unknown output", {"inputs": _good_inputs(), "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ("bad deadline", {"inputs": _good_inputs(), "parameters": {"deadline_ms": "soon"}}, 400, "deadline_ms"),
])
def test_bad_requests_get_the_protocols_error_body(deployment: Deployment, case: str, body: Any, status: int,
                                                   says: str) -> None:
    payload = body if isinstance(body, str) else json.dumps(body)
    got, answer, _ = asyncio.run(_post(http_address(deployment), f"/v2/models/{MODEL}/infer", payload))
    assert (got, list(answer)) == (status, ["error"]), (case, answer)
    assert says in answer["error"], (case, answer)


def test_unknown_model_or_version_is_404_and_the_worker_goes_on(deployment: Deployment) -> None:
    address = http_address(deployment)
    body = json.dumps({"inputs": _good_inputs()})
    for path, says in (("/v2/models/nope/infer", "model 'nope' is not served"),
                       (f"/v2/models/{MODEL}/versions/999/infer", "version '999' is not served")):
        got, answer, _ = asyncio.run(_post(address, path, body))
        assert got == 404 and says in answer["error"]
    client = triton.InferenceServerClient(address)
    with pytest.raises(InferenceServerException, match="unknown input 'nope'"):
        client.infer(MODEL, [triton.InferInput("nope", [1], "FP32")
                             .set_data_from_numpy(np.ones(1, np.float32), binary_data=False)])
    got, answer, _ = asyncio.run(_post(address, f"/v2/models/{MODEL}/infer", json.dumps(
        {"inputs": _good_inputs(3), "parameters": {"deadline_ms": 1}})))
    assert got == 504 and answer["error"].startswith("expired")
    got, answer, _ = asyncio.run(_post(address, f"/v2/models/{MODEL}/infer", body))
    assert got == 200 and answer["outputs"][0]["shape"] == [1]


@pytest.fixture(scope="module")
def redis_down_worker(deployment: Deployment) -> Iterator[str]:
    """A second worker pointed at a Redis port where nothing listens, with a queue of 2 rows and a long batch
    window, so that it stays overloaded for a while (its own topic prefix: it shares nothing with the first)."""
    port = _free_port()
    env = {**os.environ, **deployment.env, "STREAMSCORE_TOPIC_PREFIX": deployment.env["STREAMSCORE_TOPIC_PREFIX"] + "h",
           "STREAMSCORE_REDIS__PORT": str(_free_port()), "STREAMSCORE_WORKER__WEB_PORT": str(_free_port()),
           "STREAMSCORE_HTTP__PORT": str(port), "STREAMSCORE_HTTP__MAX_WAITING_ROWS": "2",
           "STREAMSCORE_HTTP__BATCH_WINDOW_MS": "400"}
    log_path = deployment.log_path.with_name("worker-redis-down.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        asyncio.run(_until_connected(address, process))
    except BaseException:
        stop_process(process)
        pytest.fail(f"the second worker did not start:\n{log_path.read_text()[-3000:]}", pytrace=False)
    yield address
    stop_process(process)


async def _until_connected(address: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"worker exited with {process.returncode}"
            try:
                async with session.get(f"http://{address}/v2/health/ready") as response:
                    if (await response.json())["checks"]["worker"] == "ok":
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError("no answer after 90 s")


def test_ready_is_false_and_names_what_is_down(redis_down_worker: str) -> None:
    client = triton.InferenceServerClient(redis_down_worker)
    assert client.is_server_live() and not client.is_server_ready()

    async def ready() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{redis_down_worker}/v2/health/ready") as response:
            return response.status, await response.json()

    status, body = asyncio.run(ready())
    assert status == 400 and body["ready"] is False
    assert [line.split(":")[0] for line in body["not_ready"]] == ["redis"], body
    assert body["checks"]["kafka"] == "ok" and body["checks"]["cassandra"] == "ok"


def test_overload_is_503_with_retry_after_never_a_long_queue(deployment: Deployment, redis_down_worker: str
                                                             ) -> None:
    requests = [request(f"o-{i}", f"card-{i + 1}", "merchant-2", 10.0 + i) for i in range(12)]

    async def burst() -> list[tuple[int, dict[str, Any], Any]]:
        async with aiohttp.ClientSession() as session:
            async def one(r: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
                body = {"inputs": [_tensor(key, "BYTES", [1], [r["entities"][key]]) for key in r["entities"]]
                        + [_tensor(name, "FP32", [1], [r["features"][name]]) for name in FEATURES]}
                async with session.post(f"http://{redis_down_worker}/v2/models/{MODEL}/infer",
                                        json=body) as response:
                    return response.status, await response.json(), response.headers
            return list(await asyncio.gather(*(one(r) for r in requests)))

    answers = asyncio.run(burst())

    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    for (status, body, headers), sent in zip(answers, requests, strict=True):
        if status == 503:
            assert headers["Retry-After"] == "1" and "overloaded" in body["error"]
        else:
            score = body["outputs"][0]["data"][0]
            assert body["outputs"][0]["name"] == "fraud_probability"
            np.testing.assert_allclose(score, offline_scores_of(deployment, [sent])[0], atol=1e-5)


def _text(value: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: str from a JSON response, bytes from binary data."""
    return value.decode() if isinstance(value, bytes) else value


def test_http_rows_join_the_micro_batches_of_kafka_requests(deployment: Deployment) -> None:
    """While a stream of Kafka requests is scored, HTTP requests land in the very batches Kafka's requests are
    in (the same batch id in their lineage), and both get their own answers."""
    from .test_worker_e2e import _predictions_for

    run = uuid.uuid4().hex[:6]
    cards = [card for card in deployment.rows["card_stats"] if card != "card-7"]
    streamed = [request(f"j-{run}-{i}", cards[i % len(cards)], "merchant-2", 1.0 + i % 50) for i in range(3000)]
    body = {"inputs": [*_good_inputs(4)]}

    async def scenario() -> list[str]:
        batch_ids: list[str] = []
        async with Client(deployment.settings) as client, aiohttp.ClientSession() as session:
            producing = asyncio.create_task(client.produce_many(MODEL, streamed, rate=2000))

            async def one() -> None:
                async with session.post(f"http://{http_address(deployment)}/v2/models/{MODEL}/infer",
                                        json=body) as response:
                    answer = await response.json()
                    assert response.status == 200, answer
                    batch_ids.extend(row["batch_id"] for row in json.loads(answer["parameters"]["lineage"]))

            while not producing.done():
                await asyncio.gather(*(one() for _ in range(8)))
            await producing
        return batch_ids

    http_batches = set(asyncio.run(scenario()))
    predictions = _predictions_for(deployment, {r["id"] for r in streamed})

    assert {p["id"] for p in predictions} == {r["id"] for r in streamed}
    assert http_batches & {p["lineage"]["batch_id"] for p in predictions}
