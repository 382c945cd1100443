"""The cache-tier contract (``featurestore.cache.CacheTier``), run on every entry of
``featurestore.backends.CACHES``.

Two suites. What a reader of the feature store sees, whatever the tier (``none`` included): a write is seen by
the very next read, an unknown entity that is written later reads as written, never a stale row; with the
in-memory online store, so only the tier's own server is needed. And the tier's own operations, on every
implementation (Redis against the local stack with a key prefix of its own, marked ``integration``): misses and
hits, negative entries, a fill that never replaces an entry, fences as misses that a fill cannot replace,
settling, overlapping writers, expiry, a tier that does not answer, close."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, get_args

import pytest
import redis

from streamscore.featurestore.backends import CACHES, cache_tier
from streamscore.featurestore.cache import MISSING, CacheInvalidationFailed, CacheTier, FeatureCache, pack_row
from streamscore.featurestore.memory import MemoryStore
from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import Settings

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id",
     "features": [{"name": "spend", "type": "float", "default": -1.0},
                  {"name": "count", "type": "int", "default": 0}]},
]})
SERVERS = {"redis"}
ROW_A, ROW_B = pack_row([1.0, 2.0], 10), pack_row([3.0, 4.0], 20)

TierFactory = Callable[..., AbstractAsyncContextManager[CacheTier]]
"""``async with make(cache_ttl_s=..., reachable=...) as tier``: a tier of this test only, made in the test's own
event loop (redis.asyncio clients belong to the loop that first uses them), its entries removed afterwards."""


@pytest.fixture
def redis_tier(request: pytest.FixtureRequest) -> Iterator[TierFactory]:
    base: Settings = request.getfixturevalue("redis_server")
    prefix = f"contract{uuid.uuid4().hex[:10]}"

    @asynccontextmanager
    async def make(cache_ttl_s: int = 300, reachable: bool = True) -> AsyncIterator[CacheTier]:
        port = base.redis.port if reachable else 1
        settings = base.model_copy(update={
            "topic_prefix": prefix,
            "redis": base.redis.model_copy(update={"cache_ttl_s": cache_ttl_s, "port": port, "fence_s": 30}),
        })
        tier = cache_tier(settings.model_copy(update={"cache": "redis"}))
        assert isinstance(tier, FeatureCache)
        try:
            yield tier
        finally:
            await tier.close()

    yield make
    client = redis.Redis(host=base.redis.host, port=base.redis.port)
    try:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


TIERS = {"redis": "redis_tier"}
"""Registry name -> the fixture making tiers of that implementation ("none" has no tier to make)."""


def _params(names: Any) -> list[Any]:
    return [pytest.param(name, marks=[pytest.mark.integration] if name in SERVERS else [], id=name)
            for name in names]


@pytest.fixture(params=_params(TIERS))
def make_tier(request: pytest.FixtureRequest) -> TierFactory:
    factory: TierFactory = request.getfixturevalue(TIERS[request.param])
    return factory


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def test_every_registered_cache_is_tested_here_and_named_in_the_settings() -> None:
    assert set(TIERS) | {"none"} == set(CACHES)
    assert set(get_args(Settings.model_fields["cache"].annotation)) == set(CACHES)
    assert CACHES["none"] is None and cache_tier(Settings(cache="none")) is None


# ------------------------------------------------------------------ what the feature store's readers see


@pytest.fixture(params=_params(CACHES))
def make_store(request: pytest.FixtureRequest) -> Callable[[], AbstractAsyncContextManager[FeatureStore]]:
    """``async with make() as store``: a FeatureStore on a fresh in-memory online store and the tier."""
    name = request.param
    factory: TierFactory | None = request.getfixturevalue(TIERS[name]) if name in TIERS else None

    @asynccontextmanager
    async def make() -> AsyncIterator[FeatureStore]:
        online = MemoryStore(VIEWS)
        online.connect()
        if factory is None:
            yield FeatureStore(Settings(cache="none"), VIEWS, online=online)
            return
        async with factory() as tier:
            yield FeatureStore(Settings(), VIEWS, online=online, cache=tier)

    return make


async def _spend(store: FeatureStore, *entities: str) -> list[float | None]:
    rows = await store.get("card", list(entities))
    return [None if row is None else row["spend"] for row in rows.values()]


def test_a_write_is_seen_by_the_very_next_read(make_store: Callable[[], Any]) -> None:
    async def scenario() -> None:
        async with make_store() as store:
            await store.put("card", [("a", {"spend": 1.0}, 1), ("b", {"spend": 2.0}, 1)])
            assert await _spend(store, "a", "b") == [1.0, 2.0]
            assert await _spend(store, "a", "b") == [1.0, 2.0], "read again (from the tier, where there is one)"
            await store.put("card", [("a", {"spend": 9.0}, 2)])
            assert await _spend(store, "a", "b") == [9.0, 2.0]

    run(scenario())


def test_an_unknown_entity_written_later_reads_as_written(make_store: Callable[[], Any]) -> None:
    async def scenario() -> None:
        async with make_store() as store:
            assert await _spend(store, "ghost") == [None]
            assert await _spend(store, "ghost") == [None], "unknown again (a negative entry, where there is a tier)"
            await store.put("card", [("ghost", {"spend": 4.0}, 3)])
            assert await _spend(store, "ghost") == [4.0]

    run(scenario())


def test_a_batch_of_many_entities_reads_through_and_back(make_store: Callable[[], Any]) -> None:
    async def scenario() -> None:
        async with make_store() as store:
            await store.put("card", [(f"k{i}", {"spend": float(i)}, i) for i in range(0, 600, 2)])
            entities = [f"k{i}" for i in range(600)]
            expected = [float(i) if i % 2 == 0 else None for i in range(600)]
            assert await _spend(store, *entities) == expected
            if store.cache is not None:
                hits = store.cache.hits
                assert await _spend(store, *entities) == expected
                assert store.cache.hits - hits == 600, "every entity, found or not, is now served by the tier"

    run(scenario())


# ------------------------------------------------------------------------------ the tier's own operations


def test_misses_then_hits_and_negative_entries_pass_through(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier() as tier:
            assert await tier.get_many([]) == []
            assert await tier.get_many([("card", "a"), ("card", "ghost")]) == [None, None]
            assert (tier.hits, tier.misses) == (0, 2)
            await tier.put_many([("card", "a", ROW_A), ("card", "ghost", MISSING)])
            assert await tier.get_many([("card", "a"), ("card", "ghost"), ("card", "a")]) == [ROW_A, MISSING, ROW_A]
            assert (tier.hits, tier.misses) == (3, 2) and tier.available and tier.bypassed == 0

    run(scenario())


def test_a_fill_never_replaces_an_entry(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier() as tier:
            await tier.put_many([("card", "a", ROW_A)])
            await tier.put_many([("card", "a", ROW_B), ("card", "b", ROW_B)])
            assert await tier.get_many([("card", "a"), ("card", "b")]) == [ROW_A, ROW_B]

    run(scenario())


def test_a_fence_is_a_miss_a_fill_cannot_replace_until_settled(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier() as tier:
            await tier.put_many([("card", "a", ROW_A), ("card", "other", ROW_A)])
            fences = await tier.fence("card", ["a", "new"])
            assert await tier.get_many([("card", "a"), ("card", "new"), ("card", "other")]) == [None, None, ROW_A]
            await tier.put_many([("card", "a", ROW_A), ("card", "new", MISSING)])  # a reader's late fill
            assert await tier.get_many([("card", "a"), ("card", "new")]) == [None, None]
            await tier.settle(fences, ["a", "new"], {"a": ROW_B})
            assert await tier.get_many([("card", "a"), ("card", "new")]) == [ROW_B, None], \
                "the written row is cached; an entity settled without its row stays a miss"
            await tier.put_many([("card", "new", MISSING)])
            assert await tier.get_many([("card", "new")]) == [None], "still fenced: the fill did not land"

    run(scenario())


def test_overlapping_writers_leave_misses_not_either_row(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier() as tier:
            first = await tier.fence("card", ["a"])
            second = await tier.fence("card", ["a"])
            await tier.settle(second, ["a"], {"a": ROW_B})
            await tier.settle(first, ["a"], {"a": ROW_A})
            assert await tier.get_many([("card", "a")]) == [None]

    run(scenario())


def test_entries_expire_after_the_cache_ttl(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier(cache_ttl_s=1) as tier:
            await tier.put_many([("card", "a", ROW_A)])
            assert await tier.get_many([("card", "a")]) == [ROW_A]
            await asyncio.sleep(1.3)
            assert await tier.get_many([("card", "a")]) == [None]

    run(scenario())


def test_a_tier_that_does_not_answer_is_bypassed_by_reads_and_refuses_writes(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier(reachable=False) as tier:
            assert await tier.get_many([("card", "a")]) is None
            assert tier.bypassed == 1 and not tier.available
            await tier.put_many([("card", "a", ROW_A)])  # never raises
            with pytest.raises(CacheInvalidationFailed, match="nothing was written"):
                await tier.fence("card", ["a"])

    run(scenario())


def test_close_is_harmless_twice(make_tier: TierFactory) -> None:
    async def scenario() -> None:
        async with make_tier() as tier:
            await tier.put_many([("card", "a", ROW_A)])
            await tier.close()
        # and the factory's own close after it

    run(scenario())
