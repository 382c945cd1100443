"""The fence logic without servers: a fence is a miss (never a hit, never a negative entry), the refusal
message is one line that says what to check, and a write fences before Cassandra, writes nothing when that
fails, and settles the entries after the write (with its rows when it succeeded; a failure of that second round
is a warning)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from streamscore.featurestore.cache import (
    FENCE,
    MISSING,
    TOKEN_BYTES,
    CacheInvalidationFailed,
    Fences,
    is_fence,
    pack_row,
    without_fences,
)
from streamscore.featurestore.cassandra import FeatureStoreUnavailable
from streamscore.featurestore.store import FeatureStore, _ViewTable
from streamscore.featurestore.views import parse_views
from streamscore.settings import RedisSettings, Settings

VIEWS = parse_views({"views": [{"name": "card", "entity": "card_id",
                                "features": [{"name": "spend", "type": "float", "default": -1.0}]}]})


def test_without_fences_turns_fences_into_misses_and_keeps_the_rest() -> None:
    row, token_fence = pack_row([2.5], 7), FENCE + b"\x00" * TOKEN_BYTES
    assert without_fences([row, None, MISSING]) == [row, None, MISSING]
    assert without_fences([row, FENCE, MISSING, token_fence]) == [row, None, MISSING, None]


def test_no_row_is_taken_for_a_fence() -> None:
    """A row starts with its little-endian timestamp: its first byte can be '~', its length never 1 or 9."""
    tilde_first = pack_row([1.0], 0x7E)
    assert tilde_first[:1] == FENCE and not is_fence(tilde_first)
    assert without_fences([tilde_first]) == [tilde_first]
    assert is_fence(FENCE) and is_fence(FENCE + b"12345678") and not is_fence(MISSING) and not is_fence(None)


def test_a_fence_that_reaches_the_table_is_a_miss_not_a_negative_entry() -> None:
    table = _ViewTable(VIEWS["card"], ["a", "b", "c"])
    table.take_cached([pack_row([2.5], 7), FENCE, MISSING])
    assert table.miss_positions() == [1]
    fetched = table.fetched()
    assert fetched.missing == [1, 2] and fetched.block.row_of_request[0] == 0


def test_the_refusal_is_one_line_naming_the_address_the_reason_and_the_settings() -> None:
    settings = RedisSettings(host="cache.internal", port=6380, username="writer")
    error = CacheInvalidationFailed(settings, "card", 3, ConnectionError("Error 111 connecting.\nConnection refused."))
    message = str(error)
    assert "\n" not in message
    assert "cache.internal:6380" in message and "'writer'" in message
    assert "ConnectionError: Error 111 connecting. Connection refused." in message
    assert "3 card row(s)" in message and "nothing was written to Cassandra" in message
    assert "STREAMSCORE_REDIS__HOST/__PORT/__USERNAME/__PASSWORD" in message
    assert error.address == "cache.internal:6380" and error.reason.startswith("ConnectionError")
    after = str(CacheInvalidationFailed(settings, "card", 3, "timeout", written=True))
    assert "nothing was written" not in after and "the rows were written" in after and "\n" not in after


class FakeCache:
    def __init__(self, settings: RedisSettings, journal: list[str], fail: set[int], contended: set[str]) -> None:
        self.settings, self.journal, self.fail, self.contended, self.calls = settings, journal, fail, contended, 0

    async def fence(self, view: str, entities: Sequence[str]) -> Fences:
        return self._call(f"fence {view} {','.join(entities)}", Fences(view, FENCE + b"t" * TOKEN_BYTES,
                                                                           set(self.contended)))

    async def settle(self, fences: Fences, entities: Sequence[str], rows: Mapping[str, bytes]) -> None:
        self._call(f"settle {fences.view} {','.join(entities)} rows={','.join(sorted(rows))}", None)

    def _call(self, what: str, result: Any) -> Any:
        self.calls += 1
        self.journal.append(what)
        if self.calls in self.fail:
            raise CacheInvalidationFailed(self.settings, "card", 2, "NOPERM no SET for you")
        return result

    async def close(self) -> None:
        pass


class FakeOnline:
    def __init__(self, journal: list[str], fail: bool) -> None:
        self.journal, self.fail = journal, fail

    async def put(self, view: str, rows: Sequence[tuple[str, list[Any], int]]) -> None:
        self.journal.append(f"write {view} {','.join(entity for entity, _, _ in rows)}")
        if self.fail:
            raise FeatureStoreUnavailable("1 of 1 writes failed")


def _store(journal: list[str], fail_fences: frozenset[int] = frozenset(), fail_write: bool = False) -> FeatureStore:
    settings = Settings()
    store = FeatureStore(settings, VIEWS, use_cache=False)
    store.cache = FakeCache(settings.redis, journal, set(fail_fences), set())  # type: ignore[assignment]
    store.online = FakeOnline(journal, fail_write)  # type: ignore[assignment]
    return store


ROWS = [("a", {"spend": 1.0}, 1), ("b", {"spend": 2.0}, 1)]


def test_a_write_is_fenced_before_and_settled_with_its_rows_after() -> None:
    journal: list[str] = []
    assert asyncio.run(_store(journal).put("card", ROWS)) == 2
    assert journal == ["fence card a,b", "write card a,b", "settle card a,b rows=a,b"]


def test_an_entity_twice_in_a_batch_is_fenced_not_published() -> None:
    journal: list[str] = []
    assert asyncio.run(_store(journal).put("card", [*ROWS, ("a", {"spend": 3.0}, 2)])) == 3
    assert journal == ["fence card a,b", "write card a,b,a", "settle card a,b rows=b"]


def test_a_refused_first_fence_writes_nothing() -> None:
    journal: list[str] = []
    with pytest.raises(CacheInvalidationFailed, match="nothing was written"):
        asyncio.run(_store(journal, fail_fences=frozenset({1})).put("card", ROWS))
    assert journal == ["fence card a,b"]


def test_a_failed_settle_is_a_warning_and_the_write_stands(caplog: pytest.LogCaptureFixture) -> None:
    journal: list[str] = []
    with caplog.at_level(logging.WARNING, logger="streamscore.featurestore.store"):
        assert asyncio.run(_store(journal, fail_fences=frozenset({2})).put("card", ROWS)) == 2
    assert journal == ["fence card a,b", "write card a,b", "settle card a,b rows=a,b"]
    assert "did not settle" in caplog.text and "NOPERM" in caplog.text
    assert "nothing was written" not in caplog.text


def test_a_failed_cassandra_write_is_settled_with_fences_only_and_raises() -> None:
    journal: list[str] = []
    with pytest.raises(FeatureStoreUnavailable):
        asyncio.run(_store(journal, fail_write=True).put("card", ROWS))
    assert journal == ["fence card a,b", "write card a,b", "settle card a,b rows="]
