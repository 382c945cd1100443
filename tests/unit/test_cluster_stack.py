"""The cluster profile's layout without starting anything: three Kafka nodes forming one quorum, three Cassandra
nodes on their own loopback addresses with evenly spaced tokens and their datacenters, every pid in its dir."""

from __future__ import annotations

from pathlib import Path

from streamscore.settings import StackClusterSettings, StackSettings
from streamscore_stack import ClusterStack
from streamscore_stack.cluster import _CassandraNode, _KafkaNode


def _stack(tmp_path: Path, **cluster: object) -> ClusterStack:
    settings = StackSettings(cache_dir=tmp_path / "cache", cluster=StackClusterSettings(dir=tmp_path / "c", **cluster))
    return ClusterStack(settings, echo=lambda line: None)


def test_seven_servers_on_their_own_ports_and_addresses(tmp_path: Path) -> None:
    servers = _stack(tmp_path)._servers()

    assert [server.name for server in servers] == ["kafka-1", "kafka-2", "kafka-3", "cassandra-1", "cassandra-2",
                                                   "cassandra-3", "redis"]
    assert [server.address for server in servers] == [
        "127.0.0.1:29092", "127.0.0.1:29093", "127.0.0.1:29094",
        "127.0.0.1:29042", "127.0.0.2:29042", "127.0.0.3:29042", "127.0.0.1:26379"]
    assert servers[0].ports == [29092, 29192] and servers[4].ports == [29042, 27000]
    assert {server.pid_file.parent for server in servers} == {tmp_path / "c" / "pids"}


def test_cassandra_nodes_render_their_address_seed_token_and_datacenter(tmp_path: Path) -> None:
    stack = _stack(tmp_path, cassandra_datacenters=["dc1", "dc1", "dc2"])
    nodes = [server for server in stack._servers() if isinstance(server, _CassandraNode)]

    for node in nodes:
        node.prepare(lambda line: None)
    yamls = [(node.conf_dir / "cassandra.yaml").read_text() for node in nodes]
    rackdc = [(node.conf_dir / "cassandra-rackdc.properties").read_text() for node in nodes]

    assert [f"listen_address: 127.0.0.{index}" in text for index, text in enumerate(yamls, 1)] == [True] * 3
    assert all('seeds: "127.0.0.1:27000"' in text and "GossipingPropertyFileSnitch" in text for text in yamls)
    tokens = [int(text.split("initial_token: ")[1].split()[0]) for text in yamls]
    assert tokens == [-(2**63), -(2**63) + 2**64 // 3, -(2**63) + 2 * (2**64 // 3)]
    assert ["dc=dc1" in rackdc[0], "dc=dc1" in rackdc[1], "dc=dc2" in rackdc[2]] == [True] * 3
    assert all("{{" not in text for text in yamls + rackdc)


def test_kafka_nodes_name_the_same_three_voters(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    nodes = [server for server in stack._servers() if isinstance(server, _KafkaNode)]
    for node in nodes:
        node.is_formatted = lambda: True  # type: ignore[method-assign]  # formatting needs Java
        node.prepare(lambda line: None)

    rendered = [(node.conf_dir / "server.properties").read_text() for node in nodes]

    voters = "controller.quorum.voters=1@127.0.0.1:29192,2@127.0.0.1:29193,3@127.0.0.1:29194"
    assert all(voters in text for text in rendered)
    assert [f"node.id={index}" in text for index, text in enumerate(rendered, 1)] == [True] * 3
    assert all("min.insync.replicas=2" in text and "{{" not in text for text in rendered)
