"""The near cache of the Redis tier against the stack's Redis (a key prefix per test): repeated reads are served
from the worker's memory without an MGET (counted by Redis's own MONITOR stream); a write through another
feature store, and a plain DEL / SET / EXPIRE by another client, reach the first one's copies through Redis's
invalidations; losing the listener's connection empties the near cache, reads stay right meanwhile, and it comes
back; ``near_cache_entries=0`` is the tier as it was, with no connection of its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from streamscore.featurestore.cache import MISSING, FeatureCache, pack_row
from streamscore.featurestore.memory import MemoryStore
from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import RedisSettings, Settings

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id",
     "features": [{"name": "spend", "type": "float", "default": -1.0},
                  {"name": "count", "type": "int", "default": 0}]},
]})
ROW_A, ROW_B = pack_row([1.0, 2.0], 10), pack_row([3.0, 4.0], 20)
POLL_S = 2.0
"""Longest a test waits for Redis's invalidation (or the listener's reconnection) to reach the tier."""

Tiers = Callable[..., Any]


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test; its keys are removed afterwards."""
    settings = RedisSettings()
    client = redis.Redis(host=settings.host, port=settings.port, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {settings.host}:{settings.port} ({exc}): `streamscore stack up` starts it",
                    pytrace=False)
    name = f"near{uuid.uuid4().hex[:10]}"
    try:
        yield name
        keys = list(client.scan_iter(f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def tiers(prefix: str) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(**redis_settings: Any) -> AsyncIterator[FeatureCache]:
        tier = FeatureCache(RedisSettings(**redis_settings), prefix)
        try:
            yield tier
        finally:
            await tier.close()

    return make


async def poll(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        await asyncio.sleep(0.01)


async def serving(tier: FeatureCache) -> None:
    """The first read starts the listener; wait until it tracks the keys."""
    await tier.get_many([("card", "_warm")])

    async def up() -> bool:
        return tier.near is not None and tier.near.serving

    await poll(up, "the near cache's listener to be up")


@asynccontextmanager
async def commands_seen(prefix: str) -> AsyncIterator[list[str]]:
    """The commands naming ``prefix`` that Redis executed inside the block, from Redis's MONITOR stream (read up
    to a marker command sent at the end)."""
    settings = RedisSettings()
    client = aioredis.Redis(host=settings.host, port=settings.port, socket_timeout=5)
    marker = f"{prefix}:marker:{uuid.uuid4().hex}"
    seen: list[str] = []
    try:
        async with client.monitor() as monitor:
            yield seen
            await client.get(marker)
            while True:
                command = (await monitor.next_command())["command"]
                if marker in command:
                    break
                if prefix in command:
                    seen.append(command)
    finally:
        await client.aclose()


def mgets(commands: list[str]) -> list[list[str]]:
    """The keys of each MGET among ``commands``."""
    return [command.split()[1:] for command in commands if command.upper().startswith("MGET ")]


def test_repeated_reads_are_served_from_memory_without_an_mget(prefix: str) -> None:
    async def scenario() -> None:
        async with tiers(prefix)() as tier:
            await serving(tier)
            await tier.put_many([("card", "a", ROW_A), ("card", "ghost", MISSING)])
            keys = [("card", "a"), ("card", "ghost"), ("card", "absent")]
            async with commands_seen(prefix) as first:
                assert await tier.get_many(keys) == [ROW_A, MISSING, None]
            assert len(mgets(first)) == 1 and tier.near_hits == 0
            # the fills' own invalidations may still be on their way: a read that crossed one keeps nothing
            await poll(lambda: _kept(tier, keys[:2]), "the row and the negative entry to be kept in memory")
            hits, misses, near_hits = tier.hits, tier.misses, tier.near_hits
            async with commands_seen(prefix) as again:
                for _ in range(5):
                    assert await tier.get_many(keys[:2]) == [ROW_A, MISSING]
            assert mgets(again) == [], "every entry was in memory: Redis was not asked"
            assert (tier.hits - hits, tier.misses - misses, tier.near_hits - near_hits) == (10, 0, 10), \
                "hits still count every entry the tier served, near hits those from memory"
            async with commands_seen(prefix) as mixed:
                assert await tier.get_many(keys) == [ROW_A, MISSING, None]
            assert mgets(mixed) == [[f"{prefix}:fv:card:absent"]], \
                "only the entry not in memory (a miss is never kept) is asked of Redis"
            assert (tier.hits - hits, tier.misses - misses, tier.near_hits - near_hits) == (12, 1, 12)

    asyncio.run(scenario())


async def _kept(tier: FeatureCache, keys: list[tuple[str, str]]) -> bool:
    before = tier.near_hits
    await tier.get_many(keys)
    return tier.near_hits - before == len(keys)


def test_a_write_through_another_store_reaches_the_first_ones_memory(prefix: str) -> None:
    async def scenario() -> None:
        online = MemoryStore(VIEWS)
        online.connect()
        make = tiers(prefix)
        async with make() as reader_tier, make() as writer_tier:
            reader = FeatureStore(Settings(), VIEWS, online=online, cache=reader_tier)
            writer = FeatureStore(Settings(), VIEWS, online=online, cache=writer_tier)
            await serving(reader_tier)
            await writer.put("card", [("c1", {"spend": 1.0}, 1_000)])
            assert (await reader.get("card", ["c1"]))["c1"] == {"spend": 1.0, "count": 0.0, "event_ts_ms": 1_000}
            await poll(lambda: _kept(reader_tier, [("card", "c1")]), "the row to be kept in the reader's memory")

            await writer.put("card", [("c1", {"spend": 7.0, "count": 3}, 2_000)])

            async def new_row() -> bool:
                return (await reader.get("card", ["c1"]))["c1"] == {"spend": 7.0, "count": 3.0, "event_ts_ms": 2_000}

            await poll(new_row, "the reader to read the written row")
            assert reader_tier.near is not None and reader_tier.near.serving

    asyncio.run(scenario())


@pytest.mark.parametrize("change", ["DEL", "SET", "EXPIRE"])
def test_a_plain_change_by_another_client_drops_the_copy(prefix: str, change: str) -> None:
    async def scenario() -> None:
        settings = RedisSettings()
        other = aioredis.Redis(host=settings.host, port=settings.port, socket_timeout=2)
        key = ("card", "k")
        try:
            async with tiers(prefix)() as tier:
                await serving(tier)
                await tier.put_many([(*key, ROW_A)])
                await poll(lambda: _kept(tier, [key]), "the row to be kept in memory")
                name = tier.key(*key)
                expected = {"DEL": None, "SET": ROW_B, "EXPIRE": ROW_A}[change]
                if change == "DEL":
                    await other.delete(name)
                elif change == "SET":
                    await other.set(name, ROW_B)
                else:
                    await other.expire(name, 100)

                async def dropped() -> bool:
                    assert tier.near is not None
                    return tier.near.lookup([name]) == [None]

                await poll(dropped, f"{change} to drop the copy in memory")
                assert await tier.get_many([key]) == [expected]
        finally:
            await other.aclose()

    asyncio.run(scenario())


def test_losing_the_listener_empties_the_near_cache_until_it_is_back(prefix: str) -> None:
    async def scenario() -> None:
        settings = RedisSettings()
        other = aioredis.Redis(host=settings.host, port=settings.port, socket_timeout=2)
        keys = [("card", "a"), ("card", "b")]
        try:
            async with tiers(prefix)() as tier:
                near = tier.near
                assert near is not None
                await serving(tier)
                await tier.put_many([(*keys[0], ROW_A), (*keys[1], ROW_B)])
                await poll(lambda: _kept(tier, keys), "the rows to be kept in memory")
                killed = near.client_id
                assert await other.execute_command("CLIENT", "KILL", "ID", killed) == 1

                async def lost() -> bool:
                    return not near.serving

                await poll(lost, "the listener to notice its connection is gone")
                assert len(near) == 0, "everything in memory is dropped the moment the listener fails"
                # meanwhile reads come from Redis, and stay right
                await other.set(tier.key(*keys[0]), ROW_B)
                near_hits = tier.near_hits
                assert await tier.get_many(keys) == [ROW_B, ROW_B]
                assert tier.near_hits == near_hits and len(near) == 0, "nothing served or kept while it is down"

                async def back() -> bool:
                    return near.serving

                await poll(back, "the listener to reconnect", timeout_s=POLL_S + 1.0)
                assert near.client_id != killed
                await poll(lambda: _kept(tier, keys), "the rows to be kept in memory again")
                await other.set(tier.key(*keys[1]), ROW_A)

                async def invalidated_again() -> bool:
                    return await tier.get_many(keys) == [ROW_B, ROW_A]

                await poll(invalidated_again, "the new listener to drop a changed row")
        finally:
            await other.aclose()

    asyncio.run(scenario())


def test_without_a_near_cache_the_tier_is_as_it_was(prefix: str) -> None:
    async def scenario() -> None:
        async with commands_seen(prefix) as seen, tiers(prefix)(near_cache_entries=0) as tier:
            assert tier.near is None
            await tier.put_many([("card", "a", ROW_A)])
            for _ in range(3):
                assert await tier.get_many([("card", "a"), ("card", "b")]) == [ROW_A, None]
                await asyncio.sleep(0.05)
            assert not [task for task in asyncio.all_tasks() if task.get_name() == "near-cache-listener"]
            assert (tier.hits, tier.misses, tier.near_hits) == (3, 3, 0)
        assert len(mgets(seen)) == 3, "one MGET per read"
        assert not [command for command in seen if "TRACKING" in command.upper()], "no tracking connection"

    asyncio.run(scenario())


def test_the_near_cache_listener_tracks_the_feature_keys_of_its_prefix(prefix: str) -> None:
    async def scenario() -> None:
        async with commands_seen(prefix) as seen, tiers(prefix)() as tier:
            await serving(tier)
        assert [command.split() for command in seen if "TRACKING" in command.upper()] == [
            ["CLIENT", "TRACKING", "ON", "REDIRECT", str(tier.near.client_id), "BCAST", "PREFIX",  # type: ignore[union-attr]
             f"{prefix}:fv:"]]

    asyncio.run(scenario())
