"""The schema is made by `streamscore features init` alone; the commands that need it say in one line when it is
missing. And the connection problems a new user meets end in one line naming the setting to check: a Kafka
listener that closes the connection (another security protocol), nothing listening, SASL without a password,
a CA file that is not there."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session
from click.testing import CliRunner, Result

from streamscore.cli import main
from streamscore.settings import get_settings
from streamscore_examples.fraud.data import CARD_VIEW, write_views


def _invoke(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, list(args), env=env, input=input)
    finally:
        get_settings.cache_clear()


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture
def fresh_keyspace(stack: Any, cassandra_session: Session, tmp_path: Path) -> Iterator[dict[str, str]]:
    keyspace = f"init_{uuid.uuid4().hex[:10]}"
    views = tmp_path / "views.json"
    write_views(views)
    try:
        yield {"STREAMSCORE_CASSANDRA__KEYSPACE": keyspace, "STREAMSCORE_VIEWS_FILE": str(views),
               "STREAMSCORE_CACHE": "none"}
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def test_only_features_init_creates_the_schema(fresh_keyspace: dict[str, str], cassandra_session: Session) -> None:
    env, keyspace = fresh_keyspace, fresh_keyspace["STREAMSCORE_CASSANDRA__KEYSPACE"]
    missing = _one_line_error(_invoke(env, "features", "get", CARD_VIEW, "card-1"))
    assert f"Cassandra has no table {keyspace}.view_{CARD_VIEW}" in missing and "streamscore features init" in missing
    assert keyspace not in {row[0] for row in cassandra_session.execute("SELECT keyspace_name FROM "
                                                                         "system_schema.keyspaces")}
    put = '{"entity": "card-1", "features": {"txn_count_24h": 3}}\n'
    assert "streamscore features init" in _one_line_error(_invoke(env, "features", "put", CARD_VIEW, input=put))

    made = _invoke(env, "features", "init")
    assert made.exit_code == 0, made.output
    assert f"keyspace {keyspace}" in made.output and CARD_VIEW in made.output
    assert f"prediction log table {keyspace}.prediction_log in place" in made.output  # the worker then runs no DDL
    assert "prediction_log" in {row[0] for row in cassandra_session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,))}
    assert _invoke(env, "features", "put", CARD_VIEW, input=put).exit_code == 0
    again = _invoke(env, "features", "init")  # running it again keeps the rows
    assert again.exit_code == 0, again.output
    got = _invoke(env, "features", "get", CARD_VIEW, "card-1")
    assert got.exit_code == 0 and '"txn_count_24h": 3.0' in got.output, got.output


@pytest.fixture
def closing_listener() -> Iterator[int]:
    """A TCP port that accepts and closes every connection at once: a listener speaking another protocol."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        server.close()


def test_a_listener_that_closes_the_connection_hints_the_security_protocol(closing_listener: int) -> None:
    env = {"STREAMSCORE_KAFKA__BOOTSTRAP": f"127.0.0.1:{closing_listener}"}
    line = _one_line_error(_invoke(env, "subscribe", "--model", "fraud", "--count", "1"))
    assert f"Kafka at 127.0.0.1:{closing_listener} accepts connections" in line
    assert "STREAMSCORE_KAFKA__SECURITY_PROTOCOL" in line


def test_nothing_listening_says_so() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = _one_line_error(_invoke({"STREAMSCORE_KAFKA__BOOTSTRAP": f"127.0.0.1:{port}"},
                                   "subscribe", "--model", "fraud", "--count", "1"))
    assert f"nothing answers at 127.0.0.1:{port}" in line and "STREAMSCORE_KAFKA__BOOTSTRAP" in line


@pytest.mark.parametrize(("env", "expected"), [
    ({"STREAMSCORE_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "STREAMSCORE_KAFKA__SASL_USERNAME": "worker"},
     "STREAMSCORE_KAFKA__SASL_PASSWORD (or __SASL_PASSWORD_FILE) is not set, and security_protocol is SASL_SSL"),
    ({"STREAMSCORE_KAFKA__SECURITY_PROTOCOL": "SSL", "STREAMSCORE_KAFKA__SSL_CAFILE": "/nowhere/ca.pem"},
     "STREAMSCORE_KAFKA__SSL_CAFILE names /nowhere/ca.pem, which is not a file"),
    ({"STREAMSCORE_REDIS__SSL_CAFILE": "/nowhere/redis-ca.pem"},
     "STREAMSCORE_REDIS__SSL_CAFILE names /nowhere/redis-ca.pem, which is not a file"),
    ({"STREAMSCORE_CASSANDRA__PASSWORD_FILE": "/nowhere/password"},
     "STREAMSCORE_CASSANDRA__PASSWORD_FILE names /nowhere/password, which cannot be read"),
])
def test_unusable_settings_end_in_one_line_naming_the_setting(env: dict[str, str], expected: str) -> None:
    line = _one_line_error(_invoke(env, "features", "get", CARD_VIEW, "x"))
    assert expected in line, line
