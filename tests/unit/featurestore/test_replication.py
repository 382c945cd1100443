"""The ``cassandra`` replication settings -> the keyspace's replication map and the driver's options."""

from __future__ import annotations

import pytest
from cassandra import ConsistencyLevel
from cassandra.policies import DCAwareRoundRobinPolicy, RoundRobinPolicy, TokenAwarePolicy
from pydantic import ValidationError

from streamscore.featurestore import replication
from streamscore.settings import CassandraSettings, Settings


def test_default_is_simple_strategy_rf1_local_one_round_robin() -> None:
    settings = CassandraSettings()

    assert replication.replication_cql(settings) == "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    assert replication.read_consistency(settings) == ConsistencyLevel.LOCAL_ONE
    assert replication.write_consistency(settings) == ConsistencyLevel.LOCAL_ONE
    policy = replication.load_balancing(settings)
    assert isinstance(policy, TokenAwarePolicy) and isinstance(policy._child_policy, RoundRobinPolicy)


def test_network_topology_with_two_datacenters_and_local_quorum() -> None:
    settings = CassandraSettings(keyspace="feats", replication_strategy="NetworkTopologyStrategy",
                                 datacenters={"west": 1, "east": 2}, read_consistency="LOCAL_QUORUM",
                                 write_consistency="EACH_QUORUM", local_dc="east")

    assert replication.create_keyspace_cql(settings) == (
        "CREATE KEYSPACE IF NOT EXISTS feats WITH replication = "
        "{'class': 'NetworkTopologyStrategy', 'east': 2, 'west': 1}")
    assert replication.read_consistency(settings) == ConsistencyLevel.LOCAL_QUORUM
    assert replication.write_consistency(settings) == ConsistencyLevel.EACH_QUORUM
    policy = replication.load_balancing(settings)
    assert isinstance(policy, TokenAwarePolicy)
    child = policy._child_policy
    assert isinstance(child, DCAwareRoundRobinPolicy)
    assert (child.local_dc, child.used_hosts_per_remote_dc) == ("east", 0)


def test_simple_strategy_keeps_its_factor() -> None:
    settings = CassandraSettings(replication_factor=3, read_consistency="QUORUM")

    assert replication.keyspace_replication(settings) == {"class": "SimpleStrategy", "replication_factor": 3}
    assert replication.read_consistency(settings) == ConsistencyLevel.QUORUM


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSCORE_CASSANDRA__REPLICATION_STRATEGY", "NetworkTopologyStrategy")
    monkeypatch.setenv("STREAMSCORE_CASSANDRA__DATACENTERS", '{"dc1": 3}')
    monkeypatch.setenv("STREAMSCORE_CASSANDRA__LOCAL_DC", "dc1")
    monkeypatch.setenv("STREAMSCORE_CASSANDRA__READ_CONSISTENCY", "LOCAL_QUORUM")

    settings = Settings().cassandra

    assert replication.keyspace_replication(settings) == {"class": "NetworkTopologyStrategy", "dc1": 3}
    assert settings.local_dc == "dc1" and settings.read_consistency == "LOCAL_QUORUM"


@pytest.mark.parametrize(("fields", "says"), [
    ({"replication_strategy": "NetworkTopologyStrategy"}, "DATACENTERS is empty"),
    ({"datacenters": {"dc1": 3}}, "REPLICATION_STRATEGY=NetworkTopologyStrategy"),
    ({"replication_strategy": "NetworkTopologyStrategy", "datacenters": {"dc1": 0}}, "at least 1"),
    ({"replication_strategy": "NetworkTopologyStrategy", "datacenters": {"dc1": 3}, "local_dc": "dc2"},
     "not one of the keyspace's datacenters"),
    ({"read_consistency": "ANY"}, "read_consistency"),
    ({"replication_factor": 0}, "replication_factor"),
    ({"speculative_retry": "50ms'; DROP KEYSPACE x; --"}, "speculative_retry"),
])
def test_unusable_replication_settings_are_refused_in_one_line(fields: dict, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        CassandraSettings(**fields)

    assert says in str(refused.value)


def test_speculative_retry_becomes_a_table_option() -> None:
    assert replication.table_options(CassandraSettings()) == ""
    assert replication.table_options(CassandraSettings(speculative_retry="50ms")) == " WITH speculative_retry = '50ms'"
    assert replication.table_options(CassandraSettings(speculative_retry="99p")) == " WITH speculative_retry = '99p'"
