"""Failover on the cluster profile (``streamscore stack up --cluster``), requests streaming through two workers:
a broker SIGKILLed and restarted, a Cassandra node SIGKILLed and restarted, a rolling restart of the brokers.
Topics and keyspace are replicated 3 (``min.insync.replicas=2``), Cassandra read and written at QUORUM: nothing
may be lost and nothing degraded, and the latency bump is measured (cluster_scenarios.py).

Marked ``cluster``: skipped unless ``-m`` names it. ``make soak-cluster`` runs the long ones (``cluster and
soak``) and writes ``bench/results/reliability_cluster.{json,md}``; the short one (``pytest -m 'cluster and not
soak' tests/reliability``: one broker kill, 2k requests, about a minute once the cluster runs) fits CI's time
where the cluster profile can run (about 5.7 GB of memory, three minutes to start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .checks import assert_nothing_lost
from .cluster_scenarios import broker_failover, cassandra_failover, rolling_restart
from .harness import CLUSTER, Scenario, Tally, TestCluster

pytestmark = pytest.mark.cluster


def check(result: Tally) -> None:
    assert_nothing_lost(result, result.notes["repeat_bound"])
    assert result.notes["degraded"] == 0, f"degraded answers with RF 3 and QUORUM: {result.describe()}"


@pytest.mark.timeout(600)
def test_cluster_broker_kill_loses_nothing(scenario: Callable[..., Scenario], cluster: TestCluster) -> None:
    result = asyncio.run(broker_failover(scenario("cluster-broker-short", CLUSTER), cluster, count=2_000, rate=100,
                                         down_s=8))

    check(result)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_cluster_leader_broker_killed(scenario: Callable[..., Scenario], cluster: TestCluster,
                                           cluster_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(broker_failover(scenario("broker_leader_killed", CLUSTER), cluster, count=20_000,
                                         rate=400))
    cluster_report(result)

    check(result)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_cluster_cassandra_node_killed(scenario: Callable[..., Scenario], cluster: TestCluster,
                                            cluster_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(cassandra_failover(scenario("cassandra_node_killed", CLUSTER), cluster, count=20_000,
                                            rate=400))
    cluster_report(result)

    check(result)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_cluster_rolling_broker_restart(scenario: Callable[..., Scenario], cluster: TestCluster,
                                             cluster_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(rolling_restart(scenario("rolling_broker_restart", CLUSTER), cluster, count=40_000,
                                         rate=400))
    cluster_report(result)

    check(result)
