"""How the ``cassandra`` settings become the keyspace's replication and the driver's options.

- ``keyspace_replication``: the ``replication`` map of ``CREATE KEYSPACE`` (SimpleStrategy with one factor, or
  NetworkTopologyStrategy with a factor per datacenter);
- ``load_balancing``: token-aware routing over the local datacenter's nodes (``local_dc``), or over every node;
- ``read_consistency`` / ``write_consistency``: the driver's ``ConsistencyLevel`` of each;
- ``table_options``: the feature tables' ``speculative_retry``.

Kept apart from the store so the mapping is tested without a cluster (tests/unit/featurestore/test_replication.py)
and the prediction log creates its keyspace the same way.
"""

from __future__ import annotations

from cassandra import ConsistencyLevel
from cassandra.policies import DCAwareRoundRobinPolicy, LoadBalancingPolicy, RoundRobinPolicy, TokenAwarePolicy

from streamscore.settings import CassandraSettings


def keyspace_replication(settings: CassandraSettings) -> dict[str, str | int]:
    """The ``replication`` map of the keyspace streamscore creates."""
    if settings.replication_strategy == "NetworkTopologyStrategy":
        return {"class": "NetworkTopologyStrategy", **dict(sorted(settings.datacenters.items()))}
    return {"class": "SimpleStrategy", "replication_factor": settings.replication_factor}


def replication_cql(settings: CassandraSettings) -> str:
    """``keyspace_replication`` as CQL: ``{'class': 'SimpleStrategy', 'replication_factor': 1}``."""
    items = ", ".join(f"'{key}': {value if isinstance(value, int) else repr(value)}"
                      for key, value in keyspace_replication(settings).items())
    return "{" + items + "}"


def create_keyspace_cql(settings: CassandraSettings) -> str:
    return f"CREATE KEYSPACE IF NOT EXISTS {settings.keyspace} WITH replication = {replication_cql(settings)}"


def table_options(settings: CassandraSettings) -> str:
    """The ``WITH ...`` of the feature tables' ``CREATE TABLE`` (empty: Cassandra's defaults)."""
    if settings.speculative_retry is None:
        return ""
    return f" WITH speculative_retry = '{settings.speculative_retry}'"


def load_balancing(settings: CassandraSettings) -> LoadBalancingPolicy:
    """Token-aware (a single-key query goes to a replica of its key; an ``IN`` over many keys to the child's
    pick) over the local datacenter only when ``local_dc`` is set (no remote host is ever used: a region reads
    its own replicas, and ``LOCAL_*`` levels count them), else over every node round robin."""
    child: LoadBalancingPolicy
    if settings.local_dc is not None:
        child = DCAwareRoundRobinPolicy(local_dc=settings.local_dc, used_hosts_per_remote_dc=0)
    else:
        child = RoundRobinPolicy()
    return TokenAwarePolicy(child)


def read_consistency(settings: CassandraSettings) -> int:
    return int(getattr(ConsistencyLevel, settings.read_consistency))


def write_consistency(settings: CassandraSettings) -> int:
    return int(getattr(ConsistencyLevel, settings.write_consistency))


__all__ = ["create_keyspace_cql", "keyspace_replication", "load_balancing", "read_consistency",
           "replication_cql", "table_options", "write_consistency"]
