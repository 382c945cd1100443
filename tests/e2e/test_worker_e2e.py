"""The mission, end to end: requests on Kafka, features from Cassandra through Redis, ONNX Runtime,
predictions on Kafka, against the real local stack and a real worker process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamscore.streams import topics
from streamscore.streams.client import Client
from streamscore.streams.kafka import client_kwargs
from streamscore.streams.wire import HEADER_ERROR_KIND, HEADER_REQUEST_ID, headers_dict, unpack

from .conftest import MODEL, Deployment, offline_score, offline_scores_of, request

pytestmark = pytest.mark.usefixtures("worker")


async def _consume(deployment: Deployment, topic: str, until: Any, timeout: float = 60.0,
                   grace: float = 1.5) -> list[Any]:
    """Every record of a topic from the beginning until ``until(records)`` holds (then a grace period, so
    repeats would be seen too) or the timeout."""
    consumer = AIOKafkaConsumer(topic, **client_kwargs(deployment.settings.kafka), auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline, satisfied_at = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            if satisfied_at is None and until(records):
                satisfied_at = time.monotonic()
            if satisfied_at is not None and time.monotonic() - satisfied_at > grace:
                break
    finally:
        await consumer.stop()
    return records


def _predictions_for(deployment: Deployment, ids: set[str], topic: str | None = None) -> list[dict[str, Any]]:
    name = topic or topics.predictions(deployment.settings.topic_prefix, MODEL)

    def answered(records: list[Any]) -> bool:
        return ids <= {unpack(record.value)["id"] for record in records}

    records = asyncio.run(_consume(deployment, name, answered))
    return [prediction for prediction in (unpack(record.value) for record in records) if prediction["id"] in ids]


async def _produce(deployment: Deployment, requests: list[dict[str, Any]]) -> None:
    async with Client(deployment.settings) as client:
        await client.produce_many(MODEL, requests)


def test_n_requests_give_n_predictions_with_offline_scores(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    cards = [card for card in deployment.rows["card_stats"] if card != "card-7"]  # card-7 is updated elsewhere
    merchants = list(deployment.rows["merchant_stats"])
    requests = [request(f"n-{run}-{i}", cards[i % len(cards)], merchants[i % len(merchants)], 5.0 + i % 97)
                for i in range(600)]
    asyncio.run(_produce(deployment, requests))

    predictions = _predictions_for(deployment, {r["id"] for r in requests})

    counts = Counter(prediction["id"] for prediction in predictions)
    assert len(counts) == len(requests) and set(counts.values()) == {1}
    by_id = {prediction["id"]: prediction for prediction in predictions}
    streamed = np.array([by_id[r["id"]]["outputs"]["fraud_probability"] for r in requests])
    np.testing.assert_allclose(streamed, offline_scores_of(deployment, requests), atol=1e-5, rtol=0)
    sample = by_id[requests[0]["id"]]
    assert sample["status"] == "ok" and sample["degraded"] == [] and sample["model"] == MODEL
    assert len(sample["lineage"]["artifact_sha256"]) == 64
    assert sample["lineage"]["feature_ts_ms"]["card_stats"] > 0
    assert {"decode", "features", "assemble", "infer"} <= set(sample["timings_us"])


def test_feature_update_is_seen_by_later_requests(deployment: Deployment) -> None:
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import load_views

    card, merchant = "card-7", "merchant-3"  # no other test reads card-7: its row changes here
    first = f"upd-{uuid.uuid4().hex[:6]}-a"
    asyncio.run(_produce(deployment, [request(first, card, merchant)]))
    before = _predictions_for(deployment, {first})[0]["outputs"]["fraud_probability"]

    changed = {**deployment.rows["card_stats"][card], "chargebacks_90d": 6, "txn_count_24h": 40}

    async def update() -> None:
        store = FeatureStore(deployment.settings, load_views(deployment.settings.views_file))
        store.connect(create_schema=False)
        try:
            await store.put("card_stats", [(card, changed, None)])
        finally:
            await store.close()

    asyncio.run(update())
    second = f"upd-{uuid.uuid4().hex[:6]}-b"
    asyncio.run(_produce(deployment, [request(second, card, merchant)]))
    after = _predictions_for(deployment, {second})[0]["outputs"]["fraud_probability"]

    rows = {**deployment.rows, "card_stats": {**deployment.rows["card_stats"], card: changed}}
    assert abs(after - offline_score(deployment, card, merchant, rows=rows)) <= 1e-5
    assert abs(before - after) > 1e-4, "the update changed nothing the model sees"


def test_missing_entity_gets_defaults_and_degraded(deployment: Deployment) -> None:
    request_id = f"miss-{uuid.uuid4().hex[:6]}"
    asyncio.run(_produce(deployment, [request(request_id, "card-unknown-1", "merchant-1")]))

    prediction = _predictions_for(deployment, {request_id})[0]

    assert prediction["status"] == "ok"
    assert prediction["degraded"] == ["card_stats:missing:card-unknown-1"]
    assert prediction["lineage"]["feature_ts_ms"]["card_stats"] is None
    expected = offline_score(deployment, "card-unknown-1", "merchant-1")
    assert abs(prediction["outputs"]["fraud_probability"] - expected) <= 1e-5


def test_expired_deadline_is_answered_expired(deployment: Deployment) -> None:
    request_id = f"exp-{uuid.uuid4().hex[:6]}"
    past = time.time_ns() // 1_000_000 - 60_000
    asyncio.run(_produce(deployment, [request(request_id, "card-1", "merchant-1", deadline_ms=past)]))

    prediction = _predictions_for(deployment, {request_id})[0]

    assert prediction["status"] == "expired"
    assert prediction["outputs"] == {}
    assert prediction["error"]["kind"] == "expired"


def test_malformed_message_is_dead_lettered_and_its_batch_answered(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    goods = [request(f"mal-{run}-{i}", "card-2", "merchant-2") for i in range(4)]
    bad_values = [b"\xc1 not msgpack", msgpack.packb({"id": f"mal-{run}-noentities", "features": {"amount": 1.0}})]
    requests_topic = topics.requests(deployment.settings.topic_prefix, MODEL)

    async def send_interleaved() -> None:
        producer = AIOKafkaProducer(**client_kwargs(deployment.settings.kafka), linger_ms=50)
        await producer.start()
        try:
            values = [msgpack.packb(goods[0]), bad_values[0], msgpack.packb(goods[1]), msgpack.packb(goods[2]),
                      bad_values[1], msgpack.packb(goods[3])]
            futures = [await producer.send(requests_topic, value, key=b"same-partition") for value in values]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send_interleaved())
    predictions = _predictions_for(deployment, {g["id"] for g in goods})
    dlq = topics.dead_letters(deployment.settings.topic_prefix, MODEL)
    letters = asyncio.run(_consume(deployment, dlq, lambda records: any(
        headers_dict(r.headers).get(HEADER_REQUEST_ID) == f"mal-{run}-noentities" for r in records)))

    assert sorted(p["id"] for p in predictions) == sorted(g["id"] for g in goods)
    mine = [r for r in letters if r.value in bad_values]
    assert sorted(headers_dict(r.headers)[HEADER_ERROR_KIND] for r in mine) == ["missing_entity", "undecodable"]
    assert len(mine) == 2, "each bad message becomes exactly one dead letter"


def _produce_foreign(deployment: Deployment, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce (key, value) pairs with librdkafka (confluent-kafka), a client the project did not write, as a
    user's own producer would; a None value is a tombstone."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": deployment.settings.kafka.bootstrap, "linger.ms": 20})
    topic = topics.requests(deployment.settings.topic_prefix, MODEL)
    for key, value in messages:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0, "librdkafka could not deliver every message"


def _letters_keyed(deployment: Deployment, key: bytes, count: int) -> list[Any]:
    dlq = topics.dead_letters(deployment.settings.topic_prefix, MODEL)
    records = asyncio.run(_consume(deployment, dlq, lambda found: sum(r.key == key for r in found) >= count))
    return [record for record in records if record.key == key]


def test_a_tombstone_then_ten_good_requests_give_one_dead_letter_and_ten_answers(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    goods = [request(f"tomb-{run}-{i}", "card-3", "merchant-3") for i in range(10)]
    tombstone_key = f"tombstone-{run}".encode()
    _produce_foreign(deployment, [(tombstone_key, None), (tombstone_key, b""),
                                  *((b"card-3", msgpack.packb(good)) for good in goods)])

    predictions = _predictions_for(deployment, {good["id"] for good in goods})
    letters = _letters_keyed(deployment, tombstone_key, 2)

    assert sorted(p["id"] for p in predictions) == sorted(g["id"] for g in goods)
    assert all(p["status"] == "ok" for p in predictions)
    assert sorted(headers_dict(r.headers)[HEADER_ERROR_KIND] for r in letters) == ["empty_value", "null_value"]
    assert sorted((r.value is None, r.value) for r in letters) == [(False, b""), (True, None)]


def test_zero_and_negative_deadlines_have_passed(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    expired = [request(f"dl-{run}-{value}", "card-1", "merchant-1", deadline_ms=value) for value in (0, -5, 1)]
    open_ended = request(f"dl-{run}-none", "card-1", "merchant-1")
    asyncio.run(_produce(deployment, [*expired, open_ended]))

    predictions = {p["id"]: p for p in _predictions_for(deployment, {r["id"] for r in [*expired, open_ended]})}

    assert [predictions[r["id"]]["status"] for r in expired] == ["expired"] * 3
    assert predictions[open_ended["id"]]["status"] == "ok"


def test_dead_letters_of_a_batch_message_carry_only_their_element(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    bad = [{"id": f"bad-{run}-{i}", "entities": {"card_id": "card-1"}, "features": {"amount": "NaN?"}}
           for i in range(1000)]
    good = [request(f"good-{run}-{i}", "card-4", "merchant-4") for i in range(2)]
    elements = [good[0], *bad, good[1]]
    message = msgpack.packb(elements)
    key = f"mixed-{run}".encode()
    _produce_foreign(deployment, [(key, message)])

    predictions = _predictions_for(deployment, {g["id"] for g in good})
    letters = _letters_keyed(deployment, key, 1000)

    assert sorted(p["id"] for p in predictions) == sorted(g["id"] for g in good)
    assert len(letters) == 1000, "one dead letter per bad element"
    assert sum(len(r.value) for r in letters) <= len(message), "dead-letter bytes bounded by the message's bytes"
    by_element = {int(headers_dict(r.headers)["streamscore-element"]): r for r in letters}
    assert sorted(by_element) == list(range(1, 1001))
    for index, letter in by_element.items():
        assert msgpack.unpackb(letter.value) == elements[index]
        assert headers_dict(letter.headers)[HEADER_REQUEST_ID] == elements[index]["id"]


def test_screened_elements_are_dead_lettered_with_their_index(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    elements = [request(f"scr-{run}-0", "card-5", "merchant-5"),
                request(f"scr-{run}-1", "card-5", "merchant-5", version="no-such-version"),
                request(f"scr-{run}-2", "card-5", "merchant-5", reply_to="__consumer_offsets")]
    key = f"screen-{run}".encode()
    _produce_foreign(deployment, [(key, msgpack.packb(elements))])

    _predictions_for(deployment, {elements[0]["id"]})
    letters = _letters_keyed(deployment, key, 2)

    named = sorted((headers_dict(r.headers)["streamscore-element"], headers_dict(r.headers)[HEADER_ERROR_KIND])
                   for r in letters)
    assert named == [("1", "unknown_version"), ("2", "bad_field")]
    assert sorted(msgpack.unpackb(r.value)["id"] for r in letters) == [elements[1]["id"], elements[2]["id"]]


def test_batch_message_gives_one_prediction_per_element(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    batch = [request(f"arr-{run}-{i}", f"card-{100 + i}", f"merchant-{i}", 10.0 * (i + 1)) for i in range(32)]

    async def send() -> None:
        async with Client(deployment.settings) as client:
            await client.produce(MODEL, batch)

    asyncio.run(send())
    predictions = _predictions_for(deployment, {r["id"] for r in batch})

    assert Counter(p["id"] for p in predictions) == Counter(r["id"] for r in batch)
    by_id = {p["id"]: p["outputs"]["fraud_probability"] for p in predictions}
    np.testing.assert_allclose([by_id[r["id"]] for r in batch], offline_scores_of(deployment, batch), atol=1e-5)


def test_predict_round_trips(deployment: Deployment) -> None:
    async def ask() -> dict[str, Any]:
        async with Client(deployment.settings) as client:
            return await client.predict(MODEL, request("rt-" + uuid.uuid4().hex, "card-9", "merchant-9", 77.0),
                                        timeout=20)

    prediction = asyncio.run(ask())

    assert prediction["status"] == "ok"
    expected = offline_score(deployment, "card-9", "merchant-9", 77.0)
    assert abs(prediction["outputs"]["fraud_probability"] - expected) <= 1e-5


def test_reply_to_outside_the_allowed_prefixes_is_dead_lettered(deployment: Deployment) -> None:
    run = uuid.uuid4().hex[:6]
    allowed = "allowed" + deployment.settings.topic_prefix[1:] + f".replies-{run}"
    forbidden_id, allowed_id = f"rt-no-{run}", f"rt-ok-{run}"
    asyncio.run(_produce(deployment, [request(forbidden_id, "card-4", "merchant-4", reply_to=f"elsewhere-{run}"),
                                      request(allowed_id, "card-4", "merchant-4", reply_to=allowed)]))

    answered = _predictions_for(deployment, {allowed_id}, topic=allowed)
    dlq = topics.dead_letters(deployment.settings.topic_prefix, MODEL)
    letters = asyncio.run(_consume(deployment, dlq, lambda records: any(
        headers_dict(r.headers).get(HEADER_REQUEST_ID) == forbidden_id for r in records)))

    assert [p["id"] for p in answered] == [allowed_id]
    mine = [headers_dict(r.headers) for r in letters if headers_dict(r.headers).get(HEADER_REQUEST_ID) == forbidden_id]
    assert len(mine) == 1 and mine[0][HEADER_ERROR_KIND] == "bad_field"
    assert "not allowed" in mine[0]["streamscore-error-message"]


def test_metrics_and_status_are_served(deployment: Deployment) -> None:
    import json
    import urllib.request

    port = deployment.env["STREAMSCORE_WORKER__WEB_PORT"]
    asyncio.run(_produce(deployment, [request(f"met-{uuid.uuid4().hex[:6]}", "card-3", "merchant-3")]))
    time.sleep(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        status = json.load(response)

    lines = metrics.splitlines()
    ok = [line for line in lines if line.startswith('streamscore_predictions_total{model="fraud",status="ok"}')]
    assert ok and float(ok[0].split()[-1]) > 0
    assert any(line.startswith("streamscore_model_info{") and 'version="1"' in line for line in lines)
    assert "streamscore_stage_seconds_bucket" in metrics and "streamscore_cache_hits" in metrics
    assert status["fraud"]["answered"] > 0 and status["fraud"]["model_version"] == "1"
    # device=auto (the default): the provider and why, the same at /status and /metrics
    from streamscore.workers.devices import cuda_check

    served = status["fraud"]
    assert served["provider"] == ("CPUExecutionProvider" if cuda_check() else "CUDAExecutionProvider")
    assert served["device"].startswith("device=auto")
    assert ("CUDA not usable here" in served["device"]) == bool(cuda_check())
    provider = [line for line in lines if line.startswith("streamscore_model_provider{")]
    assert len(provider) == 1 and f'provider="{served["provider"]}"' in provider[0]
    assert f'device="{served["device"]}"' in provider[0]


def _served_version(deployment: Deployment) -> str:
    async def ask() -> dict[str, Any]:
        async with Client(deployment.settings) as client:
            return await client.predict(MODEL, request("ver-" + uuid.uuid4().hex, "card-5", "merchant-5"), timeout=20)

    return str(asyncio.run(ask())["version"])


def test_tampered_new_version_is_refused_and_a_good_one_is_served(deployment: Deployment) -> None:
    """Runs last in this file: it leaves the worker serving v2 (same artifact as v1)."""
    import json
    import shutil

    library = deployment.settings.models_dir / MODEL
    original = (library / "1" / "model.onnx").read_bytes()
    shutil.copytree(library / "1", library / "2")
    manifest = json.loads((library / "2" / "manifest.json").read_text())
    (library / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    (library / "2" / "model.onnx").write_bytes(original + b"\0")  # sha256 no longer matches the manifest

    time.sleep(3)  # three reload checks
    assert _served_version(deployment) == "1"
    assert "refusing v2" in deployment.log_path.read_text()

    (library / "2" / "model.onnx").write_bytes(original)
    deadline = time.monotonic() + 30
    while _served_version(deployment) != "2":
        assert time.monotonic() < deadline, "the verified v2 was not picked up"
        time.sleep(0.5)


def test_the_manifests_decision_stage_labels_every_prediction_and_counts_them(deployment: Deployment) -> None:
    import urllib.request

    run = uuid.uuid4().hex[:6]
    requests = [request(f"dec-{run}-{i}", f"card-{i}", f"merchant-{i % 40}", 5.0 + 40.0 * i) for i in range(40)]
    asyncio.run(_produce(deployment, requests))

    predictions = _predictions_for(deployment, {r["id"] for r in requests})

    def expected(score: float) -> str:  # the demo manifest's thresholds, in float32 like the model's output
        score32 = np.float32(score)
        return "approve" if score32 < np.float32(0.3) else "review" if score32 < np.float32(0.7) else "decline"

    assert len(predictions) == len(requests)
    for prediction in predictions:
        assert prediction["outputs"]["decision"] == expected(prediction["outputs"]["fraud_probability"])
        assert "decision" in prediction["timings_us"]
    port = deployment.env["STREAMSCORE_WORKER__WEB_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'streamscore_decisions_total{decision="approve",model="fraud"}' in metrics
    assert 'streamscore_stage_seconds_count{model="fraud",stage="decision"}' in metrics


def test_the_worker_follows_the_deployment_and_never_serves_a_variant_by_itself(deployment: Deployment) -> None:
    """After the tampered-version test (the worker serves v2): a variant (a manifest naming a parent) is not
    served until deployed; `models promote` and `models rollback` move the worker between batches."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    library = deployment.settings.models_dir / MODEL
    served = _served_version(deployment)
    shutil.copytree(library / served, library / "9-int8")
    manifest = json.loads((library / "9-int8" / "manifest.json").read_text())
    (library / "9-int8" / "manifest.json").write_text(json.dumps({**manifest, "version": "9-int8",
                                                                    "parent": served}))
    time.sleep(3)  # three reload checks: the newest folder is a variant, not served without a deployment
    assert _served_version(deployment) == served

    def models(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "streamscore", "models", *args], capture_output=True,
                              text=True, env={**os.environ, **deployment.env}, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def seconds_until_served(version: str) -> float:
        started = time.monotonic()
        while _served_version(deployment) != version:
            assert time.monotonic() - started < 30, f"v{version} not served 30 s after the change"
            time.sleep(0.2)
        return time.monotonic() - started

    other = "1" if served != "1" else "2"
    models("promote", MODEL, other)
    promoted = seconds_until_served(other)
    models("rollback", MODEL)
    rolled_back = seconds_until_served(served)
    print(f"promote -> served in {promoted:.1f} s, rollback -> served in {rolled_back:.1f} s")
    shown = models("show", MODEL)
    assert "rollback" in shown and "promote" in shown, shown


def test_a_canary_serves_its_share_by_entity_hash_and_pins_reach_their_version(deployment: Deployment) -> None:
    """After the deployment test: `models canary` routes by a stable hash of the card id, exactly as
    canary_share computes it; a pinned version is served by that version; `models retire` ends the canary."""
    import os
    import subprocess
    import sys

    from streamscore.workers.stages import canary_share

    def models(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "streamscore", "models", *args], capture_output=True,
                              text=True, env={**os.environ, **deployment.env}, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    production = _served_version(deployment)
    canary = "1" if production != "1" else "2"
    models("canary", MODEL, canary, "--weight", "0.5")
    deadline = time.monotonic() + 30
    while True:  # until the worker took the canary: a card hashed onto it is answered by it
        run = uuid.uuid4().hex[:6]
        probe_card = next(f"card-{i}" for i in range(300) if canary_share([f"card-{i}"], 0.5)[0])
        probe = request(f"probe-{run}", probe_card, "merchant-1")
        asyncio.run(_produce(deployment, [probe]))
        if _predictions_for(deployment, {probe["id"]})[0]["version"] == canary:
            break
        assert time.monotonic() < deadline, "the canary was not taken within 30 s"

    run = uuid.uuid4().hex[:6]
    cards = [f"card-{i % 300}" for i in range(600)]
    requests = [request(f"can-{run}-{i}", card, "merchant-2") for i, card in enumerate(cards)]
    pinned = request(f"pin-{run}", "card-1", "merchant-2", version=canary)
    asyncio.run(_produce(deployment, [*requests, pinned]))
    predictions = {p["id"]: p for p in _predictions_for(deployment, {r["id"] for r in [*requests, pinned]})}

    expected = ["canary" if on else "production" for on in canary_share(cards, 0.5)]
    observed = ["canary" if predictions[r["id"]]["version"] == canary else "production" for r in requests]
    assert observed == expected
    assert 0.35 < expected.count("canary") / len(expected) < 0.65
    assert predictions[pinned["id"]]["version"] == canary
    models("retire", MODEL, canary)


def test_a_shadow_scores_in_the_dark_beside_the_answer(deployment: Deployment) -> None:
    """After the canary test: `models shadow` makes the worker score every request with the shadow version
    too; its outputs go to the shadow topic beside the answer's, never to the predictions topic."""
    import os
    import subprocess
    import sys

    def models(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "streamscore", "models", *args], capture_output=True,
                              text=True, env={**os.environ, **deployment.env}, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    from streamscore.workers.deployments import read_deployment

    state = asyncio.run(read_deployment(deployment.settings, MODEL))
    assert state is not None and state.production is not None and state.canary is None
    production = state.production
    dark = "1" if production != "1" else "2"
    models("shadow", MODEL, dark)
    shadow_topic = topics.shadow(deployment.settings.topic_prefix, MODEL)
    deadline = time.monotonic() + 30
    while True:  # until the worker took the shadow
        run = uuid.uuid4().hex[:6]
        requests = [request(f"sh-{run}-{i}", f"card-{i}", "merchant-3", 10.0 + i) for i in range(20)]
        asyncio.run(_produce(deployment, requests))
        predictions = _predictions_for(deployment, {r["id"] for r in requests})
        last_id = requests[-1]["id"]
        records = [unpack(r.value) for r in asyncio.run(_consume(
            deployment, shadow_topic, lambda found, last=last_id: any(unpack(r.value)["id"] == last for r in found),
            timeout=3, grace=0.5))]
        mine = {record["id"]: record for record in records if record["id"].startswith(f"sh-{run}")}
        if len(mine) == len(requests):
            break
        assert time.monotonic() < deadline, "no shadow records 30 s after `models shadow`"

    assert {p["version"] for p in predictions} == {production}  # the answers are production's
    for prediction in predictions:
        record = mine[prediction["id"]]
        assert record["version"] == dark and record["answered_version"] == production
        assert record["answered_outputs"]["fraud_probability"] == pytest.approx(
            prediction["outputs"]["fraud_probability"], abs=1e-6)
        # v1 and v2 are the same artifact: the shadow agrees with the answer
        assert record["outputs"]["fraud_probability"] == pytest.approx(record["answered_outputs"]["fraud_probability"],
                                                                       abs=1e-6)
    models("retire", MODEL, dark)


def test_a_deployment_record_naming_a_missing_or_tampered_version_is_refused_by_the_worker(
        deployment: Deployment) -> None:
    """A record written to the deployments topic by someone else than the CLI (which would refuse it): the
    worker refuses it, keeps serving what it had, says so in its log and at /status, and takes the next good
    record."""
    import json
    import shutil
    import urllib.request

    from streamscore.workers.deployments import Change, ensure_topic, implicit, read_deployment, scan_library

    settings = deployment.settings
    state = asyncio.run(read_deployment(settings, MODEL))
    if state is None:  # run alone: no record yet, the worker serves the implicit state
        state = implicit(MODEL, scan_library(settings.models_dir, MODEL, verify=()))
    assert state.production is not None
    serving = state.production
    library = settings.models_dir / MODEL
    shutil.copytree(library / serving, library / "78")
    manifest = json.loads((library / "78" / "manifest.json").read_text())
    (library / "78" / "manifest.json").write_text(json.dumps({**manifest, "version": "78"}))
    with (library / "78" / "model.onnx").open("ab") as artifact:
        artifact.write(b"\0")  # its sha256 no longer matches its manifest

    async def publish(production: str, seq: int) -> None:
        topic = await ensure_topic(settings, MODEL)
        record = state.model_copy(update={"production": production, "seq": seq, "history": (),
                                          "changed": Change(by="someone@elsewhere", at_ms=int(time.time() * 1000),
                                                            what=f"production {production}, by hand")})
        producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, record.model_dump_json().encode(), key=MODEL.encode())
        finally:
            await producer.stop()

    def status() -> dict[str, Any]:
        port = deployment.env["STREAMSCORE_WORKER__WEB_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
            return dict(json.load(response)[MODEL])

    def refused_within(seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while not (refusal := status()["version_refused"]):
            assert time.monotonic() < deadline, "the worker did not report the refusal"
            time.sleep(0.3)
        return str(refusal)

    try:
        for bad, seq in (("77", state.seq + 1), ("78", state.seq + 2)):
            asyncio.run(publish(bad, seq))
            time.sleep(0.5)
            deadline = time.monotonic() + 30
            while f"v{bad}" not in (refusal := refused_within(30)):
                assert time.monotonic() < deadline, f"v{bad} not refused: {refusal}"
                time.sleep(0.3)
            assert "still serving" in refusal and serving in refusal
            assert _served_version(deployment) == serving
            assert f"refusing v{bad}" in deployment.log_path.read_text()
        asyncio.run(publish(serving, state.seq + 3))  # a good record again: the refusal clears
        deadline = time.monotonic() + 30
        while status()["version_refused"]:
            assert time.monotonic() < deadline, "the refusal did not clear on a good record"
            time.sleep(0.3)
        assert _served_version(deployment) == serving
    finally:
        shutil.rmtree(library / "78", ignore_errors=True)
