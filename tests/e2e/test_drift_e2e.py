"""Drift seen by a real worker: shifted requests streamed through Kafka come back as a window report on the
monitoring topic that flags the shifted columns against the version's training profile."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamscore.streams import topics
from streamscore.streams.client import Client, partitions_of
from streamscore.streams.kafka import client_kwargs
from streamscore.streams.wire import unpack
from streamscore_examples.fraud.data import generate_transactions
from streamscore_examples.fraud.requests import as_request

from .conftest import MODEL, Deployment

pytestmark = pytest.mark.usefixtures("worker")

SHIFTED = 3000
"""Requests streamed: several windows of STREAMSCORE_MONITORING__WINDOW_REQUESTS (500 in this session)."""


async def _reports_after_streaming(deployment: Deployment, requests: list[dict[str, Any]],
                                   timeout: float = 30.0) -> list[dict[str, Any]]:
    """Stream the requests; every monitoring report published from then on, until one window opened after the
    first request was sent flags ``amount`` (or the timeout)."""
    settings = deployment.settings
    topic = topics.monitoring(settings.topic_prefix, MODEL)
    partitions = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    reports: list[dict[str, Any]] = []
    try:
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for partition in partitions:  # the end resolved now: reports published after this point are read
            await consumer.position(partition)
        started_ms = int(time.time() * 1000)
        async with Client(settings) as client:
            await client.produce_many(MODEL, requests)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                reports.extend(unpack(record.value) for record in records)
            if any(report["window_start_ms"] >= started_ms and "amount" in report["drifted_columns"]
                   for report in reports):
                break
    finally:
        await consumer.stop()
    return [report for report in reports if report["window_start_ms"] >= started_ms]


def test_shifted_requests_are_flagged_in_a_window_report(deployment: Deployment) -> None:
    """A new fraud pattern: amounts twenty times the usual and every transaction foreign, on known cards."""
    run = uuid.uuid4().hex[:6]
    transactions = generate_transactions(deployment.rows, SHIFTED, seed=41, with_labels=False)
    requests = []
    for index, transaction in enumerate(transactions):
        shifted = {**transaction, "amount": transaction["amount"] * 20, "is_foreign": 1.0}
        requests.append(as_request(f"drift-{run}-{index}", shifted))

    reports = asyncio.run(_reports_after_streaming(deployment, requests))

    flagged = [report for report in reports if "amount" in report["drifted_columns"]]
    assert flagged, f"no window report flagging amount among {len(reports)} published after the stream began"
    report = flagged[0]
    assert report["model"] == MODEL and report["requests"] >= 500
    assert report["window_end_ms"] >= report["window_start_ms"]
    amount = report["columns"]["amount"]
    assert amount["drifted"] and amount["psi"] >= report["psi_threshold"] and amount["p_value"] < 1e-6
    assert amount["mean"] > 5 * amount["training_mean"]
    assert report["columns"]["is_foreign"]["drifted"]  # 100% foreign against a few % in training
    assert sum(amount["counts"]) == report["requests"]
    assert report["defaulted_share"] == 0.0  # every card and merchant is in the store
    assert set(report["outputs"]) == {"fraud_probability", "label"}

    labels = f'column="amount",model="{MODEL}",version="{report["version"]}"'
    with urllib.request.urlopen(f"http://127.0.0.1:{deployment.env['STREAMSCORE_WORKER__WEB_PORT']}/metrics",
                                timeout=10) as response:
        metrics = response.read().decode()
    assert f"streamscore_drift_flagged{{{labels}}} 1.0" in metrics  # the last window: shifted requests only
    assert f"streamscore_drift_psi{{{labels}}}" in metrics and "streamscore_stale_share{" in metrics
