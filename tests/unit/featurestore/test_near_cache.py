"""The near cache's own bookkeeping, without a server: an MGET's entries are kept only when no invalidation came
between the count taken before it and its reply (the fill race), never while the listener is down; Redis's
invalidation messages drop their keys (nil: everything); the oldest entry leaves when it is full, and every
entry after its lifetime (at most the Redis cache TTL)."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from streamscore.featurestore.cache import MISSING, pack_row
from streamscore.featurestore.nearcache import INVALIDATIONS, NearCache
from streamscore.settings import RedisSettings

ROW_A, ROW_B = pack_row([1.0], 1), pack_row([2.0], 2)


def near(**settings: object) -> NearCache:
    cache = NearCache(RedisSettings(**settings), "p", aioredis.ConnectionPool())  # type: ignore[arg-type]
    cache.serving = True  # as the listener sets it once Redis tracks the keys for it
    return cache


def message(keys: list[bytes] | None) -> list[object]:
    return [b"message", INVALIDATIONS.encode(), keys]


def test_a_key_invalidated_between_the_count_and_the_reply_is_not_kept() -> None:
    cache = near()
    version = cache.version  # taken before the MGET
    cache.handle(message([b"p:fv:card:a"]))  # its invalidation while the MGET is in flight
    assert cache.fill(["p:fv:card:a", "p:fv:card:b"], [ROW_A, MISSING], version) == 1, \
        "the key invalidated meanwhile must not be kept, the other one is"
    assert cache.lookup(["p:fv:card:a", "p:fv:card:b"]) == [None, MISSING]
    version = cache.version
    cache.handle(message(None))  # everything cleared meanwhile (FLUSHDB): nothing is kept
    assert cache.fill(["p:fv:card:c"], [ROW_A], version) == 0
    version = cache.version
    cache.handle(message([f"p:fv:card:x{n}".encode() for n in range(5000)]))  # more than it remembers
    assert cache.fill(["p:fv:card:c"], [ROW_A], version) == 0, "a fill older than what was forgotten keeps nothing"
    version = cache.version
    assert cache.fill(["p:fv:card:a", "p:fv:card:b", "p:fv:card:c"], [ROW_A, MISSING, None], version) == 2
    assert cache.lookup(["p:fv:card:a", "p:fv:card:b", "p:fv:card:c"]) == [ROW_A, MISSING, None], \
        "rows and negative entries are kept, misses and fences (None here) never"


def test_nothing_is_served_or_kept_while_the_listener_is_down() -> None:
    cache = near()
    cache.fill(["p:fv:card:a"], [ROW_A], cache.version)
    cache.serving = False
    assert cache.lookup(["p:fv:card:a"]) == [None]
    assert cache.fill(["p:fv:card:b"], [ROW_B], cache.version) == 0


def test_invalidation_messages_drop_their_keys_and_nil_drops_everything() -> None:
    cache = near()
    cache.fill(["p:fv:card:a", "p:fv:card:b", "p:fv:card:c"], [ROW_A, ROW_B, MISSING], cache.version)
    cache.handle(message([b"p:fv:card:a", b"p:fv:card:zzz"]))
    assert cache.lookup(["p:fv:card:a", "p:fv:card:b"]) == [None, ROW_B]
    before = cache.version
    cache.handle([b"pong", b""])
    assert cache.version == before, "a PING's answer invalidates nothing"
    cache.handle(message(None))
    assert len(cache) == 0 and cache.version > before


def test_the_oldest_stored_leaves_when_full() -> None:
    cache = near(near_cache_entries=2)
    cache.fill(["a"], [ROW_A], cache.version)
    cache.fill(["b"], [ROW_B], cache.version)
    cache.fill(["c"], [ROW_A], cache.version)
    assert cache.lookup(["a", "b", "c"]) == [None, ROW_B, ROW_A] and len(cache) == 2


@pytest.mark.parametrize(("ttls", "lifetime"), [({"near_cache_ttl_s": 0.05}, 0.05),
                                                ({"near_cache_ttl_s": 30, "cache_ttl_s": 1}, 1.0)])
def test_entries_leave_after_their_lifetime(ttls: dict[str, float], lifetime: float) -> None:
    cache = near(**ttls)
    assert cache.lifetime_s == lifetime
    cache.lifetime_s = 0.05  # the same clock, shorter
    cache.fill(["a"], [ROW_A], cache.version)
    assert cache.lookup(["a"]) == [ROW_A]
    time.sleep(0.06)
    assert cache.lookup(["a"]) == [None] and len(cache) == 0
