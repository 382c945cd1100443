"""Integration fixtures: the real local stack (Kafka, Cassandra, Redis on 127.0.0.1).

The `stack` fixture reuses a running stack and starts one otherwise; a server that fails to start fails
the session with its log, instead of every test failing on a refused connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cassandra import ProtocolVersion
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import WhiteListRoundRobinPolicy

from streamscore.settings import get_settings
from streamscore_stack import HOST, ServerStatus, Stack, StackError

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> dict[str, ServerStatus]:
    try:
        statuses = Stack().ensure_up()
    except StackError as error:
        pytest.fail(f"the local stack could not start:\n{error}", pytrace=False)
    return {status.name: status for status in statuses}


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: dict[str, ServerStatus]) -> str:
    return stack["kafka"].address


@pytest.fixture(scope="session")
def cassandra_session(stack: dict[str, ServerStatus]) -> Iterator[Session]:
    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([HOST]), request_timeout=30.0)
    cluster = Cluster(
        [HOST],
        port=get_settings().stack.cassandra_port,
        protocol_version=ProtocolVersion.V5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    session = cluster.connect()
    yield session
    cluster.shutdown()


@pytest.fixture
def redis_client(stack: dict[str, ServerStatus]) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=get_settings().stack.redis_port)
    yield client
    client.close()
