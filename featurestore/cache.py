"""The cache tier in front of the online store: its contract (``CacheTier``), and the Redis implementation
(``FeatureCache``, ``cache = "redis"``; ``cache = "none"`` runs without a tier, see ``backends.CACHES``).

The contract, as ``FeatureStore`` uses it (``tests/contract/test_cache_tier.py`` checks every implementation):
``get_many`` gives the packed entries of a batch (None for a miss or a writer's fence, or None for the whole
batch when the tier is down: the store then reads everything from the online store); ``put_many`` fills misses
after a read-through and never replaces an entry that is there; a write calls ``fence`` before it writes the
online store (raising ``CacheInvalidationFailed`` refuses the write) and ``settle`` after; the counters
``hits``, ``misses``, ``near_hits`` (those of the hits served from the worker's own memory) and ``bypassed`` and
``available`` feed the worker's /status and /metrics.

The Redis implementation. Key: ``<prefix>:fv:<view>:<entity>``. Value: the row packed as little-endian
``int64 event_ts_ms`` followed by one ``float64`` per feature (fixed width per view, so a whole batch of hits is
parsed with one numpy call), the one byte ``-`` for an entity the store does not have (a negative entry, so unknown
entities do not hit Cassandra on every request), or a writer's fence: ``~`` followed by the writer's 8-byte token
while its write is in flight, the one byte ``~`` otherwise. Entries expire after ``cache_ttl_s``, fences after
``fence_s``.

Coherence with writes (a write never leaves a stale cached row):

1. before it writes Cassandra, a writer replaces each entity's entry with its fence (``SET ~<token> EX fence_s
   GET``, one pipeline for the batch). If that fails (Redis unreachable, credentials refused, ``NOPERM``, a
   timeout), nothing is written and ``CacheInvalidationFailed`` is raised. The old value tells it whether another
   writer's fence was there (contention: that write may still be in flight);
2. after the write, one pipeline settles the entries: where the entry still holds this writer's own fence and no
   other fence was there (one atomic compare-and-set, a Lua script), it becomes the written row, so readers hit
   the new value at once; anywhere else (contention, a failed write, an entity twice in the batch, a fence another
   writer replaced) it becomes the plain fence ``~`` for ``fence_s``. If that fails, a warning is logged: the
   fence of step 1 still keeps readers off the old row for ``fence_s``. A user without ``EVAL`` gets plain
   fences (correct, and the rows are cached by the next reads once the fences expire).

A reader treats a fence as a miss (it reads Cassandra; a fence is neither a hit nor a negative entry), and its
read-through fill is ``SET NX EX``: it never replaces a fence or a row a writer set meanwhile. So a reader that
read the old row just before a write cannot cache it afterwards, as long as its read-through (Cassandra read to
cache fill) and the write take less than ``fence_s`` each.

The near cache (``nearcache.NearCache``, ``near_cache_entries`` > 0): the entries a worker read from Redis are also
kept in its memory and served from there without asking Redis, while Redis tracks the feature keys for it and
tells it of every change (a writer's fence in step 1 is such a change, so is anything else that touches a key).
The bound, stated plainly: a copy in memory may still be served after a write in another process until that
write's invalidation reaches this worker, milliseconds after Redis took the fence (the time Redis takes to send
it and this worker's event loop to read it; longer only if this worker's loop is blocked). A write through this
tier drops its own copies at once, so this process's next read sees it. Without the invalidation listener (not
up yet, lost, refused) nothing is served from memory (see ``nearcache``).

Redis is an accelerator for readers, never a dependency: when it does not answer, reads skip it, a warning is
logged (once per outage) and ``bypassed`` counts the batches that went straight to Cassandra. Writers need it
(see above): a write it did not fence could be hidden by a stale cached row until ``cache_ttl_s``.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from streamscore.featurestore.nearcache import NearCache
from streamscore.settings import RedisSettings, Settings

log = logging.getLogger(__name__)


class CacheTier(Protocol):
    """What ``FeatureStore`` needs of a cache tier (see the module docstring)."""

    hits: int
    """Entries served from the tier."""
    misses: int
    """Entries asked for and not there (or fenced): read through to the online store."""
    bypassed: int
    """Batches served without the tier because it did not answer."""
    near_hits: int
    """Of ``hits``, those served from the worker's own memory without a round trip (0 without a near cache)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> CacheTier:
        """The tier its section of the settings describes (connections are opened on first use)."""
        ...

    @property
    def available(self) -> bool:
        """False while the tier is known to be down (reads skip it until it is tried again)."""
        ...

    async def get_many(self, keys: Sequence[tuple[str, str]]) -> list[bytes | None] | None:
        """Packed entries (``pack_row`` or ``MISSING``) for (view, entity) pairs, None for a miss or a fence;
        None instead of the list when the tier did not answer."""
        ...

    async def put_many(self, entries: Sequence[tuple[str, str, bytes]]) -> None:
        """Read-through fill of (view, entity, packed) entries, only where no entry is; never raises."""
        ...

    async def fence(self, view: str, entities: Sequence[str]) -> Fences:
        """Step 1 of a write, before the online store is written: after it no reader gets the old entries, nor
        can fill them back. Raises ``CacheInvalidationFailed`` when it could not (the write is then refused)."""
        ...

    async def settle(self, fences: Fences, entities: Sequence[str], rows: Mapping[str, bytes]) -> None:
        """Step 2, after the write: entities in ``rows`` (packed as written) may become those rows where no
        other write overlapped; the others stay misses for a while. Raises ``CacheInvalidationFailed``
        (``written=True``) when it failed; the fences of step 1 still stand."""
        ...

    async def check(self) -> None:
        """One read of the feature keys as a reader does it; raises ``CacheUnusable`` (one line: what the tier
        said and the settings to check) when it did not answer or refused (``/readyz``)."""
        ...

    async def close(self) -> None: ...


class CacheUnusable(RuntimeError):
    """The cache tier did not answer a read, or refused it (credentials, permissions); the message is one line."""


_RETRY_AFTER_S = 1.0


def connect(settings: RedisSettings) -> aioredis.Redis:
    return aioredis.Redis(
        host=settings.host,
        port=settings.port,
        db=settings.db,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        ssl=settings.tls,
        ssl_ca_certs=str(settings.ssl_cafile) if settings.ssl_cafile else None,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        # no retries: a Redis that does not answer is bypassed, and the batch goes on from Cassandra
        retry=Retry(NoBackoff(), 0),
    )


class FeatureCache:
    """The Redis cache tier (``CacheTier``)."""

    def __init__(self, settings: RedisSettings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.client = connect(settings)
        self.bypassed = 0
        """Batches served without the cache because Redis did not answer."""
        self.hits = 0
        """Entries served by the tier (from Redis or the near cache)."""
        self.misses = 0
        self.near_hits = 0
        """Of ``hits``, those the near cache served (no round trip to Redis)."""
        self.near = (NearCache(settings, prefix, self.client.connection_pool) if settings.near_cache_entries > 0
                     else None)
        """The entries kept in this process's memory, coherent through Redis's invalidations; None when off."""
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._no_eval = False
        """Redis refused the publishing script once (no EVAL for this user): writes settle with plain fences."""

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureCache:
        return cls(settings.redis, settings.topic_prefix)

    def key(self, view: str, entity: str) -> str:
        return f"{self.prefix}:fv:{view}:{entity}"

    @property
    def available(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    async def get_many(self, keys: Sequence[tuple[str, str]]) -> list[bytes | None] | None:
        """Raw cached values for (view, entity) pairs (None where not cached or fenced by a writer), or None
        when Redis is down and the caller must read everything from the store."""
        if not keys:
            return []
        if not self.available:
            self.bypassed += 1
            return None
        names = [self.key(view, entity) for view, entity in keys]
        near = self.near
        if near is None or not near.start():
            raw = await self._mget(names)
        else:
            raw = near.lookup(names)
            wanted = [position for position, value in enumerate(raw) if value is None]
            if wanted:  # else: every entry was in memory, Redis is not asked
                asked = [names[position] for position in wanted]
                version = near.version  # before the MGET: a key invalidated while it is in flight is not kept
                fetched = await self._mget(asked)
                if fetched is None:
                    return None
                near.fill(asked, fetched, version)
                for position, value in zip(wanted, fetched, strict=True):
                    raw[position] = value
            self.near_hits += len(raw) - len(wanted)
        if raw is None:
            return None
        hit_count = len(raw) - raw.count(None)
        self.hits += hit_count
        self.misses += len(raw) - hit_count
        return raw

    async def _mget(self, names: list[str]) -> list[bytes | None] | None:
        """One MGET, fences as misses; None (counted as bypassed) when Redis did not answer."""
        try:
            replies = await self.client.mget(names)
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            self.bypassed += 1
            return None
        self._mark_up()
        return without_fences(replies)  # type: ignore[arg-type]  # bytes: the client does not decode responses

    async def put_many(self, entries: Sequence[tuple[str, str, bytes]]) -> None:
        """Cache packed rows (see ``pack_row``) read from the store, only where no entry is (``SET NX``): a
        writer's fence, or anything a writer set since this reader missed, is never overwritten."""
        if not entries or not self.available:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for view, entity, packed in entries:
                    pipe.set(self.key(view, entity), packed, ex=self.settings.cache_ttl_s, nx=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)

    async def fence(self, view: str, entities: Sequence[str]) -> Fences:
        """Step 1 of a write: replace the entries of ``entities`` with this writer's fence (one pipeline).
        Raises ``CacheInvalidationFailed`` unless Redis set every one; tried even while reads bypass a Redis
        that did not answer (a writer must know, not assume)."""
        fences = Fences(view, FENCE + os.urandom(TOKEN_BYTES))
        if not entities:
            return fences
        self._forget(view, entities)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for entity in entities:
                    pipe.set(self.key(view, entity), fences.token, ex=self.settings.fence_s, get=True)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise CacheInvalidationFailed(self.settings, view, len(entities), exc) from exc
        refused = next((reply for reply in replies if isinstance(reply, BaseException)), None)
        if refused is not None:
            raise CacheInvalidationFailed(self.settings, view, len(entities), refused)
        fences.contended = {entity for entity, old in zip(entities, replies, strict=True) if is_fence(old)}
        return fences

    async def settle(self, fences: Fences, entities: Sequence[str], rows: Mapping[str, bytes]) -> None:
        """Step 2, after the Cassandra write: each entity in ``rows`` (packed as written) whose entry still holds
        this writer's fence, and was not contended, becomes its row (atomically); every other entity gets the
        plain fence for ``fence_s``. One pipeline; raises ``CacheInvalidationFailed`` (``written``) when Redis
        failed."""
        self._forget(fences.view, entities)  # again: no fill that raced with the fence stays in memory
        publish = [entity for entity in entities if entity in rows and entity not in fences.contended]
        plain = [entity for entity in entities if entity not in rows or entity in fences.contended]
        if self._no_eval:
            publish, plain = [], [*publish, *plain]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                if publish:
                    pipe.eval(_PUBLISH, len(publish), *[self.key(fences.view, entity) for entity in publish],
                              fences.token, self.settings.cache_ttl_s, self.settings.fence_s,
                              *[rows[entity] for entity in publish])
                for entity in plain:
                    pipe.set(self.key(fences.view, entity), FENCE, ex=self.settings.fence_s)
                replies = await pipe.execute(raise_on_error=False)
                if publish and isinstance(replies[0], ResponseError):  # the script failed: plain fences
                    if isinstance(replies[0], NoPermissionError) or "can't run this command" in str(replies[0]):
                        self._no_eval = True  # no EVAL (or no GET) for this user: not again
                    log.warning("Redis at %s:%s refused the script that caches written rows (%s: %s; the user "
                                "needs EVAL and GET to run it): written entities are fenced for %d s instead "
                                "(correct, but not cached until then)", self.settings.host, self.settings.port,
                                type(replies[0]).__name__, replies[0], self.settings.fence_s)
                    for entity in publish:
                        pipe.set(self.key(fences.view, entity), FENCE, ex=self.settings.fence_s)
                    replies = replies[1:] + await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise CacheInvalidationFailed(self.settings, fences.view, len(entities), exc, written=True) from exc
        refused = next((reply for reply in replies if isinstance(reply, BaseException)), None)
        if refused is not None:
            raise CacheInvalidationFailed(self.settings, fences.view, len(entities), refused, written=True)

    def _forget(self, view: str, entities: Sequence[str]) -> None:
        """A write of this process: its entities leave the near cache now, not when Redis says so."""
        if self.near is not None:
            self.near.invalidate([self.key(view, entity) for entity in entities])

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Redis at %s:%s did not answer (%s): serving features from Cassandra without the "
                        "cache until it is back", self.settings.host, self.settings.port, exc)
        self._retry_at = time.monotonic() + _RETRY_AFTER_S

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("Redis at %s:%s is back after %.1f s: cache in use again", self.settings.host,
                        self.settings.port, time.monotonic() - self._down_since)
            self._down_since = None

    async def check(self) -> None:
        try:
            await self.client.get(self.key("_readyz", "_"))
        except (RedisError, OSError) as exc:
            raise CacheUnusable(redis_problem(self.settings, self.prefix, exc)) from exc

    async def close(self) -> None:
        if self.near is not None:
            await self.near.close()
        await self.client.aclose()


def redis_problem(settings: RedisSettings, prefix: str, error: BaseException) -> str:
    """One line on why Redis is unusable: wrong credentials, a missing permission, or no answer at all."""
    user = f" as user {settings.username!r}" if settings.username else ""
    where = f"Redis at {settings.host}:{settings.port}{user}"
    said = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, AuthenticationError) or said.startswith(("WRONGPASS", "NOAUTH")):
        return (f"{where} refused the credentials ({said}): check STREAMSCORE_REDIS__USERNAME and "
                "STREAMSCORE_REDIS__PASSWORD")
    if isinstance(error, NoPermissionError):
        return f"{where} refused a read ({said}): the user needs GET, MGET, SET and EVAL on ~{prefix}:fv:*"
    if settings.tls and any(word in said for word in ("SSL", "certificate", "handshake", "Connection reset",
                                                      "Connection closed")):
        return (f"{where} and this client did not agree on TLS ({type(error).__name__}: {said}): check "
                "STREAMSCORE_REDIS__SSL_CAFILE (the CA that signed Redis's certificate) and __SSL_CERTFILE / "
                "__SSL_KEYFILE (a client certificate, where Redis asks for one)")
    return f"{where} does not answer ({type(error).__name__}: {said}): check STREAMSCORE_REDIS__HOST, __PORT, __SSL"


MISSING = b"-"
"""Cached value of an entity the store does not have."""

FENCE = b"~"
"""A writer's fence: this byte alone, or followed by the writer's token (``TOKEN_BYTES``) while its write is in
flight. Readers treat it as a miss and never overwrite it."""

TOKEN_BYTES = 8
"""Random bytes that tell one writer's fence from another's (a fence of 9 bytes: no row is that short)."""

_PUBLISH = """
local published = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('SET', key, ARGV[3 + i], 'EX', ARGV[2])
    published = published + 1
  else
    redis.call('SET', key, '~', 'EX', ARGV[3])
  end
end
return published
"""
"""KEYS: the entries to publish; ARGV: the writer's fence, cache_ttl_s, fence_s, then the packed rows. An entry
that still holds the writer's fence becomes its row, any other gets the plain fence."""


@dataclass
class Fences:
    """What step 1 of a write left: the view, this writer's fence value, and the entities whose entry already
    held a fence (another write may be in flight there: they are not published)."""

    view: str
    token: bytes
    contended: set[str] = field(default_factory=set)


class CacheInvalidationFailed(RuntimeError):
    """Redis did not take a write's fences. From ``fence`` (before the write): the write was refused, nothing was
    written to Cassandra. From ``settle`` (after it, ``written``): the rows were written and their first fences
    stand. The message is one line: the Redis address, what Redis said, the outcome, the settings to check."""

    def __init__(self, settings: RedisSettings, view: str, count: int, error: object, written: bool = False
                 ) -> None:
        said = " ".join(str(error).split()) or type(error).__name__
        self.reason = f"{type(error).__name__}: {said}" if isinstance(error, BaseException) else said
        """What Redis (or the connection to it) said."""
        self.address = f"{settings.host}:{settings.port}"
        self.written = written
        """False (``fence``): nothing was written. True (``settle``): the rows were, and their fences stand."""
        user = f" as user {settings.username!r}" if settings.username else ""
        outcome = ("the rows were written and stay fenced for up to fence_s" if written
                   else "nothing was written to Cassandra")
        super().__init__(f"Redis at {self.address}{user} refused to invalidate the cache entries of {count} {view} "
                         f"row(s) ({self.reason}); {outcome}. Check "
                         "STREAMSCORE_REDIS__HOST/__PORT/__USERNAME/__PASSWORD (the user needs SET on the "
                         "feature keys)")


def is_fence(value: bytes | None) -> bool:
    return value is not None and len(value) <= 1 + TOKEN_BYTES and value[:1] == FENCE


def without_fences(raw: list[bytes | None]) -> list[bytes | None]:
    """``raw`` with every fence replaced by None (a miss). One pass; no row is shorter than 16 bytes."""
    return [None if value is not None and len(value) <= 1 + TOKEN_BYTES and value[:1] == FENCE else value
            for value in raw]


def row_dtype(features: int) -> np.dtype:
    """Layout of a cached row: event timestamp, then the features in view order."""
    return np.dtype([("ts", "<i8"), ("values", "<f8", (features,))])


def pack_row(values: Sequence[float], event_ts_ms: int) -> bytes:
    return struct.pack(f"<q{len(values)}d", event_ts_ms, *values)
