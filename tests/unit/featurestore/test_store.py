"""The feature store without servers: through the in-memory online store and no cache tier. A batch fetch gives
the blocks the assembler reads (rows, defaults, event timestamps, the defaulted requests), an online store that
fails makes those requests ``unavailable`` (counted, logged once per outage) and the batch goes on, and writes
are checked against the view before anything is written."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from streamscore.featurestore.memory import MemoryStore
from streamscore.featurestore.online import FeatureStoreUnavailable, StoredRow
from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import Settings

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id", "ttl_s": 60,
     "features": [{"name": "spend", "type": "float", "default": -1.0},
                  {"name": "count", "type": "int", "default": 7},
                  {"name": "vip", "type": "bool", "default": 0}]},
    {"name": "shop", "entity": "shop_id",
     "features": [{"name": "risk", "type": "float", "default": 0.5}]},
]})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FailingStore(MemoryStore):
    """The in-memory store, with reads that fail while ``down`` (every key, or the keys in ``down_keys``)."""

    def __init__(self) -> None:
        super().__init__(VIEWS)
        self.down = False
        self.down_keys: set[str] = set()
        self.raise_instead = False

    async def get_many(self, requests: Sequence[tuple[str, str]]) -> list[StoredRow | BaseException | None]:
        if self.down and self.raise_instead:
            raise FeatureStoreUnavailable("no host answered")
        rows = await super().get_many(requests)
        error = FeatureStoreUnavailable("read timed out")
        return [error if self.down and (not self.down_keys or entity in self.down_keys) else row
                for (_, entity), row in zip(requests, rows, strict=True)]


def make_store(online: MemoryStore | None = None) -> FeatureStore:
    store = FeatureStore(Settings(cache="none"), VIEWS, online=online or MemoryStore(VIEWS))
    store.connect()
    return store


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_the_settings_pick_the_backends() -> None:
    store = FeatureStore(Settings(online_store="memory", cache="none"), VIEWS)
    assert isinstance(store.online, MemoryStore) and store.cache is None
    assert FeatureStore(Settings(online_store="memory"), VIEWS, use_cache=False).cache is None


def test_a_fetch_gives_rows_defaults_and_event_timestamps_per_request() -> None:
    store = make_store()
    run(store.put("card", [("c1", {"spend": 2.5, "count": 3, "vip": True}, 1_000), ("c2", {"spend": 4.0}, 2_000)]))
    run(store.put("shop", [("s1", {"risk": 0.9}, 3_000)]))
    card, shop = run(store.fetch(["card", "shop"], [["c2", "c1", "nope", "c2"], ["s1", "s1", "s2", "s9"]]))

    assembled = card.block.values[card.block.row_of_request]
    assert card.block.values.dtype == np.float32 and card.block.row_of_request.dtype == np.int32
    assert assembled[0].tolist() == [4.0, 7.0, 0.0], "absent features were written as their defaults"
    assert assembled[1].tolist() == [2.5, 3.0, 1.0] and assembled[3].tolist() == [4.0, 7.0, 0.0]
    assert card.block.row_of_request[2] == -1 and card.block.defaults.tolist() == [-1.0, 7.0, 0.0]
    assert card.event_ts_ms.tolist() == [2_000, 1_000, 0, 2_000]
    assert card.missing == [2] and card.unavailable_rows == []
    assert len(card.block.values) == 3, "one row per distinct entity"
    assert shop.missing == [2, 3] and shop.event_ts_ms.tolist() == [3_000, 3_000, 0, 0]
    assert card.exact_values is not None and card.view is VIEWS["card"]


def test_get_gives_features_by_entity_and_none_for_an_unknown_one() -> None:
    store = make_store()
    run(store.put("card", [(17, {"spend": 0.1, "count": 2}, 5)]))  # an int entity is stored as its str
    assert run(store.get("card", ["17", "18"])) == {
        "17": {"spend": 0.1, "count": 2.0, "vip": 0.0, "event_ts_ms": 5},  # exact: float64, not float32
        "18": None,
    }


def test_a_row_without_event_timestamp_is_stamped_now_and_expires_with_the_view_ttl() -> None:
    clock = Clock()
    store = make_store(MemoryStore(VIEWS, clock=clock))
    before = int(time.time() * 1000)
    run(store.put("card", [("c1", {"spend": 1.0}, None)]))
    row = run(store.get("card", ["c1"]))["c1"]
    assert row is not None and row["event_ts_ms"] >= before
    clock.now += 61
    assert run(store.get("card", ["c1"])) == {"c1": None}
    (card,) = run(store.fetch(["card"], [["c1"]]))
    assert card.missing == [0] and card.unavailable_rows == [], "expired is missing, not unavailable"


def test_failed_reads_make_requests_unavailable_and_the_batch_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    online = FailingStore()
    store = make_store(online)
    run(store.put("card", [("c1", {"spend": 1.0}, 1), ("c2", {"spend": 2.0}, 2)]))
    online.down, online.down_keys = True, {"c2"}
    with caplog.at_level(logging.WARNING, logger="streamscore.featurestore.store"):
        (card,) = run(store.fetch(["card"], [["c1", "c2", "c2", "ghost"]]))
        (again,) = run(store.fetch(["card"], [["c2"]]))
    assert card.block.values[card.block.row_of_request[0]].tolist() == [1.0, 7.0, 0.0]
    assert card.missing == [1, 2, 3] and card.unavailable_rows == [1, 2], "ghost is missing, c2 unavailable"
    assert card.event_ts_ms.tolist() == [1, 0, 0, 0]
    assert again.unavailable_rows == [0] and store.store_errors == 2
    failures = [record for record in caplog.records if "reads failed" in record.getMessage()]
    assert len(failures) == 1, "one line per outage, not per batch"
    assert failures[0].getMessage().startswith("The in-memory store reads failed for 1 of 3 entities")

    online.down = False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamscore.featurestore.store"):
        (back,) = run(store.fetch(["card"], [["c2"]]))
    assert back.missing == [] and "answers again" in caplog.text and "2 reads failed meanwhile" in caplog.text


def test_a_store_that_raises_makes_every_miss_unavailable() -> None:
    online = FailingStore()
    store = make_store(online)
    run(store.put("shop", [("s1", {"risk": 0.1}, 1)]))
    online.down = online.raise_instead = True
    card, shop = run(store.fetch(["card", "shop"], [["c1", "c2"], ["s1", "s1"]]))
    assert card.unavailable_rows == [0, 1] and shop.unavailable_rows == [0, 1]
    assert shop.block.row_of_request.tolist() == [-1, -1], "s1 is stored, but could not be read"
    assert store.store_errors == 3, "one per distinct (view, entity) asked for"


def test_an_unknown_feature_or_view_is_refused_before_anything_is_written() -> None:
    store = make_store()
    with pytest.raises(ValueError, match=r"view 'card' has no feature\(s\) \['spnd'\]; it has \['spend', 'count'"):
        run(store.put("card", [("c1", {"spend": 1.0}, 1), ("c2", {"spnd": 2.0}, 1)]))
    with pytest.raises(ValueError, match=r"no feature view 'cards'; declared views: \['card', 'shop'\]"):
        run(store.put("cards", [("c1", {"spend": 1.0}, 1)]))
    with pytest.raises(ValueError, match="no feature view"):
        run(store.get("cards", ["c1"]))
    with pytest.raises(ValueError):
        run(store.put("card", [("c1", {"spend": "a lot"}, 1)]))
    assert run(store.get("card", ["c1", "c2"])) == {"c1": None, "c2": None}, "the valid row was not written either"


def test_a_closed_store_refuses_writes_and_degrades_reads() -> None:
    store = make_store()
    run(store.close())
    with pytest.raises(RuntimeError, match="connect"):
        run(store.put("card", [("c1", {"spend": 1.0}, 1)]))
    (card,) = run(store.fetch(["card"], [["c1"]]))
    assert card.unavailable_rows == [0], "a read of a closed store degrades, it does not raise"
