"""The reliability harness: real worker processes on a real stack, faults injected while requests stream, and
the bookkeeping of every request sent.

Pieces, each usable on its own:

- ``Endpoints``: where a scenario's worker and clients connect (the shared stack, the private one, a proxy);
- ``Library``: the views, the model and the feature rows a test session shares (trained and written once);
- ``Scenario``: one scenario's topic prefix, environment, settings and folder;
- ``WorkerProcess``: ``streamscore worker`` as a subprocess: start, SIGKILL, SIGTERM-then-SIGKILL, RSS, /status;
- ``Load``: produces messages at a steady rate and keeps every one until Kafka acknowledged it;
- ``Collector``: reads the predictions and dead-letter topics from the beginning while the scenario runs;
- ``Tally``: what came back for what was sent (sent, answered, duplicated, lost, dead_lettered);
- ``PrivateStack``, ``RedisProcess``, ``TcpProxy``: servers a scenario may stop and start again.

Nothing here ever signals a process it did not start: workers and Redis processes by their Popen, private stack
servers through the ``Stack`` API's pid files (the shared stack in ``.stack/`` is never touched).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from streamscore.settings import Settings, StackSettings
from streamscore.streams import topics
from streamscore.streams.client import Client, PredictTimeout, partitions_of
from streamscore.streams.kafka import client_kwargs
from streamscore.streams.wire import (
    HEADER_ELEMENT,
    HEADER_ERROR_KIND,
    HEADER_ERROR_MESSAGE,
    HEADER_ORIGINAL_BYTES,
    HEADER_REQUEST_ID,
    headers_dict,
)
from streamscore_stack import ClusterStack, Stack

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "fraud"
HOST = "127.0.0.1"
PARTITIONS = 4
"""Request-topic partitions: enough for two workers to split them in the rebalance scenario."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------------------------------------ where


@dataclass(frozen=True)
class Endpoints:
    """Where a scenario's worker and its test clients connect."""

    kafka_bootstrap: str = f"{HOST}:9092"
    cassandra_port: int = 9042
    redis_port: int = 6379
    redis_password: str | None = None
    cassandra_hosts: tuple[str, ...] = ()
    """Contact points (empty: the settings' default, 127.0.0.1)."""
    replication: int = 1
    """Replication factor of the scenario's topics and keyspace; above 1, Cassandra is read and written at
    QUORUM and the worker creates its topics with that factor too."""
    speculative_retry: str | None = None
    """The feature tables' ``speculative_retry`` (None: Cassandra's 99p)."""

    def env(self) -> dict[str, str]:
        env = {
            "STREAMSCORE_KAFKA__BOOTSTRAP": self.kafka_bootstrap,
            "STREAMSCORE_CASSANDRA__PORT": str(self.cassandra_port),
            "STREAMSCORE_REDIS__PORT": str(self.redis_port),
        }
        if self.redis_password is not None:
            env["STREAMSCORE_REDIS__PASSWORD"] = self.redis_password
        if self.cassandra_hosts:
            env["STREAMSCORE_CASSANDRA__HOSTS"] = json.dumps(list(self.cassandra_hosts))
        if self.replication > 1:
            env.update({"STREAMSCORE_CASSANDRA__REPLICATION_FACTOR": str(self.replication),
                        "STREAMSCORE_CASSANDRA__READ_CONSISTENCY": "QUORUM",
                        "STREAMSCORE_CASSANDRA__WRITE_CONSISTENCY": "QUORUM"})
            env["STREAMSCORE_KAFKA__TOPIC_REPLICATION_FACTOR"] = str(self.replication)
            env["STREAMSCORE_KAFKA__TOPIC_MIN_INSYNC_REPLICAS"] = str(self.replication - 1)
        if self.speculative_retry is not None:
            env["STREAMSCORE_CASSANDRA__SPECULATIVE_RETRY"] = self.speculative_retry
        return env


PRIVATE_STACK = StackSettings(
    dir=REPO_ROOT / ".stack-soak", kafka_port=19092, kafka_controller_port=19093, cassandra_port=19042,
    cassandra_storage_port=17000, redis_port=16379,
)
"""The private stack the scenarios that stop servers use; the shared one in ``.stack/`` is never stopped."""
PRIVATE = Endpoints(f"{HOST}:{PRIVATE_STACK.kafka_port}", PRIVATE_STACK.cassandra_port, PRIVATE_STACK.redis_port)
CLUSTER_SETTINGS = Settings().stack.cluster
"""The cluster profile (``stack up --cluster``, ``.stack-cluster/``; ``STREAMSCORE_STACK__CLUSTER__*``) the
cluster scenarios run against."""
CLUSTER = Endpoints(",".join(f"{HOST}:{port}" for port in CLUSTER_SETTINGS.kafka_ports),
                    CLUSTER_SETTINGS.cassandra_port, CLUSTER_SETTINGS.redis_port,
                    cassandra_hosts=tuple(CLUSTER_SETTINGS.cassandra_hosts), replication=3, speculative_retry="50ms")
SHARED = Endpoints()


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a worker started with ``env`` reads (the environment is patched only while reading)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return Settings()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------- library


@dataclass
class Library:
    """The views file, the model library and the feature rows every scenario of a session reads."""

    data_dir: Path
    rows: dict[str, dict[str, dict[str, Any]]]
    keyspace: str

    @property
    def cards(self) -> list[str]:
        return sorted(self.rows["card_stats"], key=lambda card: int(card.split("-")[1]))

    @property
    def merchants(self) -> list[str]:
        return sorted(self.rows["merchant_stats"], key=lambda merchant: int(merchant.split("-")[1]))

    def env(self) -> dict[str, str]:
        return {
            "STREAMSCORE_MODELS_DIR": str(self.data_dir / "models"),
            "STREAMSCORE_VIEWS_FILE": str(self.data_dir / "views.json"),
            "STREAMSCORE_DATA_DIR": str(self.data_dir),
            "STREAMSCORE_CASSANDRA__KEYSPACE": self.keyspace,
        }


def build_library(data_dir: Path) -> Library:
    """Views, 300 cards and 40 merchants, and a small trained fraud model (seconds, not minutes)."""
    from streamscore_examples.fraud.data import generate_feature_rows, write_views
    from streamscore_examples.fraud.model import build_and_register

    write_views(data_dir / "views.json")
    build_and_register(data_dir / "models", seed=5, n_train=4000, max_iter=60)
    rows = generate_feature_rows(seed=3, n_cards=300, n_merchants=40)
    return Library(data_dir, rows, f"rel_{uuid.uuid4().hex[:8]}")


async def fill_store(library: Library, endpoints: Endpoints) -> None:
    """Write the library's rows into the keyspace on the Cassandra of ``endpoints``."""
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import load_views

    settings = settings_of({**library.env(), **endpoints.env()})
    store = FeatureStore(settings, load_views(settings.views_file), use_cache=False)
    store.connect(create_schema=True)
    try:
        for view, entities in library.rows.items():
            await store.put(view, [(entity, values, None) for entity, values in entities.items()])
    finally:
        await store.close()


# --------------------------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    """One scenario: its own topic prefix (so runs never see each other's messages), env and folder."""

    name: str
    library: Library
    endpoints: Endpoints
    folder: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    prefix: str = ""

    def __post_init__(self) -> None:
        self.prefix = self.prefix or f"rel-{self.name}-{uuid.uuid4().hex[:6]}"
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            "STREAMSCORE_TOPIC_PREFIX": self.prefix,
            "STREAMSCORE_WORKER__PARTITIONS": str(PARTITIONS),
            "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": "0",
            "STREAMSCORE_LOG_LEVEL": "INFO",
            **self.library.env(),
            **self.endpoints.env(),
            **self.extra_env,
        }

    @property
    def settings(self) -> Settings:
        return settings_of(self.env)

    @property
    def requests_topic(self) -> str:
        return topics.requests(self.prefix, MODEL)

    @property
    def predictions_topic(self) -> str:
        return topics.predictions(self.prefix, MODEL)

    @property
    def dlq_topic(self) -> str:
        return topics.dead_letters(self.prefix, MODEL)

    def worker(self, label: str, faulty: bool = False, **extra_env: str) -> WorkerProcess:
        return WorkerProcess({**self.env, **extra_env}, self.folder / f"worker-{label}.log", self.folder, faulty)

    async def create_topics(self, request_topic_config: dict[str, str] | None = None,
                            extra_topics: Sequence[str] = ()) -> None:
        """The scenario's topics, before any worker or client: the collector is assigned every partition
        from the start, and a request topic can get a config of its own (a larger max.message.bytes)."""
        admin = AIOKafkaAdminClient(**client_kwargs(self.settings.kafka))
        await admin.start()
        try:
            factor = self.endpoints.replication
            wanted = [NewTopic(self.requests_topic, PARTITIONS, factor, topic_configs=request_topic_config or {}),
                      NewTopic(self.predictions_topic, PARTITIONS, factor),
                      NewTopic(self.dlq_topic, PARTITIONS, factor),
                      *(NewTopic(name, 1, factor) for name in extra_topics)]
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        finally:
            await admin.close()


# ----------------------------------------------------------------------------------------------- worker


class WorkerProcess:
    """``python -m streamscore worker --model fraud`` with a scenario's environment, its log in a file and its
    working directory in the scenario's folder (Faust writes a data folder there)."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path, faulty: bool = False) -> None:
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.faulty = faulty
        """Run tests/reliability/faulty_worker.py (faults injected on markers) instead of the plain worker."""
        self.process: subprocess.Popen | None = None
        self.web_port = 0
        self.max_rss_kb = 0
        self.starts = 0

    def start(self) -> WorkerProcess:
        assert not self.alive, "already running"
        self.web_port = free_port()
        env = {**os.environ, **self.env, "STREAMSCORE_WORKER__WEB_PORT": str(self.web_port)}
        command = [sys.executable, "-m", "streamscore", "worker", "--model", MODEL]
        if self.faulty:
            command = [sys.executable, "-m", "tests.reliability.faulty_worker", "--model", MODEL]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
            self.process = subprocess.Popen(command, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM (the worker drains and commits what it has in flight), SIGKILL if it takes too long."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode

    def rss_kb(self) -> int:
        """Resident set size from /proc/<pid>/status (0 when it is not running); remembers the maximum."""
        if not self.alive:
            return 0
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    self.max_rss_kb = max(self.max_rss_kb, rss)
                    return rss
        except OSError:
            pass
        return 0

    def status(self, page: str = "status") -> dict[str, Any] | None:
        """The worker's /status JSON (or another JSON page's), or None when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.web_port}/{page}", timeout=2) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as error:  # /readyz answers 503 with a JSON body
            try:
                return dict(json.loads(error.read()))
            except ValueError:
                return None
        except (OSError, ValueError):
            return None

    def stacks(self) -> str:
        """The worker's Python stacks (py-spy, when installed), for a failure message about a stuck worker."""
        import shutil

        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if spy is None or not self.alive:
            return "(no stacks: py-spy not installed or the worker is not running)"
        dump = subprocess.run([spy, "dump", "--pid", str(self.pid)], capture_output=True, text=True, timeout=60)
        return dump.stdout + dump.stderr

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]


async def wait_answering(scenario: Scenario, worker: WorkerProcess, timeout: float = 120.0) -> float:
    """Wait until the worker answers a predict() round trip; returns how long it took."""
    started = time.monotonic()
    deadline = started + timeout
    async with Client(scenario.settings) as client:
        while time.monotonic() < deadline:
            if not worker.alive:
                raise AssertionError(f"worker exited with {worker.returncode}:\n{worker.log_tail()}")
            probe = {"id": f"probe-{uuid.uuid4().hex[:8]}", "entities": {"card_id": "card-1", "merchant_id":
                     "merchant-1"}, "features": {"amount": 1.0, "hour": 1.0, "is_foreign": 0.0}}
            try:
                await client.predict(MODEL, probe, timeout=5)
                return time.monotonic() - started
            except PredictTimeout:
                continue
    raise AssertionError(f"worker not answering after {timeout:.0f} s:\n{worker.log_tail()}")


async def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` s. Returns the seconds waited."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


@contextlib.contextmanager
def cleanup(*workers: WorkerProcess) -> Iterator[list[WorkerProcess]]:
    """Every worker started in the block is stopped on the way out, whatever happened."""
    started = list(workers)
    try:
        yield started
    finally:
        for worker in started:
            worker.stop(timeout=20)


# ------------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Message:
    """One message to produce: its key, its bytes and the request ids it carries (none for garbage)."""

    key: bytes
    value: bytes
    ids: tuple[str, ...] = ()


def request(request_id: str, card: str, merchant: str, amount: float = 42.0, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "entities": {"card_id": card, "merchant_id": merchant},
            "features": {"amount": amount, "hour": 13.0, "is_foreign": 0.0}, **extra}


def request_messages(prefix: str, count: int, cards: Sequence[str], merchants: Sequence[str],
                     seed: int = 1) -> list[Message]:
    """``count`` valid single-request messages with unique ids, keyed by card (the recommended key)."""
    rng = random.Random(seed)
    messages = []
    for index in range(count):
        card, merchant = rng.choice(cards), rng.choice(merchants)
        body = request(f"{prefix}-{index}", card, merchant, round(rng.uniform(1, 400), 2))
        messages.append(Message(card.encode(), msgpack.packb(body), (body["id"],)))
    return messages


class Load:
    """Produces messages at a steady rate; a send that fails is sent again until Kafka acknowledges it (so a
    broker restart does not drop requests on the client side). ``sent_ids`` are the acknowledged ids."""

    def __init__(self, settings: Settings, topic: str, rate: float, max_request_size: int = 1 << 20) -> None:
        self.settings = settings
        self.topic = topic
        self.rate = rate
        self.max_request_size = max_request_size
        self.acked = 0
        self.attempted = 0
        self.resent = 0
        self.sent_ids: set[str] = set()
        self.attempted_ids: set[str] = set()
        self.sent_at: dict[str, float] = {}
        """Wall-clock time each id was first handed to the producer (latency = arrival - this)."""

    async def send_all(self, messages: Iterable[Message]) -> None:
        producer = AIOKafkaProducer(**client_kwargs(self.settings.kafka), acks="all", enable_idempotence=True,
                                    linger_ms=5, max_request_size=self.max_request_size,
                                    request_timeout_ms=30_000)
        await producer.start()
        try:
            pending: set[asyncio.Task] = set()
            started = time.monotonic()
            for tick, message in enumerate(messages, 1):
                pending.add(asyncio.create_task(self._deliver(producer, message)))
                ahead = tick / self.rate - (time.monotonic() - started)
                # always yield: the producer's own tasks must run while messages are being made
                await asyncio.sleep(ahead if ahead > 0.005 else 0)
                if len(pending) > 4096:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                await asyncio.gather(*pending)
        finally:
            await producer.stop()

    async def _deliver(self, producer: AIOKafkaProducer, message: Message) -> None:
        self.attempted += 1
        self.attempted_ids.update(message.ids)
        at = time.time()
        for request_id in message.ids:
            self.sent_at.setdefault(request_id, at)
        for attempt in range(100):
            try:
                await (await producer.send(self.topic, message.value, key=message.key))
                break
            except KafkaError:
                self.resent += 1
                await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt))
        else:
            raise AssertionError(f"Kafka did not take message {message.key!r} after 100 attempts")
        self.acked += 1
        self.sent_ids.update(message.ids)


# -------------------------------------------------------------------------------------------- collector


@dataclass(frozen=True)
class Letter:
    key: bytes | None
    kind: str
    request_id: str | None
    element: int | None = None
    """The ``streamscore-element`` header (None when absent or not an int)."""
    value_sha256: str | None = None
    """sha256 of the dead letter's value (hex); None when the value is null (a tombstone's dead letter)."""
    value_size: int = -1
    """Length of the dead letter's value; -1 when it is null."""
    original_bytes: int | None = None
    """The ``streamscore-original-bytes`` header: the original value's length when the value was cut."""
    message: str = ""
    """The start of the ``streamscore-error-message`` header (its first 300 characters)."""


class Collector:
    """Reads the predictions and dead-letter topics from their beginning, until stopped."""

    def __init__(self, scenario: Scenario, follow: Sequence[str] = ()) -> None:
        self.scenario = scenario
        self.prediction_topics = {scenario.predictions_topic, *follow}
        self.counts: Counter[str] = Counter()
        self.first: dict[str, dict[str, Any]] = {}
        """The first prediction of each id, without its outputs (status, version, degraded)."""
        self.letters: list[Letter] = []
        self.arrived: dict[str, float] = {}
        """Wall-clock time the first prediction of each id was read."""
        self._task: asyncio.Task | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> Collector:
        settings = self.scenario.settings
        wanted = [*sorted(self.prediction_topics), self.scenario.dlq_topic]
        partitions = [TopicPartition(topic, number) for topic in wanted
                      for number in await partitions_of(settings, topic)]
        # read_committed, as the SDK reads: under exactly_once only committed batches count (the same as
        # read_uncommitted for at_least_once, which writes no transactions)
        self._consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False,
                                          isolation_level="read_committed",
                                          max_partition_fetch_bytes=8 << 20, fetch_max_bytes=32 << 20)
        await self._consumer.start()
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                fetched = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            except KafkaError:  # the broker restarting: the consumer reconnects by itself
                await asyncio.sleep(0.5)
                continue
            for tp, records in fetched.items():
                for record in records:
                    if tp.topic in self.prediction_topics:
                        self._prediction(record.value, tp.topic)
                    else:
                        self._letter(record.key, record.headers, record.value)

    def _prediction(self, value: bytes, topic: str | None = None) -> None:
        prediction = msgpack.unpackb(value, raw=False)
        request_id = prediction["id"]
        self.counts[request_id] += 1
        if request_id not in self.first:
            self.arrived[request_id] = time.time()
            self.first[request_id] = {"status": prediction["status"], "version": prediction["version"],
                                      "degraded": tuple(prediction["degraded"]), "topic": topic}

    def _letter(self, key: bytes | None, headers: Sequence[tuple[str, bytes]], value: bytes | None = b"") -> None:
        named = headers_dict(headers)
        self.letters.append(Letter(
            key, named.get(HEADER_ERROR_KIND, "?"), named.get(HEADER_REQUEST_ID),
            element=_int_or_none(named.get(HEADER_ELEMENT)),
            value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
            value_size=-1 if value is None else len(value),
            original_bytes=_int_or_none(named.get(HEADER_ORIGINAL_BYTES)),
            message=named.get(HEADER_ERROR_MESSAGE, "")[:300]))

    @property
    def answered(self) -> int:
        return len(self.counts)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def settle(self, done: Callable[[], bool], timeout: float, grace: float = 3.0) -> bool:
        """Wait until ``done()`` (or the timeout), then ``grace`` seconds more so late repeats are counted."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(grace)
        return done()


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- tally


@dataclass
class Tally:
    """What came back for what was sent. ``sent`` counts units that must each get exactly one outcome: a
    request id (one prediction) or a bad message or array element (one dead letter)."""

    scenario: str
    sent: int
    answered: int
    duplicated: int
    lost: int
    dead_lettered: int
    unexpected: int = 0
    """Predictions for ids never sent (must be 0)."""
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    lost_sample: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "duplicated": self.duplicated, "lost": self.lost,
                "dead_lettered": self.dead_lettered, "unexpected": self.unexpected,
                "seconds": round(self.seconds, 1), **self.notes}

    def describe(self) -> str:
        return (f"{self.scenario}: sent {self.sent}, answered {self.answered}, duplicated {self.duplicated}, "
                f"lost {self.lost}, dead-lettered {self.dead_lettered}, unexpected {self.unexpected}; "
                f"{self.notes}; lost e.g. {self.lost_sample[:5]}")


def tally(name: str, collector: Collector, sent_ids: set[str], attempted_ids: set[str],
          expected_letters: Counter[bytes | None] | None = None, seconds: float = 0.0) -> Tally:
    """Predictions keyed by id: duplicated = beyond the first per id, lost = sent ids with neither a prediction
    nor a dead letter. Dead letters are matched by message key against ``expected_letters`` (key -> count):
    missing ones are lost, extra ones duplicated."""
    expected_letters = expected_letters or Counter()
    letters_by_key: Counter[bytes | None] = Counter(letter.key for letter in collector.letters)
    lettered_ids = {letter.request_id for letter in collector.letters if letter.request_id}
    answered_ids = set(collector.counts)
    missing = sorted(sent_ids - answered_ids - lettered_ids)
    missing_letters = sum(max(0, count - letters_by_key[key]) for key, count in expected_letters.items())
    extra_letters = sum(max(0, count - expected_letters[key]) for key, count in letters_by_key.items()
                        if key in expected_letters)
    return Tally(
        scenario=name,
        sent=len(sent_ids) + sum(expected_letters.values()),
        answered=len(answered_ids & sent_ids),
        duplicated=sum(count - 1 for count in collector.counts.values()) + extra_letters,
        lost=len(missing) + missing_letters,
        dead_lettered=len(collector.letters),
        unexpected=len(answered_ids - attempted_ids - _probe_ids(answered_ids)),
        seconds=seconds,
        lost_sample=missing[:20],
    )


def _probe_ids(ids: set[str]) -> set[str]:
    return {request_id for request_id in ids if request_id.startswith("probe-")}


# --------------------------------------------------------------------------------------------- servers


class PrivateStack(Stack):
    """The private stack (``.stack-soak``, its own ports), limited to the servers a scenario needs: a short
    scenario that restarts Kafka does not wait for a Cassandra it does not use."""

    def __init__(self, names: Sequence[str] = ("kafka", "cassandra", "redis")) -> None:
        super().__init__(PRIVATE_STACK, echo=lambda line: None)
        self.names = tuple(names)

    def _servers(self) -> list[Any]:
        return [server for server in super()._servers() if server.name in self.names]

    def pid_of(self, name: str) -> int:
        (status,) = [status for status in self.status() if status.name == name]
        assert status.up and status.pid, f"private {name} is not running: {status.detail}"
        return status.pid

    def kill(self, name: str, signum: signal.Signals = signal.SIGKILL, timeout: float = 90.0) -> None:
        """Signal one private server by its recorded pid and wait until it is gone."""
        pid = self.pid_of(name)
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
            time.sleep(0.1)


class TestCluster(ClusterStack):
    """The cluster profile (``.stack-cluster/``) as the cluster scenarios drive it: a node killed by its
    recorded pid, stopped gracefully, started again through ``up()``."""

    __test__ = False

    def __init__(self) -> None:
        # the environment's stack settings: its jar cache (STREAMSCORE_STACK__CACHE_DIR) and cluster profile
        super().__init__(Settings().stack, echo=lambda line: None)

    def pid_of(self, name: str) -> int:
        (status,) = [status for status in self.status() if status.name == name]
        assert status.up and status.pid, f"cluster node {name} is not running: {status.detail}"
        return status.pid

    def kill(self, name: str, signum: signal.Signals = signal.SIGKILL, timeout: float = 90.0) -> None:
        """Signal one node by its recorded pid and wait until it is gone (SIGKILL after ``timeout``)."""
        pid = self.pid_of(name)
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
            time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class RedisProcess:
    """A redis-server of our own (a cache only: no persistence), optionally with ``requirepass``."""

    def __init__(self, folder: Path, password: str | None = None, port: int | None = None) -> None:
        self.folder = folder
        self.password = password
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 20.0) -> RedisProcess:
        import shutil

        import redis

        argv = [shutil.which("redis-server") or "redis-server", "--bind", HOST, "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            client = redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=1)
            try:
                client.ping()
                return self
            except redis.RedisError:
                assert self.process.poll() is None, f"redis-server exited: {self.folder / 'redis.log'}"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def client(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=2)


class TcpProxy:
    """A TCP proxy in front of a server, that can be cut: every connection through it is reset and new ones
    are refused, exactly what clients see when the server's process dies, until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tcp-proxy")
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(timeout=10)

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cut(), self.loop).result(timeout=10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # RST, as from a dead process
        self._writers.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, server_writer))
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer),
                             return_exceptions=True)
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()


# ----------------------------------------------------------------------------------------------- report


def write_report(rows: dict[str, dict[str, Any]], folder: Path, generated: str | None = None,
                 name: str = "reliability", extra_columns: Sequence[str] = (), title: str = "Reliability soak",
                 command: str = "`make soak` (tests/reliability, `pytest -m soak`)") -> tuple[Path, Path]:
    """bench/results/<name>.json and <name>.md (reliability: the soak): one row per scenario."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    document = {"generated": generated or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                "cpus": os.cpu_count(), "scenarios": rows}
    json_path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    columns = ["sent", "answered", "duplicated", "lost", "dead_lettered", "unexpected", *extra_columns, "seconds"]
    lines = [f"# {title}", "", f"Generated {document['generated']} on {document['host']} "
             f"({document['cpus']} CPUs) by {command}.", "",
             "`sent`: units that must each get exactly one outcome (a request id: one prediction; a bad message "
             "or bad array element: one dead letter). `answered`: distinct ids with a prediction. `duplicated`: "
             "predictions beyond the first per id (and dead letters beyond one per bad unit). `lost`: sent, with "
             "neither. `unexpected`: predictions for ids never sent. `repeat_bound`: batches in flight x batch "
             "size x events. `decoder_fuzz`: inputs decoded by both twins; `lost` would be an input that crashed "
             "one.", "",
             "| scenario | " + " | ".join(columns) + " | notes |",
             "|---|" + "---:|" * len(columns) + "---|"]
    for name, row in rows.items():
        notes = "; ".join(f"{key}: {value}" for key, value in row.items() if key not in columns)
        lines.append(f"| {name} | " + " | ".join(str(row.get(column, "")) for column in columns)
                     + f" | {notes} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
