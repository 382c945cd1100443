"""The near cache: the hottest cache entries kept in the worker's own memory, in front of Redis, and kept
coherent by Redis itself (server-assisted client-side caching).

A batch whose entries are all in memory asks Redis nothing (no round trip); the others are read with one MGET as
before, and what it returns (rows and negative entries, never fences) is kept. Redis tells the worker which keys
changed: one dedicated RESP2 connection turns on ``CLIENT TRACKING ... REDIRECT <its own id> BCAST PREFIX
<prefix>:fv:`` and subscribes to ``__redis__:invalidate``; from then on every change of a feature key (a
writer's fence or row, a reader's fill, ``DEL``, ``EXPIRE``, expiry, eviction) publishes the key there, and a
``FLUSHDB``/``FLUSHALL`` publishes nil (drop everything). The listener task drops those keys from memory.

Coherence:

- an invalidation may be handled before the reply of an MGET that read the old value (the two come on different
  connections). Every invalidation counts (``version``) and is remembered per key; an MGET's entry is kept only
  when its key was not invalidated between the count taken before the MGET and its reply (nothing is kept when
  everything was dropped meanwhile);
- while the listener is not connected and subscribed (not started yet, connection lost, Redis down or refusing)
  nothing is served from memory nor kept, and everything is dropped the moment it fails; it reconnects with a
  backoff. A listener that hears nothing pings Redis and gives up when the answer is late, so a silently dead
  link stops serving within ``_PING_AFTER_S`` plus ``socket_timeout_s``;
- a write through this process's tier drops its entities here at once (fence and settle), so it is seen by this
  process's very next read; another process's write is seen once its invalidation arrives (milliseconds after
  the write: the time Redis takes to send it and this worker's event loop to read it);
- entries also leave after ``near_cache_ttl_s`` (at most ``cache_ttl_s``) whatever happens, a safety net.

Where Redis refuses the listener (an ACL user without ``CLIENT ID``/``CLIENT TRACKING``/``SUBSCRIBE``/``PING`` or
the channel, a Redis older than 6), one warning says what to grant and the tier runs without the near cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamscore.settings import RedisSettings

log = logging.getLogger(__name__)

INVALIDATIONS = "__redis__:invalidate"
"""The channel Redis publishes tracked keys' invalidations on (RESP2 redirect mode)."""

_PING_AFTER_S = 1.0
"""A listener that heard nothing for this long pings Redis (an idle link may have died without a word)."""

_RECENT_KEYS = 4096
"""Invalidated keys remembered for the fills in flight (an MGET takes at most ``socket_timeout_s``)."""
_RETRY_AFTER_S = 1.0
_RETRY_MAX_S = 30.0
"""Reconnection backoff of the listener: doubled after each failed attempt, up to this."""


class NearCache:
    """Entries of a ``FeatureCache`` (Redis key -> raw value) kept in memory while Redis tracks them for us."""

    def __init__(self, settings: RedisSettings, prefix: str, pool: aioredis.ConnectionPool) -> None:
        self.settings = settings
        self.prefix = prefix
        self.capacity = settings.near_cache_entries
        self.lifetime_s = min(settings.near_cache_ttl_s, float(settings.cache_ttl_s))
        self._pool = pool
        self._entries: dict[str, tuple[bytes, float]] = {}
        """Redis key -> (raw value, monotonic time it leaves), oldest stored first."""
        self.version = 0
        """Invalidations (and losses of the listener) seen so far: an MGET's entry is kept only when its key was
        not invalidated (nor everything cleared) after this was read, before the MGET."""
        self._invalidated: dict[str, int] = {}
        """Key -> ``version`` of its last invalidation, for the fills in flight; forgotten wholesale past
        ``_RECENT_KEYS`` keys (then ``_floor`` moves up and older fills keep nothing)."""
        self._floor = 0
        """A fill whose ``version`` is below this keeps nothing (everything was cleared, or forgotten, since)."""
        self.serving = False
        """The listener is connected and subscribed: entries may be served and kept."""
        self.refused: str | None = None
        """Why Redis refused the listener (the tier then runs without the near cache), None otherwise."""
        self.client_id: int | None = None
        """Redis's id of the listener's connection (``CLIENT KILL ID``), None before it connected."""
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> bool:
        """Starts the listener where it does not run (inside the event loop of the tier's client); True when
        entries may be served now."""
        if self._listener is None or self._listener.done():
            if self._closed or self.refused is not None:
                return False
            self._listener = asyncio.get_running_loop().create_task(self._run(), name="near-cache-listener")
        return self.serving

    def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values kept for ``keys``, None where there is none (or it is past its lifetime)."""
        if not self.serving:
            return [None] * len(keys)
        now = time.monotonic()
        entries = self._entries
        found: list[bytes | None] = []
        for key in keys:
            entry = entries.get(key)
            if entry is not None and entry[1] <= now:
                del entries[key]
                entry = None
            found.append(None if entry is None else entry[0])
        return found

    def fill(self, keys: Sequence[str], values: Sequence[bytes | None], version: int) -> int:
        """Keeps the non-None ``values`` an MGET returned for ``keys`` (fences already replaced by None), except
        those of keys invalidated since ``version`` was read before it (all of them after a clear, or while the
        listener is not up); how many."""
        if not self.serving or version < self._floor:
            return 0
        invalidated = self._invalidated
        entries, capacity = self._entries, self.capacity
        leaves = time.monotonic() + self.lifetime_s
        kept = 0
        for key, value in zip(keys, values, strict=True):
            if value is None or invalidated.get(key, -1) >= version:
                continue
            entries.pop(key, None)  # stored again: it is the newest
            while len(entries) >= capacity:
                del entries[next(iter(entries))]
            entries[key] = (value, leaves)
            kept += 1
        return kept

    def invalidate(self, keys: Iterable[str]) -> None:
        """Drops ``keys`` (a write of this process, or Redis said they changed)."""
        entries, invalidated, version = self._entries, self._invalidated, self.version
        for key in keys:
            entries.pop(key, None)
            invalidated[key] = version
        self.version = version + 1
        if len(invalidated) > _RECENT_KEYS:
            invalidated.clear()
            self._floor = self.version

    def clear(self) -> None:
        self.version += 1
        self._floor = self.version
        self._entries.clear()
        self._invalidated.clear()

    async def close(self) -> None:
        """Stops the listener and closes its connection; harmless twice."""
        self._closed = True
        listener, self._listener = self._listener, None
        # cancelled again until it ends: on Python 3.11 a cancellation that lands as ``asyncio.wait_for`` (which
        # redis-py sends commands through) finishes is lost
        while listener is not None and not listener.done():
            listener.cancel()
            await asyncio.wait([listener], timeout=0.1)
        self._lost()

    # ---------------------------------------------------------------------------------------------- listener

    def _lost(self) -> None:
        self.serving = False
        self.clear()

    async def _run(self) -> None:
        delay = _RETRY_AFTER_S
        try:
            while True:
                # RESP2: the invalidations come as pub/sub messages of the connection they are redirected to
                connection = self._pool.connection_class(**{**self._pool.connection_kwargs, "protocol": 2})
                try:
                    await self._listen(connection)
                except ResponseError as exc:  # an answer, not an outage: this Redis or user cannot track
                    self._lost()
                    self.refused = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                    log.warning(self._refusal())
                    return
                except Exception as exc:  # RedisError, OSError (an outage) or anything else: never stop listening
                    if self.serving:
                        log.warning("Redis at %s:%s: the near cache's invalidation listener was lost (%s: %s): "
                                    "the near cache is emptied and serves nothing until it is back",
                                    self.settings.host, self.settings.port, type(exc).__name__, exc)
                        delay = _RETRY_AFTER_S
                    else:
                        log.debug("near cache listener could not connect: %s", exc)
                    self._lost()
                finally:
                    await connection.disconnect(nowait=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        finally:
            self._lost()

    async def _listen(self, connection: Any) -> None:
        """Connects, turns tracking on towards this very connection and subscribes; then handles messages until
        the connection fails (raises)."""
        await connection.connect()
        client_id = int(await _command(connection, "CLIENT", "ID"))
        await _command(connection, "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX",
                       f"{self.prefix}:fv:")
        await _command(connection, "SUBSCRIBE", INVALIDATIONS)
        self.client_id = client_id
        self.clear()
        self.serving = True
        pinged = False
        while True:
            wait = self.settings.socket_timeout_s if pinged else _PING_AFTER_S
            message = await connection.read_response(timeout=wait)  # None: nothing within ``wait``
            if message is None:
                if pinged:
                    raise TimeoutError(f"no answer to PING within {wait:g} s")
                await connection.send_command("PING")
                pinged = True
                continue
            pinged = False  # anything heard: the link is alive
            self.handle(message)

    def handle(self, message: Any) -> None:
        """One message of the listener's connection: an invalidation (a list of keys, or nil for FLUSHDB and
        FLUSHALL: everything), or the answer to a PING."""
        if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
            keys = message[2]
            if keys is None:
                self.clear()
            else:
                self.invalidate([key.decode(errors="replace") for key in keys])

    def _refusal(self) -> str:
        user = f" as user {self.settings.username!r}" if self.settings.username else ""
        return (f"Redis at {self.settings.host}:{self.settings.port}{user} refused the near cache's invalidation "
                f"listener ({self.refused}): running without the near cache (every batch reads Redis). To use "
                "it, grant the user +client|id +client|tracking +subscribe +ping and the channel "
                "&__redis__:invalidate (Redis 6 or later); STREAMSCORE_REDIS__NEAR_CACHE_ENTRIES=0 turns it off "
                "and silences this")


async def _command(connection: Any, *args: Any) -> Any:
    await connection.send_command(*args)
    return await connection.read_response()
