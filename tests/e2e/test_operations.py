"""Operations endpoints of a real worker: /healthz, /readyz naming what fails, consumer lag on /metrics, JSON
logs; and a worker whose Redis refuses its credentials (a second, password-protected redis-server started here)
is not ready and says why, then ready once the credentials are right."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streamscore_examples.fraud.run import stop_process

from .conftest import MODEL, Deployment

RIGHT, WRONG = "right-password", "wrong-password"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(port: int, page: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{page}", timeout=3) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _readyz(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        status, body = _get(port, "readyz")
    except OSError:  # not listening yet
        return None
    return status, json.loads(body)


def _wait_for(what: str, probe: Any, log: Path, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = probe()
        if seen:
            return seen
        time.sleep(0.5)
    pytest.fail(f"{what} not seen in {timeout_s:g} s (last: {seen!r}); worker log:\n{log.read_text()[-3000:]}",
                pytrace=False)


def _start_worker(deployment: Deployment, extra: dict[str, str], log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, **deployment.env, "STREAMSCORE_WORKER__WEB_PORT": str(port),
           "STREAMSCORE_HTTP__PORT": str(_free_port()),  # beside the session's worker, which may be running
           "STREAMSCORE_WORKER__READINESS_INTERVAL_S": "0.5", **extra}
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "streamscore", "worker", "--model", MODEL], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    return process, port


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of its own (port of its own, loopback, no persistence) that wants ``RIGHT``."""
    port = _free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", RIGHT,
                                "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=RIGHT, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_healthz_readyz_and_the_lag_per_partition_are_served(deployment: Deployment, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    process, port = _start_worker(deployment, {"STREAMSCORE_TOPIC_PREFIX": deployment.env["STREAMSCORE_TOPIC_PREFIX"]
                                               + "ops", "STREAMSCORE_LOG_FORMAT": "json"}, log)
    try:
        _, body = _wait_for("a ready worker", lambda: (_readyz(port) or (0, {}))[0] == 200 and _readyz(port), log)
        assert body["ready"] is True and body["reason"] is None
        checks = body["checks"]
        assert set(checks) == {"model", "kafka", "consumer", "cassandra", "cache"}, checks
        assert all(state.startswith("ok") for state in checks.values()), checks
        assert checks["model"].startswith(f"ok: {MODEL} v"), checks
        assert "2 partition(s)" in checks["consumer"], checks
        assert _get(port, "healthz") == (200, b'{"alive":true}')
        metrics = _wait_for("the consumer lag", lambda: "streamscore_consumer_lag{" in _get(port, "metrics")[1].decode()
                            and _get(port, "metrics")[1].decode(), log)
        lag_lines = [line for line in metrics.splitlines() if line.startswith("streamscore_consumer_lag{")]
        assert {line.split('partition="')[1].split('"')[0] for line in lag_lines} == {"0", "1"}, lag_lines
        assert all(float(line.rsplit(" ", 1)[1]) == 0.0 for line in lag_lines), lag_lines  # nothing was sent
    finally:
        stop_process(process)
    records = [_json_or_none(line) for line in log.read_text().splitlines() if line.strip()]
    assert records and None not in records, log.read_text()[-3000:]  # every line is one JSON record
    loggers = {record["logger"] for record in records}
    assert any(name.startswith("streamscore") for name in loggers), loggers  # streamscore's own lines ...
    assert any(name.startswith(("faust", "mode", "aiokafka")) for name in loggers), loggers  # ... and Faust's
    assert all({"ts", "level", "logger", "message"} <= set(record) for record in records)


def test_wrong_redis_credentials_make_the_worker_not_ready_and_say_why(deployment: Deployment, tmp_path: Path,
                                                                       password_redis: int) -> None:
    log = tmp_path / "worker.log"
    process, port = _start_worker(deployment, {
        "STREAMSCORE_TOPIC_PREFIX": deployment.env["STREAMSCORE_TOPIC_PREFIX"] + "auth",
        "STREAMSCORE_REDIS__PORT": str(password_redis), "STREAMSCORE_REDIS__PASSWORD": WRONG}, log)
    try:
        def refused() -> Any:
            seen = _readyz(port)  # once started: everything else answers
            return seen if seen and "refused the credentials" in seen[1]["checks"].get("cache", "") and all(
                state.startswith("ok") for name, state in seen[1]["checks"].items() if name != "cache") else None

        status, body = _wait_for("/readyz naming Redis's refusal", refused, log)
        assert status == 503 and body["ready"] is False
        assert f"Redis at 127.0.0.1:{password_redis}" in body["reason"]
        assert "STREAMSCORE_REDIS__PASSWORD" in body["reason"]
        assert WRONG not in json.dumps(body) and WRONG not in log.read_text()  # no secret in any output
        # the server now wants what the worker sends: the worker becomes ready without a restart
        redis.Redis(port=password_redis, password=RIGHT).config_set("requirepass", WRONG)
        _wait_for("a ready worker", lambda: (_readyz(port) or (0, {}))[0] == 200, log)
        assert "ready again: cache" in log.read_text()
    finally:
        stop_process(process)
