"""The benchmark's workload: the fraud demo's feature rows and requests, 95% cache hits and 5% misses.

How the 95/5 split is made (per request, so per entity lookup: a request looks up one card and one merchant):

- *hot* entities are the demo's cards and merchants (``generate_feature_rows(FEATURE_SEED)``). Requests are
  cycled from a pool of demo transactions against them; before a variant runs, every hot entity the pool uses
  is read once through that variant's ``FeatureStore`` (read-through), so it sits in that variant's Redis
  namespace (the cache key starts with the topic prefix, and each variant has its own prefix);
- *cold* entities are extra Cassandra rows ``card-cold-<n>`` / ``merchant-cold-<n>`` (values copied from the
  hot rows). Request number ``i`` is cold when ``i % COLD_EVERY == COLD_EVERY - 1`` and then uses cold number
  ``cold_base + i // COLD_EVERY``. Each variant hands out every cold number at most once (``ColdIds``), so a
  cold lookup is always a cache miss that goes to Cassandra: exactly 5% of requests, both of their lookups.

Rows live in one keyspace (``streamscore_bench`` by default) shared by every run; they are written only when a
sentinel row shows they are missing, so a rerun does not pay for the fill again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
from aiokafka import AIOKafkaProducer

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import FeatureView
from streamscore.settings import Settings
from streamscore.streams.kafka import client_kwargs
from streamscore_examples.fraud.data import (
    CARD_VIEW,
    MERCHANT_VIEW,
    FeatureRows,
    generate_feature_rows,
    generate_transactions,
)
from streamscore_examples.fraud.requests import FEATURE_SEED, as_request

log = logging.getLogger(__name__)

COLD_EVERY = 20
"""One request in COLD_EVERY (5%) looks up entities that are in Cassandra but not in the cache."""
POOL_SEED = 23
"""Seed of the demo transactions that requests are cycled from."""
WRITE_CHUNK = 2000

Message = tuple[bytes, bytes]
"""(key, value) of one Kafka message."""


def is_cold(index: int) -> bool:
    return index % COLD_EVERY == COLD_EVERY - 1


def cold_count(requests: int) -> int:
    """Cold numbers used by requests 0..requests-1."""
    return requests // COLD_EVERY


def request_index(key_or_id: bytes | str) -> int:
    """The request number in an id ``<phase>-<number>``."""
    text = key_or_id.decode() if isinstance(key_or_id, bytes) else key_or_id
    return int(text.rsplit("-", 1)[1])


def partition_of(key: bytes, partitions: int) -> int:
    """Partition of a message key (crc32: C speed and deterministic; any stable hash keeps an entity on one
    partition, which is all the recommended keying asks for)."""
    return zlib.crc32(key) % partitions


class ColdIds:
    """Hands out cold entity numbers, each once per variant (a second use would be a cache hit)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, requests: int) -> int:
        """The cold base for a phase of ``requests`` requests; the numbers it uses are not handed out again."""
        base = self.next
        self.next += cold_count(requests) + 1
        return base


class Workload:
    """Request maps and packed messages of the benchmark, cycled from a pool of demo transactions."""

    def __init__(self, pool_size: int = 20_000, seed: int = POOL_SEED, hot_only: bool = False) -> None:
        self.hot_only = hot_only
        """Every request looks up hot entities (no 5% of cache misses): the HTTP bench's like-for-like Kafka load."""
        self.rows: FeatureRows = generate_feature_rows(FEATURE_SEED)
        transactions = generate_transactions(self.rows, pool_size, seed, with_labels=False)
        self._templates = [as_request("", transaction) for transaction in transactions]

    def hot_entities(self) -> dict[str, list[str]]:
        """Distinct entities (per view) the requests' hot lookups use: the set to warm in the cache."""
        cards = dict.fromkeys(template["entities"]["card_id"] for template in self._templates)
        merchants = dict.fromkeys(template["entities"]["merchant_id"] for template in self._templates)
        return {CARD_VIEW: list(cards), MERCHANT_VIEW: list(merchants)}

    def request(self, phase: str, index: int, cold_base: int, sent_ms: int) -> dict[str, Any]:
        template = self._templates[index % len(self._templates)]
        entities = template["entities"]
        if is_cold(index) and not self.hot_only:
            number = cold_base + index // COLD_EVERY
            entities = {"card_id": f"card-cold-{number}", "merchant_id": f"merchant-cold-{number}"}
        return {"id": f"{phase}-{index}", "entities": entities, "features": template["features"],
                "sent_ms": sent_ms}

    def message(self, phase: str, start: int, batch_size: int, cold_base: int, sent_ms: int) -> Message:
        """Requests start..start+batch_size-1 as one message: a map when batch_size is 1, else an array.
        The key is the (first) card id, as the wire format recommends."""
        requests = [self.request(phase, index, cold_base, sent_ms) for index in range(start, start + batch_size)]
        payload: Any = requests[0] if batch_size == 1 else requests
        return requests[0]["entities"]["card_id"].encode(), msgpack.packb(payload, use_bin_type=True)

    def messages(self, phase: str, requests: int, batch_size: int, cold_base: int) -> list[Message]:
        """``requests`` requests (a multiple of batch_size) as packed messages, stamped now."""
        sent_ms = time.time_ns() // 1_000_000
        return [self.message(phase, start, batch_size, cold_base, sent_ms)
                for start in range(0, requests, batch_size)]


# --- feature rows in Cassandra, and the cache ----------------------------------------------------------------

def cold_rows(hot: FeatureRows, start: int, stop: int) -> FeatureRows:
    """Cold rows start..stop-1: ``card-cold-<n>`` gets the values of hot card ``n mod cards`` (same for
    merchants), so cold requests score like hot ones and only their lookup path differs."""
    cards, merchants = list(hot[CARD_VIEW].values()), list(hot[MERCHANT_VIEW].values())
    return {
        CARD_VIEW: {f"card-cold-{n}": cards[n % len(cards)] for n in range(start, stop)},
        MERCHANT_VIEW: {f"merchant-cold-{n}": merchants[n % len(merchants)] for n in range(start, stop)},
    }


class BenchRows:
    """The benchmark's rows in its Cassandra keyspace: the hot rows once, cold rows as far as needed."""

    def __init__(self, settings: Settings, views: Mapping[str, FeatureView], hot: FeatureRows) -> None:
        self.settings = settings
        self.store = FeatureStore(settings, views, use_cache=False)
        self.hot = hot
        self.cold_written = 0

    async def open(self) -> None:
        self.store.connect(create_schema=True)

    async def close(self) -> None:
        await self.store.close()

    async def _present(self, view: str, entity: str) -> bool:
        return (await self.store.get(view, [entity]))[entity] is not None

    async def ensure_hot(self) -> int:
        """Write the hot rows unless the last of each view is already there; returns rows written."""
        last = {view: next(reversed(entities)) for view, entities in self.hot.items()}
        if all([await self._present(view, entity) for view, entity in last.items()]):
            return 0
        return await self._write(self.hot)

    async def ensure_cold(self, upto: int) -> int:
        """Make cold numbers 0..upto-1 present; returns rows written. Earlier runs' rows are kept: only the
        numbers past the highest present one are written."""
        if upto <= self.cold_written:
            return 0
        start = await self._cold_present_below(upto)
        written = await self._write(cold_rows(self.hot, start, upto)) if start < upto else 0
        self.cold_written = upto
        return written

    async def _cold_present(self, number: int) -> bool:
        return (await self._present(CARD_VIEW, f"card-cold-{number}")
                and await self._present(MERCHANT_VIEW, f"merchant-cold-{number}"))

    async def _cold_present_below(self, upto: int) -> int:
        """How many cold numbers from 0 are present (at most ``upto``). Rows are written in number order, a
        chunk at a time, so presence is monotone up to the last chunk written: a binary search finds the end,
        and the chunk before it is written again in case it was interrupted half way."""
        if await self._cold_present(upto - 1):
            return upto
        low, high = self.cold_written, upto - 1  # low: present (or 0), high: missing
        while low < high:
            middle = (low + high) // 2
            if await self._cold_present(middle):
                low = middle + 1
            else:
                high = middle
        return max(self.cold_written, low - WRITE_CHUNK)

    async def _write(self, rows: FeatureRows) -> int:
        written = 0
        for view, entities in rows.items():
            items = list(entities.items())
            for start in range(0, len(items), WRITE_CHUNK):
                written += await self.store.put(view, [(entity, values, None)
                                                       for entity, values in items[start:start + WRITE_CHUNK]])
        return written


async def warm_cache(settings: Settings, views: Mapping[str, FeatureView], entities: Mapping[str, Sequence[str]]
                     ) -> tuple[int, int]:
    """Read ``entities`` through a FeatureStore with the variant's settings (its topic prefix names the cache
    namespace), so each lands in Redis; then read them again and return (cache hits, lookups) of that second
    read, which shows the hot set is cached."""
    store = FeatureStore(settings, views)
    store.connect(create_schema=False)
    try:
        names = list(entities)
        longest = max(len(column) for column in entities.values())
        for start in range(0, longest, WRITE_CHUNK):
            await store.fetch(names, [list(entities[name][start:start + WRITE_CHUNK]) for name in names])
        assert store.cache is not None
        hits_before, misses_before = store.cache.hits, store.cache.misses
        for start in range(0, longest, WRITE_CHUNK):
            await store.fetch(names, [list(entities[name][start:start + WRITE_CHUNK]) for name in names])
        hits = store.cache.hits - hits_before
        return hits, hits + store.cache.misses - misses_before
    finally:
        await store.close()


# --- producing a backlog fast ---------------------------------------------------------------------------------

def new_producer(settings: Settings, linger_ms: int = 5) -> AIOKafkaProducer:
    return AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all", linger_ms=linger_ms, max_batch_size=1 << 20,
                            max_request_size=4 << 20)


async def send_partition(producer: AIOKafkaProducer, topic: str, partition: int, messages: Sequence[Message]
                         ) -> list[asyncio.Future]:
    """Queue messages for one partition as producer batches (``create_batch``/``send_batch``); returns the
    batches' acknowledgement futures."""
    futures = []
    batch = producer.create_batch()
    for key, value in messages:
        if batch.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a {len(value)}-byte message does not fit in an empty producer batch")
    if batch.record_count():
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


async def send_messages(producer: AIOKafkaProducer, topic: str, messages: Sequence[Message],
                        partitions: int) -> list[asyncio.Future]:
    """Queue messages on their key's partition, one sender per partition so the partitions fill in parallel
    (``send_batch`` waits while the partition's previous batch is still queued)."""
    by_partition: dict[int, list[Message]] = {}
    for key, value in messages:
        by_partition.setdefault(partition_of(key, partitions), []).append((key, value))
    sent = await asyncio.gather(*(send_partition(producer, topic, partition, group)
                                  for partition, group in by_partition.items()))
    return [future for futures in sent for future in futures]


async def load_backlog(settings: Settings, topic: str, messages: Sequence[Message], partitions: int) -> None:
    """Produce messages and wait until Kafka acknowledged every one."""
    producer = new_producer(settings)
    await producer.start()
    try:
        await asyncio.gather(*await send_messages(producer, topic, messages, partitions))
    finally:
        await producer.stop()
