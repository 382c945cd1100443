"""Reliability fixtures: the shared stack, the session's library, the private stack for the scenarios that stop
servers, and the soak report.

Every test here is marked ``reliability``. Those also marked ``soak`` are long and run only when the ``-m``
expression names soak (``make soak`` runs ``pytest -m soak tests/reliability``); each soak test adds its row to
``bench/results/reliability.json`` and ``reliability.md`` as soon as it has one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamscore_stack import Stack, StackError

from .harness import (
    CLUSTER,
    SHARED,
    Endpoints,
    Library,
    PrivateStack,
    Scenario,
    Tally,
    TestCluster,
    build_library,
    fill_store,
    write_report,
)

HERE = Path(__file__).parent
RESULTS = HERE.parents[1] / "bench" / "results"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak_selected = "soak" in (config.getoption("markexpr") or "")
    cluster_selected = "cluster" in (config.getoption("markexpr") or "")
    for item in items:
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.reliability)
        if item.get_closest_marker("cluster") and not cluster_selected:
            item.add_marker(pytest.mark.skip(reason="needs the cluster profile: `make soak-cluster` runs the long "
                                                    "ones, `pytest -m 'cluster and not soak'` the short one"))
        elif item.get_closest_marker("soak") and not soak_selected:
            item.add_marker(pytest.mark.skip(reason="long soak: `make soak` runs it (pytest -m soak)"))


@pytest.fixture(scope="session")
def shared_stack() -> None:
    try:
        Stack().ensure_up()
    except StackError as error:
        pytest.fail(f"the local stack could not start:\n{error}", pytrace=False)


@pytest.fixture(scope="session")
def library(shared_stack: None, tmp_path_factory: pytest.TempPathFactory) -> Library:
    built = build_library(tmp_path_factory.mktemp("library"))
    asyncio.run(fill_store(built, SHARED))
    return built


@pytest.fixture
def scenario(library: Library, tmp_path: Path) -> Callable[..., Scenario]:
    def make(name: str, endpoints: Endpoints = SHARED, **extra_env: str) -> Scenario:
        return Scenario(name, library, endpoints, tmp_path / name, dict(extra_env))

    return make


@pytest.fixture(scope="session")
def private_kafka() -> Iterator[PrivateStack]:
    """Only the private stack's Kafka: what the short broker-restart scenario needs (seconds to start)."""
    stack = PrivateStack(["kafka"])
    was_up = all(status.up for status in stack.status())
    try:
        stack.up()
    except StackError as error:
        pytest.fail(f"the private Kafka could not start:\n{error}", pytrace=False)
    yield stack
    if not was_up:
        stack.down()


@pytest.fixture(scope="session")
def private_stack(library: Library) -> Iterator[PrivateStack]:
    """The whole private stack (Kafka, Cassandra, Redis on their own ports), the library's rows written into
    its Cassandra; stopped at the end of the session through the Stack API."""
    from .harness import PRIVATE

    stack = PrivateStack()
    try:
        try:
            stack.up()
        except StackError as error:
            pytest.fail(f"the private stack could not start:\n{error}", pytrace=False)
        asyncio.run(fill_store(library, PRIVATE))
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def cluster(library: Library) -> Iterator[TestCluster]:
    """The cluster profile (``.stack-cluster/``), started if it is not running (about three minutes) and then
    left as it was found; the library's rows written into its Cassandra (replication factor 3, QUORUM)."""
    stack = TestCluster()
    was_up = all(status.up for status in stack.status())
    try:
        try:
            stack.up()
        except StackError as error:
            pytest.fail(f"the cluster profile could not start:\n{error}", pytrace=False)
        asyncio.run(fill_store(library, CLUSTER))
        yield stack
    finally:
        if not was_up:
            stack.down()


@pytest.fixture(scope="session")
def soak_report() -> Callable[[Tally], None]:
    """Records a soak scenario's row and rewrites the report files at once (a later failure keeps it)."""
    rows: dict[str, dict[str, Any]] = {}

    def record(result: Tally) -> None:
        rows[result.scenario] = result.row()
        write_report(rows, RESULTS)

    return record


CLUSTER_COLUMNS = ("degraded", "p99_before_ms", "p99_during_ms", "max_during_ms")


@pytest.fixture(scope="session")
def cluster_report() -> Callable[[Tally], None]:
    """Records a cluster scenario's row into bench/results/reliability_cluster.{json,md}, keeping the rows of
    the scenarios this session did not run."""
    import json

    path = RESULTS / "reliability_cluster.json"
    rows: dict[str, dict[str, Any]] = json.loads(path.read_text())["scenarios"] if path.is_file() else {}

    def record(result: Tally) -> None:
        rows[result.scenario] = result.row()
        write_report(rows, RESULTS, name="reliability_cluster", extra_columns=CLUSTER_COLUMNS,
                     title="Failover on the cluster profile",
                     command="`make soak-cluster` (tests/reliability/test_cluster.py, `pytest -m 'cluster and soak'`)")

    return record
