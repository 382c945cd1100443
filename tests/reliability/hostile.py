"""Hostile input: generated malformed messages interleaved with valid ones, and what each must become.

Every message gets a unique Kafka key, so its dead letters (which keep the original key) can be matched to it,
and every request id is unique, so its prediction can be. What a message must become is computed by the
reference decoder (the pure-Python twin, whose semantics the compiled one is held to by the parity tests) plus
the worker's own checks (pinned version, reply_to topic): a list of ids to answer and the dead-letter kinds.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from streamscore.fastpath import DecodeSpec, _pure

from .harness import Collector, Load, Message, Scenario, Tally, request, tally, wait_for
from .scenarios import streaming

MIB = 1 << 20
REFUSED_REPLY_TO = (".", "..", "__consumer_offsets", "__transaction_state")
"""reply_to names Kafka never accepts a write to: the worker must dead-letter these requests, not retry."""


@dataclass
class Expected:
    """What the messages sent must become."""

    answer_ids: set[str] = field(default_factory=set)
    letters: Counter[bytes | None] = field(default_factory=Counter)
    """Message key -> dead letters it must give (one per bad message, or per bad element of an array)."""
    kinds: Counter[str] = field(default_factory=Counter)
    bad_messages: int = 0
    categories: Counter[str] = field(default_factory=Counter)
    unknown_entity_ids: set[str] = field(default_factory=set)
    """Valid requests naming a card the store does not have: answered with defaults, marked missing."""


def expect(value: bytes, key: bytes, spec: DecodeSpec, version: str, expected: Expected) -> tuple[str, ...]:
    """Record what ``value`` must become; returns the ids it must be answered for."""
    decoded = _pure.decode_batch([value], spec)
    kinds = [error.kind for error in decoded.errors]
    answered = []
    for row, request_id in enumerate(decoded.ids):
        if decoded.version[row] is not None and decoded.version[row] != version:
            kinds.append("unknown_version")
        elif decoded.reply_to[row] in REFUSED_REPLY_TO:
            kinds.append("bad_field")
        else:
            answered.append(request_id)
    assert not expected.answer_ids & set(answered), f"ids must be unique: {answered}"
    expected.answer_ids.update(answered)
    expected.letters[key] += len(kinds)
    expected.kinds.update(kinds)
    expected.bad_messages += bool(kinds)
    return tuple(answered)


class Generator:
    """Seeded hostile messages; ``bad_share`` of them malformed, the rest valid (some with unknown entities,
    some batches, some with a reply_to)."""

    def __init__(self, prefix: str, cards: list[str], merchants: list[str], reply_topic: str, seed: int) -> None:
        self.prefix = prefix
        self.cards = cards
        self.merchants = merchants
        self.reply_topic = reply_topic
        self.rng = random.Random(seed)
        self.serial = 0
        self.bad: list[tuple[str, int, Callable[[], Any]]] = [
            ("random_bytes", 10, self.random_bytes),
            ("truncated", 10, self.truncated),
            ("wrong_types", 14, self.wrong_types),
            ("long_strings", 6, self.long_strings),
            ("long_arrays", 5, self.long_arrays),
            ("deep_nesting", 5, self.deep_nesting),
            ("nan_inf", 8, self.nan_inf),
            ("unknown_version", 6, self.unknown_version),
            ("refused_reply_to", 4, self.refused_reply_to),
            ("huge_declared_lengths", 4, self.huge_declared_lengths),
            ("odd_msgpack", 6, self.odd_msgpack),
            ("empty", 3, self.empty),
            ("array_with_bad_element", 5, self.array_with_bad_element),
        ]
        self.good: list[tuple[str, int, Callable[[], Any]]] = [
            ("valid", 10, self.valid),
            ("unknown_entities", 3, self.unknown_entities),
            ("valid_batch", 2, self.valid_batch),
            ("valid_reply_to", 1, self.valid_reply_to),
            ("expired", 1, self.expired),
            ("valid_with_junk", 1, self.valid_with_junk),
        ]

    # -- building blocks

    def _id(self) -> str:
        self.serial += 1
        return f"{self.prefix}-h{self.serial}"

    def _request(self, **extra: Any) -> dict[str, Any]:
        return request(self._id(), self.rng.choice(self.cards), self.rng.choice(self.merchants),
                       round(self.rng.uniform(1, 500), 2), **extra)

    @staticmethod
    def pack(value: Any) -> bytes:
        return msgpack.packb(value, use_bin_type=True)

    # -- valid

    def valid(self) -> bytes:
        return self.pack(self._request())

    def unknown_entities(self) -> bytes:
        body = request(self._id(), f"card-unknown-{self.serial}", self.rng.choice([*self.merchants, "merchant-x"]))
        if self.rng.random() < 0.3:
            body["entities"]["card_id"] = 10**12 + self.serial  # an int key: its decimal string, unknown
        return self.pack(body)

    def valid_batch(self) -> bytes:
        return self.pack([self._request() for _ in range(self.rng.randint(2, 16))])

    def valid_reply_to(self) -> bytes:
        return self.pack(self._request(reply_to=self.reply_topic))

    def expired(self) -> bytes:
        return self.pack(self._request(deadline_ms=int(time.time() * 1000) - 60_000))

    def valid_with_junk(self) -> bytes:
        """Unknown keys are ignored, however big (within the 1 MiB limit)."""
        junk: Any = self.rng.choice(["x" * 20_000, list(range(5_000)), {str(n): n for n in range(500)}, "y" * 500_000
                                     if self.rng.random() < 0.1 else None])
        return self.pack({**self._request(), "junk": junk})

    # -- malformed

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 300))

    def truncated(self) -> bytes:
        whole = self.pack(self._request())
        return whole[:self.rng.randint(0, len(whole) - 1)]

    def wrong_types(self) -> bytes:
        body = self._request()
        wrong: list[Any] = [None, True, 17, -1.5, "text", b"bytes", [1, 2], {"a": 1}, msgpack.ExtType(5, b"x")]
        target = self.rng.choice(["id", "entities", "features", "entity", "feature", "deadline_ms", "sent_ms",
                                  "reply_to", "version"])
        if target in ("id", "reply_to"):  # a str there would be a valid id (answered) or topic (written to)
            wrong.remove("text")
        value = self.rng.choice(wrong)
        if target == "entity":
            body["entities"]["card_id"] = self.rng.choice([None, True, 1.5, [1], {"x": 1}, b"raw"])
        elif target == "feature":
            body["features"]["amount"] = self.rng.choice([None, True, "12.5", [1.0, 2.0], {"v": 1}, b"1"])
        elif target in ("deadline_ms", "sent_ms"):
            body[target] = self.rng.choice(["soon", 1.5, [1], None, 2**64 - 1])
        else:
            body[target] = value
        return self.pack(body)

    def long_strings(self) -> bytes:
        size = self.rng.choice([257, 1_000, 5_000]) if self.rng.random() < 0.95 else 300_000
        body = self._request()
        target = self.rng.choice(["id", "entity", "reply_to", "version", "feature_name"])
        if target == "id":
            body["id"] = f"{body['id']}-" + "i" * size
        elif target == "entity":
            body["entities"]["card_id"] = "c" * size
        elif target == "feature_name":
            body["features"] = {"a" * size: 1.0}
        else:
            body[target] = "t" * size
        return self.pack(body)

    def long_arrays(self) -> bytes:
        choice = self.rng.randrange(3)
        if choice == 0:
            length = self.rng.choice([2, 300, 5_000]) if self.rng.random() < 0.95 else 100_000
            return self.pack(self._request() | {"features": {"amount": [1.0] * length, "hour": 1.0,
                                                             "is_foreign": 0.0}})
        if choice == 1:  # more elements than a batch message may hold
            return self.pack([{}] * self.rng.choice([4_097, 70_000]))
        return self.pack({**self._request(), "entities": [["card_id", "card-1"]] * self.rng.choice([1, 1_000])})

    def deep_nesting(self) -> bytes:
        depth = self.rng.choice([65, 1_000]) if self.rng.random() < 0.9 else 200_000
        if self.rng.random() < 0.5:
            return b"\x91" * depth + b"\xc0"  # arrays in arrays
        body = self.pack(self._request())  # a valid map whose last value is nested deep: \x84 + ... + "x": [[[...]]]
        return bytes([body[0] + 1]) + body[1:] + self.pack("x") + b"\x81\xa1k" * depth + b"\xc0"

    def oversized(self) -> bytes:
        return self.pack({**self._request(), "pad": b"\0" * (MIB + self.rng.randint(1, 50_000))})

    def nan_inf(self) -> bytes:
        value = self.rng.choice([math.nan, math.inf, -math.inf, 1e39, -3.5e38])
        body = self._request()
        body["features"][self.rng.choice(["amount", "hour", "is_foreign"])] = value
        return self.pack(body)

    def unknown_version(self) -> bytes:
        return self.pack(self._request(version=self.rng.choice(["999", "0", "1.0", "latest"])))

    def refused_reply_to(self) -> bytes:
        return self.pack(self._request(reply_to=self.rng.choice(REFUSED_REPLY_TO)))

    def huge_declared_lengths(self) -> bytes:
        """Headers that announce gigabytes and bring a few bytes: nothing may allocate what they announce."""
        header = self.rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                                  b"\xc6\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff",
                                  b"\x81\xa2id\xdb\x7f\xff\xff\xff"])
        return header + self.rng.randbytes(self.rng.randint(0, 64))

    def odd_msgpack(self) -> bytes:
        """Valid msgpack that is not a valid request: ext types, timestamps, non-str keys, duplicate keys."""
        choice = self.rng.randrange(5)
        if choice == 0:
            return self.pack({"id": msgpack.ExtType(1, b"abc"), "entities": {}})
        if choice == 1:
            return self.pack({**self._request(), "features": {"amount": msgpack.Timestamp(1, 2), "hour": 1.0,
                                                              "is_foreign": 0.0}})
        if choice == 2:
            return self.pack({1: 2, None: 3, "entities": {"card_id": "card-1"}})
        if choice == 3:  # a map with "id" twice, the second one an int
            body = self.pack(self._request())
            return bytes([body[0] + 1]) + body[1:] + self.pack("id") + self.pack(12)
        return b"\xc1" + self.pack(self._request())  # a reserved byte first

    def empty(self) -> bytes:
        return self.rng.choice([b"", self.pack([]), self.pack({}), self.pack(None), self.pack(0), self.pack("")])

    def array_with_bad_element(self) -> bytes:
        elements: list[Any] = [self._request() for _ in range(self.rng.randint(1, 8))]
        bad = self._request()
        bad["features"]["amount"] = math.nan
        elements.insert(self.rng.randrange(len(elements) + 1), bad)
        return self.pack(elements)

    # -- the stream

    def messages(self, bad_count: int, good_count: int, oversized: int, spec: DecodeSpec, version: str,
                 expected: Expected) -> Iterator[Message]:
        """``bad_count`` malformed (``oversized`` of them over 1 MiB) and ``good_count`` valid, shuffled."""
        plan = ["bad"] * (bad_count - oversized) + ["oversized"] * oversized + ["good"] * good_count
        self.rng.shuffle(plan)
        for index, what in enumerate(plan):
            if what == "oversized":
                category, value = "oversized", self.oversized()
            else:
                category, _, make = self._pick(self.bad if what == "bad" else self.good)
                value = make()
            key = f"{self.prefix}-k{index}".encode()
            ids = expect(value, key, spec, version, expected)
            expected.categories[category] += 1
            if category == "unknown_entities":
                expected.unknown_entity_ids.update(ids)
            yield Message(key, value, ids)

    def _pick(self, table: list[tuple[str, int, Callable[[], Any]]]) -> tuple[str, int, Callable[[], Any]]:
        return self.rng.choices(table, weights=[weight for _, weight, _ in table])[0]


def model_spec(scenario: Scenario) -> tuple[DecodeSpec, str]:
    """The decode spec and version the worker serves (from the same library)."""
    from streamscore.featurestore.views import load_views
    from streamscore.workers.library import read_manifest, version_dir

    settings = scenario.settings
    views = load_views(settings.views_file)
    manifest = read_manifest(version_dir(settings.models_dir, "fraud"))
    entity_keys = tuple(views[view].entity for view in manifest.view_names)
    return DecodeSpec(entity_keys=entity_keys, request_features=manifest.request_features), manifest.version


@dataclass
class HostileOutcome:
    tally: Tally
    expected: Expected
    letter_kinds: Counter[str]
    mismatched: list[tuple[bytes | None, Counter[str], int]]
    max_rss_mb: float
    start_rss_mb: float
    not_marked_missing: list[tuple[str, Any]] = field(default_factory=list)
    """Unknown-entity requests whose prediction does not name the card as missing (must be empty)."""


async def hostile(scenario: Scenario, bad_count: int, good_count: int, oversized: int, rate: float,
                  seed: int = 16) -> HostileOutcome:
    """Hostile messages interleaved with valid ones through one worker, its RSS sampled all along."""
    reply_topic = f"{scenario.prefix}.replies.hostile"
    scenario.extra_env["STREAMSCORE_WORKER__RELOAD_INTERVAL_S"] = "0"
    # the request topic takes messages up to 4 MiB, so the oversized ones (> 1 MiB) reach the worker
    await scenario.create_topics({"max.message.bytes": str(4 * MIB)}, extra_topics=[reply_topic])
    spec, version = model_spec(scenario)
    generator = Generator(scenario.prefix, scenario.library.cards, scenario.library.merchants, reply_topic, seed)
    expected = Expected()
    worker = scenario.worker("hostile")
    started = time.monotonic()
    async with streaming(scenario, worker, follow=[reply_topic]) as collector:
        start_rss = worker.rss_kb()
        sampling = asyncio.create_task(_sample_rss(worker))
        load = Load(scenario.settings, scenario.requests_topic, rate, max_request_size=4 * MIB)
        try:
            await load.send_all(generator.messages(bad_count, good_count, oversized, spec, version, expected))
            sent_s = time.monotonic() - started
            await collector.settle(lambda: _complete(collector, expected), timeout=180)
            await wait_for(lambda: worker.alive, 1, "the worker alive")
        finally:
            sampling.cancel()
        assert worker.alive, f"the worker died:\n{worker.log_tail()}"
    result = tally(scenario.name, collector, expected.answer_ids, load.attempted_ids, expected.letters,
                   seconds=time.monotonic() - started)
    result.sent = len(expected.answer_ids) + sum(expected.letters.values())
    by_key: dict[bytes | None, Counter[str]] = {}
    for letter in collector.letters:
        by_key.setdefault(letter.key, Counter())[letter.kind] += 1
    mismatched = [(key, kinds, expected.letters[key]) for key, kinds in by_key.items()
                  if sum(kinds.values()) != expected.letters[key]]
    result.notes.update(bad_messages=expected.bad_messages, oversized=oversized, sent_after_s=round(sent_s, 1),
                        max_rss_mb=round(worker.max_rss_kb / 1024, 1), start_rss_mb=round(start_rss / 1024, 1))
    not_marked = [(request_id, collector.first.get(request_id, {}).get("degraded"))
                  for request_id in expected.unknown_entity_ids
                  if not any(":missing:" in item for item in collector.first.get(request_id, {}).get("degraded", ()))]
    result.notes["dead_letter_kinds"] = dict(sorted(Counter(letter.kind for letter in collector.letters).items()))
    return HostileOutcome(result, expected, Counter(letter.kind for letter in collector.letters), mismatched,
                          worker.max_rss_kb / 1024, start_rss / 1024, not_marked)


def _complete(collector: Collector, expected: Expected) -> bool:
    if not expected.answer_ids <= collector.counts.keys():
        return False
    return len(collector.letters) >= sum(expected.letters.values())


async def _sample_rss(worker: Any) -> None:
    while True:
        worker.rss_kb()
        await asyncio.sleep(0.2)

