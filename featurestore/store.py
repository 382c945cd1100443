"""The feature store a worker and a client use: an online store (Cassandra by default) with a cache tier (Redis
by default) in front, both picked by name in the settings (``backends``) or handed in from Python.

A write fences its rows' cache entries, writes the online store, then settles the entries: each becomes the
written row where no other write overlapped it, the plain fence elsewhere (see ``cache``). If the fences cannot be set,
nothing is written and ``put`` raises ``CacheInvalidationFailed``; if only the settling fails, a warning is
logged and the write stands (the fences keep readers off the old rows for ``fence_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamscore.fastpath import ViewBlock
from streamscore.settings import Settings

from .backends import cache_tier, online_store
from .cache import MISSING, CacheInvalidationFailed, CacheTier, CacheUnusable, pack_row, row_dtype
from .online import FeatureStoreUnavailable, OnlineStore, StoredRow
from .views import FeatureView

log = logging.getLogger(__name__)


@dataclass
class FetchedView:
    """One view's features for a batch: the block the assembler reads and lineage/degradation facts."""

    view: FeatureView
    block: ViewBlock
    event_ts_ms: np.ndarray
    """int64 (n,): event timestamp of the row each request used, 0 where defaults were used."""
    missing: list[int]
    """Request rows that got the view's defaults (entity unknown or the store unreachable)."""
    unavailable_rows: list[int] = field(default_factory=list)
    """The rows of ``missing`` whose entity could not be read (the online store did not answer), not unknown."""
    exact_values: np.ndarray | None = None
    """float64 values behind block.values (same rows), for readers that want more than float32."""


_UNKNOWN, _FOUND, _ABSENT, _UNAVAILABLE = 0, 1, 2, 3


class _ViewTable:
    """One view's rows for one batch, filled from the cache, then from the online store for the misses."""

    def __init__(self, view: FeatureView, column: Sequence[str]) -> None:
        self.view = view
        self.column = column
        self.entities = list(dict.fromkeys(column))
        count, width = len(self.entities), len(view.features)
        self.values = np.zeros((count, width), dtype=np.float64)
        self.stamps = np.zeros(count, dtype=np.int64)
        self.state = np.zeros(count, dtype=np.int8)
        self.defaults = np.asarray(view.defaults, dtype=np.float64)
        self.dtype = row_dtype(width)

    def take_cached(self, raw: list[bytes | None] | None) -> None:
        if raw is None:
            return
        width = self.dtype.itemsize  # a value of another width is an old or corrupt entry: a miss
        hits = [position for position, value in enumerate(raw) if value is not None and len(value) == width]
        if hits:
            rows = np.frombuffer(b"".join([raw[position] for position in hits]), dtype=self.dtype)  # type: ignore[misc]
            self.values[hits] = rows["values"]
            self.stamps[hits] = rows["ts"]
            self.state[hits] = _FOUND
        absent = [position for position, value in enumerate(raw) if value == MISSING]
        self.state[absent] = _ABSENT

    def miss_positions(self) -> list[int]:
        return np.flatnonzero(self.state == _UNKNOWN).tolist()

    def take_stored(self, position: int, row: StoredRow | BaseException | None) -> bytes | None:
        """Record a row read from the online store; returns what to cache (None: cache nothing)."""
        if isinstance(row, BaseException):
            self.state[position] = _UNAVAILABLE
            return None
        if row is None:
            self.state[position] = _ABSENT
            return MISSING
        values = [default if value is None else value for value, default in zip(row[0], self.view.defaults,
                                                                                strict=True)]
        self.values[position] = values
        self.stamps[position] = row[1]
        self.state[position] = _FOUND
        return pack_row(values, row[1])

    def fetched(self) -> FetchedView:
        index = {entity: position for position, entity in enumerate(self.entities)}
        entity_of_request = np.fromiter((index[entity] for entity in self.column), dtype=np.int64,
                                        count=len(self.column))
        found = self.state == _FOUND
        row_of_request = np.where(found[entity_of_request], entity_of_request, -1).astype(np.int32)
        event_ts = np.where(row_of_request >= 0, self.stamps[entity_of_request], 0).astype(np.int64)
        block = ViewBlock(values=self.values.astype(np.float32), row_of_request=row_of_request,
                          defaults=self.defaults.astype(np.float32))
        missing = np.flatnonzero(row_of_request < 0).tolist()
        unavailable = np.flatnonzero(self.state[entity_of_request] == _UNAVAILABLE).tolist()
        return FetchedView(self.view, block, event_ts, missing, unavailable, self.values)


class FeatureStore:
    """Batch reads (``fetch``, ``get``) and writes (``put``) of feature views, through the cache tier.

    ``online`` and ``cache`` default to the backends ``settings.online_store`` and ``settings.cache`` name;
    instances handed in are used as they are (composition from Python, e.g. ``online=MemoryStore(views)``).
    ``use_cache=False`` runs without a cache tier whatever the settings say."""

    def __init__(self, settings: Settings, views: Mapping[str, FeatureView], use_cache: bool = True, *,
                 online: OnlineStore | None = None, cache: CacheTier | None = None) -> None:
        self.settings = settings
        self.views = dict(views)
        self.online: OnlineStore = online if online is not None else online_store(settings, self.views)
        self.cache: CacheTier | None = None
        if use_cache:
            self.cache = cache if cache is not None else cache_tier(settings)
        self.store_errors = 0
        """Online-store reads that failed (those requests got the view's defaults, marked unavailable)."""
        self._store_down_since: float | None = None
        self._errors_before_outage = 0

    def connect(self, create_schema: bool = False) -> None:
        """Connect the online store. Its schema is made by ``streamscore features init`` (``apply_schema``),
        an administrator's step: a worker and the feature commands need only read and write grants, and say
        in one line when the schema is missing. ``create_schema`` runs ``apply_schema`` first (demo, tests)."""
        self.online.connect(create=create_schema)

    def apply_schema(self) -> None:
        """Create the keyspace and tables (or what the backend needs) the views lack; keeps every row."""
        self.online.apply_schema()

    async def check(self, timeout_s: float) -> dict[str, str | None]:
        """Read each tier once as a batch does (``/readyz``): {"<online store>": why not, or None when it
        answered; "cache": likewise, absent without a cache tier}. A read of a view's table needs the table
        and the grant to read it: a missing schema or a missing grant is found here, not by the first batch."""
        problems: dict[str, str | None] = {}
        first = next(iter(self.views.values()), None)
        problems[self.online.name] = None
        if first is not None:
            try:
                (row,) = await asyncio.wait_for(self.online.get_many([(first.name, "_readyz")]), timeout_s)
            except Exception as exc:  # the driver raises synchronously when no host is available
                row = exc
            if isinstance(row, BaseException):
                said = " ".join(str(row).split()) or type(row).__name__
                problems[self.online.name] = (f"{self.online.title} did not answer a read of view {first.name!r} "
                                              f"({type(row).__name__}: {said})")
        if self.cache is not None:
            try:
                await asyncio.wait_for(self.cache.check(), timeout_s)
                problems["cache"] = None
            except CacheUnusable as exc:
                problems["cache"] = str(exc)
            except TimeoutError:
                problems["cache"] = f"the cache tier did not answer within {timeout_s:g} s"
        return problems

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        self.online.close()

    async def put(self, view_name: str, rows: Iterable[tuple[str, Mapping[str, Any], int | None]]) -> int:
        """Write (entity, {feature: value}, event_ts_ms or None for now) rows, keeping the cache coherent.

        The rows' cache entries are fenced before the online store is written: if Redis refuses (unreachable,
        credentials, NOPERM, timeout), ``CacheInvalidationFailed`` is raised and nothing is written. After the
        write (whether it succeeded or not) the entries are settled: the written row where no other write
        overlapped, the plain fence elsewhere; a failure of that second round is logged, and the write stands."""
        view = self._view(view_name)
        now_ms = int(time.time() * 1000)
        prepared = []
        for entity, features, event_ts in rows:
            unknown = set(features) - set(view.feature_names)
            if unknown:
                raise ValueError(f"view {view_name!r} has no feature(s) {sorted(unknown)}; "
                                 f"it has {view.feature_names}")
            values = [_typed(feature.type, features.get(feature.name, feature.default)) for feature in view.features]
            prepared.append((str(entity), values, now_ms if event_ts is None else int(event_ts)))
        if self.cache is None:
            await self.online.put(view_name, prepared)
            return len(prepared)
        entities = list(dict.fromkeys(entity for entity, _, _ in prepared))
        fences = await self.cache.fence(view_name, entities)  # raises: nothing written
        written: dict[str, bytes] = {}
        try:
            await self.online.put(view_name, prepared)
            # an entity twice in the batch is not published: which of its writes Cassandra kept is its business
            repeated = len(entities) < len(prepared)
            counts = Counter(entity for entity, _, _ in prepared) if repeated else None
            written = {entity: pack_row(values, event_ts) for entity, values, event_ts in prepared
                       if counts is None or counts[entity] == 1}
        finally:
            try:
                await self.cache.settle(fences, entities, written)
            except CacheInvalidationFailed as exc:
                log.warning("Redis at %s did not settle the cache entries of %d %s row(s) after the online "
                            "store's write (%s); the fences set before it keep readers off the old rows for up to %d s",
                            exc.address, len(entities), view_name, exc.reason, self.settings.redis.fence_s)
        return len(prepared)

    async def get(self, view_name: str, entities: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Feature values by entity (None for unknown entities), through the cache."""
        view = self._view(view_name)
        (fetched,) = await self.fetch([view_name], [[str(entity) for entity in entities]])
        result: dict[str, dict[str, Any] | None] = {}
        for position, entity in enumerate(entities):
            row = fetched.block.row_of_request[position]
            if row < 0:
                result[str(entity)] = None
                continue
            values = fetched.block.values[row].tolist() if fetched.exact_values is None else \
                fetched.exact_values[row].tolist()
            result[str(entity)] = {**dict(zip(view.feature_names, values, strict=True)),
                                   "event_ts_ms": int(fetched.event_ts_ms[position])}
        return result

    async def fetch(self, view_names: Sequence[str], entity_columns: Sequence[Sequence[str]]) -> list[FetchedView]:
        """Features of a batch: for view i, entity_columns[i] holds each request's entity key.

        One cache read (Redis: one MGET) for every distinct (view, entity) of the batch, then one batch read
        of the online store for the misses (Cassandra: one concurrent round); hits are parsed with one numpy call
        per view."""
        tables = [_ViewTable(self.views[name], column) for name, column in zip(view_names, entity_columns, strict=True)]
        pairs = [(table.view.name, entity) for table in tables for entity in table.entities]
        cached = await self.cache.get_many(pairs) if self.cache is not None else None
        start = 0
        for table in tables:
            table.take_cached(None if cached is None else cached[start:start + len(table.entities)])
            start += len(table.entities)
        await self._read_misses(tables)
        return [table.fetched() for table in tables]

    async def _read_misses(self, tables: list[_ViewTable]) -> None:
        wanted = [(table, position) for table in tables for position in table.miss_positions()]
        if not wanted:
            return
        try:
            stored = await self.online.get_many([(table.view.name, table.entities[pos]) for table, pos in wanted])
        except Exception as exc:  # no host at all: every miss is unavailable, the batch still goes on
            stored = [exc] * len(wanted)
        to_cache = []
        failures = [row for row in stored if isinstance(row, BaseException)]
        for (table, position), row in zip(wanted, stored, strict=True):
            packed = table.take_stored(position, row)
            if packed is not None:
                to_cache.append((table.view.name, table.entities[position], packed))
        if failures:
            self._note_store_errors(len(failures), failures[0], len(stored))
        elif self._store_down_since is not None:
            log.warning("%s answers again after %.1f s; %d reads failed meanwhile", self.online.title,
                        time.monotonic() - self._store_down_since, self.store_errors - self._errors_before_outage)
            self._store_down_since = None
        if self.cache is not None:
            await self.cache.put_many(to_cache)

    def _note_store_errors(self, failures: int, first: BaseException, asked: int) -> None:
        """Logged once per outage (a line per batch would flood the log while the store is away), and once
        when reads succeed again; ``store_errors`` counts every failed read."""
        if self._store_down_since is None:
            self._store_down_since = time.monotonic()
            self._errors_before_outage = self.store_errors
            log.warning("%s reads failed for %d of %d entities (%r): until it answers again, requests "
                        "whose rows are not cached get the view defaults, marked <view>:unavailable:<entity>",
                        self.online.title, failures, asked, first)
        self.store_errors += failures

    def _view(self, name: str) -> FeatureView:
        try:
            return self.views[name]
        except KeyError:
            raise ValueError(f"no feature view {name!r}; declared views: {sorted(self.views)}") from None


def _typed(kind: str, value: Any) -> Any:
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return int(value)
    return float(value)


__all__ = ["CacheInvalidationFailed", "FeatureStore", "FeatureStoreUnavailable", "FetchedView", "OnlineStore"]
