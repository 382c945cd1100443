"""The Redis cache tier in front of the online store.

Key: ``<prefix>:fv:<view>:<entity>``. Value: the row packed as little-endian ``int64 event_ts_ms`` followed by
one ``float64`` per feature (fixed width per view, so a whole batch of hits is parsed with one numpy call),
or the one byte ``-`` for an entity the store does not have (a negative entry, so unknown entities do not
hit Cassandra on every request). Entries expire after ``cache_ttl_s`` and are deleted when the row is written.

Redis is an accelerator, never a dependency: when it does not answer, reads and invalidations are skipped,
a warning is logged (once per outage) and ``bypassed`` counts the batches that went straight to Cassandra.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from streamscore.settings import RedisSettings

log = logging.getLogger(__name__)

_RETRY_AFTER_S = 1.0


def connect(settings: RedisSettings) -> aioredis.Redis:
    return aioredis.Redis(
        host=settings.host,
        port=settings.port,
        db=settings.db,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        ssl=settings.ssl,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        # no retries: a Redis that does not answer is bypassed, and the batch goes on from Cassandra
        retry=Retry(NoBackoff(), 0),
    )


class FeatureCache:
    def __init__(self, settings: RedisSettings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.client = connect(settings)
        self.bypassed = 0
        """Batches served without the cache because Redis did not answer."""
        self.hits = 0
        self.misses = 0
        self._down_since: float | None = None
        self._retry_at = 0.0

    def key(self, view: str, entity: str) -> str:
        return f"{self.prefix}:fv:{view}:{entity}"

    @property
    def available(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    async def get_many(self, keys: Sequence[tuple[str, str]]) -> list[bytes | None] | None:
        """Raw cached values for (view, entity) pairs (None where not cached), or None when Redis is down
        and the caller must read everything from the store."""
        if not keys:
            return []
        if not self.available:
            self.bypassed += 1
            return None
        try:
            raw = await self.client.mget([self.key(view, entity) for view, entity in keys])
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            self.bypassed += 1
            return None
        self._mark_up()
        hit_count = len(raw) - raw.count(None)
        self.hits += hit_count
        self.misses += len(raw) - hit_count
        return raw  # type: ignore[return-value]  # bytes: the client does not decode responses

    async def put_many(self, entries: Sequence[tuple[str, str, bytes]]) -> None:
        """Cache packed rows (see ``pack_row``) read from the store."""
        if not entries or not self.available:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for view, entity, packed in entries:
                    pipe.set(self.key(view, entity), packed, ex=self.settings.cache_ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._mark_down(exc)

    async def invalidate(self, view: str, entities: Sequence[str]) -> bool:
        """Delete cached rows after a write; False when Redis did not answer (entries then expire by TTL)."""
        if not entities:
            return True
        try:
            await self.client.delete(*[self.key(view, entity) for entity in entities])
        except (RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

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

    async def close(self) -> None:
        await self.client.aclose()


MISSING = b"-"
"""Cached value of an entity the store does not have."""


def row_dtype(features: int) -> np.dtype:
    """Layout of a cached row: event timestamp, then the features in view order."""
    return np.dtype([("ts", "<i8"), ("values", "<f8", (features,))])


def pack_row(values: Sequence[float], event_ts_ms: int) -> bytes:
    return struct.pack(f"<q{len(values)}d", event_ts_ms, *values)
