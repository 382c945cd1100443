"""A write never leaves a stale cached row: against a private redis-server with ACL users and the shared stack's
Cassandra, a writer Redis refuses writes nothing (readers stay consistent), a writer it accepts is seen on the
readers' very next read, a reader's late read-through fill (before, during or after the write) cannot put the old
row back, overlapping writers leave a fence rather than a row, and a writer without EVAL leaves fences that
expire. The CLI turns a refused write into one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cassandra.cluster import Session

from streamscore.featurestore.cache import FENCE, TOKEN_BYTES, CacheInvalidationFailed, FeatureCache, pack_row
from streamscore.featurestore.cassandra import CassandraStore
from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import RedisSettings, Settings

HOST = "127.0.0.1"
RESERVED_PORTS = {6379, 16379, 9042, 7000, *range(9090, 9100)}
VIEWS_DOC = {"views": [
    {"name": "card", "entity": "card_id", "ttl_s": 3600,
     "features": [{"name": "spend", "type": "float", "default": -1.0},
                  {"name": "count", "type": "int", "default": 0}]},
]}
VIEWS = parse_views(VIEWS_DOC)
PASSWORDS = {"admin": "adm1n-pw", "reader": "r3ader-pw", "writer": "wr1ter-pw", "fencer": "f3ncer-pw",
             "readonly": "r3adonly-pw", "tracker": "tr4cker-pw"}
ACL = [
    "user default off",
    f"user admin on >{PASSWORDS['admin']} ~* &* +@all",  # the test's own look at the keys
    # the reader path: one MGET per batch, SET NX EX for the read-through fill
    f"user reader on >{PASSWORDS['reader']} ~*:fv:* +mget +set",
    # a writer: SET for the fences, EVAL (and GET, which the script runs) for the compare-and-set that caches
    # the written rows
    f"user writer on >{PASSWORDS['writer']} ~*:fv:* +mget +set +eval +get",
    # a writer without EVAL: its writes leave plain fences instead of rows
    f"user fencer on >{PASSWORDS['fencer']} ~*:fv:* +mget +set",
    # may read, may not write: the fence is refused with NOPERM
    f"user readonly on >{PASSWORDS['readonly']} ~* +get +mget",
    # a reader with what the near cache's invalidation listener needs besides
    f"user tracker on >{PASSWORDS['tracker']} ~*:fv:* &__redis__:invalidate +mget +set +client|id "
    "+client|tracking +subscribe +ping",
]


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = int(probe.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


@dataclass
class AclRedis:
    port: int
    process: subprocess.Popen

    def admin(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, username="admin", password=PASSWORDS["admin"],
                           socket_timeout=2)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    """A redis-server of our own with ACL users, on a free port; killed by its pid at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/bootstrap installs it)", pytrace=False)
    folder = tmp_path_factory.mktemp("acl-redis")
    port = free_port()
    config = folder / "redis.conf"
    config.write_text("\n".join([f"bind {HOST}", f"port {port}", 'save ""', "appendonly no", f"dir {folder}",
                                 f"logfile {folder / 'redis.log'}", *ACL]) + "\n")
    process = subprocess.Popen([binary, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    server = AclRedis(port, process)
    try:
        deadline = time.monotonic() + 20
        while True:
            client = server.admin()
            try:
                client.ping()
                break
            except redis.RedisError:
                assert process.poll() is None, f"redis-server exited: {(folder / 'redis.log').read_text()}"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
            finally:
                client.close()
        yield server
    finally:
        if process.poll() is None:
            os.kill(process.pid, 9)
        process.wait(timeout=30)


@dataclass
class World:
    redis: AclRedis
    prefix: str
    keyspace: str
    online: CassandraStore
    session: Session

    def settings(self, user: str | None, password: str | None = None, port: int | None = None,
                 fence_s: int = 30) -> Settings:
        redis_settings: dict[str, Any] = {"port": port or self.redis.port, "fence_s": fence_s}
        if user is not None:
            redis_settings |= {"username": user, "password": password or PASSWORDS[user]}
        return Settings(topic_prefix=self.prefix, cassandra={"keyspace": self.keyspace}, redis=redis_settings)

    def store(self, user: str | None, password: str | None = None, port: int | None = None,
              fence_s: int = 30) -> FeatureStore:
        """A store as ``user``, sharing the one Cassandra session; create it inside the test's event loop."""
        store = FeatureStore(self.settings(user, password, port, fence_s), VIEWS)
        store.online = self.online
        return store

    def key(self, entity: str) -> str:
        return f"{self.prefix}:fv:card:{entity}"

    def cached(self, entity: str) -> bytes | None:
        client = self.redis.admin()
        try:
            return client.get(self.key(entity))  # type: ignore[return-value]
        finally:
            client.close()

    def stored(self, entity: str) -> tuple[float, int] | None:
        row = self.session.execute(
            f"SELECT spend, event_ts_ms FROM {self.keyspace}.view_card WHERE entity = %s", (entity,)).one()
        return None if row is None else (row[0], row[1])


@pytest.fixture
def world(stack: Any, acl_redis: AclRedis, cassandra_session: Session) -> Iterator[World]:
    run = uuid.uuid4().hex[:8]
    keyspace, prefix = f"cc_{run}", f"cc{run}"
    online = CassandraStore(Settings(cassandra={"keyspace": keyspace}).cassandra, dict(VIEWS))
    online.connect(create=True)
    try:
        yield World(acl_redis, prefix, keyspace, online, cassandra_session)
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        online.close()


async def _closing(*stores: FeatureStore) -> None:
    for store in stores:
        if store.cache is not None:
            await store.cache.close()


async def _spend(store: FeatureStore, entity: str) -> float | None:
    row = (await store.get("card", [entity]))[entity]
    return None if row is None else row["spend"]


REFUSED = {
    "wrong password": (("writer", "not-the-" + PASSWORDS["writer"]), ("WRONGPASS", "invalid username-password")),
    "ACL without SET": (("readonly", None), ("NoPermissionError: this user has no permissions to run the 'set'",)),
    "unreachable": (("writer", None), ("ConnectionError: Error 111 connecting",)),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_writer_writes_nothing_and_readers_stay_consistent(world: World, case: str) -> None:
    (user, password), redis_words = REFUSED[case]
    port = free_port() if case == "unreachable" else None

    async def scenario() -> None:
        reader, writer = world.store("reader"), world.store("writer")
        refused = world.store(user, password, port=port)
        try:
            await writer.put("card", [("card-X", {"spend": 1.0}, 1_000)])
            assert await _spend(reader, "card-X") == 1.0
            assert world.cached("card-X") == pack_row([1.0, 0.0], 1_000), "cached (by the writer)"

            with pytest.raises(CacheInvalidationFailed) as refusal:
                await refused.put("card", [("card-X", {"spend": 99.0}, 2_000)])
            message = str(refusal.value)
            assert "\n" not in message
            assert f"{HOST}:{port or world.redis.port}" in message
            assert any(word in message for word in redis_words), message
            assert "nothing was written" in message
            assert "STREAMSCORE_REDIS__HOST/__PORT/__USERNAME/__PASSWORD" in message
            assert PASSWORDS["writer"] not in message

            assert world.stored("card-X") == (1.0, 1_000), "the refused write must not reach Cassandra"
            hits = reader.cache.hits  # type: ignore[union-attr]
            assert await _spend(reader, "card-X") == 1.0, "consistent with Cassandra, not stale"
            assert reader.cache.hits == hits + 1  # type: ignore[union-attr]

            await writer.put("card", [("card-X", {"spend": 99.0}, 2_000)])
            assert world.stored("card-X") == (99.0, 2_000)
            assert world.cached("card-X") == pack_row([99.0, 0.0], 2_000), "the writer cached its row"
            hits = reader.cache.hits  # type: ignore[union-attr]
            assert await _spend(reader, "card-X") == 99.0, "the very next read sees the write"
            assert reader.cache.hits == hits + 1  # type: ignore[union-attr]
        finally:
            await _closing(reader, writer, refused)

    asyncio.run(scenario())


class HookedOnline:
    """The shared Cassandra store, with ``during`` run inside a write, after its fences and before its rows."""

    def __init__(self, online: CassandraStore, during: Callable[[], Awaitable[None]]) -> None:
        self.online, self.during = online, during

    async def put(self, view: str, rows: Any) -> None:
        await self.during()
        await self.online.put(view, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.online, name)


def test_a_late_read_through_fill_never_replaces_the_new_row(world: World) -> None:
    async def scenario() -> None:
        reader, writer = world.store("reader"), world.store("writer")
        try:
            await writer.put("card", [("card-X", {"spend": 1.0}, 1_000)])
            with world.redis.admin() as admin:
                assert 0 < admin.ttl(world.key("card-X")) <= world.settings(None).redis.cache_ttl_s

            # a reader missed the cache and read the old row from Cassandra ...
            (old,) = await reader.online.get_many([("card", "card-X")])
            assert old == ([1.0, 0.0], 1_000)
            # ... the writer writes ...
            await writer.put("card", [("card-X", {"spend": 99.0, "count": 7}, 2_000)])
            # ... and the reader's late fill comes in with the old row
            await reader.cache.put_many([("card", "card-X", pack_row(old[0], old[1]))])  # type: ignore[union-attr,index]
            assert world.cached("card-X") == pack_row([99.0, 7.0], 2_000), "a late fill must not replace the row"
            assert (await reader.get("card", ["card-X"]))["card-X"] == {"spend": 99.0, "count": 7.0,
                                                                        "event_ts_ms": 2_000}
        finally:
            await _closing(reader, writer)

    asyncio.run(scenario())


def test_a_fence_is_a_miss_during_the_write_and_the_readers_fill_cannot_replace_it(world: World) -> None:
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        reader, writer = world.store("reader"), world.store("writer")

        async def read_during_the_write() -> None:
            seen["fence"] = world.cached("card-X")
            misses, hits = reader.cache.misses, reader.cache.hits  # type: ignore[union-attr]
            seen["row"] = (await reader.get("card", ["card-X"]))["card-X"]  # the old row, from Cassandra
            seen["counted"] = (reader.cache.misses - misses, reader.cache.hits - hits)  # type: ignore[union-attr]
            seen["after_fill"] = world.cached("card-X")

        try:
            await writer.put("card", [("card-X", {"spend": 1.0}, 1_000)])
            writer.online = HookedOnline(world.online, read_during_the_write)  # type: ignore[assignment]
            await writer.put("card", [("card-X", {"spend": 99.0}, 2_000)])
            assert len(seen["fence"]) == 1 + TOKEN_BYTES and seen["fence"][:1] == FENCE
            assert seen["row"] == {"spend": 1.0, "count": 0.0, "event_ts_ms": 1_000}, \
                "a fence is a miss (read from Cassandra), not an unknown entity"
            assert seen["counted"] == (1, 0)
            assert seen["after_fill"] == seen["fence"], "the reader's fill must not replace the fence"
            assert world.cached("card-X") == pack_row([99.0, 0.0], 2_000)
            assert await _spend(reader, "card-X") == 99.0
        finally:
            await _closing(reader, writer)

    asyncio.run(scenario())


def test_overlapping_writes_leave_a_fence_and_readers_get_what_cassandra_kept(world: World) -> None:
    async def scenario() -> None:
        reader, first, second = world.store("reader"), world.store("writer"), world.store("writer")

        async def second_writer_inside() -> None:
            await second.put("card", [("card-X", {"spend": 2.0}, 2_000)])
            assert world.cached("card-X") == FENCE, "the second writer saw the first one's fence: no row"

        try:
            await first.put("card", [("card-X", {"spend": 0.5}, 500), ("card-Z", {"spend": 3.0}, 500)])
            first.online = HookedOnline(world.online, second_writer_inside)  # type: ignore[assignment]
            await first.put("card", [("card-X", {"spend": 1.0}, 1_000), ("card-Z", {"spend": 4.0}, 1_000)])
            assert world.stored("card-X") == (1.0, 1_000), "the first writer's row landed last"
            assert world.cached("card-X") == FENCE, "overlapping writes are not cached by the writers"
            assert world.cached("card-Z") == pack_row([4.0, 0.0], 1_000), "card-Z had one writer"
            with world.redis.admin() as admin:
                assert 0 < admin.ttl(world.key("card-X")) <= 30
            assert await _spend(reader, "card-X") == 1.0
            assert world.cached("card-X") == FENCE
        finally:
            await _closing(reader, first, second)

    asyncio.run(scenario())


def test_a_writer_without_eval_leaves_fences_that_expire(world: World, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        reader, writer = world.store("reader"), world.store("fencer", fence_s=1)
        try:
            with caplog.at_level(logging.WARNING, logger="streamscore.featurestore.cache"):
                await writer.put("card", [("card-Y", {"spend": 5.0}, 3_000)])
            assert "refused the script" in caplog.text and "no permissions to run the 'eval'" in caplog.text
            assert world.stored("card-Y") == (5.0, 3_000)
            assert world.cached("card-Y") == FENCE
            assert await _spend(reader, "card-Y") == 5.0
            assert world.cached("card-Y") == FENCE, "the reader's fill left the fence alone"
            await asyncio.sleep(1.3)
            assert world.cached("card-Y") is None
            assert await _spend(reader, "card-Y") == 5.0
            assert world.cached("card-Y") == pack_row([5.0, 0.0], 3_000)
            hits = reader.cache.hits  # type: ignore[union-attr]
            assert await _spend(reader, "card-Y") == 5.0
            assert reader.cache.hits == hits + 1  # type: ignore[union-attr]
        finally:
            await _closing(reader, writer)

    asyncio.run(scenario())


def _cli(world: World, tmp_path: Path, user: str, password: str, line: dict[str, Any]) -> subprocess.CompletedProcess:
    views_file = tmp_path / "views.json"
    views_file.write_text(json.dumps(VIEWS_DOC))
    executable = Path(sys.executable).with_name("streamscore")
    env = {**os.environ,
           "STREAMSCORE_VIEWS_FILE": str(views_file),
           "STREAMSCORE_TOPIC_PREFIX": world.prefix,
           "STREAMSCORE_CASSANDRA__KEYSPACE": world.keyspace,
           "STREAMSCORE_REDIS__HOST": HOST,
           "STREAMSCORE_REDIS__PORT": str(world.redis.port),
           "STREAMSCORE_REDIS__USERNAME": user,
           "STREAMSCORE_REDIS__PASSWORD": password}
    return subprocess.run([str(executable), "features", "put", "card"], input=json.dumps(line) + "\n",
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_cli_reports_a_refused_write_in_one_line(world: World, tmp_path: Path) -> None:
    async def seed() -> None:
        writer = world.store("writer")
        try:
            await writer.put("card", [("card-X", {"spend": 1.0}, 1_000)])
        finally:
            await _closing(writer)

    asyncio.run(seed())
    row = {"entity": "card-X", "features": {"spend": 99.0}, "event_ts_ms": 2_000}

    refused = _cli(world, tmp_path, "writer", "not-the-" + PASSWORDS["writer"], row)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"Error: Redis at {HOST}:{world.redis.port}"), lines[0]
    assert "nothing was written" in lines[0] and "STREAMSCORE_REDIS__" in lines[0]
    assert "Traceback" not in refused.stderr and PASSWORDS["writer"] not in refused.stderr
    assert world.stored("card-X") == (1.0, 1_000)

    accepted = _cli(world, tmp_path, "writer", PASSWORDS["writer"], row)
    assert accepted.returncode == 0, accepted.stderr
    assert "wrote 1 rows" in accepted.stderr
    assert world.stored("card-X") == (99.0, 2_000)
    assert world.cached("card-X") == pack_row([99.0, 0.0], 2_000)


def test_the_near_cache_runs_with_its_grants_and_without_them_says_once_what_to_grant(
        acl_redis: AclRedis, caplog: pytest.LogCaptureFixture) -> None:
    row, key = pack_row([1.0, 0.0], 1_000), ("card", "card-N")

    def tier(user: str) -> FeatureCache:
        return FeatureCache(RedisSettings(port=acl_redis.port, username=user, password=PASSWORDS[user]),
                            f"nc{uuid.uuid4().hex[:8]}")

    async def scenario() -> None:
        refused, granted = tier("reader"), tier("tracker")
        granted.prefix = refused.prefix
        try:
            await granted.put_many([(*key, row)])
            with caplog.at_level(logging.WARNING, logger="streamscore.featurestore.nearcache"):
                deadline = time.monotonic() + 2
                while refused.near.refused is None:  # type: ignore[union-attr]
                    assert await refused.get_many([key]) == [row], "a refused listener fails no read"
                    assert time.monotonic() < deadline, "Redis's refusal within 2 s"
                    await asyncio.sleep(0.01)
                for _ in range(3):
                    assert await refused.get_many([key]) == [row]
            warnings = [record.getMessage() for record in caplog.records if "near cache" in record.getMessage()]
            assert len(warnings) == 1, warnings
            assert "as user 'reader' refused the near cache's invalidation listener (NoPermissionError" in warnings[0]
            assert all(grant in warnings[0] for grant in ("+client|id", "+client|tracking", "+subscribe", "+ping",
                                                         "&__redis__:invalidate", "NEAR_CACHE_ENTRIES=0"))
            assert refused.near_hits == 0 and not refused.near.serving  # type: ignore[union-attr]

            deadline = time.monotonic() + 2
            while granted.near_hits < 2:  # the grants above are enough: rows come from memory
                assert await granted.get_many([key]) == [row]
                assert time.monotonic() < deadline, f"near hits with the grants: {granted.near.refused}"  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        finally:
            await refused.close()
            await granted.close()

    asyncio.run(scenario())
