"""The online-store contract (``featurestore.online``), one suite run on every backend of
``featurestore.backends.ONLINE_STORES``: memory without servers, Cassandra against the local stack in a keyspace
of its own (marked ``integration``), once with ``IN`` reads of 32 keys and once with one read per key.

Each test writes entities of its own (a fresh prefix), so the backends' stores are shared per module."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import pytest

from streamscore.featurestore.backends import ONLINE_STORES, online_store
from streamscore.featurestore.cassandra import CassandraStore
from streamscore.featurestore.memory import MemoryStore
from streamscore.featurestore.online import FeatureStoreUnavailable, OnlineStore
from streamscore.featurestore.views import parse_views
from streamscore.settings import Settings

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id",
     "features": [{"name": "spend", "type": "float", "default": -1.0},
                  {"name": "count", "type": "int", "default": 0},
                  {"name": "vip", "type": "bool", "default": 0}]},
    {"name": "short", "entity": "card_id", "ttl_s": 2,
     "features": [{"name": "recent", "type": "float", "default": 0.0}]},
]})
TTL_S = 2
"""The ``short`` view's TTL: Cassandra counts TTLs in whole seconds, so a row written at t lives until somewhere in
(t + TTL_S - 1, t + TTL_S]; read at once it is there, after TTL_S + 1 seconds it is gone."""


@dataclass
class Backend:
    store: OnlineStore
    elapse: Callable[[float], None]
    """Let this many seconds pass, as the store's TTLs see time."""


def _memory() -> Iterator[Backend]:
    now = [1_000.0]
    store = MemoryStore(VIEWS, clock=lambda: now[0])
    store.connect()

    def elapse(seconds: float) -> None:
        now[0] += seconds

    try:
        yield Backend(store, elapse)
    finally:
        store.close()


def _cassandra(read_chunk: int) -> Callable[[], Iterator[Backend]]:
    def backend() -> Iterator[Backend]:
        base = Settings().cassandra
        keyspace = f"contract_{uuid.uuid4().hex[:10]}"
        store = CassandraStore(base.model_copy(update={"keyspace": keyspace, "read_chunk": read_chunk}), VIEWS)
        try:
            store.connect(create=True)
        except FeatureStoreUnavailable as exc:
            pytest.fail(f"the cassandra online-store contract needs the local stack's Cassandra: {exc}",
                        pytrace=False)
        try:
            yield Backend(store, time.sleep)
        finally:
            if store._session is None:  # a test closed it and did not reconnect
                store.connect(create=False)
            store.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
            store.close()

    return backend


CASES: dict[str, tuple[str, Callable[[], Iterator[Backend]]]] = {
    "memory": ("memory", _memory),
    "cassandra": ("cassandra", _cassandra(read_chunk=32)),
    "cassandra-per-key": ("cassandra", _cassandra(read_chunk=1)),
}
"""Case id -> (registry name, the backend made and torn down): every registered store has at least one."""
SERVERS = {"cassandra"}


@pytest.fixture(scope="module", params=[
    pytest.param(case, marks=[pytest.mark.integration] if name in SERVERS else [], id=case)
    for case, (name, _) in CASES.items()
])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from CASES[request.param][1]()


@pytest.fixture
def key() -> Callable[[str], str]:
    """Entity names of this test only: the store is shared by the module's tests."""
    prefix = uuid.uuid4().hex[:8]
    return lambda name: f"{prefix}-{name}"


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_every_registered_store_has_a_case_here_and_a_name_in_the_settings() -> None:
    assert {name for name, _ in CASES.values()} == set(ONLINE_STORES)
    assert set(get_args(Settings.model_fields["online_store"].annotation)) == set(ONLINE_STORES)
    for name, store_class in ONLINE_STORES.items():
        assert issubclass(store_class, OnlineStore) and store_class.name == name
        made = online_store(Settings(online_store=name), VIEWS)  # type: ignore[arg-type]
        assert type(made) is store_class and made.views == VIEWS


def test_a_written_row_reads_back_as_floats_with_its_event_timestamp(backend: Backend,
                                                                     key: Callable[[str], str]) -> None:
    store = backend.store
    run(store.put("card", [(key("a"), [2.5, 7, True], 1_700_000_000_123), (key("b"), [-1.0, 0, False], 5)]))
    rows = run(store.get_many([("card", key("a")), ("card", key("b"))]))
    assert rows == [([2.5, 7.0, 1.0], 1_700_000_000_123), ([-1.0, 0.0, 0.0], 5)]
    assert all(isinstance(value, float) for value in rows[0][0])


def test_an_unknown_entity_reads_as_none_in_its_place(backend: Backend, key: Callable[[str], str]) -> None:
    store = backend.store
    run(store.put("card", [(key("known"), [1.0, 1, False], 10)]))
    rows = run(store.get_many([("card", key("ghost")), ("card", key("known")), ("short", key("known")),
                               ("card", key("known")), ("card", key("ghost"))]))
    assert rows == [None, ([1.0, 1.0, 0.0], 10), None, ([1.0, 1.0, 0.0], 10), None], \
        "in request order, repeats included; a row of one view is not a row of another"


def test_a_null_column_reads_as_none(backend: Backend, key: Callable[[str], str]) -> None:
    run(backend.store.put("card", [(key("sparse"), [None, 3, None], 11)]))
    assert run(backend.store.get_many([("card", key("sparse"))])) == [([None, 3.0, None], 11)]


def test_the_last_write_wins_whatever_its_event_timestamp(backend: Backend, key: Callable[[str], str]) -> None:
    store = backend.store
    run(store.put("card", [(key("a"), [1.0, 1, False], 2_000), (key("b"), [5.0, 5, False], 2_000)]))
    run(store.put("card", [(key("a"), [9.0, 9, True], 1_000)]))
    rows = run(store.get_many([("card", key("a")), ("card", key("b"))]))
    assert rows == [([9.0, 9.0, 1.0], 1_000), ([5.0, 5.0, 0.0], 2_000)], \
        "the later write replaced a, with its older event timestamp; b, not written again, kept its row"


def test_a_view_ttl_forgets_rows_after_it_and_a_view_without_keeps_them(backend: Backend,
                                                                       key: Callable[[str], str]) -> None:
    store = backend.store
    run(store.put("short", [(key("a"), [4.0], 100)]))
    run(store.put("card", [(key("a"), [4.0, 4, False], 100)]))
    assert run(store.get_many([("short", key("a"))])) == [([4.0], 100)]
    backend.elapse(TTL_S + 1.2)
    assert run(store.get_many([("short", key("a")), ("card", key("a"))])) == [None, ([4.0, 4.0, 0.0], 100)]
    run(store.put("short", [(key("a"), [5.0], 200)]))
    assert run(store.get_many([("short", key("a"))])) == [([5.0], 200)], "written again, it is back"


def test_a_batch_of_many_keys_across_views_and_chunks_reads_every_one_in_order(backend: Backend,
                                                                               key: Callable[[str], str]) -> None:
    store = backend.store
    count = 700  # 22 IN chunks of 32 per view, or 700 single reads
    run(store.put("card", [(key(f"k{i}"), [float(i), i, i % 2 == 0], i) for i in range(count)]))
    run(store.put("short", [(key(f"k{i}"), [i / 2], i) for i in range(0, count, 3)]))
    requests = [(view, key(f"k{i}")) for i in range(count + 20) for view in ("card", "short")]
    requests += [("card", key("k5")), ("short", key("k3"))] * 3
    rows = run(store.get_many(requests))
    assert len(rows) == len(requests)
    for (view, entity), row in zip(requests, rows, strict=True):
        index = int(entity.rsplit("-k", 1)[1])
        if view == "card":
            assert row == (None if index >= count else ([float(index), float(index), float(index % 2 == 0)], index))
        else:
            assert row == (([index / 2], index) if index < count and index % 3 == 0 else None)


def test_empty_batches_are_nothing(backend: Backend) -> None:
    run(backend.store.put("card", []))
    assert run(backend.store.get_many([])) == []


def test_apply_schema_again_changes_nothing_and_keeps_the_rows(backend: Backend, key: Callable[[str], str]) -> None:
    run(backend.store.put("card", [(key("a"), [1.5, 2, False], 3)]))
    backend.store.apply_schema()
    backend.store.apply_schema()
    assert run(backend.store.get_many([("card", key("a"))])) == [([1.5, 2.0, 0.0], 3)]


def test_a_closed_store_refuses_work_until_connected_again(backend: Backend, key: Callable[[str], str]) -> None:
    store = backend.store
    run(store.put("card", [(key("a"), [1.0, 1, True], 1)]))
    store.close()
    try:
        with pytest.raises(RuntimeError, match="connect"):
            run(store.get_many([("card", key("a"))]))
        with pytest.raises(RuntimeError, match="connect"):
            run(store.put("card", [(key("b"), [1.0, 1, True], 1)]))
        store.close()  # twice is harmless
    finally:
        store.connect(create=False)
    assert run(store.get_many([("card", key("a")), ("card", key("b"))])) == [([1.0, 1.0, 1.0], 1), None]


def test_an_unconnected_store_refuses_work(backend: Backend) -> None:
    fresh = type(backend.store).from_settings(Settings(), VIEWS)
    with pytest.raises(RuntimeError, match="connect"):
        run(fresh.get_many([("card", "a")]))
    with pytest.raises(RuntimeError, match="connect"):
        run(fresh.put("card", [("a", [1.0, 1, True], 1)]))
    fresh.close()
