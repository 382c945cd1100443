"""Failover on the cluster profile (``streamscore stack up --cluster``), requests streaming through two workers:
a broker SIGKILLed and restarted, a Cassandra node SIGKILLed and restarted, a rolling restart of the brokers.
Topics and keyspace are replicated 3 (``min.insync.replicas=2``), Cassandra read and written at QUORUM: nothing
may be lost and nothing degraded, and the latency bump is measured (cluster_scenarios.py).

Marked ``cluster``: skipped unless ``-m`` names it. ``make soak-cluster`` runs the long ones (``cluster and
soak``, each under both guarantees, 50k requests) and writes
``bench/results/reliability_cluster.{json,md}``; the short one (``pytest -m 'cluster and not
soak' tests/reliability``: one broker kill, 2k requests, 146 s here once the cluster runs) fits CI's time
where the cluster profile can run (about 5.7 GB of memory, three minutes to start).

``test_two_datacenters_each_region_reads_its_own_replicas`` (also ``cluster and not soak``) starts three more
Cassandra nodes as two datacenters (``.stack-cluster-2dc/``, 127.0.0.4-6; 105 s here, start included) and
checks that a reader with ``local_dc`` reads, at LOCAL_QUORUM, through its own datacenter's nodes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest

from streamscore.featurestore.cassandra import CassandraStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import CassandraSettings, Settings, StackClusterSettings, StackSettings
from streamscore_stack import ClusterStack

from .checks import assert_nothing_lost
from .cluster_scenarios import broker_failover, cassandra_failover, rolling_restart
from .harness import CLUSTER, REPO_ROOT, Scenario, Tally, TestCluster

pytestmark = pytest.mark.cluster


def check(result: Tally) -> None:
    assert_nothing_lost(result, result.notes["repeat_bound"])
    assert result.notes["degraded"] == 0, f"degraded answers with RF 3 and QUORUM: {result.describe()}"


@pytest.mark.timeout(600)
def test_cluster_broker_kill_loses_nothing(scenario: Callable[..., Scenario], cluster: TestCluster) -> None:
    result = asyncio.run(broker_failover(scenario("cluster-broker-short", CLUSTER), cluster, count=2_000, rate=100,
                                         down_s=8))

    check(result)


GUARANTEES = pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
"""Each soak scenario runs under both processing guarantees (``worker.processing_guarantee``); the collector
reads ``read_committed`` as the SDK does, so under exactly_once a repeat is a defect (checked: 0)."""

SOAK_REQUESTS = 50_000


def _guaranteed(scenario: Scenario, guarantee: str) -> Scenario:
    if guarantee == "exactly_once":
        scenario.extra_env["STREAMSCORE_WORKER__PROCESSING_GUARANTEE"] = guarantee
    return scenario


def check_guarantee(result: Tally, guarantee: str) -> None:
    check(result)
    if guarantee == "exactly_once":
        assert result.duplicated == 0, f"repeats under exactly_once: {result.describe()}"


def _name(base: str, guarantee: str) -> str:
    return base if guarantee == "at_least_once" else f"{base}_exactly_once"


@pytest.mark.soak
@pytest.mark.timeout(1800)
@GUARANTEES
def test_soak_cluster_leader_broker_killed(scenario: Callable[..., Scenario], cluster: TestCluster,
                                           cluster_report: Callable[[Tally], None], guarantee: str) -> None:
    result = asyncio.run(broker_failover(_guaranteed(scenario(_name("broker_leader_killed", guarantee), CLUSTER),
                                                     guarantee), cluster, count=SOAK_REQUESTS, rate=200))
    result.notes["guarantee"] = guarantee
    cluster_report(result)

    check_guarantee(result, guarantee)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@GUARANTEES
def test_soak_cluster_cassandra_node_killed(scenario: Callable[..., Scenario], cluster: TestCluster,
                                            cluster_report: Callable[[Tally], None], guarantee: str) -> None:
    result = asyncio.run(cassandra_failover(_guaranteed(scenario(_name("cassandra_node_killed", guarantee), CLUSTER),
                                                        guarantee), cluster, count=SOAK_REQUESTS, rate=200))
    result.notes["guarantee"] = guarantee
    cluster_report(result)

    check_guarantee(result, guarantee)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@GUARANTEES
def test_soak_cluster_rolling_broker_restart(scenario: Callable[..., Scenario], cluster: TestCluster,
                                             cluster_report: Callable[[Tally], None], guarantee: str) -> None:
    result = asyncio.run(rolling_restart(_guaranteed(scenario(_name("rolling_broker_restart", guarantee), CLUSTER),
                                                     guarantee), cluster, count=SOAK_REQUESTS, rate=200))
    result.notes["guarantee"] = guarantee
    cluster_report(result)

    check_guarantee(result, guarantee)


# ------------------------------------------------------------------------------------------- two datacenters

TWO_DC = StackSettings(servers=["cassandra"], cluster=StackClusterSettings(
    dir=REPO_ROOT / ".stack-cluster-2dc", cassandra_hosts=["127.0.0.4", "127.0.0.5", "127.0.0.6"],
    cassandra_port=29043, cassandra_storage_port=27001, cassandra_datacenters=["dc1", "dc1", "dc2"]))
"""Three Cassandra nodes as two datacenters (two in dc1, one in dc2), on addresses and ports of their own so
they run beside the cluster profile; only Cassandra (STREAMSCORE_STACK__SERVERS)."""


@pytest.fixture(scope="module")
def two_datacenters() -> Iterator[ClusterStack]:
    stack = ClusterStack(Settings().stack.model_copy(update={"servers": TWO_DC.servers, "cluster": TWO_DC.cluster}),
                         echo=lambda line: None)
    was_up = all(status.up for status in stack.status())
    try:
        stack.up()
        yield stack
    finally:
        if not was_up:
            stack.down()


def _coordinators(store: CassandraStore, view: str, keys: list[str]) -> set[str]:
    """Which node coordinated each single-key read of ``view`` (the driver's choice under the store's policy)."""
    futures = [store.session.execute_async(store._select[view], (key,)) for key in keys]
    for future in futures:
        future.result()
    return {str(future.coordinator_host) for future in futures}


@pytest.mark.timeout(600)
def test_two_datacenters_each_region_reads_its_own_replicas(two_datacenters: ClusterStack) -> None:
    hosts = TWO_DC.cluster.cassandra_hosts
    keyspace = f"two_dc_{uuid.uuid4().hex[:8]}"
    common = {"hosts": hosts, "port": TWO_DC.cluster.cassandra_port, "keyspace": keyspace,
              "replication_strategy": "NetworkTopologyStrategy", "datacenters": {"dc1": 2, "dc2": 1},
              "request_timeout_s": 10.0}
    views = parse_views({"views": [{"name": "card", "entity": "card_id",
                                    "features": [{"name": "spend", "type": "float", "default": -1.0}]}]})
    writer = CassandraStore(CassandraSettings(**common, write_consistency="EACH_QUORUM", local_dc="dc1"), views)
    writer.connect(create=True)
    stores = {}
    try:
        keys = [f"card-{number}" for number in range(40)]
        asyncio.run(writer.put("card", [(key, [float(number)], 1_000 + number) for number, key in enumerate(keys)]))
        for dc in ("dc1", "dc2"):
            stores[dc] = CassandraStore(CassandraSettings(**common, read_consistency="LOCAL_QUORUM", local_dc=dc),
                                        views)
            stores[dc].connect()
        rows = {dc: asyncio.run(store.get_many([("card", key) for key in keys])) for dc, store in stores.items()}
        coordinators = {dc: _coordinators(store, "card", keys) for dc, store in stores.items()}
        replication = writer.session.execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)).one()[0]
    finally:
        with contextlib.suppress(Exception):
            writer.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        for store in [writer, *stores.values()]:
            store.close()

    expected = [([float(number)], 1_000 + number) for number in range(40)]
    assert rows["dc1"] == expected and rows["dc2"] == expected
    assert replication == {"class": "org.apache.cassandra.locator.NetworkTopologyStrategy", "dc1": "2", "dc2": "1"}
    port = TWO_DC.cluster.cassandra_port
    assert coordinators["dc2"] == {f"{hosts[2]}:{port}"}, "a dc2 reader used a node of dc1"
    assert coordinators["dc1"] <= {f"{hosts[0]}:{port}", f"{hosts[1]}:{port}"}, "a dc1 reader used the dc2 node"
