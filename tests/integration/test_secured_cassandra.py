"""Least privilege against a real Cassandra with PasswordAuthenticator and CassandraAuthorizer (the stack's
secured profile, a Cassandra of its own on ports of its own): the schema is made by `features init` as an admin,
then an app role with SELECT and MODIFY on the keyspace only writes and reads features; a role that may not
create, a role without the grant, a wrong password and no user at all each end in one line naming the fix."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster, Session
from click.testing import CliRunner, Result

from streamscore.cli import main
from streamscore.settings import StackSettings, get_settings
from streamscore_examples.fraud.data import CARD_VIEW, write_views
from streamscore_stack import HOST, SECURED_CASSANDRA_SUPERUSER, Stack, StackError

APP_PASSWORD = "app-pass-not-shown"
KEYSPACE = f"secured_{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def secured_cassandra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    main_stack = get_settings().stack
    settings = StackSettings(dir=tmp_path_factory.mktemp("secured-stack"), cache_dir=main_stack.cache_dir,
                             cassandra_port=_free_port(), cassandra_storage_port=_free_port(), servers=["cassandra"],
                             secured=True, cassandra_heap_mb=768, start_timeout_s=300)
    stack = Stack(settings, echo=lambda line: None)
    try:
        stack.up()
    except StackError as error:
        pytest.fail(f"the secured Cassandra did not start:\n{error}", pytrace=False)
    try:
        yield settings.cassandra_port
    finally:
        stack.down()


@pytest.fixture(scope="module")
def admin(secured_cassandra: int) -> Iterator[Session]:
    cluster = Cluster([HOST], port=secured_cassandra, auth_provider=PlainTextAuthProvider(*SECURED_CASSANDRA_SUPERUSER))
    session = cluster.connect()
    session.execute(f"CREATE ROLE IF NOT EXISTS app WITH PASSWORD = '{APP_PASSWORD}' AND LOGIN = true")
    session.execute(f"CREATE ROLE IF NOT EXISTS nobody WITH PASSWORD = '{APP_PASSWORD}' AND LOGIN = true")
    yield session
    cluster.shutdown()


@pytest.fixture
def env(secured_cassandra: int, tmp_path: Path) -> dict[str, str]:
    views = tmp_path / "views.json"
    write_views(views)
    return {"STREAMSCORE_CASSANDRA__PORT": str(secured_cassandra), "STREAMSCORE_CASSANDRA__KEYSPACE": KEYSPACE,
            "STREAMSCORE_VIEWS_FILE": str(views), "STREAMSCORE_CACHE": "none"}


def _as(env: dict[str, str], user: str | None, password: str | None, *args: str, input: str | None = None) -> Result:
    credentials = {"STREAMSCORE_CASSANDRA__USERNAME": user, "STREAMSCORE_CASSANDRA__PASSWORD": password}
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, list(args), env={**env, **credentials}, input=input)
    finally:
        get_settings.cache_clear()


def _one_line(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert APP_PASSWORD not in result.output
    return lines[0]


PUT = '{"entity": "card-1", "features": {"txn_count_24h": 7}}\n'


def test_an_app_role_with_keyspace_grants_only_writes_and_reads_once_an_admin_made_the_schema(
        env: dict[str, str], admin: Any) -> None:
    refused = _one_line(_as(env, "app", APP_PASSWORD, "features", "init"))
    assert "Cassandra refused 'app' the schema of keyspace" in refused and "CREATE" in refused

    made = _as(env, *SECURED_CASSANDRA_SUPERUSER, "features", "init")
    assert made.exit_code == 0, made.output
    admin.execute(f"GRANT SELECT, MODIFY ON KEYSPACE {KEYSPACE} TO app")

    assert _as(env, "app", APP_PASSWORD, "features", "put", CARD_VIEW, input=PUT).exit_code == 0
    got = _as(env, "app", APP_PASSWORD, "features", "get", CARD_VIEW, "card-1")
    assert got.exit_code == 0 and '"txn_count_24h": 7.0' in got.output, got.output
    again = _as(env, *SECURED_CASSANDRA_SUPERUSER, "features", "init")  # the admin again: keyspace and rows kept
    assert again.exit_code == 0, again.output

    denied = _one_line(_as(env, "nobody", APP_PASSWORD, "features", "get", CARD_VIEW, "card-1"))
    assert f"GRANT SELECT, MODIFY ON KEYSPACE {KEYSPACE} TO <role>" in denied, denied


def test_a_wrong_password_and_no_user_end_in_one_line(env: dict[str, str], admin: Any) -> None:
    wrong = _one_line(_as(env, "app", "not-the-password", "features", "get", CARD_VIEW, "card-1"))
    assert "refused the credentials of user 'app'" in wrong and "STREAMSCORE_CASSANDRA__PASSWORD" in wrong
    assert "is it running" not in wrong and "not-the-password" not in wrong
    anonymous = _one_line(_as(env, None, None, "features", "get", CARD_VIEW, "card-1"))
    assert "wants credentials" in anonymous and "STREAMSCORE_CASSANDRA__USERNAME" in anonymous


def test_a_role_that_may_read_but_not_write_is_told_the_grant(env: dict[str, str], admin: Any) -> None:
    assert _as(env, *SECURED_CASSANDRA_SUPERUSER, "features", "init").exit_code == 0
    admin.execute("CREATE ROLE IF NOT EXISTS reader WITH PASSWORD = 'reader-pass' AND LOGIN = true")
    admin.execute(f"GRANT SELECT ON KEYSPACE {KEYSPACE} TO reader")
    assert _as(env, "reader", "reader-pass", "features", "get", CARD_VIEW, "card-9").exit_code == 0
    refused = _one_line(_as(env, "reader", "reader-pass", "features", "put", CARD_VIEW, input=PUT))
    assert "Cassandra refused 'reader' access to" in refused and "GRANT SELECT, MODIFY ON KEYSPACE" in refused
