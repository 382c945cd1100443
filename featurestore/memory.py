"""The in-memory online store (``online_store = "memory"``): the rows live in this process, one dict per view.

For tests, notebooks and composing a pipeline from Python without servers: it keeps the Cassandra store's
semantics (the contract in ``online``): the last write of an entity wins, a view's ``ttl_s`` forgets a row
that long after its write, an unknown entity reads as None, values come back as float with the event
timestamp. A worker started with it sees only what was written in its own process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from streamscore.settings import Settings

from .online import OnlineRow, OnlineStore, StoredRow
from .views import FeatureView

_Entry = tuple[list[float | None], int, float]
"""Values, event_ts_ms, and the clock reading after which the row is gone (inf: no TTL)."""


class MemoryStore(OnlineStore):
    name = "memory"
    title = "The in-memory store"

    def __init__(self, views: Mapping[str, FeatureView], clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` (seconds) times the TTLs; a test may pass one it moves by hand."""
        super().__init__(views)
        self.clock = clock
        self._tables: dict[str, dict[str, _Entry]] = {}
        self._connected = False

    @classmethod
    def from_settings(cls, settings: Settings, views: Mapping[str, FeatureView]) -> MemoryStore:
        return cls(views)

    def connect(self, create: bool = False) -> None:
        """Nothing to administer in this process's memory: the tables are made whatever ``create`` says."""
        self._connected = True
        self.apply_schema()

    def apply_schema(self) -> None:
        self._require_connected()
        for name in self.views:
            self._tables.setdefault(name, {})

    def close(self) -> None:
        """Disconnects; the rows stay (they are the store's, as a server's would), for a later ``connect``."""
        self._connected = False

    async def put(self, view_name: str, rows: Sequence[OnlineRow]) -> None:
        table = self._table(view_name)
        ttl_s = self.views[view_name].ttl_s
        expires = self.clock() + ttl_s if ttl_s else float("inf")
        for entity, values, event_ts_ms in rows:
            table[entity] = ([None if value is None else float(value) for value in values], int(event_ts_ms),
                             expires)

    async def get_many(self, requests: Sequence[tuple[str, str]]) -> list[StoredRow | BaseException | None]:
        self._require_connected()
        now = self.clock()
        results: list[StoredRow | BaseException | None] = []
        for view_name, entity in requests:
            table = self._table(view_name)
            entry = table.get(entity)
            if entry is not None and entry[2] <= now:
                del table[entity]  # expired: gone, as a TTL'd Cassandra row is
                entry = None
            results.append(None if entry is None else (list(entry[0]), entry[1]))
        return results

    def _table(self, view_name: str) -> dict[str, _Entry]:
        self._require_connected()
        try:
            return self._tables[view_name]
        except KeyError:
            raise RuntimeError(f"the in-memory store has no table for view {view_name!r}: apply_schema() creates "
                               "one per declared view") from None

    def _require_connected(self) -> None:
        if not self._connected:
            raise RuntimeError("MemoryStore.connect() was not called (or the store was closed)")
