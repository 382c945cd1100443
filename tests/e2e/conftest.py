"""End-to-end fixtures: a real worker process against the real local stack.

Each test session gets its own topic prefix, keyspace and model library, so runs never see each other's data.
The worker runs as a subprocess exactly as `streamscore worker` runs it; it is ready when it answers a
request/reply round trip.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamscore.settings import Settings
from streamscore_examples.fraud.data import generate_feature_rows, write_views
from streamscore_examples.fraud.model import build_and_register
from streamscore_examples.fraud.run import stop_process
from streamscore_stack import Stack, StackError

HERE = Path(__file__).parent
MODEL = "fraud"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Deployment:
    settings: Settings
    env: dict[str, str]
    rows: dict[str, dict[str, dict[str, Any]]]
    pipeline: Any
    """The trained scikit-learn pipeline: the offline reference for every streamed score."""
    log_path: Path
    http_port: int = 0
    """The session worker's Open Inference Protocol port (see http_address); not in ``env``, so other workers a
    test starts with ``env`` do not compete for it."""


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    try:
        Stack().ensure_up()
    except StackError as error:
        pytest.fail(f"the local stack could not start:\n{error}", pytrace=False)
    data_dir = tmp_path_factory.mktemp("e2e")
    run = uuid.uuid4().hex[:8]
    env = {
        "STREAMSCORE_TOPIC_PREFIX": f"t{run}",
        "STREAMSCORE_MODELS_DIR": str(data_dir / "models"),
        "STREAMSCORE_VIEWS_FILE": str(data_dir / "views.json"),
        "STREAMSCORE_DATA_DIR": str(data_dir),
        "STREAMSCORE_CASSANDRA__KEYSPACE": f"e2e_{run}",
        "STREAMSCORE_WORKER__WEB_PORT": str(_free_port()),
        "STREAMSCORE_WORKER__PARTITIONS": "2",
        "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": "1",
        "STREAMSCORE_WORKER__REPLY_TO_PREFIXES": f'["allowed{run}."]',
        "STREAMSCORE_MONITORING__WINDOW_REQUESTS": "500",  # drift windows a test can fill in a second
    }
    settings = Settings(**_settings_kwargs(env))
    write_views(settings.views_file)
    rows = generate_feature_rows(seed=3, n_cards=300, n_merchants=40)
    asyncio.run(_fill(settings, rows))
    _, pipeline = build_and_register(settings.models_dir, seed=5, n_train=4000, max_iter=60)
    return Deployment(settings, env, rows, pipeline, data_dir / "worker.log", http_port=_free_port())


def _settings_kwargs(env: dict[str, str]) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return Settings().model_dump()


async def _fill(settings: Settings, rows: dict[str, dict[str, dict[str, Any]]]) -> None:
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import load_views

    store = FeatureStore(settings, load_views(settings.views_file))
    store.connect(create_schema=True)
    try:
        for view, entities in rows.items():
            await store.put(view, [(entity, values, None) for entity, values in entities.items()])
    finally:
        await store.close()
        store.online.close()


@pytest.fixture(scope="session")
def worker(deployment: Deployment) -> Iterator[subprocess.Popen]:
    with open(deployment.log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL],
                                   env={**os.environ, **deployment.env,
                                        "STREAMSCORE_HTTP__PORT": str(deployment.http_port)},
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(_wait_until_answering(deployment, process))
    except BaseException:
        stop_process(process)
        pytest.fail(f"the worker did not start answering:\n{deployment.log_path.read_text()[-4000:]}",
                    pytrace=False)
    yield process
    stop_process(process)


async def _wait_until_answering(deployment: Deployment, process: subprocess.Popen) -> None:
    from streamscore.streams.client import Client, PredictTimeout

    deadline = time.monotonic() + 120
    async with Client(deployment.settings) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"worker exited with {process.returncode}"
            try:
                await client.predict(MODEL, request("probe-" + uuid.uuid4().hex[:6], "card-1", "merchant-1"),
                                     timeout=5)
                return
            except PredictTimeout:
                continue
    raise TimeoutError("worker not answering after 120 s")


def http_address(deployment: Deployment) -> str:
    """host:port of the worker's Open Inference Protocol endpoint (e.g. for tritonclient's InferenceServerClient)."""
    return f"127.0.0.1:{deployment.http_port}"


def request(request_id: str, card: str, merchant: str, amount: float = 42.0, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "entities": {"card_id": card, "merchant_id": merchant},
            "features": {"amount": amount, "hour": 13.0, "is_foreign": 0.0}, **extra}


def offline_score(deployment: Deployment, card: str, merchant: str, amount: float = 42.0,
                  rows: dict | None = None) -> float:
    from streamscore_examples.fraud.data import feature_matrix
    from streamscore_examples.fraud.model import offline_scores

    transaction = {"card_id": card, "merchant_id": merchant, "amount": amount, "hour": 13.0, "is_foreign": 0.0}
    matrix = feature_matrix([transaction], rows if rows is not None else deployment.rows)
    return float(offline_scores(deployment.pipeline, matrix)[0])


def offline_scores_of(deployment: Deployment, requests: list[dict[str, Any]]) -> np.ndarray:
    from streamscore_examples.fraud.data import feature_matrix
    from streamscore_examples.fraud.model import offline_scores

    transactions = [{**r["entities"], **r["features"]} for r in requests]
    return offline_scores(deployment.pipeline, feature_matrix(transactions, deployment.rows))
