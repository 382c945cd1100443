"""The feature store a worker and a client use: Cassandra online store with the Redis cache in front."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamscore.fastpath import ViewBlock
from streamscore.settings import Settings

from .cache import FeatureCache
from .cassandra import CassandraStore, FeatureStoreUnavailable, StoredRow
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
    unavailable: bool = False
    """True when Cassandra could not be read for some of this batch's entities."""


def _as_float_row(view: FeatureView, values: Sequence[float | None]) -> list[float]:
    return [default if value is None else float(value) for value, default in zip(values, view.defaults, strict=True)]


class FeatureStore:
    def __init__(self, settings: Settings, views: Mapping[str, FeatureView], use_cache: bool = True) -> None:
        self.settings = settings
        self.views = dict(views)
        self.online = CassandraStore(settings.cassandra, self.views)
        self.cache = FeatureCache(settings.redis, settings.topic_prefix) if use_cache else None
        self.store_errors = 0

    def connect(self, create_schema: bool = True) -> None:
        self.online.connect(create=create_schema)

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        self.online.close()

    async def put(self, view_name: str, rows: Iterable[tuple[str, Mapping[str, Any], int | None]]) -> int:
        """Write (entity, {feature: value}, event_ts_ms or None for now) rows, then drop their cache entries."""
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
        await self.online.put(view_name, prepared)
        if self.cache is not None:
            await self.cache.invalidate(view_name, [entity for entity, _, _ in prepared])
        return len(prepared)

    async def get(self, view_name: str, entities: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Feature values by entity (None for unknown entities), through the cache."""
        view = self._view(view_name)
        rows = await self._rows([(view_name, str(entity)) for entity in entities])
        result: dict[str, dict[str, Any] | None] = {}
        for entity, row in zip(entities, rows, strict=True):
            if row is None or isinstance(row, BaseException):
                result[str(entity)] = None
            else:
                values = _as_float_row(view, row[0])
                result[str(entity)] = {**dict(zip(view.feature_names, values, strict=True)), "event_ts_ms": row[1]}
        return result

    async def fetch(self, view_names: Sequence[str], entity_columns: Sequence[Sequence[str]]) -> list[FetchedView]:
        """Features of a batch: for view i, entity_columns[i] holds each request's entity key.

        One cache MGET for every distinct (view, entity) of the batch, then one concurrent round of
        Cassandra reads for the misses."""
        distinct = [list(dict.fromkeys(column)) for column in entity_columns]
        pairs = [(view, entity) for view, entities in zip(view_names, distinct, strict=True) for entity in entities]
        rows = await self._rows(pairs)
        fetched, start = [], 0
        for view_name, entities, column in zip(view_names, distinct, entity_columns, strict=True):
            view_rows = rows[start:start + len(entities)]
            start += len(entities)
            fetched.append(self._block(self.views[view_name], entities, view_rows, column))
        return fetched

    def _block(self, view: FeatureView, entities: list[str], rows: list, column: Sequence[str]) -> FetchedView:
        values = np.empty((len(entities), len(view.features)), dtype=np.float32)
        stamps = np.zeros(len(entities), dtype=np.int64)
        row_of_entity: dict[str, int] = {}
        unavailable = False
        for index, (entity, row) in enumerate(zip(entities, rows, strict=True)):
            if isinstance(row, BaseException):
                unavailable = True
                continue
            if row is None:
                continue
            values[index] = _as_float_row(view, row[0])
            stamps[index] = row[1]
            row_of_entity[entity] = index
        row_of_request = np.fromiter((row_of_entity.get(entity, -1) for entity in column), dtype=np.int32,
                                     count=len(column))
        event_ts = np.where(row_of_request >= 0, stamps[row_of_request], 0)
        missing = np.flatnonzero(row_of_request < 0).tolist()
        block = ViewBlock(values=values, row_of_request=row_of_request,
                          defaults=np.asarray(view.defaults, dtype=np.float32))
        return FetchedView(view, block, event_ts.astype(np.int64), missing, unavailable)

    async def _rows(self, pairs: list[tuple[str, str]]) -> list[StoredRow | BaseException | None]:
        cached = await self.cache.get_many(pairs) if self.cache is not None else None
        if cached is None:
            cached = [False] * len(pairs)
        miss_positions = [index for index, row in enumerate(cached) if row is False]
        rows: list[StoredRow | BaseException | None] = [None if row is False else row for row in cached]  # type: ignore[misc]
        if not miss_positions:
            return rows
        misses = [pairs[index] for index in miss_positions]
        try:
            stored = await self.online.get_many(misses)
        except Exception as exc:  # no host at all: every miss is unavailable, the batch still goes on
            stored = [exc] * len(misses)
        failures = 0
        for index, row in zip(miss_positions, stored, strict=True):
            rows[index] = row
            failures += isinstance(row, BaseException)
        if failures:
            self._note_store_errors(failures, stored)
        if self.cache is not None:
            await self.cache.put_many([(view, entity, row) for (view, entity), row in zip(misses, stored, strict=True)
                                       if not isinstance(row, BaseException)])
        return rows

    def _note_store_errors(self, failures: int, stored: list) -> None:
        first = next(row for row in stored if isinstance(row, BaseException))
        if self.store_errors == 0 or failures == len(stored):
            log.warning("Cassandra reads failed for %d entities (%r): those requests use view defaults and are "
                        "marked degraded", failures, first)
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


__all__ = ["FeatureStore", "FeatureStoreUnavailable", "FetchedView"]
