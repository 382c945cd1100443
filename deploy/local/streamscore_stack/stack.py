"""The local stack: real Apache Kafka (KRaft), Apache Cassandra and Redis on 127.0.0.1.

Kafka and Cassandra run from their Maven Central jars (resolved once by ``deploy/local/pom.xml`` into the jar
cache, ``StackSettings.cache_dir``), Redis from the Debian ``redis-server`` package. Configs are rendered from
the templates in ``deploy/local/`` into ``<stack dir>/conf``; data, logs and pid files live under the stack dir
too, so deleting that folder resets everything.

This package is checkout tooling: it lives in ``deploy/local/streamscore_stack/`` and finds its Maven project
and templates next to itself, and the stack dir and jar cache default to ``.stack/`` and ``.cache/`` at the root
of that checkout (whatever the current directory). Installed anywhere else, :class:`Stack` refuses with a
:class:`StackError` that says so.

Servers are started in their own sessions so they outlive the CLI that started them; the pid files are the
only record of what this module owns, and nothing else is ever signalled.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamscore.settings import StackSettings, get_settings

HOST = "127.0.0.1"
DEPLOY_DIR = Path(__file__).resolve().parents[1]
"""``deploy/local/``: the Maven project and config templates, found next to this package."""
CHECKOUT = DEPLOY_DIR.parents[1]
"""The checkout this package runs from; the default stack dir and jar cache are at its root."""
KAFKA_MAX_HEAP_MB = 1024
CASSANDRA_MAX_HEAP_MB = 1536
SECURED_KAFKA_USER = ("streamscore", "streamscore-scram-secret")
"""The SCRAM-SHA-512 user of the secured profile's SASL_PLAINTEXT listener (``kafka_sasl_port``)."""
SECURED_CASSANDRA_SUPERUSER = ("cassandra", "cassandra")
"""The superuser a PasswordAuthenticator Cassandra makes at its first start (the secured profile's admin)."""
STOP_GRACE_S = 60.0
"""Cassandra drains its memtables on SIGTERM; give it that long before SIGKILL."""
PROBE_TIMEOUT_S = 5.0
FAILURE_LOG_LINES = 40

JAVA_HINT = "Java 17 not found: install it with `apt-get install -y openjdk-17-jre-headless`"
MAVEN_HINT = "Maven not found (needed once, to fetch the Kafka and Cassandra jars): `apt-get install -y maven`"
REDIS_HINT = "redis-server not found: install it with `apt-get install -y redis-server`"
CHECKOUT_HINT = (
    "the local stack runs from a streamscore checkout, and this copy of its manager ({package}) is not in one "
    "(no deploy/local/pom.xml beside it): clone the repository and run `make stack-up` (or "
    "`.venv/bin/streamscore stack ...`) there"
)

# From Cassandra's conf/jvm17-server.options: the JDK internals Cassandra 5.0 reaches into on Java 17.
CASSANDRA_JPMS_FLAGS = [
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
]


@dataclass
class ServerStatus:
    name: str
    up: bool
    pid: int | None
    address: str
    version: str | None
    log_file: Path
    detail: str = ""


class StackError(Exception):
    """The stack could not do what was asked; the message says what was wrong and what to do."""


# ----------------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class _Tools:
    java: Path
    redis_server: Path


def _java_major_version(java: Path) -> int | None:
    try:
        result = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    # Java 8 and older report themselves as 1.x.
    return int(match.group(2) or 0) if major == 1 else major


def _find_java17() -> Path:
    """Java 17 exactly: Kafka 4 needs 17+, and Cassandra 5.0 supports 11 and 17 only."""
    candidates = [shutil.which("java"), *sorted(map(str, Path("/usr/lib/jvm").glob("*17*/bin/java")))]
    for candidate in filter(None, candidates):
        if _java_major_version(Path(candidate)) == 17:
            return Path(candidate).resolve()
    raise StackError(JAVA_HINT)


def _find_tools() -> _Tools:
    java = _find_java17()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise StackError(REDIS_HINT)
    # Not resolved: Debian links redis-server to redis-check-rdb, which picks its role from argv[0].
    return _Tools(java=java, redis_server=Path(redis_server))


# ------------------------------------------------------------------------------------------ jar cache


class _JarCache:
    """Runtime class paths of Kafka and Cassandra, copied out of Maven Central once per pom change."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.kafka_libs = cache_dir / "kafka-libs"
        self.cassandra_libs = cache_dir / "cassandra-libs"
        self._stamp = cache_dir / "libs.sha256"

    def is_current(self) -> bool:
        if not (self._stamp.is_file() and self._stamp.read_text().strip() == self._poms_digest()):
            return False
        return all(any(libs.glob("*.jar")) for libs in (self.kafka_libs, self.cassandra_libs))

    def resolve(self, echo: Callable[[str], None]) -> None:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(MAVEN_HINT)
        echo(f"resolving Kafka and Cassandra jars from Maven Central into {self.cache_dir} (once) ...")
        started = time.monotonic()
        # Stale jars of an older pin would sit beside the new ones on the wildcard class path.
        shutil.rmtree(self.kafka_libs, ignore_errors=True)
        shutil.rmtree(self.cassandra_libs, ignore_errors=True)
        self._run_maven(mvn)
        self._stamp.write_text(self._poms_digest() + "\n")
        echo(f"jars resolved in {time.monotonic() - started:.1f} s")

    def kafka_version(self) -> str | None:
        for jar in self.kafka_libs.glob("kafka_2.13-*.jar"):
            return jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
        return None

    def jamm_agent(self) -> Path | None:
        return next(iter(self.cassandra_libs.glob("jamm-*.jar")), None)

    def _run_maven(self, mvn: str) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        command = [
            mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(DEPLOY_DIR / "pom.xml"),
            f"-Dmaven.repo.local={self.cache_dir / 'm2'}", f"-Dstack.libs={self.cache_dir}",
            "dependency:copy-dependencies",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = _tail_text(result.stdout + result.stderr, FAILURE_LOG_LINES)
            raise StackError(
                "Maven could not resolve the Kafka/Cassandra jars (is Maven Central reachable? a proxy goes "
                f"in ~/.m2/settings.xml):\n{output}"
            )

    @staticmethod
    def _poms_digest() -> str:
        digest = hashlib.sha256()
        for pom in sorted(DEPLOY_DIR.rglob("pom.xml")):
            digest.update(pom.read_bytes())
        return digest.hexdigest()


# ------------------------------------------------------------------------------------------- processes


def _spawn(argv: list[str], out_file: Path) -> int:
    """Start argv in its own session with stdout+stderr appended to out_file.

    posix_spawn instead of subprocess.Popen: a Popen object still holding a live server warns
    (ResourceWarning) when collected, and these servers are meant to outlive us.
    """
    out_file.parent.mkdir(parents=True, exist_ok=True)
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(out_file), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=file_actions, setsid=True)


def _reap_if_child(pid: int) -> None:
    # A server started by an earlier CLI run is not our child: init reaps it, not us.
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_alive(pid: int) -> bool:
    _reap_if_child(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain spaces or parens.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _belongs_to_stack(pid: int, stack_dir: Path) -> bool:
    """Whether pid is one of our servers, not an unrelated process that reused a recorded pid."""
    stack_dir = stack_dir.resolve()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    # Redis rewrites its command line into a process title, but it chdirs into its data dir.
    return str(stack_dir) in cmdline or cwd == stack_dir or stack_dir in cwd.parents


def _port_is_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int) -> str:
    if not path.is_file():
        return ""
    with path.open(errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip("\n")


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Probing a server that is still starting makes client libraries log connection errors; those are
    expected here and only bury the real failure message."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _run_coroutine(make_coroutine: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """asyncio.run in a fresh thread, so callers that already run an event loop can use the stack too."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


# --------------------------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class _Context:
    settings: StackSettings
    stack_dir: Path
    tools: _Tools | None
    jars: _JarCache


class _Server(ABC):
    name: str
    log_name: str
    typical_start_s: float
    """Seconds from launch to answering on this 2-core machine; only orders the starts."""
    host: str = HOST
    """The loopback address the server binds (the cluster's Cassandra nodes each have one of their own)."""

    def __init__(self, context: _Context) -> None:
        self.context = context
        stack_dir = context.stack_dir
        self.conf_dir = stack_dir / "conf" / self.name
        self.data_dir = stack_dir / "data" / self.name
        self.logs_dir = stack_dir / "logs" / self.name
        self.pid_file = stack_dir / "pids" / f"{self.name}.pid"
        self.log_file = self.logs_dir / self.log_name
        self.out_file = self.logs_dir / f"{self.name}.out"

    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    def ports(self) -> list[int]:
        """Every port the server binds; all must be free before it starts."""
        return [self.port]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @abstractmethod
    def prepare(self, echo: Callable[[str], None]) -> None:
        """Render config and create folders; runs before every start."""

    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    def probe(self) -> str:
        """Ask the server over its own protocol whether it serves; return its version or raise."""

    @property
    def tools(self) -> _Tools:
        assert self.context.tools is not None, "preflight runs before any server starts"
        return self.context.tools

    def render(self, template: Path, values: dict[str, object]) -> Path:
        rendered = self.conf_dir / template.name
        rendered.parent.mkdir(parents=True, exist_ok=True)
        rendered.write_text(_render(template.read_text(), values, template))
        return rendered

    def copy_conf(self, source: Path) -> Path:
        target = self.conf_dir / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def jvm_common_flags(self, heap_mb: int) -> list[str]:
        return [
            f"-Xms{heap_mb}m",
            f"-Xmx{heap_mb}m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            # JVM crash files go next to the logs, not into whatever directory `stack up` ran from.
            f"-XX:ErrorFile={self.logs_dir}/hs_err_pid%p.log",
        ]


def _render(text: str, values: dict[str, object], template: Path) -> str:
    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise StackError(f"{template}: unknown placeholder {{{{{key}}}}}; known: {sorted(values)}")
        return str(values[key])

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", substitute, text)


class _Kafka(_Server):
    name = "kafka"
    log_name = "server.log"
    typical_start_s = 7.0

    @property
    def port(self) -> int:
        return self.context.settings.kafka_port

    @property
    def ports(self) -> list[int]:
        settings = self.context.settings
        secured = [settings.kafka_sasl_port, settings.kafka_sasl_ssl_port] if settings.secured else []
        return [self.port, settings.kafka_controller_port, *secured]

    @property
    def heap_mb(self) -> int:
        return min(self.context.settings.kafka_heap_mb, KAFKA_MAX_HEAP_MB)

    def prepare(self, echo: Callable[[str], None]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        settings = self.context.settings
        self.render(
            DEPLOY_DIR / "kafka" / "server.properties",
            {
                "kafka_port": settings.kafka_port,
                "kafka_controller_port": settings.kafka_controller_port,
                "kafka_data_dir": self.data_dir,
                "kafka_sasl_listener": f",SASL_PLAINTEXT://127.0.0.1:{settings.kafka_sasl_port},"
                f"SASL_SSL://127.0.0.1:{settings.kafka_sasl_ssl_port}" if settings.secured else "",
                "kafka_tls_config": self.make_certificates() if settings.secured else "",
            },
        )
        self.copy_conf(DEPLOY_DIR / "kafka" / "log4j2.xml")
        if not self.is_formatted():
            self.format_storage(echo)

    def make_certificates(self) -> str:
        """The secured profile's TLS: a CA and a broker certificate for 127.0.0.1 it signed (openssl, once), and
        the broker's PEM keystore settings."""
        folder = kafka_tls_dir(self.context.stack_dir)
        keystore = folder / "broker-keystore.pem"
        if not keystore.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
            steps = [
                ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=streamscore stack CA",
                 "-keyout", "ca.key", "-out", "ca.pem"],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "broker.key",
                 "-out", "broker.csr"],
                ["x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "30", "-extfile", "san.ext", "-out", "broker.pem"],
                ["pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8"],
            ]
            for step in steps:
                done = subprocess.run(["openssl", *step], cwd=folder, capture_output=True, text=True)
                if done.returncode != 0:
                    raise StackError(f"making the secured profile's certificates failed: {done.stderr.strip()}")
            keystore.write_text((folder / "broker.pk8").read_text() + (folder / "broker.pem").read_text())
        return f"ssl.keystore.type=PEM\nssl.keystore.location={keystore}"

    def is_formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()

    def format_storage(self, echo: Callable[[str], None]) -> None:
        """KRaft refuses to start on an unformatted log dir; format it once with a new cluster id."""
        cluster_id = _new_kafka_cluster_id()
        echo(f"formatting Kafka storage in {self.data_dir} (cluster id {cluster_id})")
        command = [
            *self.java_prefix(),
            "kafka.tools.StorageTool", "format", "--ignore-formatted",
            "--cluster-id", cluster_id, "--config", str(self.conf_dir / "server.properties"),
            # the secured profile's SCRAM user, stored in the cluster metadata from the start
            *(["--add-scram", "SCRAM-SHA-512=[name={},password={}]".format(*SECURED_KAFKA_USER)]
              if self.context.settings.secured else []),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = _tail_text(result.stdout + result.stderr, FAILURE_LOG_LINES)
            raise StackError(f"formatting Kafka storage failed; delete {self.data_dir} and retry:\n{output}")

    def java_prefix(self) -> list[str]:
        return [
            str(self.tools.java),
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dlog4j2.configurationFile={self.conf_dir / 'log4j2.xml'}",
            # log4j2's own hook would stop logging while the broker's shutdown hook is still running;
            # the file appender flushes every line, so nothing is lost without it.
            "-Dlog4j2.shutdownHookEnabled=false",
            "-cp", f"{self.context.jars.kafka_libs}/*",
        ]  # fmt: skip

    def command(self) -> list[str]:
        java, *properties = self.java_prefix()
        return [
            java,
            *self.jvm_common_flags(self.heap_mb),
            # The broker's own launcher defaults: short GC pauses matter more than throughput here.
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            *properties,
            "kafka.Kafka",
            str(self.conf_dir / "server.properties"),
        ]

    def probe(self) -> str:
        from aiokafka import AIOKafkaClient

        async def fetch_metadata() -> int:
            client = AIOKafkaClient(bootstrap_servers=self.address, request_timeout_ms=int(PROBE_TIMEOUT_S * 1000))
            try:
                await client.bootstrap()
                return len(client.cluster.brokers())
            finally:
                await client.close()

        with _quiet_loggers("aiokafka"):
            brokers = _run_coroutine(fetch_metadata)
        if brokers == 0:
            raise RuntimeError("metadata lists no broker yet (still unfencing)")
        return self.context.jars.kafka_version() or "unknown"


def kafka_tls_dir(stack_dir: Path) -> Path:
    """Where the secured profile keeps its Kafka CA (``ca.pem``, what a client's ``ssl_cafile`` names)."""
    return stack_dir / "conf" / "kafka" / "tls"


def _new_kafka_cluster_id() -> str:
    """A Kafka Uuid string: URL-safe base64 of 16 random bytes, never starting with '-' (a CLI flag)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class _Cassandra(_Server):
    name = "cassandra"
    log_name = "system.log"
    typical_start_s = 15.0

    @property
    def port(self) -> int:
        return self.context.settings.cassandra_port

    @property
    def ports(self) -> list[int]:
        return [self.port, self.context.settings.cassandra_storage_port]

    @property
    def heap_mb(self) -> int:
        return min(self.context.settings.cassandra_heap_mb, CASSANDRA_MAX_HEAP_MB)

    def prepare(self, echo: Callable[[str], None]) -> None:
        for sub_dir in ("data", "commitlog", "saved_caches", "hints", "cdc_raw"):
            (self.data_dir / sub_dir).mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "triggers").mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        settings = self.context.settings
        self.render(
            DEPLOY_DIR / "cassandra" / "cassandra.yaml",
            {
                "cassandra_port": settings.cassandra_port,
                "cassandra_storage_port": settings.cassandra_storage_port,
                "cassandra_data_dir": self.data_dir,
                "cassandra_authenticator": "PasswordAuthenticator" if settings.secured else "AllowAllAuthenticator",
                "cassandra_authorizer": "CassandraAuthorizer" if settings.secured else "AllowAllAuthorizer",
            },
        )
        self.copy_conf(DEPLOY_DIR / "cassandra" / "logback.xml")

    def command(self) -> list[str]:
        jars = self.context.jars
        jamm = jars.jamm_agent()
        return [
            str(self.tools.java),
            *self.jvm_common_flags(self.heap_mb),
            # Cassandra's jvm-server.options / jvm17-server.options, minus what only matters on big hosts.
            "-Xss256k",
            "-XX:+ParallelRefProcEnabled",
            "-XX:MaxTenuringThreshold=1",
            "-XX:MaxGCPauseMillis=300",
            "-XX:+PerfDisableSharedMem",
            # Cassandra's start-up check asks for this: a node half-dead from OOM can corrupt its data.
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.net.preferIPv4Stack=true",
            "-Djdk.attach.allowAttachSelf=true",
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Dio.netty.allocator.useCacheForAllThreads=true",
            "-Dio.netty.allocator.maxOrder=11",
            "-Dchronicle.analytics.disable=true",
            *CASSANDRA_JPMS_FLAGS,
            # Memtable sizing measures objects through jamm, which wants to be a java agent.
            *([f"-javaagent:{jamm}"] if jamm else []),
            *self.cassandra_properties(),
            "-cp", f"{jars.cassandra_libs}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ]  # fmt: skip

    def cassandra_properties(self) -> list[str]:
        return [
            f"-Dcassandra.config=file://{self.conf_dir / 'cassandra.yaml'}",
            f"-Dcassandra.storagedir={self.data_dir}",
            f"-Dcassandra.logdir={self.logs_dir}",
            f"-Dcassandra.triggers_dir={self.conf_dir / 'triggers'}",
            f"-Dlogback.configurationFile={self.conf_dir / 'logback.xml'}",
            "-Dcassandra-foreground=yes",
            # One node, its own seed: there is no gossip to settle and no ring to wait for.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            # No JMX port (no nodetool): one port fewer to collide with on a shared machine.
        ]

    def probe(self) -> str:
        from cassandra import ProtocolVersion
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy

        profile = ExecutionProfile(
            load_balancing_policy=WhiteListRoundRobinPolicy([self.host]), request_timeout=PROBE_TIMEOUT_S
        )
        cluster = Cluster(
            [self.host],
            port=self.port,
            protocol_version=ProtocolVersion.V5,
            # the secured profile: the superuser Cassandra makes at its first start
            auth_provider=PlainTextAuthProvider(*SECURED_CASSANDRA_SUPERUSER) if self.context.settings.secured
            else None,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=PROBE_TIMEOUT_S,
            control_connection_timeout=PROBE_TIMEOUT_S,
            # A probe needs one row, not the whole schema and token map.
            schema_metadata_enabled=False,
            token_metadata_enabled=False,
        )
        with _quiet_loggers("cassandra"):
            try:
                row = cluster.connect().execute("SELECT release_version FROM system.local").one()
            finally:
                cluster.shutdown()
        return str(row.release_version)


class _Redis(_Server):
    name = "redis"
    log_name = "redis.log"
    typical_start_s = 0.1

    @property
    def port(self) -> int:
        return self.context.settings.redis_port

    def prepare(self, echo: Callable[[str], None]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.render(
            DEPLOY_DIR / "redis" / "redis.conf",
            {
                "redis_port": self.port,
                "redis_data_dir": self.data_dir,
                "redis_log_file": self.log_file,
            },
        )

    def command(self) -> list[str]:
        return [str(self.tools.redis_server), str(self.conf_dir / "redis.conf")]

    def probe(self) -> str:
        import redis

        client = redis.Redis(
            host=HOST, port=self.port, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
        )
        try:
            client.ping()
            return str(client.info("server")["redis_version"])
        finally:
            client.close()


# ----------------------------------------------------------------------------------------------- stack


@dataclass(frozen=True)
class _Launch:
    pid: int
    at: float
    """time.monotonic() at launch, for the "ready in" time and the start timeout."""


class Stack:
    """Start, stop and inspect the local Kafka, Cassandra and Redis."""

    def __init__(self, settings: StackSettings | None = None, echo: Callable[[str], None] = print) -> None:
        if not (DEPLOY_DIR / "pom.xml").is_file():
            raise StackError(CHECKOUT_HINT.format(package=Path(__file__).resolve().parent))
        self.settings = settings or get_settings().stack
        self.echo = echo
        self.dir = (self.settings.dir or CHECKOUT / ".stack").resolve()
        self.jars = _JarCache((self.settings.cache_dir or CHECKOUT / ".cache").resolve())
        self._tools: _Tools | None = None

    # -- public API

    def up(self) -> list[ServerStatus]:
        """Start whatever is not running and wait until every server answers; idempotent."""
        with self._lock():
            self._preflight()
            servers = self._servers()
            stopped = self._stopped_servers(servers)
            # Slowest first, so its start-up overlaps the others'; then wait for the quickest first, so
            # each "ready in" is measured close to when that server really became ready.
            quickest_first = sorted(servers, key=lambda server: server.typical_start_s)
            launches = {server.name: self._start(server) for server in quickest_first[::-1] if server in stopped}
            ready = {server.name: self._await_ready(server, launches.get(server.name)) for server in quickest_first}
            statuses = [ready[server.name] for server in servers]
        for status in statuses:
            self.echo(_describe(status))
        return statuses

    def ensure_up(self) -> list[ServerStatus]:
        """Like up(), but says nothing when everything already runs."""
        statuses = self.status()
        if all(status.up for status in statuses):
            return statuses
        return self.up()

    def down(self) -> None:
        """Stop the servers recorded in the pid files, and only those."""
        with self._lock():
            stopping = [(server, pid) for server in self._servers() if (pid := self._owned_pid(server))]
            for server, pid in stopping:
                self.echo(f"stopping {server.name} (pid {pid})")
                _signal(pid, signal.SIGTERM)
            for server, pid in stopping:
                self._wait_gone(server, pid)
            for server in self._servers():
                server.pid_file.unlink(missing_ok=True)
        if not stopping:
            self.echo("the local stack is not running")

    def status(self) -> list[ServerStatus]:
        return [self._status_of(server) for server in self._servers()]

    def logs(self, lines: int = 40) -> dict[str, str]:
        return {server.name: _tail_file(server.log_file, lines) for server in self._servers()}

    # -- start

    def _preflight(self) -> None:
        self._tools = _find_tools()
        if not self.jars.is_current():
            self.jars.resolve(self.echo)
        self._note_heap_caps()

    def _note_heap_caps(self) -> None:
        caps = [
            ("kafka", "KAFKA_HEAP_MB", self.settings.kafka_heap_mb, KAFKA_MAX_HEAP_MB),
            ("cassandra", "CASSANDRA_HEAP_MB", self.settings.cassandra_heap_mb, CASSANDRA_MAX_HEAP_MB),
        ]
        for name, field, asked_mb, cap_mb in caps:
            if asked_mb > cap_mb:
                self.echo(f"{name}: heap capped at {cap_mb} MB (STREAMSCORE_STACK__{field}={asked_mb} is above it)")

    def _servers(self) -> list[_Server]:
        context = _Context(settings=self.settings, stack_dir=self.dir, tools=self._tools, jars=self.jars)
        servers: list[_Server] = [_Kafka(context), _Cassandra(context), _Redis(context)]
        return [server for server in servers if server.name in self.settings.servers]

    def _stopped_servers(self, servers: list[_Server]) -> list[_Server]:
        """The servers that need starting, after checking that none of their ports is taken, so that a
        conflict is reported before anything starts."""
        stopped = []
        for server in servers:
            if pid := self._owned_pid(server):
                self.echo(f"{server.name} already running (pid {pid})")
            else:
                stopped.append(server)
        for server in stopped:
            self._check_ports_free(server)
        return stopped

    def _start(self, server: _Server) -> _Launch:
        server.pid_file.unlink(missing_ok=True)
        server.prepare(self.echo)
        self.echo(f"starting {server.name} (log: {server.log_file})")
        pid = _spawn(server.command(), server.out_file)
        server.pid_file.parent.mkdir(parents=True, exist_ok=True)
        server.pid_file.write_text(f"{pid}\n")
        return _Launch(pid, time.monotonic())

    def _check_ports_free(self, server: _Server) -> None:
        for port in server.ports:
            if _port_is_open(port, server.host):
                raise StackError(
                    f"cannot start {server.name}: port {port} on {server.host} is taken by a process this stack "
                    f"did not start (see `ss -ltnp 'sport = :{port}'`); stop it, or move the stack with "
                    "STREAMSCORE_STACK__* port settings"
                )

    def _await_ready(self, server: _Server, launch: _Launch | None) -> ServerStatus:
        """Poll until server answers. A server this call launched is followed by the pid it got, not by
        the ownership check: a starting process may not show the stack dir in /proc yet (Redis rewrites
        its command line into a title, then changes into its data dir)."""
        pid = launch.pid if launch else self._owned_pid(server)
        since = launch.at if launch else time.monotonic()
        deadline = since + self.settings.start_timeout_s
        last_error = "its port never opened"
        while pid is not None and _is_alive(pid):
            if _port_is_open(server.port, server.host):
                try:
                    version = server.probe()
                except Exception as error:
                    last_error = f"{type(error).__name__}: {error}"
                else:
                    took = f"ready in {time.monotonic() - since:.1f} s" if launch else ""
                    return self._status(server, pid, version, took)
            if time.monotonic() > deadline:
                self._stop_one(server, pid)
                what = f"did not answer within {self._timeout()} ({last_error}); it was stopped"
                raise StackError(self._failure(server, what))
            time.sleep(0.2)
        server.pid_file.unlink(missing_ok=True)
        raise StackError(self._failure(server, "exited during start-up"))

    def _timeout(self) -> str:
        return f"{self.settings.start_timeout_s:.0f} s (STREAMSCORE_STACK__START_TIMEOUT_S)"

    def _failure(self, server: _Server, what: str) -> str:
        sections = [f"{server.name} {what}. Its log ({server.log_file}) ends with:"]
        sections.append(_tail_file(server.log_file, FAILURE_LOG_LINES) or "(empty)")
        console = _tail_file(server.out_file, FAILURE_LOG_LINES)
        if console:
            sections += [f"and its console output ({server.out_file}):", console]
        return "\n".join(sections)

    # -- stop

    def _owned_pid(self, server: _Server) -> int | None:
        """The recorded pid if it still runs and is still ours; a stale pid file is left for the caller."""
        try:
            pid = int(server.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _is_alive(pid) and _belongs_to_stack(pid, self.dir):
            return pid
        return None

    def _stop_one(self, server: _Server, pid: int) -> None:
        _signal(pid, signal.SIGTERM)
        self._wait_gone(server, pid)
        server.pid_file.unlink(missing_ok=True)

    def _wait_gone(self, server: _Server, pid: int) -> None:
        started = time.monotonic()
        killed = False
        while _is_alive(pid):
            if not killed and time.monotonic() - started > STOP_GRACE_S:
                self.echo(f"{server.name} (pid {pid}) ignored SIGTERM for {STOP_GRACE_S:.0f} s; killing it")
                _signal(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        self.echo(f"{server.name} stopped in {time.monotonic() - started:.1f} s")

    # -- status

    def _status_of(self, server: _Server) -> ServerStatus:
        pid = self._owned_pid(server)
        if pid is None:
            detail = "not running" if not server.pid_file.exists() else "not running (stale pid file)"
            return ServerStatus(server.name, False, None, server.address, None, server.log_file, detail)
        try:
            version = server.probe()
        except Exception as error:
            return ServerStatus(
                server.name, False, pid, server.address, None, server.log_file,
                f"running but not answering: {type(error).__name__}: {error}",
            )  # fmt: skip
        return self._status(server, pid, version, "")

    @staticmethod
    def _status(server: _Server, pid: int, version: str, detail: str) -> ServerStatus:
        return ServerStatus(server.name, True, pid, server.address, version, server.log_file, detail)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Two `up`s at once (parallel test sessions, a demo) must not start two of each server."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "stack.lock").open("w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _signal(pid: int, signum: signal.Signals) -> None:
    """Signal pid; it may have exited since it was last checked, which is fine."""
    try:
        os.kill(pid, signum)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise


def _describe(status: ServerStatus) -> str:
    state = "up" if status.up else "DOWN"
    facts = [f"{status.name:<10}", f"{state:<5}", f"{status.address:<16}", f"pid {status.pid}"]
    facts += [f"version {status.version}", f"log {status.log_file}"]
    if status.detail:
        facts.append(f"({status.detail})")
    return "  ".join(facts)
