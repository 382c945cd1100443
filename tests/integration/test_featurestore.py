"""The feature store against the real Cassandra and Redis: tables, TTL, batched reads and writes, the cache."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from cassandra.cluster import Session

from streamscore.featurestore.cache import MISSING
from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import Settings

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id", "ttl_s": 3600,
     "features": [{"name": "spend", "type": "float", "default": -1.0},
                  {"name": "count", "type": "int", "default": 0},
                  {"name": "prepaid", "type": "bool", "default": 0}]},
    {"name": "shop", "entity": "shop_id",
     "features": [{"name": "risk", "type": "float", "default": 0.5}]},
]})


@pytest.fixture
def settings(stack: Any) -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(topic_prefix=f"fs{run}", cassandra={"keyspace": f"fs_{run}"})


@pytest.fixture
def store(settings: Settings) -> Iterator[FeatureStore]:
    feature_store = FeatureStore(settings, VIEWS)
    feature_store.connect(create_schema=True)
    yield feature_store  # its Redis client is opened and closed inside each test's event loop
    feature_store.online.session.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}")
    feature_store.online.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _with_fresh_cache(store: FeatureStore, action: Any) -> Any:
    """redis.asyncio clients bind to the loop that first uses them: give each asyncio.run its own."""
    from streamscore.featurestore.cache import FeatureCache

    store.cache = FeatureCache(store.settings.redis, store.settings.topic_prefix)
    try:
        return await action()
    finally:
        await store.cache.close()


def test_tables_are_created_per_view_with_event_timestamp(store: FeatureStore, cassandra_session: Session,
                                                          settings: Settings) -> None:
    rows = cassandra_session.execute(
        "SELECT table_name, column_name, type FROM system_schema.columns WHERE keyspace_name = %s",
        (settings.cassandra.keyspace,))
    columns = {(row.table_name, row.column_name): row.type for row in rows}
    assert columns[("view_card", "spend")] == "double"
    assert columns[("view_card", "count")] == "bigint"
    assert columns[("view_card", "prepaid")] == "boolean"
    assert columns[("view_card", "event_ts_ms")] == "bigint"
    assert columns[("view_shop", "risk")] == "double"


def test_rows_are_written_with_the_view_ttl(store: FeatureStore, cassandra_session: Session,
                                            settings: Settings) -> None:
    run(_with_fresh_cache(store, lambda: store.put("card", [("c1", {"spend": 3.5, "count": 2}, 1_000)])))
    run(_with_fresh_cache(store, lambda: store.put("shop", [("s1", {"risk": 0.9}, 2_000)])))
    keyspace = settings.cassandra.keyspace
    card = cassandra_session.execute(
        f"SELECT TTL(spend), event_ts_ms FROM {keyspace}.view_card WHERE entity='c1'").one()
    shop = cassandra_session.execute(f"SELECT TTL(risk) FROM {keyspace}.view_shop WHERE entity='s1'").one()
    assert 3500 < card[0] <= 3600 and card[1] == 1_000
    assert shop[0] is None, "a view without TTL keeps its rows"


def test_fetch_reads_a_batch_with_defaults_and_timestamps(store: FeatureStore) -> None:
    async def scenario() -> Any:
        await store.put("card", [(f"c{i}", {"spend": float(i), "count": i, "prepaid": i % 2 == 0}, 100 + i)
                                 for i in range(50)])
        await store.put("shop", [("s1", {"risk": 0.25}, 7)])
        return await store.fetch(["card", "shop"], [["c3", "c3", "nope", "c10"], ["s1", "s2", "s1", "s1"]])

    card, shop = run(_with_fresh_cache(store, scenario))
    assembled = card.block.values[card.block.row_of_request]
    assert assembled[0].tolist() == [3.0, 3.0, 0.0] and assembled[3].tolist() == [10.0, 10.0, 1.0]
    assert card.block.row_of_request[2] == -1 and card.missing == [2]
    assert card.event_ts_ms.tolist() == [103, 103, 0, 110]
    assert card.block.defaults.tolist() == [-1.0, 0.0, 0.0]
    assert shop.missing == [1] and shop.event_ts_ms.tolist() == [7, 0, 7, 7]
    assert card.unavailable_rows == [] and shop.unavailable_rows == []


def test_cache_is_read_through_and_invalidated_on_write(store: FeatureStore, redis_client: redis.Redis) -> None:
    async def first_read() -> Any:
        await store.put("card", [("c1", {"spend": 1.0}, 1)])
        return await store.get("card", ["c1", "ghost"])

    first = run(_with_fresh_cache(store, first_read))
    key = f"{store.settings.topic_prefix}:fv:card:c1"
    assert struct.unpack("<q3d", redis_client.get(key)) == (1, 1.0, 0.0, 0.0)
    assert redis_client.get(f"{store.settings.topic_prefix}:fv:card:ghost") == MISSING
    assert 0 < redis_client.ttl(key) <= store.settings.redis.cache_ttl_s
    assert first["c1"]["spend"] == 1.0 and first["ghost"] is None

    async def cached_then_updated() -> Any:
        hits_before = store.cache.hits
        await store.get("card", ["c1"])
        hits = store.cache.hits - hits_before
        await store.put("card", [("c1", {"spend": 9.0}, 2), ("ghost", {"spend": 4.0}, 2)])
        return hits, await store.get("card", ["c1", "ghost"])

    hits, second = run(_with_fresh_cache(store, cached_then_updated))
    assert hits == 1
    assert second["c1"]["spend"] == 9.0 and second["ghost"]["spend"] == 4.0, "a write must drop the cached rows"


def test_redis_down_bypasses_the_cache(settings: Settings, store: FeatureStore) -> None:
    run(_with_fresh_cache(store, lambda: store.put("card", [("c1", {"spend": 5.0}, 1)])))
    unreachable = Settings(**{**settings.model_dump(), "redis": {**settings.redis.model_dump(), "port": 1}})
    degraded_store = FeatureStore(unreachable, VIEWS)
    degraded_store.online = store.online

    async def read() -> Any:
        try:
            return await degraded_store.fetch(["card"], [["c1", "c2"]])
        finally:
            await degraded_store.cache.close()

    (card,) = run(read())
    assert degraded_store.cache.bypassed == 1
    assert card.block.values[card.block.row_of_request[0]].tolist() == [5.0, 0.0, 0.0]
    assert card.missing == [1]


def test_unknown_feature_is_refused_with_a_clear_error(store: FeatureStore) -> None:
    with pytest.raises(ValueError, match="has no feature"):
        run(_with_fresh_cache(store, lambda: store.put("card", [("c1", {"spnd": 1.0}, None)])))


def test_a_batch_of_512_keys_is_one_round(store: FeatureStore) -> None:
    async def scenario() -> Any:
        await store.put("card", [(f"k{i}", {"spend": float(i)}, 1) for i in range(512)])
        return await store.fetch(["card"], [[f"k{i}" for i in range(512)]])

    (card,) = run(_with_fresh_cache(store, scenario))
    assert np.array_equal(card.block.values[card.block.row_of_request][:, 0], np.arange(512, dtype=np.float32))


def test_feature_reads_are_idempotent_and_speculated_after_the_configured_delay(store: FeatureStore) -> None:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT

    online = store.online
    profile = online.session.get_execution_profile(EXEC_PROFILE_DEFAULT)  # type: ignore[attr-defined]
    policy = profile.speculative_execution_policy

    assert policy is not None and policy.delay == store.settings.cassandra.speculative_execution_ms / 1000
    assert all(statement.is_idempotent for statement in [*online._select.values(), *online._select_in.values()])  # type: ignore[attr-defined]
    assert not any(statement.is_idempotent for statement in online._insert.values())  # type: ignore[attr-defined]
