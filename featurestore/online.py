"""The online store contract: where a feature view's latest rows live, one row per entity.

Four operations, as feast's ``OnlineStore`` has them (``online_write_batch``, ``online_read``, ``update``,
``teardown``): a batch write (``put``), a batch read (``get_many``), schema setup (``apply_schema``, run by
``streamscore features init``, or by ``connect`` when told to) and ``close``. A backend is one module beside
this one (``cassandra``, ``memory``) and one entry of ``backends.ONLINE_STORES``; ``Settings.online_store``
picks it by name.

What every backend does (``tests/contract/test_online_store.py`` checks each one):

- a row is ``(entity, values in view order, event_ts_ms)``; a read gives the values as float (None for a null
  column) and the event timestamp back, or None for an entity the store does not have;
- the last write of an entity wins, whatever its event timestamp (the store keeps the latest write, not the
  newest event);
- a view with ``ttl_s`` forgets a row ``ttl_s`` seconds after it was written (Cassandra's ``USING TTL``);
- a read of many keys is one round (chunked and concurrent where the backend has round trips), and a key that
  could not be read is the exception in its place, not a failed call: the caller degrades those keys only;
- before ``connect`` and after ``close``, reads and writes raise ``RuntimeError``; ``close`` twice is harmless.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from streamscore.settings import Settings

from .views import FeatureView

StoredRow = tuple[list[float | None], int]
"""Feature values in view order (None for a null column) and the row's event timestamp (epoch ms)."""

OnlineRow = tuple[str, Sequence[Any], int]
"""What a batch write takes: entity, values in view order (typed as the view declares), event_ts_ms."""


class FeatureStoreUnavailable(RuntimeError):
    """The online store did not answer (or refused a write); the message names the store and what to check."""


class SchemaMissing(FeatureStoreUnavailable):
    """A view's table (or its keyspace) is not there: ``streamscore features init`` creates them."""


class OnlineStore(ABC):
    """One backend of the online store, for the views it was made with."""

    name: ClassVar[str]
    """Its name in ``backends.ONLINE_STORES`` and ``Settings.online_store``."""
    title: ClassVar[str]
    """How log lines name it, at the start of a sentence: ``Cassandra``, ``The in-memory store``."""

    def __init__(self, views: Mapping[str, FeatureView]) -> None:
        self.views = dict(views)

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings, views: Mapping[str, FeatureView]) -> OnlineStore:
        """The backend its section of the settings describes (not connected yet)."""

    @abstractmethod
    def connect(self, create: bool = False) -> None:
        """Open the connections; with ``create`` run ``apply_schema`` first. Raises ``FeatureStoreUnavailable``
        when the store does not answer, and ``SchemaMissing`` when a view's table is not there."""

    @abstractmethod
    def apply_schema(self) -> None:
        """Create what the views need (keyspace, one table per view) where it is missing; keeps every row, and
        running it again changes nothing. Needs the connection ``connect`` opens (which runs it by default)."""

    @abstractmethod
    async def put(self, view_name: str, rows: Sequence[OnlineRow]) -> None:
        """Batch write of one view's rows; raises ``FeatureStoreUnavailable`` if any row was not written."""

    @abstractmethod
    async def get_many(self, requests: Sequence[tuple[str, str]]) -> list[StoredRow | BaseException | None]:
        """Batch read of (view, entity) pairs, in request order (a pair may repeat): each result is the row,
        None (no such entity), or the error that kept that key from being read."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections; a closed store may be connected again."""
