"""The cluster profile of the local stack: three Kafka nodes, three Cassandra nodes and a Redis, all replicated.

- Kafka: three KRaft processes, each broker and controller (a static three-voter quorum), on 127.0.0.1 with ports
  of their own (``stack.cluster.kafka_ports`` / ``kafka_controller_ports``); topics default to replication
  factor 3 and ``min.insync.replicas=2``, so one node down loses and blocks nothing (acks=all);
- Cassandra: three nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux routes all of 127.0.0.0/8 to ``lo``, no
  alias needed), the same CQL and storage ports on each address, 127.0.0.1 the seed, GossipingPropertyFileSnitch
  with each node's datacenter from ``stack.cluster.cassandra_datacenters``. Started one after the other: a node
  answers CQL only once it joined the ring, and the next bootstraps only then (two bootstrapping at once is
  refused by Cassandra);
- Redis on its own port.

Everything lives under ``stack.cluster.dir`` (``.stack-cluster/``); the pid files there are the only record of
what it owns, exactly as for the single-node stack, so ``status``, ``logs`` and ``down`` cover every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from streamscore.settings import StackClusterSettings, StackSettings, get_settings

from .stack import (
    CASSANDRA_MAX_HEAP_MB,
    CHECKOUT,
    DEPLOY_DIR,
    FAILURE_LOG_LINES,
    HOST,
    KAFKA_MAX_HEAP_MB,
    ServerStatus,
    Stack,
    StackError,
    _Cassandra,
    _Context,
    _describe,
    _Kafka,
    _new_kafka_cluster_id,
    _Redis,
    _Server,
    _tail_text,
)

TOKEN_SPAN = 2**64


def _cluster(context: _Context) -> StackClusterSettings:
    return context.settings.cluster


class _KafkaNode(_Kafka):
    """Node ``index`` (1-based) of the three-node KRaft cluster."""

    typical_start_s = 9.0

    def __init__(self, context: _Context, index: int) -> None:
        self.index = index
        self.name = f"kafka-{index}"
        super().__init__(context)

    @property
    def port(self) -> int:
        return _cluster(self.context).kafka_ports[self.index - 1]

    @property
    def controller_port(self) -> int:
        return _cluster(self.context).kafka_controller_ports[self.index - 1]

    @property
    def ports(self) -> list[int]:
        return [self.port, self.controller_port]

    @property
    def heap_mb(self) -> int:
        return min(_cluster(self.context).kafka_heap_mb, KAFKA_MAX_HEAP_MB)

    def prepare(self, echo: Callable[[str], None]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        voters = ",".join(f"{number}@{HOST}:{port}"
                          for number, port in enumerate(_cluster(self.context).kafka_controller_ports, 1))
        self.render(
            DEPLOY_DIR / "kafka" / "cluster" / "server.properties",
            {
                "node_id": self.index,
                "voters": voters,
                "kafka_port": self.port,
                "kafka_controller_port": self.controller_port,
                "kafka_data_dir": self.data_dir,
            },
        )
        self.copy_conf(DEPLOY_DIR / "kafka" / "log4j2.xml")
        if not self.is_formatted():
            self.format_storage(echo)

    def format_storage(self, echo: Callable[[str], None]) -> None:
        """Every node formatted with the one cluster id, kept in the cluster dir."""
        import subprocess

        id_file = self.context.stack_dir / "kafka-cluster-id"
        if not id_file.is_file():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(_new_kafka_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        echo(f"formatting {self.name} storage in {self.data_dir} (cluster id {cluster_id})")
        command = [
            *self.java_prefix(),
            "kafka.tools.StorageTool", "format", "--ignore-formatted",
            "--cluster-id", cluster_id, "--config", str(self.conf_dir / "server.properties"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = _tail_text(result.stdout + result.stderr, FAILURE_LOG_LINES)
            raise StackError(f"formatting {self.name} storage failed; delete {self.data_dir} and retry:\n{output}")


class _CassandraNode(_Cassandra):
    """Node ``index`` (1-based) of the three-node Cassandra cluster, on its own loopback address."""

    typical_start_s = 30.0

    def __init__(self, context: _Context, index: int) -> None:
        self.index = index
        self.name = f"cassandra-{index}"
        super().__init__(context)
        self.host = _cluster(context).cassandra_hosts[index - 1]

    @property
    def port(self) -> int:
        return _cluster(self.context).cassandra_port

    @property
    def ports(self) -> list[int]:
        return [self.port, _cluster(self.context).cassandra_storage_port]

    @property
    def heap_mb(self) -> int:
        return min(_cluster(self.context).cassandra_heap_mb, CASSANDRA_MAX_HEAP_MB)

    @property
    def datacenter(self) -> str:
        return _cluster(self.context).cassandra_datacenters[self.index - 1]

    def initial_token(self) -> int:
        nodes = len(_cluster(self.context).cassandra_hosts)
        return -(2**63) + (self.index - 1) * (TOKEN_SPAN // nodes)

    def prepare(self, echo: Callable[[str], None]) -> None:
        for sub_dir in ("data", "commitlog", "saved_caches", "hints", "cdc_raw"):
            (self.data_dir / sub_dir).mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "triggers").mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        cluster = _cluster(self.context)
        self.render(
            DEPLOY_DIR / "cassandra" / "cluster" / "cassandra.yaml",
            {
                "cassandra_host": self.host,
                "cassandra_seeds": f"{cluster.cassandra_hosts[0]}:{cluster.cassandra_storage_port}",
                "cassandra_port": cluster.cassandra_port,
                "cassandra_storage_port": cluster.cassandra_storage_port,
                "cassandra_data_dir": self.data_dir,
                "initial_token": self.initial_token(),
            },
        )
        self.render(DEPLOY_DIR / "cassandra" / "cluster" / "cassandra-rackdc.properties",
                    {"dc": self.datacenter, "rack": "rack1"})
        self.copy_conf(DEPLOY_DIR / "cassandra" / "logback.xml")

    def cassandra_properties(self) -> list[str]:
        return [
            f"-Dcassandra.config=file://{self.conf_dir / 'cassandra.yaml'}",
            f"-Dcassandra-rackdc.properties=file://{self.conf_dir / 'cassandra-rackdc.properties'}",
            f"-Dcassandra.storagedir={self.data_dir}",
            f"-Dcassandra.logdir={self.logs_dir}",
            f"-Dcassandra.triggers_dir={self.conf_dir / 'triggers'}",
            f"-Dlogback.configurationFile={self.conf_dir / 'logback.xml'}",
            "-Dcassandra-foreground=yes",
            # Three nodes on one host: gossip settles in well under the defaults (30 s ring delay).
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=3000",
        ]


class _ClusterRedis(_Redis):
    @property
    def port(self) -> int:
        return _cluster(self.context).redis_port


class ClusterStack(Stack):
    """``stack up --cluster``: start, stop and inspect the three-node Kafka and Cassandra clusters and Redis."""

    def __init__(self, settings: StackSettings | None = None, echo: Callable[[str], None] = print) -> None:
        base = settings or get_settings().stack
        cluster_dir = base.cluster.dir or CHECKOUT / ".stack-cluster"
        super().__init__(base.model_copy(update={"dir": cluster_dir}), echo)
        self.cluster = base.cluster
        self.started_in_s: float | None = None

    def _servers(self) -> list[_Server]:
        context = _Context(settings=self.settings, stack_dir=self.dir, tools=self._tools, jars=self.jars)
        count = len(self.cluster.kafka_ports)
        kafka: list[_Server] = [_KafkaNode(context, index) for index in range(1, count + 1)]
        cassandra: list[_Server] = [_CassandraNode(context, index)
                                    for index in range(1, len(self.cluster.cassandra_hosts) + 1)]
        kinds: dict[str, list[_Server]] = {"kafka": kafka, "cassandra": cassandra, "redis": [_ClusterRedis(context)]}
        # STREAMSCORE_STACK__SERVERS picks kinds here too: a Cassandra-only cluster, say
        return [server for kind, servers in kinds.items() if kind in self.settings.servers for server in servers]

    def up(self) -> list[ServerStatus]:
        """Start whatever is not running: the Kafka nodes and Redis at once (a KRaft node waits for a quorum of
        its voters), the Cassandra nodes one after the other; idempotent."""
        started = time.monotonic()
        with self._lock():
            self._preflight()
            servers = self._servers()
            stopped = self._stopped_servers(servers)
            nodes = [server for server in servers if isinstance(server, _CassandraNode)]
            launches = {server.name: self._start(server) for server in servers
                        if server in stopped and server not in nodes}
            ready = {}
            for node in nodes:
                launch = self._start(node) if node in stopped else None
                ready[node.name] = self._await_ready(node, launch)
            for server in servers:
                if server.name not in ready:
                    ready[server.name] = self._await_ready(server, launches.get(server.name))
            statuses = [ready[server.name] for server in servers]
        self.started_in_s = time.monotonic() - started
        for status in statuses:
            self.echo(_describe(status))
        if stopped:
            self.echo(f"cluster ready in {self.started_in_s:.1f} s; resident memory {self.rss_mb():.0f} MB")
        return statuses

    def rss_mb(self) -> float:
        """Resident memory of every process of the cluster, summed (MB)."""
        return sum(self.rss_by_server().values())

    def rss_by_server(self) -> dict[str, float]:
        found = {}
        for server in self._servers():
            pid = self._owned_pid(server)
            found[server.name] = _rss_mb(pid) if pid else 0.0
        return found


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


__all__ = ["ClusterStack"]
