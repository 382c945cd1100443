"""The one settings model. The environment is read here and nowhere else.

Every field can be set with an environment variable: ``STREAMSCORE_<FIELD>`` for top-level fields and
``STREAMSCORE_<SECTION>__<FIELD>`` for nested ones, e.g. ``STREAMSCORE_KAFKA__BOOTSTRAP=10.0.0.5:9092``.
Unknown keys are rejected so a typo fails loudly instead of being ignored.

No default points into the checkout the package was installed from: file defaults are relative to the current
directory (the Makefile and scripts run from the repository root), and the local stack's folders default to
``None``, which the stack tooling (``deploy/local/streamscore_stack``) resolves inside its own checkout.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _read_secret_files(section: str, data: Any, secrets: dict[str, str]) -> Any:
    """``<secret>_file`` fields (a Kubernetes Secret mounted as files): the file's text, without its final
    newline, becomes the secret. Setting both is refused (which one wins would be a guess)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for secret, file_field in secrets.items():
        path = data.get(file_field)
        if path is None:
            continue
        env = f"STREAMSCORE_{section}__{file_field.upper()}"
        try:
            text = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{env} names {path}, which cannot be read ({exc.strerror}): mount the secret "
                             "there or unset it") from None
        given = data.get(secret)
        if given is not None and (given.get_secret_value() if isinstance(given, SecretStr) else given) != text:
            # the same value twice is a model copied with its secret read (model_dump), not a conflict
            raise ValueError(f"{env} and STREAMSCORE_{section}__{secret.upper()} are both set: set one of them")
        data[secret] = text
    return data


def _check_files(section: str, model: BaseModel, fields: tuple[str, ...]) -> None:
    """A certificate setting that names no file fails at start, naming the setting and the path."""
    for name in fields:
        path = getattr(model, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"STREAMSCORE_{section}__{name.upper()} names {path}, which is not a file: put the "
                             "PEM file there (a mounted Secret) or unset it")


class KafkaSettings(_Strict):
    bootstrap: str = "127.0.0.1:9092"
    """Comma-separated host:port list of Kafka brokers."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How clients talk to the brokers; SASL_SSL for credentials over TLS."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    """SASL mechanism used when security_protocol is SASL_*."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password; never logged."""
    sasl_password_file: Path | None = None
    """A file holding the SASL password (a mounted Kubernetes Secret), read at start instead of ``sasl_password``."""
    ssl_cafile: Path | None = None
    """CA bundle used to verify the brokers' certificates when TLS is on (None: the system's CAs)."""
    ssl_certfile: Path | None = None
    """Client certificate (PEM) presented to the brokers: mutual TLS (with ``ssl_keyfile``)."""
    ssl_keyfile: Path | None = None
    """Private key (PEM) of ``ssl_certfile``."""
    topic_replication_factor: int = Field(default=1, ge=1)
    """Replication factor of the topics streamscore creates (requests, predictions, dead letters, deployments,
    Faust's own); 3 on a production cluster. Topics that exist already are left as they are."""
    topic_min_insync_replicas: int | None = Field(default=None, ge=1)
    """``min.insync.replicas`` of the topics streamscore creates (with ``acks=all``, a write needs that many
    replicas); None leaves the broker's default. At most ``topic_replication_factor``."""

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        return _read_secret_files("KAFKA", data, {"sasl_password": "sasl_password_file"})

    @model_validator(mode="after")
    def _usable(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            for name in ("sasl_username", "sasl_password"):
                if getattr(self, name) is None:
                    extra = " (or __SASL_PASSWORD_FILE)" if name == "sasl_password" else ""
                    raise ValueError(f"STREAMSCORE_KAFKA__{name.upper()}{extra} is not set, and security_protocol "
                                     f"is {self.security_protocol}: set it, or pick another security_protocol")
        _check_files("KAFKA", self, ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
        if (self.topic_min_insync_replicas or 0) > self.topic_replication_factor:
            raise ValueError("STREAMSCORE_KAFKA__TOPIC_MIN_INSYNC_REPLICAS exceeds __TOPIC_REPLICATION_FACTOR: no "
                             "write could ever succeed")
        return self


class CassandraSettings(_Strict):
    hosts: list[str] = ["127.0.0.1"]
    """Contact points of the Cassandra cluster."""
    port: int = 9042
    """CQL native-protocol port."""
    keyspace: str = "streamscore"
    """Keyspace holding one table per feature view."""
    replication_factor: int = Field(default=1, ge=1)
    """Replication factor used when the keyspace is created with SimpleStrategy."""
    replication_strategy: Literal["SimpleStrategy", "NetworkTopologyStrategy"] = "SimpleStrategy"
    """Replication class of the keyspace when streamscore creates it (an existing keyspace is left as it is):
    SimpleStrategy (``replication_factor`` copies, no datacenters) or NetworkTopologyStrategy (``datacenters``)."""
    datacenters: dict[str, int] = {}
    """NetworkTopologyStrategy only: datacenter name -> replication factor in it (JSON map), e.g.
    ``{"dc1": 3, "dc2": 3}``; the names are the snitch's (``nodetool status``, ``system.local.data_center``)."""
    read_consistency: Literal["ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_ONE", "LOCAL_QUORUM",
                              "EACH_QUORUM"] = "LOCAL_ONE"
    """Consistency level of feature reads. With replication factor 3, ``LOCAL_QUORUM`` reads and writes see every
    acknowledged write while one replica per datacenter is down; ``LOCAL_ONE`` is the cheapest."""
    write_consistency: Literal["ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_ONE", "LOCAL_QUORUM",
                               "EACH_QUORUM"] = "LOCAL_ONE"
    """Consistency level of feature writes (``features load``, the demo)."""
    speculative_retry: str | None = Field(default=None,
                                          pattern=r"(?i)^(ALWAYS|NEVER|NONE|\d+(\.\d+)?(ms|p|PERCENTILE))$")
    """``speculative_retry`` of the feature tables streamscore creates (existing tables are left as they are):
    how long a coordinator waits for a replica before it asks another. None keeps Cassandra's ``99p``, which
    under load can exceed ``request_timeout_s``: a replica that just died then fails reads until the others
    notice (seconds). A fixed ``50ms`` asks the third replica of a QUORUM read that soon."""
    local_dc: str | None = None
    """Datacenter this process is in: the driver then sends every query to that datacenter's nodes only
    (DCAwareRoundRobinPolicy, token-aware), and ``LOCAL_*`` levels count that datacenter's replicas. None:
    round robin over every node (one datacenter)."""
    username: str | None = None
    """User name for PasswordAuthenticator."""
    password: SecretStr | None = None
    """Password for PasswordAuthenticator; never logged."""
    password_file: Path | None = None
    """A file holding the password (a mounted Kubernetes Secret), read at start instead of ``password``."""
    ssl_cafile: Path | None = None
    """CA bundle; setting it (or ``ssl_certfile``) turns TLS on."""
    ssl_certfile: Path | None = None
    """Client certificate (PEM) presented to Cassandra: mutual TLS (with ``ssl_keyfile``)."""
    ssl_keyfile: Path | None = None
    """Private key (PEM) of ``ssl_certfile``."""
    read_concurrency: int = 64
    """Most concurrent read queries in flight for one batch of keys."""
    read_chunk: int = 32
    """Keys per read query (``WHERE entity IN ...``). Measured here: a read per key costs ~0.27 ms of driver
    time each, a 32-key IN ~0.08 ms per key. 1 gives one token-aware read per key (big clusters, few misses)."""
    request_timeout_s: float = 2.0
    """Per-request timeout of the driver."""
    speculative_execution_ms: float | None = Field(default=500.0, gt=0)
    """A feature read not answered after this long is also sent to the next node of the driver's query plan
    (cassandra-driver's speculative execution; reads are idempotent), the first answer wins: a coordinator
    that stalls (starting, a GC pause, dying before the driver notices) costs this delay instead of
    ``request_timeout_s`` and a defaulted answer. None: one node per read. No effect with one node."""

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        return _read_secret_files("CASSANDRA", data, {"password": "password_file"})

    @model_validator(mode="after")
    def _usable(self) -> CassandraSettings:
        _check_files("CASSANDRA", self, ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
        return self

    @model_validator(mode="after")
    def _replication_usable(self) -> CassandraSettings:
        if self.replication_strategy == "NetworkTopologyStrategy" and not self.datacenters:
            raise ValueError("STREAMSCORE_CASSANDRA__REPLICATION_STRATEGY is NetworkTopologyStrategy and "
                             "STREAMSCORE_CASSANDRA__DATACENTERS is empty: name each datacenter with its replication "
                             'factor, e.g. {"dc1": 3}')
        if self.replication_strategy == "SimpleStrategy" and self.datacenters:
            raise ValueError("STREAMSCORE_CASSANDRA__DATACENTERS is set but the replication strategy is "
                             "SimpleStrategy: set STREAMSCORE_CASSANDRA__REPLICATION_STRATEGY=NetworkTopologyStrategy")
        if any(factor < 1 for factor in self.datacenters.values()):
            raise ValueError("STREAMSCORE_CASSANDRA__DATACENTERS: every replication factor must be at least 1")
        if self.local_dc is not None and self.datacenters and self.local_dc not in self.datacenters:
            raise ValueError(f"STREAMSCORE_CASSANDRA__LOCAL_DC={self.local_dc!r} is not one of the keyspace's "
                             f"datacenters {sorted(self.datacenters)}")
        return self


class RedisSettings(_Strict):
    host: str = "127.0.0.1"
    """Redis host."""
    port: int = 6379
    """Redis port."""
    db: int = 0
    """Redis logical database."""
    username: str | None = None
    """ACL user name."""
    password: SecretStr | None = None
    """Password; never logged."""
    password_file: Path | None = None
    """A file holding the password (a mounted Kubernetes Secret), read at start instead of ``password``."""
    ssl: bool = False
    """Connect with TLS (also on when ``ssl_cafile`` or ``ssl_certfile`` is set)."""
    ssl_cafile: Path | None = None
    """CA bundle used to verify Redis's certificate (None: the system's CAs)."""
    ssl_certfile: Path | None = None
    """Client certificate (PEM) presented to Redis: mutual TLS (with ``ssl_keyfile``)."""
    ssl_keyfile: Path | None = None
    """Private key (PEM) of ``ssl_certfile``."""
    cache_ttl_s: int = 300
    """How long a cached feature row lives in Redis."""
    fence_s: int = Field(default=30, ge=1)
    """How long the fence a writer sets on an entity's cache entry lives (set before its Cassandra write; after
    it, replaced by the written row, or set again where writes overlapped): while it does, readers of that entity
    read Cassandra and cannot cache what they read. Must exceed the longest read-through of a reader (its
    Cassandra read to its cache fill) and the longest write, else a reader that read the old row just before a
    write could cache it after the fence is gone."""
    socket_timeout_s: float = 0.5
    """A slow Redis must not stall a batch: after this the cache is bypassed."""
    near_cache_entries: int = Field(default=100_000, ge=0)
    """Most feature rows (and negative entries) a worker keeps in its own memory, in front of Redis (the near
    cache; the oldest stored goes first when full); 0 turns it off. A batch whose rows are all there asks Redis
    nothing. Kept coherent by Redis (client-side caching: ``CLIENT TRACKING`` in broadcast mode on the feature
    keys, one extra connection per worker): a write anywhere drops the copies of every worker, within the time
    Redis takes to tell them (milliseconds). While that connection is not up nothing is served from memory. The
    Redis user needs ``+client|id +client|tracking +subscribe +ping`` and the channel ``&__redis__:invalidate``
    (Redis 6 or later); without them the worker logs one warning and reads Redis for every batch."""
    near_cache_ttl_s: float = Field(default=30.0, gt=0)
    """Longest a row stays in the near cache (at most ``cache_ttl_s``): a safety net only, since writes drop
    the copies at once."""

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        return _read_secret_files("REDIS", data, {"password": "password_file"})

    @model_validator(mode="after")
    def _usable(self) -> RedisSettings:
        _check_files("REDIS", self, ("ssl_cafile", "ssl_certfile", "ssl_keyfile"))
        return self

    @property
    def tls(self) -> bool:
        return self.ssl or self.ssl_cafile is not None or self.ssl_certfile is not None


class StackClusterSettings(_Strict):
    """The cluster profile of the local stack (``streamscore stack up --cluster``): three Kafka brokers, three
    Cassandra nodes and a Redis, on ports of their own."""

    dir: Path | None = None
    """Where the cluster keeps data, logs and pids; None: ``.stack-cluster/`` at the root of the checkout."""
    kafka_ports: list[int] = [29092, 29093, 29094]
    """Broker port of each Kafka node on 127.0.0.1 (JSON list; three nodes)."""
    kafka_controller_ports: list[int] = [29192, 29193, 29194]
    """KRaft controller port of each Kafka node (every node is broker and controller: a three-voter quorum)."""
    cassandra_hosts: list[str] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    """Loopback address of each Cassandra node (Linux routes all of 127.0.0.0/8 to lo); the first is the seed."""
    cassandra_port: int = 29042
    """CQL port, the same on every node's address."""
    cassandra_storage_port: int = 27000
    """Internode port, the same on every node's address."""
    cassandra_datacenters: list[str] = ["dc1", "dc1", "dc1"]
    """Datacenter of each Cassandra node (GossipingPropertyFileSnitch), e.g. ``["dc1", "dc1", "dc2"]`` for two
    datacenters; changing it needs a fresh cluster dir (a node refuses to start in another datacenter)."""
    redis_port: int = 26379
    """Redis port on 127.0.0.1."""
    kafka_heap_mb: int = 512
    """JVM heap of each Kafka node."""
    cassandra_heap_mb: int = 1024
    """JVM heap of each Cassandra node."""

    @model_validator(mode="after")
    def _three_of_each(self) -> StackClusterSettings:
        counts = {"KAFKA_PORTS": len(self.kafka_ports), "KAFKA_CONTROLLER_PORTS": len(self.kafka_controller_ports),
                  "CASSANDRA_HOSTS": len(self.cassandra_hosts),
                  "CASSANDRA_DATACENTERS": len(self.cassandra_datacenters)}
        if len(set(counts.values())) != 1 or min(counts.values()) < 1:
            raise ValueError(f"STREAMSCORE_STACK__CLUSTER__*: every list needs one entry per node, got {counts}")
        return self


class StackSettings(_Strict):
    dir: Path | None = None
    """Where the local stack keeps data, logs and pids; None: ``.stack/`` at the root of the checkout the stack
    tooling runs from (the same folder from any current directory)."""
    cache_dir: Path | None = None
    """Where resolved Maven jars are cached between runs; None: ``.cache/`` at the root of that checkout."""
    kafka_port: int = 9092
    """Kafka broker port on 127.0.0.1."""
    kafka_controller_port: int = 9093
    """KRaft controller port on 127.0.0.1."""
    kafka_sasl_port: int = 9094
    """The secured profile's SASL_PLAINTEXT (SCRAM-SHA-512) listener on 127.0.0.1."""
    kafka_sasl_ssl_port: int = 9095
    """The secured profile's SASL_SSL (SCRAM-SHA-512 over TLS) listener on 127.0.0.1; its CA: ``conf/kafka/tls/ca.pem``
    in the stack's folder."""
    cassandra_port: int = 9042
    """Cassandra CQL port on 127.0.0.1."""
    cassandra_storage_port: int = 7000
    """Cassandra internode port on 127.0.0.1."""
    redis_port: int = 6379
    """Redis port on 127.0.0.1."""
    kafka_heap_mb: int = 768
    """Kafka JVM heap (at most 1 GiB on a 2-core, 24 GiB machine)."""
    cassandra_heap_mb: int = 1536
    """Cassandra JVM heap (at most 1.5 GiB)."""
    start_timeout_s: float = 180.0
    """How long `stack up` waits for each server to answer."""
    servers: list[Literal["kafka", "cassandra", "redis"]] = ["kafka", "cassandra", "redis"]
    """The servers the stack runs (JSON list): a stack of its own for one server, on ports of its own."""
    secured: bool = False
    """The secured profile: Cassandra with PasswordAuthenticator and CassandraAuthorizer (superuser
    ``cassandra``/``cassandra``, as Cassandra makes it), and Kafka with a SCRAM-SHA-512 listener on
    ``kafka_sasl_port`` (user ``streamscore``), for least-privilege and bad-credential tests."""
    cluster: StackClusterSettings = Field(default_factory=StackClusterSettings)
    """The cluster profile (``stack up --cluster``; ``STREAMSCORE_STACK__CLUSTER__*``)."""


class WorkerSettings(_Strict):
    batch_max: int = 2048
    """Most requests handled as one batch."""
    fetch_wait_ms: int = Field(default=500, ge=1)
    """Longest the broker holds an empty fetch (Kafka's fetch.max.wait.ms) and the fetch loop waits for records
    before it looks again. A record that arrives meanwhile is returned at once, so this bounds no latency: a
    batch is whatever has arrived, up to ``batch_max``. Short waits only cost CPU at idle (10 ms: a fetch
    round trip 100 times a second)."""
    reload_interval_s: float = 5.0
    """How often the worker looks for a newer model version in the library (0 turns it off)."""
    max_batches_in_flight: int = 4
    """Batches fetched but not yet acknowledged and committed; bounds memory and repeats after a crash."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The worker's event loop: ``uvloop`` (libuv's, in C: less CPU per small batch than asyncio's own;
    ``python -m streamscore_bench.batch_cost`` measures either) or ``asyncio`` (the standard library's)."""
    commit_interval_ms: int = Field(default=100, ge=0)
    """at_least_once: the offsets of acknowledged batches are committed at most this often (one commit request
    covers every batch acknowledged meanwhile); 0 commits after each batch. A batch's offsets are never
    committed before Kafka acknowledged its predictions, and a revocation or a stop commits at once. The cost:
    a crash repeats, beyond the batches in flight, those acknowledged in the last interval. Light traffic in
    one-request batches paid one commit request per batch otherwise (a fifth of a worker's CPU per batch).
    exactly_once commits offsets in each batch's transaction and ignores this."""
    partitions: int = 4
    """Partitions created for request topics the worker creates."""
    device: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    """ONNX Runtime device. ``auto``: CUDA when it is usable here (driver, GPU, CUDA runtime and cuDNN found),
    else the CPU, saying which in the log, /status and /metrics. ``cuda``: the GPU is required; a worker that
    cannot have it refuses to start, naming what is missing (``pip install 'streamscore[gpu]'`` brings the CUDA
    and cuDNN libraries). ``tensorrt``: as ``cuda``, with ONNX Runtime's TensorRT provider in front (TensorRT 10
    installed apart). ``cpu``: the CPU provider only; CUDA is never touched."""
    gpu_id: int = Field(default=0, ge=0)
    """CUDA device ordinal the worker runs on (with ``device`` auto, cuda or tensorrt)."""
    device_batch_rows: int = Field(default=0, ge=0)
    """Most rows per runtime call on a GPU: a bigger batch is split into chunks of this many rows (its
    predictions are the same). 0: one call per batch. Does not change the Kafka batch (``batch_max``)."""
    tensorrt_cache_dir: Path | None = None
    """With ``device=tensorrt``: the folder where TensorRT engines (and timing caches) are kept, so that a
    restarted worker does not build them again (minutes for a big model). None: rebuilt at every start."""
    intra_op_threads: int = 1
    """ONNX Runtime intra-op threads (one process per core)."""
    worker_id: str | None = None
    """Identity written into lineage; defaults to host:pid."""
    reply_to_prefixes: list[str] | None = None
    """Topic-name prefixes a request's ``reply_to`` may name (JSON list); the worker's own ``<topic_prefix>.``
    is always allowed. None allows any topic the worker may write, which lets any requester write there."""
    web_port: int = 6066
    """Port of the Faust web server (metrics, health)."""
    web_bind: str = "127.0.0.1"
    """Address the web server listens on (``/healthz``, ``/readyz``, ``/metrics``, ``/status``): loopback by
    default; ``0.0.0.0`` in a container, so probes and scrapes from outside the pod reach it."""
    readiness_interval_s: float = Field(default=5.0, gt=0)
    """How often the worker checks Kafka, Cassandra and Redis for ``/readyz`` (and reads its consumer lag for
    ``/metrics``); each check waits at most this long."""
    stage_modules: list[str] = []
    """Python modules imported at start (JSON list), e.g. ``["mycompany.stages"]``: they register pipeline stages
    of their own with ``streamscore.workers.stages.register_stage``, which manifests may then name."""
    stall_timeout_s: float = Field(default=30.0, gt=0)
    """A worker whose oldest batch has waited this long without a commit (or whose event loop or fetch loop
    has not come round for this long) cannot make progress: it reports not ready at ``/readyz``, logs why and
    exits with code 70 so its supervisor restarts it. Longer than any broker outage it should ride out."""
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """``at_least_once``: a batch's offsets are committed after Kafka acknowledged its predictions and dead
    letters; a crash may repeat a batch's answers (keyed by request id, so readers can drop repeats).
    ``exactly_once``: each batch's predictions, dead letters, shadow records and consumed offsets are
    committed in one Kafka transaction, so a reader with ``isolation.level=read_committed`` sees every request
    answered once, even across a crash or a rebalance (the SDK reads that way; a worker assigned partitions
    starts at the offsets the previous owner's last transaction committed, waiting while one still holds
    them). Costs a transaction per batch, and readers see a batch only once it is committed. Set
    ``worker_id`` to a name stable across restarts (a pod name): it makes the transactional id, so a restarted
    worker fences its dead self at once instead of after ``transaction_timeout_ms``."""
    transaction_timeout_ms: int = Field(default=10_000, ge=1_000)
    """exactly_once: how long a transaction left open by a worker that died may hold back read_committed
    readers of its partitions before the broker aborts it."""
    shutdown_timeout_s: float = Field(default=15.0, gt=0)
    """Longest a SIGTERM/SIGINT shutdown may take: the batches in flight are finished and committed within
    about half of it; past the whole of it the process exits at once (code 71) and whatever was not committed
    is read again by the next owner of its partitions."""


class PredictionLogSettings(_Strict):
    enabled: bool = True
    """Log a sample of the predictions (``streamscore explain`` / ``replay``); false leaves the stage out."""
    share: float = Field(default=0.01, ge=0.0, le=1.0)
    """Share of the requests logged, picked by a stable hash of the request id (the same id is always or never
    logged); requests carrying ``debug: true`` are logged whatever the share."""
    ttl_s: int = Field(default=7 * 24 * 3600, ge=0)
    """How long a logged prediction lives in Cassandra (``USING TTL``; 0 keeps it)."""
    table: str = Field(default="prediction_log", pattern=r"^[a-z][a-z0-9_]{0,47}$")
    """Table of the log, in the ``cassandra`` section's keyspace."""
    queue_batches: int = Field(default=64, ge=1)
    """Batches of logged rows waiting for the background writer; when it is full, a batch's rows are dropped
    (counted in ``streamscore_prediction_log_rows{outcome="dropped"}`` and logged), never waited for."""
    write_concurrency: int = Field(default=16, ge=1)
    """Most log writes in flight at once."""


class RetrainSettings(_Strict):
    min_rows: int = Field(default=200, ge=1)
    """Fewest labelled rows of the prediction log ``streamscore retrain`` trains on (without the original
    training data)."""
    recipes: dict[str, str] = {"fraud": "streamscore_examples.fraud.retrain:train"}
    """Model name -> ``module:callable`` of its training recipe (JSON map): ``(inputs, labels, base manifest,
    artifact path) -> training parameters``, see ``workers/retrain.py``."""
    training_data: dict[str, str] = {"fraud": "streamscore_examples.fraud.retrain:original_training_set"}
    """Model name -> ``module:callable`` giving a version's original training data, ``(base manifest) -> (inputs,
    labels)``, for ``streamscore retrain --with-training-data``."""
    label_wait_s: float = Field(default=10.0, gt=0)
    """Longest wait for the labels topic to deliver up to its end offsets."""


class HttpSettings(_Strict):
    port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the worker's Open Inference Protocol (KServe v2 REST) endpoint, e.g. 8000; None (the default)
    serves none. A separate server from the Faust web pages (/metrics, /status), so inference can be exposed
    without them."""
    bind: str = "127.0.0.1"
    """Address the endpoint listens on: loopback by default; ``0.0.0.0`` to take requests from other hosts."""
    batch_window_ms: float = Field(default=0.0, ge=0)
    """Longest an HTTP request's rows wait for a batch to join before one is started for them (Kafka batches
    take waiting rows too; the batch size bound is ``worker.batch_max``). 0: a batch is started as soon as the
    agent can take it, and the rows that arrive while it scores one join the next (measured: a 2 ms window
    doubled the latency at low load and lowered the capacity, bench/http_bench.py)."""
    max_waiting_rows: int = Field(default=8192, ge=1)
    """Rows of HTTP requests waiting for a batch, at most; a request that would go over is answered 503 with
    Retry-After, never queued without bound."""
    max_rows_per_request: int = Field(default=4096, ge=1, le=4096)
    """Most rows (the batch dimension) one inference request may carry; more is answered 400."""
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    """Largest request body taken (413 above it)."""
    retry_after_s: int = Field(default=1, ge=0)
    """The Retry-After of a 503 (overloaded or starting)."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Longest a request waits for its answer before it is answered 504 (a worker that cannot make progress)."""


class MonitoringSettings(_Strict):
    drift: bool = True
    """Run the drift stage (``workers/drift.py``, after ``infer``) in every model's pipeline: live inputs and
    outputs binned per batch against the served version's training profile, one report per window. False
    leaves it out (a version without a profile is never monitored: the worker logs it once)."""
    window_requests: int = Field(default=10_000, ge=1)
    """A drift window closes at the first batch that brings it to this many scored requests (per version)."""
    window_s: float = Field(default=60.0, gt=0)
    """A drift window also closes at the first batch this many seconds after it opened (whichever of the two
    comes first)."""
    psi_threshold: float = Field(default=0.2, gt=0)
    """A column is flagged drifted when its PSI against the training profile reaches this (0.1: a moderate
    shift, 0.2: a significant one, by the usual rule of thumb) and its p-value is at most ``p_value_threshold``."""
    p_value_threshold: float = Field(default=0.01, gt=0, le=1)
    """Largest p-value of the chi-square test (the window's binned counts against the training shares) at which a
    column is flagged."""
    label_horizon_s: float = Field(default=3600.0, gt=0)
    """How long after its prediction (the prediction's ``sent_ms``) a label is still joined to it; also how long a
    label waits for its prediction. Past it, a prediction without a label is dropped (counted), a label without a
    prediction is dead-lettered ``unknown_id`` and a label for an expired prediction ``late_label``. It bounds the
    monitor's join state: about (predictions per second) x (this) entries."""
    label_window_s: float = Field(default=300.0, gt=0)
    """Length of the tumbling windows of the accuracy reports, by prediction time (``sent_ms``). A window is
    reported once every label it may still receive is in: at its end plus ``label_horizon_s``."""
    threshold: float | None = None
    """Decision threshold for precision and recall (score at or above it: positive). None: the model's own, from
    its manifest's ``threshold_decision`` stage (the lowest threshold of the last label, e.g. ``decline`` at 0.7
    for the demo's ``fraud``), else 0.5."""
    score_output: str | None = None
    """The prediction output holding the score. None: the ``score`` of the manifest's ``threshold_decision`` stage,
    else the model's first output."""
    calibration_bins: int = Field(default=5, ge=1, le=100)
    """Reliability bins of the calibration in each accuracy report (equal width over 0..1)."""
    alert_rules: list[str | dict[str, str | float | int | None]] = []
    """Alert rules (JSON list), each a string ``"live_auc < 0.75"``, ``"drift_psi[amount] > 0.2"`` or an object
    ``{"metric", "op", "threshold", "column", "name", "min_count"}``; added to the rules of the model's manifest
    (``alert_rules``). See README, "Alerts"."""
    tick_s: float = Field(default=1.0, gt=0)
    """How often the monitor expires join state, closes windows and publishes their reports."""
    web_port: int = 6067
    """Port of the monitor's web server (``/metrics``, ``/status``)."""
    web_bind: str = "127.0.0.1"
    """Address the monitor's web server listens on: loopback by default; ``0.0.0.0`` in a container, so that
    Prometheus reaches its ``/metrics``."""


class BatchSettings(_Strict):
    chunk_rows: int = Field(default=8192, ge=1, le=1 << 20)
    """`streamscore score`: rows per pipeline batch (one cache MGET, one Cassandra round, one runtime call each)."""
    spark_partition_rows: int = Field(default=200_000, ge=1)
    """`score --engine spark`: most rows per partition. The input is spread over the cluster's default parallelism
    (every core) or more partitions when one would hold more rows than this, never over more partitions than it
    has pipeline batches (each partition is one task)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMSCORE_", env_nested_delimiter="__", extra="forbid", frozen=True,
        use_attribute_docstrings=True,  # the docstring below a field is its description (the settings table)
    )

    topic_prefix: str = "streamscore"
    """Prefix of every topic: <prefix>.<model>.requests|predictions|dlq."""
    models_dir: Path = Path("demo-data/models")
    """Model library: one folder per model, one sub-folder per version (relative: to the current directory)."""
    views_file: Path = Path("demo-data/views.json")
    """Feature view declarations (JSON; relative: to the current directory)."""
    data_dir: Path = Path("demo-data")
    """Where the demo writes its generated data and model, and the only folder the worker writes to (Faust's
    state, under ``faust/``); relative: to the current directory. In a container, a writable volume: the rest
    of the file system can be read-only."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the CLI and the worker."""
    log_format: Literal["text", "json"] = "text"
    """``text``: one readable line per record; ``json``: one JSON object per line (``ts``, ``level``,
    ``logger``, ``message``, ``exc`` when there is one), for streamscore's and Faust's records alike."""
    online_store: Literal["cassandra", "memory"] = "cassandra"
    """Where feature rows live (``featurestore.backends.ONLINE_STORES``): ``cassandra`` (the ``cassandra``
    section), or ``memory``, rows kept in this process only (tests, notebooks; a worker sees only its own writes)."""
    cache: Literal["redis", "none"] = "redis"
    """Cache tier in front of the online store (``featurestore.backends.CACHES``): ``redis`` (the ``redis``
    section), or ``none``: every read goes to the online store and writes need no Redis."""
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    """Kafka brokers and client security (``STREAMSCORE_KAFKA__*``)."""
    cassandra: CassandraSettings = Field(default_factory=CassandraSettings)
    """The Cassandra online feature store (``STREAMSCORE_CASSANDRA__*``)."""
    redis: RedisSettings = Field(default_factory=RedisSettings)
    """The Redis feature cache (``STREAMSCORE_REDIS__*``)."""
    stack: StackSettings = Field(default_factory=StackSettings)
    """The local stack of a checkout (``STREAMSCORE_STACK__*``), used by ``streamscore stack``."""
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    """The inference worker (``STREAMSCORE_WORKER__*``)."""
    prediction_log: PredictionLogSettings = Field(default_factory=PredictionLogSettings)
    """The sampled log of predictions with their exact inputs (``STREAMSCORE_PREDICTION_LOG__*``)."""
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    """``streamscore retrain`` (``STREAMSCORE_RETRAIN__*``)."""
    http: HttpSettings = Field(default_factory=HttpSettings)
    """The worker's on-demand HTTP endpoint, Open Inference Protocol (``STREAMSCORE_HTTP__*``)."""
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    """Drift of the served versions against their training profiles, the monitor's label join, accuracy windows
    and alerts (``STREAMSCORE_MONITORING__*``)."""
    batch: BatchSettings = Field(default_factory=BatchSettings)
    """Batch scoring, `streamscore score` (``STREAMSCORE_BATCH__*``)."""


TABLE_BEGIN = "<!-- settings table: generated by `streamscore settings --markdown`; do not edit -->"
TABLE_END = "<!-- end of the settings table -->"


def settings_table() -> str:
    """Every setting as a markdown table (variable, default, meaning from its docstring), in declaration order:
    README.md holds it between ``TABLE_BEGIN`` and ``TABLE_END`` (a test fails when they differ)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows.extend(_section_rows("STREAMSCORE_", Settings.model_fields))
    return "\n".join(rows) + "\n"


def _section_rows(prefix: str, fields: dict[str, Any]) -> list[str]:
    """A section's rows, a nested section's (``STREAMSCORE_STACK__CLUSTER__*``) in its place."""
    rows = []
    for name, field in fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            rows.extend(_section_rows(f"{prefix}{name.upper()}__", section.model_fields))
        else:
            rows.append(_table_row(f"{prefix}{name.upper()}", field))
    return rows


def _table_row(variable: str, field: Any) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        shown = "unset"
    elif isinstance(default, bool):
        shown = f"`{str(default).lower()}`"
    elif isinstance(default, list | dict):
        shown = f"`{json.dumps(default)}`"
    else:
        shown = f"`{default}`"
    meaning = " ".join((field.description or "").split()).replace("``", "`").replace("|", "\\|").replace("<", "&lt;")
    return f"| `{variable}` | {shown} | {meaning} |"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
