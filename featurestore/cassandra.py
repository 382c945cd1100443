"""The Cassandra online store (``online_store = "cassandra"``): one table per feature view, batched writes, one
round of concurrent reads.

Table of a view ``v`` with features ``f1..fn``::

    CREATE TABLE view_v (entity text PRIMARY KEY, f1 <type>, ..., fn <type>, event_ts_ms bigint)

Rows are written ``USING TTL`` the view's TTL (0, i.e. none, when the view has no TTL).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cassandra import AuthenticationFailed, InvalidRequest, Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import ConstantSpeculativeExecutionPolicy, ExponentialReconnectionPolicy
from cassandra.query import PreparedStatement, tuple_factory

from streamscore.settings import CassandraSettings, Settings

from . import replication
from .online import FeatureStoreUnavailable, OnlineRow, OnlineStore, SchemaMissing, StoredRow
from .views import FeatureView

log = logging.getLogger(__name__)

SCHEMA_TIMEOUT_S = 30.0
"""A schema change is answered once the nodes agree on it: on a loaded multi-node cluster that takes seconds,
longer than a feature read may (``request_timeout_s``)."""


def _ssl_context(settings: CassandraSettings) -> ssl.SSLContext | None:
    if settings.ssl_cafile is None and settings.ssl_certfile is None:
        return None
    context = ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    if settings.ssl_certfile is not None:  # mutual TLS
        context.load_cert_chain(str(settings.ssl_certfile), str(settings.ssl_keyfile) if settings.ssl_keyfile else None)
    return context


def connect(settings: CassandraSettings) -> tuple[Cluster, Session]:
    """Open a session with tuple rows (cheapest to build), reads at ``read_consistency`` and the load balancing
    of ``local_dc`` (featurestore/replication.py)."""
    auth = None
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else ""
        auth = PlainTextAuthProvider(username=settings.username, password=password)
    profile = ExecutionProfile(
        load_balancing_policy=replication.load_balancing(settings),
        consistency_level=replication.read_consistency(settings),
        request_timeout=settings.request_timeout_s,
        row_factory=tuple_factory,
        # a feature read (idempotent) whose coordinator is slow to answer is also sent to the next node of the
        # query plan: one node stalling (starting, a GC pause, dying) then costs that delay, not a default
        speculative_execution_policy=(
            ConstantSpeculativeExecutionPolicy(settings.speculative_execution_ms / 1000, 1)
            if settings.speculative_execution_ms else None),
    )
    cluster = Cluster(
        contact_points=settings.hosts,
        port=settings.port,
        auth_provider=auth,
        ssl_context=_ssl_context(settings),
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=5,
        connect_timeout=5,
        # the driver's default backs off to 10 minutes between attempts: after a long outage, requests would
        # keep getting defaults long after Cassandra is back. An attempt every few seconds costs nothing.
        reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.5, max_delay=5.0),
    )
    try:
        session = cluster.connect()
    except Exception as exc:
        cluster.shutdown()
        raise FeatureStoreUnavailable(connect_problem(settings, exc)) from exc
    return cluster, session


def connect_problem(settings: CassandraSettings, error: BaseException) -> str:
    """One line on why no session opened: credentials refused or missing, TLS refused, or nobody answering."""
    where = f"Cassandra at {','.join(settings.hosts)}:{settings.port}"
    causes = list(error.errors.values()) if isinstance(error, NoHostAvailable) else [error]
    said = " ".join(str(causes[0] if causes else error).split()) or type(error).__name__
    if any(isinstance(cause, AuthenticationFailed) for cause in causes):
        if settings.username is None:
            return (f"{where} wants credentials ({said}): set STREAMSCORE_CASSANDRA__USERNAME and "
                    "STREAMSCORE_CASSANDRA__PASSWORD (or __PASSWORD_FILE)")
        return (f"{where} refused the credentials of user {settings.username!r} ({said}): check "
                "STREAMSCORE_CASSANDRA__USERNAME and STREAMSCORE_CASSANDRA__PASSWORD")
    if any(isinstance(cause, ssl.SSLError) for cause in causes) or "SSL" in said:
        return (f"{where} refused the TLS handshake ({said}): check STREAMSCORE_CASSANDRA__SSL_CAFILE (and the "
                "client certificate settings) against the server's certificates")
    return (f"cannot reach {where} ({said}); is it running, and is STREAMSCORE_CASSANDRA__HOSTS / __PORT right? "
            "(`streamscore stack up` starts a local one)")


def schema_problem(settings: CassandraSettings, table: str, view: str, error: BaseException) -> FeatureStoreUnavailable:
    """What preparing a view's statements failing means: the schema is missing, or the role lacks a grant."""
    said = " ".join(str(error).split())
    keyspace = settings.keyspace
    if isinstance(error, Unauthorized):
        user = repr(settings.username) if settings.username else "this role"
        return FeatureStoreUnavailable(
            f"Cassandra refused {user} access to {keyspace}.{table} of view {view!r} ({said}): "
            f"GRANT SELECT, MODIFY ON KEYSPACE {keyspace} TO <role>")
    if isinstance(error, InvalidRequest) and ("does not exist" in said or "unconfigured table" in said):
        return SchemaMissing(
            f"Cassandra has no table {keyspace}.{table} for view {view!r} (keyspace or table missing: {said}): "
            "run `streamscore features init` once, as a role that may create them")
    return FeatureStoreUnavailable(f"Cassandra could not prepare the statements of view {view!r} ({said})")


class _ConcurrentRound:
    """Runs many prepared statements with bounded concurrency on the driver's thread and resolves one asyncio
    future when all are done, so a batch costs one wake-up of the event loop, not one per key."""

    def __init__(self, session: Session, work: list[tuple[PreparedStatement, tuple]], concurrency: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._session = session
        self._work = work
        self._results: list[Any] = [None] * len(work)
        self._done = [False] * len(work)
        """Per statement: its outcome came. The driver may report one twice (with speculative execution, each
        execution that answers calls the callbacks): only the first counts."""
        self._next = 0
        self._pending = len(work)
        self._lock = threading.Lock()
        self._loop = loop
        self.future: asyncio.Future = loop.create_future()
        self._concurrency = max(1, concurrency)

    def start(self) -> asyncio.Future:
        if not self._work:
            self.future.set_result(self._results)
            return self.future
        for _ in range(min(self._concurrency, len(self._work))):
            self._launch_next()
        return self.future

    def _launch_next(self) -> None:
        with self._lock:
            if self._next >= len(self._work):
                return
            index = self._next
            self._next += 1
        statement, params = self._work[index]
        try:
            response = self._session.execute_async(statement, params)
        except Exception as exc:  # the driver raises synchronously when no host is available
            self._finish(index, exc)
            return
        response.add_callbacks(self._on_rows, self._on_error, callback_args=(index,), errback_args=(index,))

    def _on_rows(self, rows: Any, index: int) -> None:
        self._finish(index, rows)

    def _on_error(self, exc: BaseException, index: int) -> None:
        self._finish(index, exc)

    def _finish(self, index: int, result: Any) -> None:
        with self._lock:
            if self._done[index]:
                return
            self._done[index] = True
            self._results[index] = result
            self._pending -= 1
            done = self._pending == 0
        if done:
            self._loop.call_soon_threadsafe(self._resolve)
        else:
            self._launch_next()

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(self._results)


class CassandraStore(OnlineStore):
    name = "cassandra"
    title = "Cassandra"

    def __init__(self, settings: CassandraSettings, views: Mapping[str, FeatureView]) -> None:
        super().__init__(views)
        self.settings = settings
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._select: dict[str, PreparedStatement] = {}
        self._select_in: dict[str, PreparedStatement] = {}
        self._insert: dict[str, PreparedStatement] = {}

    @property
    def session(self) -> Session:
        self._require_connected()
        assert self._session is not None
        return self._session

    def _require_connected(self) -> None:
        """Unconnected (or closed) is a RuntimeError, before any prepared statement is looked up."""
        if self._session is None:
            raise RuntimeError("CassandraStore.connect() was not called (or the store was closed)")

    @classmethod
    def from_settings(cls, settings: Settings, views: Mapping[str, FeatureView]) -> CassandraStore:
        return cls(settings.cassandra, views)

    def connect(self, create: bool = False) -> None:
        """Connect (with ``create``: create the keyspace and the tables that are missing) and prepare every
        view's statements: a missing table or grant is found here, in one line, not by the first batch."""
        self._cluster, self._session = connect(self.settings)
        try:
            if create:
                self.apply_schema()
            for view in self.views.values():
                try:
                    self._prepare(view)
                    # preparing checks no permission: one read does (a role without SELECT is told so here)
                    self.session.execute(self._select[view.name], ("_connect",))
                except (InvalidRequest, Unauthorized) as exc:
                    raise schema_problem(self.settings, view.table, view.name, exc) from exc
        except BaseException:
            self.close()
            raise

    def apply_schema(self) -> None:
        """``CREATE KEYSPACE`` / ``CREATE TABLE ... IF NOT EXISTS``: a table a view outgrew (a feature added
        since) is left as it is, and the statements prepared for it then fail."""
        keyspace = self.settings.keyspace
        try:
            # CREATE KEYSPACE IF NOT EXISTS needs CREATE on all keyspaces even when the keyspace is there: a
            # keyspace made by an administrator (with NetworkTopologyStrategy, say) is left as it is
            assert self._cluster is not None
            if keyspace not in self._cluster.metadata.keyspaces:
                self.session.execute(replication.create_keyspace_cql(self.settings), timeout=SCHEMA_TIMEOUT_S)
            for view in self.views.values():
                columns = ", ".join(f"{feature.name} {feature.cql_type}" for feature in view.features)
                self.session.execute(
                    f"CREATE TABLE IF NOT EXISTS {keyspace}.{view.table} "
                    f"(entity text PRIMARY KEY, {columns}, event_ts_ms bigint)"
                    f"{replication.table_options(self.settings)}",
                    timeout=SCHEMA_TIMEOUT_S,
                )
        except Unauthorized as exc:
            user = repr(self.settings.username) if self.settings.username else "this role"
            raise FeatureStoreUnavailable(
                f"Cassandra refused {user} the schema of keyspace {keyspace} ({' '.join(str(exc).split())}): "
                f"run `streamscore features init` as a role with CREATE on ALL KEYSPACES, or create keyspace "
                f"{keyspace} and GRANT CREATE ON KEYSPACE {keyspace} to this role") from exc

    def _prepare(self, view: FeatureView) -> None:
        names = ", ".join(view.feature_names)
        marks = ", ".join("?" for _ in view.features)
        self._select[view.name] = self.session.prepare(
            f"SELECT {names}, event_ts_ms FROM {self._table(view)} WHERE entity = ?"
        )
        self._select_in[view.name] = self.session.prepare(
            f"SELECT entity, {names}, event_ts_ms FROM {self._table(view)} WHERE entity IN ?"
        )
        for read in (self._select[view.name], self._select_in[view.name]):
            read.is_idempotent = True  # what lets the driver send it to a second node (speculative_execution_ms)
        self._insert[view.name] = self.session.prepare(
            f"INSERT INTO {self._table(view)} (entity, {names}, event_ts_ms) VALUES (?, {marks}, ?) USING TTL ?"
        )
        self._insert[view.name].consistency_level = replication.write_consistency(self.settings)

    def _table(self, view: FeatureView) -> str:
        return f"{self.settings.keyspace}.{view.table}"

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = self._session = None
        self._select, self._select_in, self._insert = {}, {}, {}

    async def put(self, view_name: str, rows: Sequence[OnlineRow]) -> None:
        """Write (entity, values in view order, event_ts_ms) rows; raises if any write failed."""
        self._require_connected()
        view = self.views[view_name]
        ttl = view.ttl_s or 0
        work = [(self._insert[view_name], (entity, *values, event_ts, ttl)) for entity, values, event_ts in rows]
        results = await self._round(work)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures and isinstance(failures[0], Unauthorized):
            raise schema_problem(self.settings, view.table, view_name, failures[0])
        if failures:
            raise FeatureStoreUnavailable(f"{len(failures)} of {len(rows)} writes to {view.table} failed: "
                                          f"{failures[0]!r}")

    async def get_many(self, requests: Sequence[tuple[str, str]]) -> list[StoredRow | BaseException | None]:
        """Read (view, entity) pairs in one concurrent round; each result is the row, None, or the error.

        Keys are read ``read_chunk`` at a time with ``IN`` queries, all chunks concurrently: the driver's
        per-query cost, not Cassandra, bounded per-key reads. A failed chunk fails only its own keys."""
        self._require_connected()
        chunk = max(1, self.settings.read_chunk)
        if chunk == 1:
            results = await self._round([(self._select[view], (entity,)) for view, entity in requests])
            return [_first_row(result) for result in results]
        by_view: dict[str, list[str]] = {}
        for view, entity in requests:
            by_view.setdefault(view, []).append(entity)
        queries: list[tuple[str, list[str]]] = []
        for view, entities in by_view.items():
            distinct = list(dict.fromkeys(entities))
            queries.extend((view, distinct[start:start + chunk]) for start in range(0, len(distinct), chunk))
        results = await self._round([(self._select_in[view], (keys,)) for view, keys in queries])
        found: dict[tuple[str, str], StoredRow | BaseException] = {}
        for (view, keys), result in zip(queries, results, strict=True):
            if isinstance(result, BaseException):
                found.update(((view, key), result) for key in keys)
                continue
            for row in result or ():
                found[(view, row[0])] = _stored(row[1:])
        return [found.get(request) for request in requests]

    async def _round(self, work: list[tuple[PreparedStatement, tuple]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await _ConcurrentRound(self.session, work, self.settings.read_concurrency, loop).start()


def _first_row(result: Any) -> StoredRow | BaseException | None:
    if isinstance(result, BaseException):
        return result
    rows = list(result) if result is not None else []
    return _stored(rows[0]) if rows else None


def _stored(row: Sequence[Any]) -> StoredRow:
    """Feature columns then event_ts_ms, as read."""
    values = [None if value is None else float(value) for value in row[:-1]]
    return values, int(row[-1] or 0)


__all__ = ["CassandraStore", "FeatureStoreUnavailable", "StoredRow", "connect"]
