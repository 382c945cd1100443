"""Hostile input: generated malformed messages interleaved with valid ones, and what each must become.

Every message gets a unique Kafka key, so its dead letters (which keep the original key) can be matched to it,
and every request id is unique, so its prediction can be. Two sources of expectations:

- the random mix of ``Generator`` (random bytes, truncations, wrong types, ...): what a message must become is
  computed by the reference decoder (the pure-Python twin, whose semantics the compiled one is held to by the
  parity tests) plus the worker's own checks (pinned version, reply_to topic);
- the contract cases of ``Contract`` (what other clients produce: tombstones, empty values, ext types, bin for
  str, non-str map keys, invalid UTF-8, deep nesting under unknown keys, duplicate keys, every documented limit
  and one past it): each case carries its outcome written by hand from docs/wire-format.md, never computed by a
  decoder: the ids answered and their status, and every dead letter's kind, element index and exact value. A
  share of them (every tombstone, and the first case of each category, then every other one) is produced with
  confluent-kafka (librdkafka), a client the project did not write, the rest with aiokafka.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from streamscore.fastpath import DecodeSpec, RequestFeature, _pure

from .harness import Collector, Letter, Load, Message, Scenario, Tally, request, tally, wait_for
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
    cases: dict[bytes | None, list[Case]] = field(default_factory=dict)
    """Message key -> the contract cases sent with it (one, except the cases sent with a null key)."""

    def record(self, case: Case) -> None:
        """Record what a contract case must become (from the case itself, not from a decoder)."""
        assert not self.answer_ids & case.answers.keys(), f"ids must be unique: {case.answers}"
        self.answer_ids.update(case.answers)
        letters = case.letters()
        self.letters[case.key] += len(letters)
        self.kinds.update(want.kind for want in letters)
        self.bad_messages += bool(letters)
        self.categories[case.category] += 1
        self.cases.setdefault(case.key, []).append(case)


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
                 expected: Expected, contract: Contract | None = None, contract_count: int = 0,
                 fixed_rounds: int = 0, foreign: ForeignProducer | None = None) -> Iterator[Message]:
        """``bad_count`` malformed (``oversized`` of them over 1 MiB, ``contract_count`` of them random light
        contract cases), ``good_count`` valid, and every contract variant ``fixed_rounds`` times, shuffled. The
        contract cases given to ``foreign`` (confluent-kafka) are produced there, not yielded."""
        fixed = contract.variants() if contract is not None else []
        plan: list[Any] = (["bad"] * (bad_count - oversized - contract_count) + ["oversized"] * oversized
                           + ["good"] * good_count + ["contract"] * contract_count
                           + [variant for _ in range(fixed_rounds) for variant in fixed])
        self.rng.shuffle(plan)
        per_category: Counter[str] = Counter()
        for index, what in enumerate(plan):
            key = f"{self.prefix}-k{index}".encode()
            if callable(what) or what == "contract":
                assert contract is not None
                case = what() if callable(what) else contract.random()
                if case.key == b"":
                    case.key = key
                # every tombstone, and the first case of each category then every other one, via librdkafka
                case.foreign = foreign is not None and (case.value is None or per_category[case.category] % 2 == 0)
                per_category[case.category] += 1
                expected.record(case)
                if case.foreign:
                    assert foreign is not None
                    foreign.produce(case.key, case.value, tuple(case.answers))
                    continue
                assert case.value is not None and case.key is not None, "tombstones and null keys go via librdkafka"
                yield Message(case.key, case.value, tuple(case.answers))
                continue
            if what == "oversized":
                category, value = "oversized", self.oversized()
            else:
                category, _, make = self._pick(self.bad if what == "bad" else self.good)
                value = make()
            ids = expect(value, key, spec, version, expected)
            expected.categories[category] += 1
            if category == "unknown_entities":
                expected.unknown_entity_ids.update(ids)
            yield Message(key, value, ids)

    def _pick(self, table: list[tuple[str, int, Callable[[], Any]]]) -> tuple[str, int, Callable[[], Any]]:
        return self.rng.choices(table, weights=[weight for _, weight, _ in table])[0]


# ----------------------------------------------------------------------------------------- the contract
#
# Outcomes written from docs/wire-format.md alone (never computed by a decoder): the numbers below are the
# documented ones, restated here on purpose rather than imported from the code under test.

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127
"""The largest finite float32, 3.4028234663852886e38."""
FLOAT32_TO_INF = 2.0**128 - 2.0**103
"""The smallest double that rounds to inf in float32: half-way between FLOAT32_MAX and 2**128, and a tie rounds to
the even neighbour, 2**128 (FLOAT32_MAX's mantissa is odd). Every double below it rounds to a finite float32."""
MAX_ID_CHARS = 256
MAX_BATCH = 4096
MAX_MESSAGE = MIB
MAX_TOPIC_CHARS = 249
LETTER_LIMIT = 1_000_000
"""Key plus value over this: the dead letter keeps the first 64 KiB of the value (and says so in a header)."""
KEPT_VALUE = 64 << 10
BAD_UTF8 = (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\x80", b"card-\xe2\x82", b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80")
"""Not UTF-8: bytes never used, an overlong '/', an encoded surrogate (CESU-8), a lone continuation byte, a
sequence cut short, U+110000 (above U+10FFFF), a 5-byte form."""
NOT_UTF8 = "is not valid UTF-8"
"""What the error message of a str field that is not valid UTF-8 says."""
AFTER_ID = frozenset({"bad_entities", "missing_entity", "bad_entity", "bad_features", "missing_feature",
                      "bad_feature", "bad_field", "unknown_version"})
"""Kinds of the checks after the id's (the check order, then the worker's version screening): a request refused
with one of them had a valid id, which its dead letter carries in ``streamscore-request-id``."""


@dataclass(frozen=True)
class Want:
    """A dead letter the contract requires: its kind, its element index and its exact value."""

    kind: str
    element: int = -1
    value_sha256: str | None = None
    """sha256 of the value; None: the value is null."""
    value_size: int = -1
    original_bytes: int | None = None
    """The original value's length, when the value must have been cut."""
    request_id: str | None = None
    """The ``streamscore-request-id`` it must carry: set where the id could be read (a valid id, and a check
    after it failed); None: not checked."""
    message: str | None = None
    """Words its ``streamscore-error-message`` must hold; None: not checked."""

    @classmethod
    def of(cls, kind: str, value: bytes | None, key: bytes | None, element: int = -1,
           request_id: str | None = None, message: str | None = None) -> Want:
        """A dead letter carrying ``value`` byte for byte, or only its first 64 KiB when key and value together
        are over 1,000,000 bytes; a null value stays null."""
        if value is None:
            return cls(kind, element, request_id=request_id, message=message)
        if len(value) + len(key or b"") > LETTER_LIMIT:
            kept = value[:KEPT_VALUE]
            return cls(kind, element, hashlib.sha256(kept).hexdigest(), len(kept), len(value), request_id, message)
        return cls(kind, element, hashlib.sha256(value).hexdigest(), len(value), None, request_id, message)

    def matches(self, letter: Letter) -> bool:
        same = (letter.kind, letter.element, letter.value_sha256, letter.value_size, letter.original_bytes) == (
            self.kind, self.element, self.value_sha256, self.value_size, self.original_bytes)
        return same and (self.request_id is None or letter.request_id == self.request_id) and \
            (self.message is None or self.message in letter.message)

    def describe(self) -> str:
        if self.value_sha256 is None:
            value = "null"
        elif self.original_bytes is not None:
            value = f"its first {self.value_size // 1024} KiB, original-bytes {self.original_bytes}"
        else:
            value = "the element's bytes" if self.element >= 0 else "the message"
        checked = "".join([", with its request id" if self.request_id else "",
                           f", message has {self.message!r}" if self.message else ""])
        return f"dlq {self.kind} [{self.element}], value {value}{checked}"


@dataclass(frozen=True)
class Part:
    """One element of a batch message: its bytes, and the id it must be answered for (with its status) or the
    kind of its dead letter."""

    value: bytes
    answer: str | None = None
    status: str = "ok"
    kind: str | None = None
    request_id: str | None = None
    """The id its dead letter must carry (the element's id was valid and a later check failed)."""


@dataclass
class Case:
    """One message and what the contract says it must become."""

    category: str
    input: str
    """What it is, for a person."""
    value: bytes | None
    answers: dict[str, str] = field(default_factory=dict)
    """Request id -> the status its prediction must have."""
    parts: list[Part] | None = None
    """The elements of a batch message (their dead letters carry their own bytes), None for a single request."""
    kind: str | None = None
    """The kind of the one dead letter of the whole message, None when it has none."""
    request_id: str | None = None
    """The id that dead letter must carry, where the id could be read."""
    message: str | None = None
    """Words its error message must hold."""
    topic: str | None = None
    """The topic the answers must come on, None for the predictions topic."""
    key: bytes | None = b""
    """The Kafka key; b"" until one is given (a variant may choose its own, or None)."""
    foreign: bool = False
    """Produced with confluent-kafka."""

    def letters(self) -> list[Want]:
        if self.kind is not None:
            return [Want.of(self.kind, self.value, self.key, -1, self.request_id, self.message)]
        return [Want.of(part.kind, part.value, self.key, index, part.request_id)
                for index, part in enumerate(self.parts or ()) if part.kind is not None]

    def expected(self) -> str:
        """The documented outcome, in a few words."""
        answered = Counter(self.answers.values())
        words = [f"{count} answered {status}" if count > 1 else f"answered {status}"
                 for status, count in sorted(answered.items())]
        if self.topic:
            words[-1] += f" on {len(self.topic)}-char reply_to"
        return "; ".join([*words, *self.letter_words()]) or "nothing"

    def letter_words(self) -> list[str]:
        if self.parts is None:
            return [want.describe() for want in self.letters()]
        kinds = Counter(want.kind for want in self.letters())
        if not kinds:
            return []
        return ["dlq " + ", ".join(f"{kind} x{count}" if count > 1 else kind for kind, count in sorted(kinds.items()))
                + " (each: its index, the element's bytes)"]


def _str_header(size: int) -> bytes:
    if size < 32:
        return bytes([0xA0 | size])
    if size < 1 << 8:
        return b"\xd9" + size.to_bytes(1, "big")
    return (b"\xda" + size.to_bytes(2, "big")) if size < 1 << 16 else (b"\xdb" + size.to_bytes(4, "big"))


def raw_str(data: bytes) -> bytes:
    """A msgpack str holding ``data`` as it is (valid UTF-8 or not)."""
    return _str_header(len(data)) + data


def raw_map(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map of already-packed keys and values, in this order (duplicates kept)."""
    size = len(pairs)
    head = bytes([0x80 | size]) if size < 16 else b"\xde" + size.to_bytes(2, "big")
    return head + b"".join(key + value for key, value in pairs)


def raw_array(elements: Sequence[bytes]) -> bytes:
    size = len(elements)
    if size < 16:
        head = bytes([0x90 | size])
    else:
        head = (b"\xdc" + size.to_bytes(2, "big")) if size < 1 << 16 else (b"\xdd" + size.to_bytes(4, "big"))
    return head + b"".join(elements)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def pairs_of(body: dict[Any, Any]) -> list[tuple[bytes, bytes]]:
    return [(pack(key), pack(value)) for key, value in body.items()]


def deep_maps(depth: int) -> bytes:
    """``{"k": {"k": ... nil}}``, ``depth`` maps deep."""
    return b"\x81\xa1k" * depth + b"\xc0"


def deep_arrays(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


class Contract:
    """The contract cases: each variant builds one message (fresh ids) with its documented outcome.

    ``variants()`` lists them all (the fixed list: every one once); ``random()`` picks a light one."""

    def __init__(self, generator: Generator, reply_topic: str, long_reply_topic: str) -> None:
        self.generator = generator
        self.rng = generator.rng
        self.reply_topic = reply_topic
        self.long_reply_topic = long_reply_topic
        assert len(long_reply_topic) == MAX_TOPIC_CHARS, long_reply_topic
        self._heavy: set[Callable[[], Case]] = set()
        self._variants = self._build_variants()
        self._light = [make for make in self._variants if make not in self._heavy]

    # -- building blocks

    def req(self, **extra: Any) -> dict[str, Any]:
        """A valid request (known card and merchant) with a fresh id (also kept as ``last_id``)."""
        body = self.generator._request(**extra)
        self.last_id: str = body["id"]
        return body

    def _id(self) -> str:
        return self.generator._id()

    @staticmethod
    def answered(category: str, what: str, value: bytes, body: dict[str, Any], status: str = "ok",
                 topic: str | None = None) -> Case:
        return Case(category, what, value, {body["id"]: status}, topic=topic)

    def rejected(self, category: str, what: str, value: bytes | None, kind: str, message: str | None = None) -> Case:
        """A message dead-lettered whole. A kind given by a check after the id's (the id was valid) means the
        dead letter carries the id: the one of the request built last (every variant builds its message's
        request last)."""
        rid = self.last_id if kind in AFTER_ID else None
        return Case(category, what, value, kind=kind, request_id=rid, message=message)

    @staticmethod
    def batch(category: str, what: str, parts: list[Part]) -> Case:
        return Case(category, what, raw_array([part.value for part in parts]),
                    {part.answer: part.status for part in parts if part.answer is not None}, parts=parts)

    def big(self, make: Callable[[], Case]) -> Callable[[], Case]:
        """Marks a variant heavy (a MiB, thousands of requests, 100k levels): fixed list only, never random."""
        self._heavy.add(make)
        return make

    def good_part(self, **extra: Any) -> Part:
        body = self.req(**extra)
        return Part(pack(body), answer=body["id"])

    def with_field(self, name: str, packed: bytes) -> bytes:
        """A valid request whose field ``name`` is replaced by (or gets) the already-packed ``packed``."""
        return self.with_field_body(name, packed)[0]

    def with_field_body(self, name: str, packed: bytes) -> tuple[bytes, dict[str, Any]]:
        body = self.req()
        rest = {key: value for key, value in body.items() if key != name}
        return raw_map([*pairs_of(rest), (pack(name), packed)]), body

    def with_entity(self, name: str, packed: bytes) -> bytes:
        body = self.req()
        rest = {key: value for key, value in body.items() if key != "entities"}
        entities = {key: value for key, value in body["entities"].items() if key != name}
        return raw_map([*pairs_of(rest), (pack("entities"), raw_map([*pairs_of(entities), (pack(name), packed)]))])

    def with_feature(self, packed: bytes, name: str = "amount") -> bytes:
        return self.with_feature_body(packed, name)[0]

    def with_feature_body(self, packed: bytes, name: str = "amount") -> tuple[bytes, dict[str, Any]]:
        body = self.req()
        rest = {key: value for key, value in body.items() if key != "features"}
        features = {key: value for key, value in body["features"].items() if key != name}
        return raw_map([*pairs_of(rest), (pack("features"), raw_map([*pairs_of(features), (pack(name), packed)]))]), \
            body

    def sized(self, size: int, request_id: Any = None) -> tuple[bytes, dict[str, Any]]:
        """A request padded (under an unknown key) to exactly ``size`` bytes; its id replaced when given."""
        body = self.req()
        if request_id is not None:
            body["id"] = request_id
        probe = pack({**body, "pad": b"\0" * (1 << 16)})
        pad = size - (len(probe) - (1 << 16))
        assert pad >= 1 << 16, size
        value = pack({**body, "pad": b"\0" * pad})
        assert len(value) == size, (len(value), size)
        return value, body

    # -- the variants

    def _build_variants(self) -> list[Callable[[], Case]]:
        return [make for builder in (self._tombstones, self._empty, self._ext, self._bin, self._map_keys, self._utf8,
                                     self._deep, self._duplicates, self._limits, self._order, self._batches)
                for make in builder()]

    def variants(self) -> list[Callable[[], Case]]:
        """Every variant once (the fixed list), the heavy ones included."""
        return list(self._variants)

    def random(self) -> Case:
        """A light variant, at random."""
        return self.rng.choice(self._light)()

    def _tombstones(self) -> list[Callable[[], Case]]:
        def tombstone() -> Case:
            return self.rejected("tombstone", "null value (a Kafka tombstone)", None, "null_value")

        def tombstone_without_key() -> Case:
            case = self.rejected("tombstone", "null value and null key", None, "null_value")
            case.key = None
            return case

        return [tombstone, tombstone_without_key]

    def _empty(self) -> list[Callable[[], Case]]:
        def empty_value() -> Case:
            return self.rejected("empty_value", "zero-length value", b"", "empty_value")

        return [empty_value]

    def _ext(self) -> list[Callable[[], Case]]:
        category = "ext_types"
        now_s = int(time.time())
        ext = msgpack.ExtType(42, b"\x01\x02\x03")
        stamp = msgpack.Timestamp(now_s, 123_000_000)
        negative_ext = b"\xd4\xfe\x00"  # fixext 1 of the reserved type -2

        def whole_ext() -> Case:
            return self.rejected(category, "the message is an ext (type 42)", pack(ext), "not_a_map")

        def whole_timestamp() -> Case:
            return self.rejected(category, "the message is a timestamp ext", pack(stamp), "not_a_map")

        def id_ext() -> Case:
            return self.rejected(category, "id: ext", self.with_field("id", pack(ext)), "bad_id")

        def id_timestamp() -> Case:
            return self.rejected(category, "id: timestamp ext", self.with_field("id", pack(stamp)), "bad_id")

        def id_reserved_ext() -> Case:
            return self.rejected(category, "id: ext of reserved type -2", self.with_field("id", negative_ext), "bad_id")

        def entity_ext() -> Case:
            return self.rejected(category, "entities.card_id: ext", self.with_entity("card_id", pack(ext)),
                                 "bad_entity")

        def entities_ext() -> Case:
            return self.rejected(category, "entities: ext", self.with_field("entities", pack(ext)), "bad_entities")

        def feature_timestamp() -> Case:
            return self.rejected(category, "features.amount: timestamp ext", self.with_feature(pack(stamp)),
                                 "bad_feature")

        def feature_ext() -> Case:
            packed = pack(msgpack.ExtType(16, struct.pack(">d", 12.5)))
            return self.rejected(category, "features.amount: ext holding a double", self.with_feature(packed),
                                 "bad_feature")

        def features_ext() -> Case:
            return self.rejected(category, "features: ext", self.with_field("features", pack(ext)), "bad_features")

        def deadline_timestamp() -> Case:
            packed = pack(msgpack.Timestamp(now_s + 3600, 0))
            return self.rejected(category, "deadline_ms: timestamp ext (an hour ahead)",
                                 self.with_field("deadline_ms", packed), "bad_field")

        def sent_timestamp() -> Case:
            return self.rejected(category, "sent_ms: timestamp ext", self.with_field("sent_ms", pack(stamp)),
                                 "bad_field")

        def reply_to_ext() -> Case:
            return self.rejected(category, "reply_to: ext", self.with_field("reply_to", pack(ext)), "bad_field")

        def version_ext() -> Case:
            return self.rejected(category, "version: ext", self.with_field("version", pack(ext)), "bad_field")

        def unknown_key_exts() -> Case:
            body = self.req()
            value = raw_map([*pairs_of(body), (pack("created"), pack(stamp)),
                             (pack("stamp96"), pack(msgpack.Timestamp(1 << 40, 5))),
                             (pack("blob"), pack(msgpack.ExtType(127, b"\xff" * 100_000))),
                             (pack("reserved"), negative_ext),
                             (pack("meta"), pack({"t": stamp, "x": [ext, ext]}))])
            return self.answered(category, "ext types (timestamp 32/96, type 127 of 100 KB, reserved -2) under "
                                 "unknown keys", value, body)

        return [whole_ext, whole_timestamp, id_ext, id_timestamp, id_reserved_ext, entity_ext, entities_ext,
                feature_timestamp, feature_ext, features_ext, deadline_timestamp, sent_timestamp, reply_to_ext,
                version_ext, unknown_key_exts]

    def _bin(self) -> list[Callable[[], Case]]:
        category = "bin_for_str"

        def id_bin() -> Case:
            return self.rejected(category, "id: bin", self.with_field("id", pack(self._id().encode())), "bad_id")

        def card_bin() -> Case:
            card = self.rng.choice(self.generator.cards).encode()
            return self.rejected(category, "entities.card_id: bin", self.with_entity("card_id", pack(card)),
                                 "bad_entity")

        def merchant_bin() -> Case:
            merchant = self.rng.choice(self.generator.merchants).encode()
            return self.rejected(category, "entities.merchant_id: bin",
                                 self.with_entity("merchant_id", pack(merchant)), "bad_entity")

        def reply_to_bin() -> Case:
            return self.rejected(category, "reply_to: bin (of a valid topic)",
                                 self.with_field("reply_to", pack(self.reply_topic.encode())), "bad_field")

        def version_bin() -> Case:
            return self.rejected(category, "version: bin", self.with_field("version", pack(b"1")), "bad_field")

        def feature_bin() -> Case:
            return self.rejected(category, "features.amount: bin", self.with_feature(pack(b"12.5")), "bad_feature")

        def bin_under_unknown_key() -> Case:
            body = self.req()
            return self.answered(category, "bin (and str-looking bin) under unknown keys",
                                 pack({**body, "blob": b"\xff" * 1000, "name": b"id"}), body)

        return [id_bin, card_bin, merchant_bin, reply_to_bin, version_bin, feature_bin, bin_under_unknown_key]

    def _map_keys(self) -> list[Callable[[], Case]]:
        category = "non_str_keys"

        def int_keys_top() -> Case:
            body = self.req()
            value = raw_map([*pairs_of(body), (pack(1), pack("x")), (pack(-5), pack([1])), (pack(1 << 40), pack({})),
                             (pack(INT64_MIN), pack(None))])
            return self.answered(category, "int keys (1, -5, 2**40, int64 min) at the top level", value, body)

        def other_keys_top() -> Case:
            body = self.req()
            value = raw_map([*pairs_of(body), (pack(1.5), pack(1)), (pack(True), pack(2)), (pack(None), pack(3)),
                             (pack([1, 2]), pack("array key")), (pack({"a": 1}), pack("map key")),
                             (pack(b"bin key"), pack(4))])
            return self.answered(category, "float, bool, nil, array, map and bin keys at the top level", value, body)

        def int_key_in_entities() -> Case:
            body = self.req()
            entities = [*pairs_of(body.pop("entities")), (pack(7), pack("card-x")), (pack(0), pack(1))]
            return self.answered(category, "an int key among the entities",
                                 raw_map([*pairs_of(body), (pack("entities"), raw_map(entities))]), body)

        def int_key_in_features() -> Case:
            body = self.req()
            features = [*pairs_of(body.pop("features")), (pack(3), pack(1.0)), (pack(-1), pack(math.nan))]
            return self.answered(category, "int keys among the features (one holding NaN)",
                                 raw_map([*pairs_of(body), (pack("features"), raw_map(features))]), body)

        def only_int_keys() -> Case:
            body = self.req()
            value = raw_map([(pack(index), pack(item)) for index, item in enumerate(body.values())])
            return self.rejected(category, "every top-level key an int (0: the id, ...)", value, "missing_id")

        def bin_keys() -> Case:
            body = self.req()
            value = raw_map([(pack(key.encode()), pack(item)) for key, item in body.items()])
            return self.rejected(category, "every top-level key a bin (b'id', ...)", value, "missing_id")

        def int_entity_keys() -> Case:
            body = self.req()
            entities = [(pack(index), pack(item)) for index, item in enumerate(body.pop("entities").values())]
            return self.rejected(category, "entities keyed by ints only",
                                 raw_map([*pairs_of(body), (pack("entities"), raw_map(entities))]), "missing_entity")

        def int_feature_keys() -> Case:
            body = self.req()
            features = [(pack(index), pack(item)) for index, item in enumerate(body.pop("features").values())]
            return self.rejected(category, "features keyed by ints only (amount has no default)",
                                 raw_map([*pairs_of(body), (pack("features"), raw_map(features))]),
                                 "missing_feature")

        return [int_keys_top, other_keys_top, int_key_in_entities, int_key_in_features, only_int_keys, bin_keys,
                int_entity_keys, int_feature_keys]

    def _utf8(self) -> list[Callable[[], Case]]:
        category = "invalid_utf8"

        def bad() -> bytes:
            return self.rng.choice(BAD_UTF8)

        def id_invalid() -> Case:
            data = bad()
            return self.rejected(category, f"id: str of invalid UTF-8 ({data!r})", self.with_field("id", raw_str(data)),
                                 "bad_id", NOT_UTF8)

        def card_invalid() -> Case:
            data = bad()
            return self.rejected(category, f"entities.card_id: invalid UTF-8 ({data!r})",
                                 self.with_entity("card_id", raw_str(data)), "bad_entity", NOT_UTF8)

        def reply_to_invalid() -> Case:
            topic = self.reply_topic.encode() + b"\xff"
            return self.rejected(category, "reply_to: a valid topic and a 0xff byte",
                                 self.with_field("reply_to", raw_str(topic)), "bad_field", NOT_UTF8)

        def version_invalid() -> Case:
            return self.rejected(category, "version: invalid UTF-8", self.with_field("version", raw_str(bad())),
                                 "bad_field", NOT_UTF8)

        def under_unknown_keys() -> Case:
            body = self.req()
            value = raw_map([*pairs_of(body), (pack("note"), raw_str(b"caf\xe9")),  # Latin-1, not UTF-8
                             (raw_str(b"\xff\xfekey"), pack("value")),
                             (pack("nested"), raw_map([(raw_str(b"\xc0\xaf"), raw_str(b"\xed\xa0\x80"))]))])
            return self.answered(category, "invalid UTF-8 in unknown keys and their values", value, body)

        def in_feature_and_entity_names() -> Case:
            body = self.req()
            entities = [*pairs_of(body.pop("entities")), (raw_str(b"card_id\xff"), pack("card-x"))]
            features = [*pairs_of(body.pop("features")), (raw_str(b"amount\xff"), raw_str(b"\xff"))]
            value = raw_map([*pairs_of(body), (pack("entities"), raw_map(entities)),
                             (pack("features"), raw_map(features))])
            return self.answered(category, "an extra entity and feature whose names are invalid UTF-8", value, body)

        return [id_invalid, card_invalid, reply_to_invalid, version_invalid, under_unknown_keys,
                in_feature_and_entity_names]

    def _deep(self) -> list[Callable[[], Case]]:
        category = "deep_unknown"

        def single(depth: int, nest: Callable[[int], bytes]) -> Callable[[], Case]:
            def make() -> Case:
                body = self.req()
                value = raw_map([*pairs_of(body), (pack("junk"), nest(depth))])
                return self.answered(category, f"{nest.__name__.replace('_', ' ')} {depth:,} deep under an unknown "
                                     f"key", value, body)

            return self.big(make) if depth > 10_000 else make

        def in_batch(depth: int) -> Callable[[], Case]:
            def make() -> Case:
                body = self.req()
                deep = Part(raw_map([*pairs_of(body), (pack("junk"), deep_maps(depth))]), answer=body["id"])
                parts = [self.good_part() for _ in range(self.rng.randint(1, 4))]
                parts.insert(self.rng.randrange(len(parts) + 1), deep)
                parts.append(self.good_part())
                return self.batch("deep_unknown_in_batch", f"batch: good siblings and one element with maps "
                                  f"{depth:,} deep under an unknown key", parts)

            return self.big(make) if depth > 10_000 else make

        def unknown_inside_entities_and_features() -> Case:
            body = self.req()
            entities = [*pairs_of(body.pop("entities")), (pack("extra"), deep_arrays(1000))]
            features = [*pairs_of(body.pop("features")), (pack("extra"), deep_maps(1000))]
            value = raw_map([*pairs_of(body), (pack("entities"), raw_map(entities)),
                             (pack("features"), raw_map(features))])
            return self.answered(category, "1,000 levels under an unknown entity and an unknown feature", value, body)

        def deep_in_read_field(depth: int) -> Callable[[], Case]:
            def make() -> Case:
                return self.rejected(category, f"features.amount: arrays {depth:,} deep (a read field)",
                                     self.with_feature(deep_arrays(depth)), "bad_feature")

            return self.big(make) if depth > 10_000 else make

        def deep_element(depth: int) -> Callable[[], Case]:
            def make() -> Case:
                parts = [self.good_part(), Part(deep_arrays(depth), kind="not_a_map"), self.good_part()]
                return self.batch("deep_unknown_in_batch", f"batch: an element that is arrays {depth:,} deep, good "
                                  "siblings", parts)

            return self.big(make) if depth > 10_000 else make

        return [*(single(depth, nest) for depth in (100, 1_000, 100_000) for nest in (deep_maps, deep_arrays)),
                *(in_batch(depth) for depth in (100, 1_000, 100_000)), unknown_inside_entities_and_features,
                *(deep_in_read_field(depth) for depth in (100, 100_000)),
                *(deep_element(depth) for depth in (1_000, 100_000))]

    def _duplicates(self) -> list[Callable[[], Case]]:
        category = "duplicate_keys"

        def id_bad_then_good() -> Case:
            body = self.req()
            value = raw_map([(pack("id"), pack(12)), *pairs_of(body)])
            return self.answered(category, "'id' twice: an int, then a valid str (the last one counts)", value, body)

        def id_good_then_bad() -> Case:
            body = self.req()
            return self.rejected(category, "'id' twice: a valid str, then an int",
                                 raw_map([*pairs_of(body), (pack("id"), pack(12))]), "bad_id")

        def features_twice() -> Case:
            body = self.req()
            value = raw_map([(pack("features"), pack({"amount": math.nan})), *pairs_of(body)])
            return self.answered(category, "'features' twice: one with NaN, then a valid one", value, body)

        def feature_twice() -> Case:
            body = self.req()
            features = [(pack("amount"), pack(1.0)), (pack("amount"), pack(math.inf))]
            return self.rejected(category, "features.amount twice: 1.0, then inf",
                                 raw_map([*pairs_of({k: v for k, v in body.items() if k != "features"}),
                                          (pack("features"), raw_map(features))]), "bad_feature")

        def entity_twice() -> Case:
            body = self.req()
            entities = [*pairs_of(body.pop("entities")), (pack("card_id"), pack(None))]
            return self.rejected(category, "entities.card_id twice: a card, then nil",
                                 raw_map([*pairs_of(body), (pack("entities"), raw_map(entities))]), "bad_entity")

        return [id_bad_then_good, id_good_then_bad, features_twice, feature_twice, entity_twice]

    def _limits(self) -> list[Callable[[], Case]]:
        def id_of(chars: int, letter: str = "i") -> Callable[[], Case]:
            def make() -> Case:
                base = self._id() + "-"
                request_id = base + letter * (chars - len(base))
                body = {**self.req(), "id": request_id}
                what = f"id of {chars} chars ({letter!r}: {len(letter.encode())} B each)"
                if chars <= MAX_ID_CHARS:
                    return self.answered("limit_id", what, pack(body), body)
                return self.rejected("limit_id", what, pack(body), "bad_id")

            return make

        def empty_id() -> Case:
            return self.rejected("limit_id", "id of 0 chars", pack({**self.req(), "id": ""}), "bad_id")

        def batch_of(size: int) -> Callable[[], Case]:
            def make() -> Case:
                if size <= MAX_BATCH:
                    return self.batch("limit_batch", f"batch message of {size} requests",
                                      [self.good_part() for _ in range(size)])
                value = raw_array([pack(self.req()) for _ in range(size)])
                return self.rejected("limit_batch", f"batch message of {size} requests", value, "too_large")

            return self.big(make)

        def message_of(size: int) -> Callable[[], Case]:
            def make() -> Case:
                value, body = self.sized(size)
                what = f"valid request padded to {size:,} B"
                if size <= MAX_MESSAGE:
                    return self.answered("limit_size", what, value, body)
                return self.rejected("limit_size", what, value, "too_large")

            return self.big(make)

        def bad_id_of_size(size: int) -> Callable[[], Case]:
            def make() -> Case:
                value, _ = self.sized(size, request_id=12)
                return self.rejected("limit_size", f"an int id in a message of {size:,} B", value, "bad_id")

            return self.big(make)

        def letter_edge(extra: int) -> Callable[[], Case]:
            def make() -> Case:
                key = f"{self._id()}-edge".encode()
                value, _ = self.sized(LETTER_LIMIT - len(key) + extra, request_id=12)
                case = self.rejected("limit_size", f"an int id, key + value = {LETTER_LIMIT + extra:,} B", value,
                                     "bad_id")
                case.key = key
                return case

            return self.big(make)

        def reply_to_of(chars: int) -> Callable[[], Case]:
            def make() -> Case:
                if chars == MAX_TOPIC_CHARS:
                    body = self.req(reply_to=self.long_reply_topic)
                    return self.answered("limit_reply_to", f"reply_to of {chars} chars (an existing topic)",
                                         pack(body), body, topic=self.long_reply_topic)
                topic = (self.long_reply_topic + "x" * chars)[:chars]
                return self.rejected("limit_reply_to", f"reply_to of {chars} chars", pack(self.req(reply_to=topic)),
                                     "bad_field")

            return make

        def reply_to_named(topic: str) -> Callable[[], Case]:
            def make() -> Case:
                shown = repr(topic) if len(topic) < 40 else f"of {len(topic)} chars (over the 249 of a topic)"
                return self.rejected("limit_reply_to", f"reply_to {shown} (not a topic name)",
                                     pack(self.req(reply_to=topic)), "bad_field")

            return make

        def integer(field_name: str, value: int, outcome: str) -> Callable[[], Case]:
            def make() -> Case:
                body = self.req(**{field_name: value})
                what = f"{field_name}: {_int_name(value)}"
                if outcome in ("ok", "expired"):
                    return self.answered("limit_int64", what, pack(body), body, status=outcome)
                return self.rejected("limit_int64", what, pack(body), outcome)

            return make

        def entity_int(value: int) -> Callable[[], Case]:
            def make() -> Case:
                body = self.req()
                body["entities"]["card_id"] = value
                return self.answered("limit_int64", f"entities.card_id: int {_int_name(value)} (an unknown card)",
                                     pack(body), body)

            return make

        def amount(value: float | int, outcome: str, as_float32: bool = False) -> Callable[[], Case]:
            def make() -> Case:
                packed = (b"\xca" + struct.pack(">f", value)) if as_float32 else pack(value)
                what = f"features.amount: {value!r}" + (" (as a msgpack float32)" if as_float32 else "")
                if outcome == "ok":
                    body = self.req()
                    body["features"]["amount"] = value
                    encoded = self.with_feature(packed) if as_float32 else pack(body)
                    if as_float32:
                        body = msgpack.unpackb(encoded, raw=False)
                    return self.answered("limit_float32", what, encoded, body)
                return self.rejected("limit_float32", what, self.with_feature(packed), outcome)

            make.__name__ = f"amount_{value!r}_{as_float32}"
            return make

        def amount_list(values: list[Any], outcome: str) -> Callable[[], Case]:
            def make() -> Case:
                what = f"features.amount (size 1): {values!r}"
                body = self.req()
                body["features"]["amount"] = values
                if outcome == "ok":
                    return self.answered("one_element_list", what, pack(body), body)
                return self.rejected("one_element_list", what, pack(body), outcome)

            return make

        def deadline(offset_ms: int | None, outcome: str, absolute: bool = False) -> Callable[[], Case]:
            def make() -> Case:
                value = offset_ms if absolute or offset_ms is None else int(time.time() * 1000) + offset_ms
                body = self.req(deadline_ms=value)
                what = f"deadline_ms: {value!r}" if absolute or value is None else f"deadline_ms: now {offset_ms:+,} ms"
                return self.answered("deadline", what, pack(body), body, status=outcome)

            return make

        def entity_str(chars: int, letter: str = "c") -> Callable[[], Case]:
            def make() -> Case:
                body = self.req()
                body["entities"]["card_id"] = letter * chars
                what = f"entities.card_id: str of {chars} chars ({letter!r}: {len(letter.encode())} B each)"
                if 0 < chars <= MAX_ID_CHARS:
                    return self.answered("limit_str", what + " (an unknown card)", pack(body), body)
                return self.rejected("limit_str", what, pack(body), "bad_entity")

            return make

        def version_str(chars: int) -> Callable[[], Case]:
            def make() -> Case:
                what = f"version: str of {chars} chars"
                body = self.req(version="9" * chars)
                # within the limit it is a version, just not the one served: the worker's screening refuses it
                return self.rejected("limit_str", what, pack(body),
                                     "unknown_version" if 0 < chars <= MAX_ID_CHARS else "bad_field")

            return make

        def wrong(field_name: str, value: Any, kind: str) -> Callable[[], Case]:
            def make() -> Case:
                body = self.req()
                if field_name in ("card_id", "merchant_id"):
                    body["entities"][field_name] = value
                    where = f"entities.{field_name}"
                elif field_name in ("amount", "hour"):
                    body["features"][field_name] = value
                    where = f"features.{field_name}"
                else:
                    body[field_name] = value
                    where = field_name
                shown = _int_name(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
                what = f"{where}: {type(value).__name__} {shown}"
                if kind in ("ok", "expired"):
                    return self.answered("limit_types", what, pack(body), body, status=kind)
                return self.rejected("limit_types", what, pack(body), kind)

            return make

        below_inf = math.nextafter(FLOAT32_TO_INF, 0.0)
        now_ms = int(time.time() * 1000)
        return [
            entity_str(MAX_ID_CHARS), entity_str(MAX_ID_CHARS + 1), entity_str(MAX_ID_CHARS, "é"),
            entity_str(MAX_ID_CHARS + 1, "é"), entity_str(0),
            version_str(MAX_ID_CHARS), version_str(MAX_ID_CHARS + 1), version_str(0),
            reply_to_named("tópico"), reply_to_named("x" * 256),
            wrong("deadline_ms", 1.0, "bad_field"), wrong("deadline_ms", float(now_ms + 3_600_000), "bad_field"),
            wrong("deadline_ms", True, "bad_field"), wrong("deadline_ms", str(now_ms + 3_600_000), "bad_field"),
            wrong("sent_ms", None, "ok"), wrong("sent_ms", 1.0, "bad_field"), wrong("sent_ms", False, "bad_field"),
            wrong("card_id", (1 << 64) - 1, "ok"), wrong("card_id", INT64_MAX + 1, "ok"),
            wrong("card_id", 1.5, "bad_entity"), wrong("card_id", True, "bad_entity"),
            wrong("merchant_id", 7.0, "bad_entity"),
            wrong("amount", True, "bad_feature"), wrong("amount", "12.5", "bad_feature"),
            wrong("amount", INT64_MAX + 1, "ok"), wrong("hour", None, "bad_feature"),
            id_of(MAX_ID_CHARS), id_of(MAX_ID_CHARS + 1), id_of(MAX_ID_CHARS, "é"), id_of(MAX_ID_CHARS + 1, "é"),
            id_of(MAX_ID_CHARS, "😀"), id_of(MAX_ID_CHARS + 1, "😀"), empty_id,
            batch_of(MAX_BATCH), batch_of(MAX_BATCH + 1),
            message_of(MAX_MESSAGE), message_of(MAX_MESSAGE + 1), bad_id_of_size(MAX_MESSAGE),
            letter_edge(0), letter_edge(1),
            reply_to_of(MAX_TOPIC_CHARS), reply_to_of(MAX_TOPIC_CHARS + 1), reply_to_named(""),
            reply_to_named("has space"), reply_to_named("a/b"),
            integer("deadline_ms", INT64_MAX, "ok"), integer("deadline_ms", INT64_MAX + 1, "bad_field"),
            integer("deadline_ms", (1 << 64) - 1, "bad_field"), integer("deadline_ms", INT64_MIN, "expired"),
            integer("sent_ms", INT64_MAX, "ok"), integer("sent_ms", INT64_MAX + 1, "bad_field"),
            integer("sent_ms", INT64_MIN, "ok"),
            entity_int(INT64_MAX), entity_int(INT64_MIN),
            amount(FLOAT32_MAX, "ok"), amount(-FLOAT32_MAX, "ok"), amount(below_inf, "ok"),
            amount(FLOAT32_TO_INF, "bad_feature"), amount(-FLOAT32_TO_INF, "bad_feature"),
            amount(FLOAT32_MAX, "ok", as_float32=True), amount(math.inf, "bad_feature", as_float32=True),
            amount((1 << 64) - 1, "ok"), amount(INT64_MIN, "ok"), amount(5e-324, "ok"),
            amount_list([3.5], "ok"), amount_list([7], "ok"), amount_list([], "bad_feature"),
            amount_list([1.0, 2.0], "bad_feature"), amount_list([math.nan], "bad_feature"),
            amount_list([[1.0]], "bad_feature"),
            deadline(0, "expired", absolute=True), deadline(-1, "expired", absolute=True),
            deadline(None, "ok"), deadline(-5_000, "expired"), deadline(3_600_000, "ok"),
        ]

    def _order(self) -> list[Callable[[], Case]]:
        """Several faults in one request: the first in the documented check order gives the kind (id, entities
        and join keys in the model's order, features in the model's order, deadline_ms, sent_ms, reply_to,
        version)."""
        category = "check_order"
        ext = msgpack.ExtType(42, b"\x01")

        def case(what: str, kind: str, **changes: Any) -> Callable[[], Case]:
            def make() -> Case:
                body = self.req()
                for name, value in changes.items():
                    if name in ("card_id", "merchant_id"):
                        if value is _ABSENT:
                            del body["entities"][name]
                        else:
                            body["entities"][name] = value
                    elif name in ("amount", "hour", "is_foreign"):
                        if value is _ABSENT:
                            del body["features"][name]
                        else:
                            body["features"][name] = value
                    elif value is _ABSENT:
                        del body[name]
                    else:
                        body[name] = value
                return self.rejected(category, what, pack(body), kind)

            return make

        return [
            case("id an int, entities an ext, features NaN", "bad_id", id=7, entities=ext,
                 features={"amount": math.nan}),
            case("no id, entities a list", "missing_id", id=_ABSENT, entities=[1]),
            case("entities a str, features a str", "bad_entities", entities="card-1", features="x"),
            case("card_id absent, merchant_id a float", "missing_entity", card_id=_ABSENT, merchant_id=1.5),
            case("card_id a float, merchant_id absent", "bad_entity", card_id=1.5, merchant_id=_ABSENT),
            case("merchant_id a bool, features a list", "bad_entity", merchant_id=True, features=[1.0]),
            case("features an int, deadline_ms a str", "bad_features", features=3, deadline_ms="soon"),
            case("amount absent (no default), hour NaN", "missing_feature", amount=_ABSENT, hour=math.nan),
            case("amount inf, is_foreign a str", "bad_feature", amount=math.inf, is_foreign="no"),
            case("hour a bool, deadline_ms a float, version an int", "bad_feature", hour=False, deadline_ms=1.5,
                 version=3),
            case("deadline_ms a str, reply_to '.'", "bad_field", deadline_ms="x", reply_to="."),
            case("reply_to 250 chars, version '999' (not served)", "bad_field", reply_to="r" * 250, version="999"),
        ]

    def _batches(self) -> list[Callable[[], Case]]:
        category = "batch_bad_elements"
        ext = msgpack.ExtType(42, b"\x01")

        def bad_part(choice: int) -> Part:
            body = self.req()
            if choice == 0:
                return Part(pack(ext), kind="not_a_map")
            if choice == 1:
                return Part(pack(None), kind="not_a_map")
            if choice == 2:
                return Part(self.with_field("id", pack(self._id().encode())), kind="bad_id")
            if choice == 3:
                return Part(self.with_field("id", raw_str(self.rng.choice(BAD_UTF8))), kind="bad_id")
            if choice == 4:
                return Part(pack({**body, "id": "x" * (MAX_ID_CHARS + 1)}), kind="bad_id")
            if choice == 5:
                return Part(raw_map([(pack(index), pack(item)) for index, item in enumerate(body.values())]),
                            kind="missing_id")
            if choice == 6:
                return Part(pack([self.req()]), kind="not_a_map")  # a batch inside a batch
            if choice == 7:
                return Part(pack({}), kind="missing_id")
            if choice == 8:
                return Part(self.with_entity("card_id", pack(b"card-1")), kind="bad_entity")
            if choice == 9:
                return Part(self.with_feature(pack(msgpack.Timestamp(1, 0))), kind="bad_feature")
            if choice == 10:
                return Part(pack({**body, "reply_to": "x" * (MAX_TOPIC_CHARS + 1)}), kind="bad_field")
            if choice == 11:
                return Part(pack({**body, "deadline_ms": INT64_MAX + 1}), kind="bad_field")
            if choice == 12:  # the worker's screening, after the decoder: a version it does not serve
                return Part(pack({**body, "version": "999"}), kind="unknown_version")
            return Part(pack({**body, "reply_to": "__consumer_offsets"}), kind="bad_field")  # a topic Kafka refuses

        def bad_part_with_id(choice: int) -> Part:
            part = bad_part(choice)
            if part.kind in AFTER_ID:
                return Part(part.value, kind=part.kind, request_id=self.last_id)
            return part

        def mixed() -> Case:
            parts = [self.good_part() for _ in range(self.rng.randint(1, 6))]
            for choice in self.rng.sample(range(BAD_PARTS), self.rng.randint(1, 5)):
                parts.insert(self.rng.randrange(len(parts) + 1), bad_part_with_id(choice))
            expired = self.req(deadline_ms=0)
            parts.insert(self.rng.randrange(len(parts) + 1), Part(pack(expired), answer=expired["id"],
                                                                  status="expired"))
            return self.batch(category, "batch: bad elements of each kind among good ones", parts)

        def every_kind() -> Case:
            parts = [bad_part_with_id(choice) for choice in range(BAD_PARTS)]
            self.rng.shuffle(parts)
            parts.insert(6, self.good_part())
            return self.batch(category, f"batch: one bad element of each of {BAD_PARTS} sorts and one good one", parts)

        def all_bad() -> Case:
            return self.batch(category, "batch: only bad elements",
                              [bad_part_with_id(self.rng.randrange(BAD_PARTS)) for _ in range(self.rng.randint(2, 20))])

        return [mixed, every_kind, all_bad]


BAD_PARTS = 14
"""How many sorts of bad batch element ``Contract._batches`` makes."""
_ABSENT = object()


def _int_name(value: int) -> str:
    names = {INT64_MAX: "int64 max", INT64_MAX + 1: "int64 max + 1", INT64_MIN: "int64 min",
             (1 << 64) - 1: "uint64 max"}
    if abs(value) < 1 << 40:
        return str(value)
    return names.get(value, str(value))



class ForeignProducer:
    """A producer the project did not write: confluent-kafka (librdkafka), as a user's own client would send
    requests, null values (tombstones) and null keys included. ``produce`` only queues (librdkafka sends from
    its own threads); ``flush`` waits until Kafka acknowledged everything."""

    def __init__(self, bootstrap: str, topic: str, max_message_bytes: int = 8 * MIB) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                                  "linger.ms": 5, "message.max.bytes": max_message_bytes,
                                  "client.id": "hostile-librdkafka"})
        self.attempted_ids: set[str] = set()
        self.sent_ids: set[str] = set()
        self.produced = 0
        self.acked = 0
        self.errors: list[str] = []

    def produce(self, key: bytes | None, value: bytes | None, ids: Sequence[str] = ()) -> None:
        self.attempted_ids.update(ids)
        self.produced += 1

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                self.errors.append(f"{key!r}: {error}")
                return
            self.acked += 1
            self.sent_ids.update(ids)

        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, on_delivery=delivered)
                break
            except BufferError:  # librdkafka's queue is full: serve deliveries, then queue again
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout: float = 120.0) -> None:
        """Wait for every acknowledgement; fail on any message Kafka did not take."""
        left = self.producer.flush(timeout)
        assert left == 0, f"librdkafka still holds {left} messages after {timeout:.0f} s"
        assert not self.errors, f"Kafka refused {len(self.errors)} messages from librdkafka: {self.errors[:5]}"
        assert self.acked == self.produced, (self.acked, self.produced)


def demo_spec() -> DecodeSpec:
    """The fraud model's decode spec without a library (the requests of ``harness.request``): its join keys and
    its request features, ``amount`` without a default (the contract cases rely on that)."""
    return DecodeSpec(entity_keys=("card_id", "merchant_id"),
                      request_features=(RequestFeature("amount"), RequestFeature("hour", 1, 12.0),
                                        RequestFeature("is_foreign", 1, 0.0)))


def offline_contract(seed: int = 3) -> Contract:
    """The contract cases for a check without Kafka (no topic is written to)."""
    generator = Generator("offline", [f"card-{n}" for n in range(10)], [f"merchant-{n}" for n in range(5)],
                          "offline.replies.hostile", seed)
    return Contract(generator, "offline.replies.hostile", "offline.replies.long-".ljust(MAX_TOPIC_CHARS, "x"))


def decoder_disagreements(cases: Sequence[Case], spec: DecodeSpec, decode: Callable[..., Any]) -> list[str]:
    """Where a decoder's result differs from the contract cases' documented outcomes (the decoder's share of
    them: which elements are refused and why, the bytes a dead letter of an element would carry, the ids
    decoded, the expiry their deadline gives, their reply_to)."""
    disagreements = []
    now_ms = int(time.time() * 1000)
    for case in cases:
        try:
            decoded = decode([case.value], spec)
        except Exception as error:
            disagreements.append(f"{case.category}: {case.input}: the decoder raised {error!r}")
            continue
        data = case.value or b""
        got_errors = sorted((error.element_index, error.kind,
                             None if error.span is None else hashlib.sha256(data[error.span[0]:error.span[1]])
                             .hexdigest()) for error in decoded.errors)
        if case.kind is not None:
            wanted_errors = [(-1, case.kind, None)]
        else:
            wanted_errors = sorted((index, part.kind, hashlib.sha256(part.value).hexdigest())
                                   for index, part in enumerate(case.parts or ()) if part.kind is not None)
        got_answers = {}
        for row, request_id in enumerate(decoded.ids):
            # the worker's screening after the decoder (no contract case pins the served version)
            if decoded.version[row] is not None or decoded.reply_to[row] in REFUSED_REPLY_TO:
                start, end = (int(offset) for offset in decoded.span[row])
                got_errors.append((int(decoded.element[row]), "unknown_version" if decoded.version[row] is not None
                                   else "bad_field", hashlib.sha256(data[start:end]).hexdigest()))
            else:
                got_answers[request_id] = ("expired" if decoded.deadline_ms[row] <= now_ms else "ok",
                                           decoded.reply_to[row])
        got_errors.sort()
        if case.kind is not None and len(decoded.ids) == 1 and got_errors and got_errors[0][0] == -1:
            got_errors = [(-1, got_errors[0][1], None)]  # a single request screened: the whole message
        wanted_answers = {request_id: (status, case.topic) for request_id, status in case.answers.items()}
        if got_errors != wanted_errors or got_answers != wanted_answers:
            errors = [(error.element_index, error.kind, error.detail) for error in decoded.errors]
            disagreements.append(f"{case.category}: {case.input}: expected {case.expected()}; the decoder: "
                                 f"{len(decoded.ids)} decoded {sorted(Counter(v[0] for v in got_answers.values()))}, "
                                 f"errors {errors[:6]}")
    return disagreements


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
    contract_mismatches: list[str] = field(default_factory=list)
    """Contract cases whose outcome differs from the documented one (must be empty)."""
    contract_rows: list[ContractRow] = field(default_factory=list)
    foreign_messages: int = 0
    """Messages produced with confluent-kafka."""


async def hostile(scenario: Scenario, bad_count: int, good_count: int, oversized: int, rate: float,
                  seed: int = 16, contract_count: int = 0, fixed_rounds: int = 1) -> HostileOutcome:
    """Hostile messages interleaved with valid ones through one worker, its RSS sampled all along:
    ``contract_count`` of the ``bad_count`` are random light contract cases, and every contract variant is sent
    ``fixed_rounds`` times on top."""
    reply_topic = f"{scenario.prefix}.replies.hostile"
    long_reply_topic = f"{scenario.prefix}.replies.long-".ljust(MAX_TOPIC_CHARS, "x")
    scenario.extra_env["STREAMSCORE_WORKER__RELOAD_INTERVAL_S"] = "0"
    # the request topic takes messages up to 4 MiB, so the oversized ones (> 1 MiB) reach the worker
    await scenario.create_topics({"max.message.bytes": str(4 * MIB)}, extra_topics=[reply_topic, long_reply_topic])
    spec, version = model_spec(scenario)
    generator = Generator(scenario.prefix, scenario.library.cards, scenario.library.merchants, reply_topic, seed)
    contract = Contract(generator, reply_topic, long_reply_topic)
    expected = Expected()
    worker = scenario.worker("hostile")
    started = time.monotonic()
    async with streaming(scenario, worker, follow=[reply_topic, long_reply_topic]) as collector:
        start_rss = worker.rss_kb()
        sampling = asyncio.create_task(_sample_rss(worker))
        load = Load(scenario.settings, scenario.requests_topic, rate, max_request_size=4 * MIB)
        assert scenario.settings.kafka.security_protocol == "PLAINTEXT", "the librdkafka producer speaks PLAINTEXT"
        foreign = ForeignProducer(scenario.settings.kafka.bootstrap, scenario.requests_topic)
        try:
            await load.send_all(generator.messages(bad_count, good_count, oversized, spec, version, expected,
                                                   contract, contract_count, fixed_rounds, foreign))
            await asyncio.to_thread(foreign.flush)
            sent_s = time.monotonic() - started
            await collector.settle(lambda: _complete(collector, expected), timeout=180)
            await wait_for(lambda: worker.alive, 1, "the worker alive")
        finally:
            sampling.cancel()
        assert worker.alive, f"the worker died:\n{worker.log_tail()}"
    result = tally(scenario.name, collector, expected.answer_ids, load.attempted_ids | foreign.attempted_ids,
                   expected.letters, seconds=time.monotonic() - started)
    result.sent = len(expected.answer_ids) + sum(expected.letters.values())
    by_key: dict[bytes | None, Counter[str]] = {}
    for letter in collector.letters:
        by_key.setdefault(letter.key, Counter())[letter.kind] += 1
    mismatched = [(key, kinds, expected.letters[key]) for key, kinds in by_key.items()
                  if sum(kinds.values()) != expected.letters[key]]
    mismatched += [(key, Counter(), count) for key, count in expected.letters.items() if count and key not in by_key]
    contract_cases = sum(len(cases) for cases in expected.cases.values())
    result.notes.update(bad_messages=expected.bad_messages, oversized=oversized, contract_cases=contract_cases,
                        via_librdkafka=foreign.produced, sent_after_s=round(sent_s, 1),
                        max_rss_mb=round(worker.max_rss_kb / 1024, 1), start_rss_mb=round(start_rss / 1024, 1))
    not_marked = [(request_id, collector.first.get(request_id, {}).get("degraded"))
                  for request_id in expected.unknown_entity_ids
                  if not any(":missing:" in item for item in collector.first.get(request_id, {}).get("degraded", ()))]
    result.notes["dead_letter_kinds"] = dict(sorted(Counter(letter.kind for letter in collector.letters).items()))
    mismatches, rows = contract_check(collector, expected, scenario.predictions_topic)
    result.notes["contract_mismatches"] = len(mismatches)
    (scenario.folder / "contract.md").write_text(contract_table(rows))
    return HostileOutcome(result, expected, Counter(letter.kind for letter in collector.letters), mismatched,
                          worker.max_rss_kb / 1024, start_rss / 1024, not_marked, mismatches, rows, foreign.produced)


@dataclass
class ContractRow:
    """The cases of one input (category and description): what the contract says and what came back."""

    category: str
    input: str
    expected: str
    observed: Counter[str] = field(default_factory=Counter)
    """What came back, in the words of the expectation where it matched it exactly, else in detail."""
    mixes: set[str] = field(default_factory=set)
    """The distinct expectations of the row's cases (more than one for the random batch mixes)."""
    cases: int = 0
    failed: int = 0
    via_librdkafka: int = 0


def _observed_letter(letter: Letter) -> str:
    value = "null" if letter.value_sha256 is None else f"{letter.value_size} B sha256 {letter.value_sha256[:12]}"
    cut = f", original-bytes {letter.original_bytes}" if letter.original_bytes is not None else ""
    return f"dlq {letter.kind} [{letter.element}], value {value}{cut}"


def contract_check(collector: Collector, expected: Expected, predictions_topic: str
                   ) -> tuple[list[str], list[ContractRow]]:
    """Every contract case against what came back: its dead letters (kind, element, exact value) and its
    answers (status, topic, exactly one). Returns the mismatches and one row per distinct input."""
    letters: dict[bytes | None, list[Letter]] = {}
    for letter in collector.letters:
        if letter.key in expected.cases:
            letters.setdefault(letter.key, []).append(letter)
    lettered_ids = {letter.request_id: letter for letter in collector.letters if letter.request_id}
    mismatches: list[str] = []
    rows: dict[tuple[str, str], ContractRow] = {}
    for key, cases in expected.cases.items():
        got = list(letters.get(key, []))
        unmatched = []
        for want in (want for case in cases for want in case.letters()):
            at = next((index for index, letter in enumerate(got) if want.matches(letter)), None)
            if at is None:
                unmatched.append(want)
            else:
                got.pop(at)
        letters_ok = not unmatched and not got
        detail = [_observed_letter(letter) for letter in letters.get(key, [])]
        for case in cases:
            # the letters matched the documented ones exactly (kind, element, value): say it in the same words
            observed: Counter[str] = Counter(case.letter_words() if letters_ok else detail)
            answers_ok = True
            for request_id, status in case.answers.items():
                first = collector.first.get(request_id)
                if first is None:
                    letter = lettered_ids.get(request_id)
                    seen = _observed_letter(letter) if letter else "nothing"
                else:
                    topic = first.get("topic")
                    seen = f"answered {first['status']}"
                    if topic != predictions_topic:
                        seen += f" on {len(topic or '')}-char reply_to"
                    if collector.counts[request_id] > 1:
                        seen += f" x{collector.counts[request_id]}"
                wanted = f"answered {status}" + (f" on {len(case.topic)}-char reply_to" if case.topic else "")
                answers_ok &= seen == wanted
                observed[seen] += 1
            row = rows.setdefault((case.category, case.input), ContractRow(case.category, case.input,
                                                                           case.expected()))
            row.cases += 1
            row.mixes.add(case.expected())
            row.via_librdkafka += case.foreign
            row.observed.update(observed)
            if not (letters_ok and answers_ok):
                row.failed += 1
                wanted = "; ".join(f"{want.kind} [{want.element}] {want.value_size} B sha256 "
                                   f"{(want.value_sha256 or 'null')[:12]}" for want in case.letters())
                mismatches.append(f"{case.category}: {case.input} (key {key!r}): expected {case.expected()} "
                                  f"[{wanted}]; observed {_summary(observed) or 'nothing'} [{'; '.join(detail)}]")
    return mismatches, list(rows.values())


def _summary(observed: Counter[str]) -> str:
    return "; ".join(f"{count} {what}" if count > 1 else what for what, count in sorted(observed.items()))


def contract_table(rows: Sequence[ContractRow]) -> str:
    """A markdown table of the contract rows: input, documented outcome, observed outcome."""
    lines = ["| category | input | expected (docs/wire-format.md) | observed | cases | librdkafka | failed |",
             "|---|---|---|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda row: (row.category, row.input)):
        if len(row.mixes) > 1:  # random mixes: one example, and whether every case came back as documented
            expected = f"e.g. {row.expected} ({len(row.mixes)} mixes)"
            observed = f"as documented in {row.cases - row.failed} of {row.cases}"
        else:
            expected = row.expected
            observed = _summary(Counter({what: count // max(1, row.cases) for what, count in row.observed.items()}))
        lines.append(f"| {row.category} | {row.input} | {expected} | {observed} | {row.cases} | "
                     f"{row.via_librdkafka} | {row.failed} |")
    return "\n".join(lines) + "\n"


def _complete(collector: Collector, expected: Expected) -> bool:
    if not expected.answer_ids <= collector.counts.keys():
        return False
    return len(collector.letters) >= sum(expected.letters.values())


async def _sample_rss(worker: Any) -> None:
    while True:
        worker.rss_kb()
        await asyncio.sleep(0.2)

