"""The compiled fast path and its pure-Python twin give the same results, on good, edge and malformed input.

Both modules are imported directly, whichever one ``streamscore.fastpath`` selected. Messages are written by a
small msgpack writer of our own so that the tests can produce what ``msgpack.packb`` never does: repeated map
keys, non-minimal headers (a short str in str16, a small int in uint64), invalid UTF-8, bad timestamps, maps as
map keys, nesting far past msgpack's 1024 levels. Every decode compares the two twins (``decode_both``), and
checks each row's and each element error's byte span against the message itself.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import random
import struct
from collections import OrderedDict
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any
from unittest import mock

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamscore import fastpath
from streamscore.fastpath import _pure, parse_flag
from streamscore.fastpath._types import (
    BAD_ENTITIES,
    BAD_ENTITY,
    BAD_FEATURE,
    BAD_FEATURES,
    BAD_FIELD,
    BAD_ID,
    EMPTY_BATCH,
    EMPTY_VALUE,
    ERROR_KINDS,
    MISSING_ENTITY,
    MISSING_FEATURE,
    MISSING_ID,
    NO_DEADLINE,
    NOT_A_MAP,
    NULL_VALUE,
    TOO_LARGE,
    UNDECODABLE,
    DecodedBatch,
    DecodeError,
    DecodeSpec,
    InputColumn,
    PredictionBatch,
    RequestFeature,
    ViewBlock,
)

try:
    from streamscore.fastpath import _fast
except ImportError:  # pragma: no cover - only a pure-Python install lacks it, and only the twin run allows that
    if not parse_flag("STREAMSCORE_PUREPYTHON", os.environ.get("STREAMSCORE_PUREPYTHON")):
        raise
    pytest.skip("the compiled fast path is not built", allow_module_level=True)

IMPLEMENTATIONS = [pytest.param(_pure, id="pure"), pytest.param(_fast, id="compiled")]
PARITY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPEC = DecodeSpec(
    entity_keys=("card_id", "merchant_id"),
    request_features=(RequestFeature("amount"), RequestFeature("vec", size=3), RequestFeature("hour", default=12.0)),
)


# ------------------------------------------------------------------------------------------------------------
# A msgpack writer that can repeat keys and pick any header width
# ------------------------------------------------------------------------------------------------------------


class Pairs(list):
    """A msgpack map written as exactly these (key, value) pairs: keys may repeat (the last one wins)."""


class Raw(bytes):
    """Bytes written into the message as they are (for invalid UTF-8, bad timestamps, 0xc1...)."""


def _header(size: int, fix: int, fix_limit: int, heads: Sequence[tuple[int, int]], rng: random.Random) -> bytes:
    """The smallest header that fits, or (sometimes) a wider one: msgpack readers must accept both."""
    forms = [bytes([fix | size])] if size < fix_limit else []
    forms += [struct.pack(f">B{code}", head, size) for head, code in heads if size < 1 << (8 * struct.calcsize(code))]
    return forms[0] if rng.random() < 0.8 else rng.choice(forms)


def pack(value: Any, rng: random.Random) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, dict | Pairs):
        items = list(value.items()) if isinstance(value, dict) else list(value)
        head = _header(len(items), 0x80, 16, [(0xDE, "H"), (0xDF, "I")], rng)
        return head + b"".join(pack(key, rng) + pack(item, rng) for key, item in items)
    if isinstance(value, list):
        return _header(len(value), 0x90, 16, [(0xDC, "H"), (0xDD, "I")], rng) + b"".join(
            pack(item, rng) for item in value)
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return _header(len(data), 0xA0, 32, [(0xD9, "B"), (0xDA, "H"), (0xDB, "I")], rng) + data
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.2:
        return struct.pack(">BQ", 0xCF, value) if value >= 1 << 63 else struct.pack(">Bq", 0xD3, value)
    if isinstance(value, float) and rng.random() < 0.3:
        with np.errstate(over="ignore"):  # float32 on the wire: rounded, maybe to inf
            return b"\xca" + np.array([value], dtype=">f4").tobytes()
    return msgpack.packb(value, use_bin_type=True)


def nested(depth: int, leaf: bytes = b"\x01", kinds: str = "am") -> bytes:
    """``depth`` containers around ``leaf``, cycling through ``kinds``: a (array of 1), m (map {"k": ...}),
    k (map {...: 1}, the nesting goes through a map key), x (array of 2, the nesting in the first element)."""
    heads = {"a": (b"\x91", b""), "m": (b"\x81\xa1k", b""), "k": (b"\x81", b"\x01"), "x": (b"\x92", b"\xc0")}
    opening = b"".join(heads[kinds[level % len(kinds)]][0] for level in range(depth))
    closing = b"".join(heads[kinds[level % len(kinds)]][1] for level in reversed(range(depth)))
    return opening + leaf + closing


# ------------------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------------------

@st.composite
def mostly(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """Valid most of the time, so that a request gets past one check often enough to reach the next.

    (Weighted by hand: ``st.one_of(good, good, bad)`` drops the repeated strategy and picks 50/50.)
    """
    return draw(bad) if draw(st.integers(0, 9)) == 9 else draw(good)


INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
MSGPACK_INTS = st.one_of(st.integers(-40, 300), INT64, st.integers(1 << 63, (1 << 64) - 1),
                         st.sampled_from([0, -1, 127, 128, -32, -33, 1 << 31, (1 << 64) - 1, -(1 << 63),
                                          (1 << 60) + (1 << 36) + 1, 16777217]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e6, 1e6),
                   st.sampled_from([3.4028235e38, 3.4028236e38, 2.0**128 - 2.0**103, -1e39, 1e-46, -0.0]))
TEXT = st.one_of(st.text(max_size=12), st.text(alphabet="ab-._Zé€😀", max_size=12), st.just(""))
LONG_TEXT = st.text(min_size=250, max_size=300, alphabet="abé")  # around max_str_len=256, in characters
TOPICS = mostly(st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True), st.one_of(st.just("a" * 250), TEXT))
# Valid msgpack framing that msgpack.unpackb refuses (the byte walkers accept it where it is not read).
INVALID_UTF8 = st.sampled_from([Raw(b"\xa2\xc3\x28"), Raw(b"\xa3\xed\xa0\x80"), Raw(b"\xa2\xc0\xaf"),
                                Raw(b"\xa4\xf4\x90\x80\x80"), Raw(b"\xd9\x01\xff"), Raw(b"\xa1\x80")])
BAD_EXT = st.sampled_from([Raw(b"\xd4\xfe\x00"), Raw(b"\xc7\x03\xff\x00\x00\x00"),
                           Raw(b"\xd7\xff" + struct.pack(">Q", 10**9 << 34)), Raw(b"\xc7\x00\x80")])
DEEP = st.builds(lambda depth, leaf, kinds: Raw(nested(depth, leaf, kinds)),
                 st.sampled_from([63, 64, 65, 1023, 1025, 3000]),
                 st.sampled_from([b"\x01", b"\x90", b"\x80", b"\xa1x", b"\xa2\xc3\x28"]),
                 st.sampled_from(["a", "m", "am", "k", "akm", "x"]))
SCALARS = st.one_of(st.none(), st.booleans(), MSGPACK_INTS, FLOATS, TEXT, st.binary(max_size=8),
                    st.builds(msgpack.Timestamp, INT64, st.integers(0, 10**9 - 1)),
                    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
                    INVALID_UTF8, BAD_EXT, DEEP)
HASHABLE_KEYS = st.one_of(TEXT, MSGPACK_INTS, st.none(), st.binary(max_size=4), st.booleans(), INVALID_UTF8,
                          st.sampled_from([Raw(b"\x91\x01"), Raw(b"\x80"), Raw(nested(70))]))
ANY_VALUE = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(HASHABLE_KEYS, children, max_size=4)), max_leaves=12)
NUMBERS = st.one_of(FLOATS, MSGPACK_INTS)
GOOD_NUMBERS = st.one_of(st.floats(-1e30, 1e30), st.integers(-(1 << 40), 1 << 40), MSGPACK_INTS)
GOOD_TEXT = st.one_of(st.text(min_size=1, max_size=12), st.text(alphabet="ab-._Zé€😀", min_size=1, max_size=12))
FIELD_NAMES = ["id", "entities", "features", "deadline_ms", "sent_ms", "reply_to", "version"]


@st.composite
def maps(draw: st.DrawFn, wanted: dict[str, st.SearchStrategy[Any]], noise_keys: st.SearchStrategy[Any]) -> Pairs:
    """A map with (usually) the wanted keys, unknown keys, shuffled, sometimes a key twice."""
    pairs = Pairs((name, draw(strategy)) for name, strategy in wanted.items() if draw(st.integers(0, 15)) != 15)
    pairs += draw(st.lists(st.tuples(noise_keys, ANY_VALUE), max_size=2))
    pairs = Pairs(draw(st.permutations(pairs)))
    if pairs and draw(st.integers(0, 4)) == 0:
        key, _ = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(ANY_VALUE)))
    return pairs


def _feature_values(size: int) -> st.SearchStrategy[Any]:
    if size == 1:  # a number, or a list of one number
        return mostly(st.one_of(GOOD_NUMBERS, st.lists(GOOD_NUMBERS, min_size=1, max_size=1)),
                      st.one_of(NUMBERS, SCALARS, st.lists(st.one_of(NUMBERS, SCALARS), max_size=2)))
    near_sizes = st.lists(NUMBERS, min_size=max(0, size - 1), max_size=size + 1)
    return mostly(st.lists(GOOD_NUMBERS, min_size=size, max_size=size), st.one_of(NUMBERS, near_sizes, SCALARS))


@st.composite
def specs(draw: st.DrawFn) -> DecodeSpec:
    names = st.sampled_from(["card_id", "merchant_id", "é", "amount", "vec", "x", "id", "", "\ud800"])
    features = draw(st.lists(st.builds(RequestFeature, names, st.integers(0, 3),
                                       st.one_of(st.none(), st.floats(-10, 10))), max_size=4))
    return DecodeSpec(entity_keys=tuple(draw(st.lists(names, max_size=3))), request_features=tuple(features),
                      max_str_len=draw(st.sampled_from([3, 8, 256, 256])),
                      max_requests_per_message=draw(st.sampled_from([2, 4096, 4096])),
                      max_message_bytes=draw(st.sampled_from([64, 1 << 20, 1 << 20])))


@st.composite
def requests(draw: st.DrawFn, spec: DecodeSpec) -> Pairs:
    """A request map: mostly well formed, with any field possibly missing, wrong-typed, repeated or extreme."""
    entity_map = maps({name: mostly(st.one_of(GOOD_TEXT, MSGPACK_INTS), st.one_of(TEXT, LONG_TEXT, SCALARS))
                       for name in spec.entity_keys}, HASHABLE_KEYS)
    feature_map = maps({feature.name: _feature_values(feature.size) for feature in spec.request_features},
                       HASHABLE_KEYS)
    wanted = {
        "id": mostly(GOOD_TEXT, st.one_of(TEXT, LONG_TEXT, SCALARS)),
        "entities": mostly(entity_map, SCALARS),
        "features": mostly(feature_map, SCALARS),
        "deadline_ms": mostly(st.one_of(INT64, st.none()), st.one_of(MSGPACK_INTS, SCALARS)),
        "sent_ms": mostly(st.one_of(INT64, st.none()), st.one_of(MSGPACK_INTS, SCALARS)),
        "reply_to": mostly(st.one_of(TOPICS, st.none()), SCALARS),
        "version": mostly(st.one_of(GOOD_TEXT, st.none()), st.one_of(TEXT, LONG_TEXT, SCALARS)),
    }
    return draw(maps(wanted, st.one_of(HASHABLE_KEYS, st.sampled_from(FIELD_NAMES))))


@st.composite
def messages(draw: st.DrawFn, spec: DecodeSpec) -> bytes:
    """One message: a request, an array of requests (and non-requests), or any msgpack value."""
    rng = random.Random(draw(st.integers(0, 1 << 30)))
    shape = draw(st.integers(0, 9))
    if shape <= 5:
        value: Any = draw(requests(spec))
    elif shape <= 8:
        value = draw(st.lists(st.one_of(requests(spec), requests(spec), ANY_VALUE), max_size=5))
    else:
        value = draw(ANY_VALUE)
    return pack(value, rng)


@st.composite
def message_values(draw: st.DrawFn, spec: DecodeSpec) -> Any:
    """What a Kafka consumer may hand over as a value: mostly bytes, sometimes a tombstone (None), no byte, a
    bytearray or memoryview, or something that is not bytes at all."""
    shape = draw(st.integers(0, 19))
    if shape == 0:
        return None
    if shape == 1:
        return draw(st.sampled_from([b"", bytearray(), "a str", 17, 1.5, ["a", "list"], object()]))
    message = draw(messages(spec))
    if shape == 2:
        return bytearray(message)
    if shape == 3:
        return memoryview(message)
    return message


@st.composite
def spec_and_messages(draw: st.DrawFn, fixed_spec: bool = False) -> tuple[DecodeSpec, list[Any]]:
    spec = SPEC if fixed_spec else draw(specs())
    return spec, draw(st.lists(message_values(spec), max_size=6))


# ------------------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------------------


def error_rows(batch: DecodedBatch) -> list[tuple]:
    return [(error.message_index, error.element_index, error.kind, error.request_id, error.detail, error.span)
            for error in batch.errors]


def assert_same(expected: DecodedBatch, actual: DecodedBatch) -> None:
    assert actual.ids == expected.ids
    assert actual.entities == expected.entities
    for name in ("features", "deadline_ms", "sent_ms", "source", "element", "span"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    assert actual.reply_to == expected.reply_to
    assert actual.version == expected.version
    assert error_rows(actual) == error_rows(expected)
    for column in (*actual.entities, actual.ids, actual.reply_to, actual.version):
        assert all(type(value) in (str, type(None)) for value in column)


def as_bytes(message: Any) -> bytes | None:
    try:
        return bytes(memoryview(message))
    except Exception:
        return None


def assert_spans(messages: Sequence[Any], batch: DecodedBatch) -> None:
    """Each row's span, and each element error's, is exactly its element's bytes inside its message."""
    assert batch.element.dtype == np.int32 and batch.element.shape == (len(batch),)
    assert batch.span.dtype == np.int64 and batch.span.shape == (len(batch), 2)
    located = [(int(batch.source[row]), int(batch.element[row]), (int(batch.span[row, 0]), int(batch.span[row, 1])))
               for row in range(len(batch))]
    for error in batch.errors:
        assert (error.span is None) == (error.element_index < 0), error
        if error.span is not None:
            assert type(error.span) is tuple and all(type(offset) is int for offset in error.span)
            located.append((error.message_index, error.element_index, error.span))
    for message_index, element, (start, end) in located:
        message = as_bytes(messages[message_index])
        assert message is not None
        if element < 0:
            assert (start, end) == (0, len(message))
            continue
        assert 0 < start < end <= len(message)
        assert _pure._frame(message[start:end]) is None  # exactly one msgpack object
        try:
            whole = msgpack.unpackb(message, raw=False, strict_map_key=False)
        except Exception:  # what msgpack refuses is checked by framing alone
            continue
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)  # msgpack's own offsets of the elements
        unpacker.feed(message)
        unpacker.read_array_header()
        for _ in range(element):
            unpacker.skip()
        assert unpacker.tell() == start
        unpacker.skip()
        assert unpacker.tell() == end
        with contextlib.suppress(ValueError):  # packb stops at 512 levels; repacked, as NaN != NaN
            assert msgpack.packb(msgpack.unpackb(message[start:end], raw=False, strict_map_key=False)) == \
                msgpack.packb(whole[element])
    by_message: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for message_index, element, span in located:
        if element >= 0:
            by_message.setdefault(message_index, []).append((element, span))
    for message_index, elements in by_message.items():  # the elements tile the array, in order
        elements.sort()
        assert [element for element, _ in elements] == list(range(len(elements)))
        assert all(left[1][1] == right[1][0] for left, right in itertools.pairwise(elements))
        assert elements[-1][1][1] == len(as_bytes(messages[message_index]) or b"")


def decode_both(messages: Sequence[Any], spec: DecodeSpec) -> DecodedBatch:
    expected = _pure.decode_batch(messages, spec)
    assert_same(expected, _fast.decode_batch(messages, spec))
    assert_spans(messages, expected)
    return expected


# ------------------------------------------------------------------------------------------------------------
# decode_batch parity
# ------------------------------------------------------------------------------------------------------------


@PARITY
@given(spec_and_messages(fixed_spec=True))
def test_decode_parity_fixed_spec(case: tuple[DecodeSpec, list[bytes]]) -> None:
    spec, batch = case
    decode_both(batch, spec)


@PARITY
@given(spec_and_messages())
def test_decode_parity_any_spec(case: tuple[DecodeSpec, list[bytes]]) -> None:
    spec, batch = case
    decode_both(batch, spec)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(SPEC))
def test_decode_parity_every_truncation(message: bytes) -> None:
    """Every prefix of a message (a valid one included) in one batch: each prefix is judged alone."""
    decode_both([message[:end] for end in range(len(message) + 1)], SPEC)


@PARITY
@given(messages(SPEC), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255), st.integers(0, 2)),
                                min_size=1, max_size=4))
def test_decode_parity_mutated_bytes(message: bytes, edits: list[tuple[int, int, int]]) -> None:
    """Bytes overwritten, inserted or deleted anywhere: headers, lengths, UTF-8, ext types go wrong."""
    data = bytearray(message)
    for position, byte, action in edits:
        at = position % (len(data) + 1)
        if action == 0 and at < len(data):
            data[at] = byte
        elif action == 1:
            data.insert(at, byte)
        elif at < len(data):
            del data[at]
    decode_both([bytes(data), message], SPEC)


@PARITY
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_decode_parity_random_bytes(batch: list[bytes]) -> None:
    decode_both(batch, SPEC)


@PARITY
@given(spec_and_messages(fixed_spec=True), st.data())
def test_one_bad_message_changes_nothing_else(case: tuple[DecodeSpec, list[Any]], data: st.DataObject) -> None:
    """A batch decodes as its messages decode alone: [good..., bad, good...] == the goods, indices aside."""
    spec, batch = case
    batch.insert(data.draw(st.integers(0, len(batch))), data.draw(st.one_of(st.binary(max_size=30), st.sampled_from(
        [b"", None, "str", b"\xc1", b"\x90", b"\x91\x91", b"\x81\xa2id\xa1\xff", b"\x92\x80", nested(5000)]))))
    for impl in (_pure, _fast):
        whole = impl.decode_batch(batch, spec)
        alone = [impl.decode_batch([message], spec) for message in batch]
        assert whole.ids == [request_id for part in alone for request_id in part.ids]
        assert whole.source.tolist() == [index for index, part in enumerate(alone) for _ in part.ids]
        assert np.array_equal(whole.features, np.concatenate([part.features for part in alone]))
        assert whole.entities == [[value for part in alone for value in part.entities[key]] for key in range(2)]
        for name in ("deadline_ms", "sent_ms", "element", "span"):
            assert np.array_equal(getattr(whole, name), np.concatenate([getattr(part, name) for part in alone]))
        assert whole.reply_to == [value for part in alone for value in part.reply_to]
        assert whole.version == [value for part in alone for value in part.version]
        assert error_rows(whole) == [(index, *row[1:]) for index, part in enumerate(alone)
                                     for row in error_rows(part)]


def _nested(depth: int, leaf: bytes, rng: random.Random, key_containers: bool = False) -> bytes:
    """``depth`` maps/arrays around ``leaf`` (a map nests through a value, or through its key)."""
    data = leaf
    for _ in range(depth):
        kind = rng.randrange(3 if key_containers else 2)
        if kind == 0:
            data = b"\x91" + data
        elif kind == 1:
            data = b"\x81\xa1k" + data
        else:
            data = b"\x81" + data + b"\x01"  # a container as a map key
    return data


@pytest.mark.parametrize("depth", [1, 2, 63, 64, 65, 66, 200, 1023, 1024, 1025, 1100, 5000])
@pytest.mark.parametrize("key_containers", [False, True])
def test_decode_parity_deep_nesting(depth: int, key_containers: bool) -> None:
    rng = random.Random(depth)
    request = msgpack.packb({"id": "deep", "entities": {"card_id": "c", "merchant_id": 1},
                             "features": {"amount": 1.0, "vec": [1, 2, 3]}})
    batch = [_nested(depth, leaf, rng, key_containers) for leaf in (b"\x01", b"\x90", b"\x80", request, b"\xc1",
                                                                    b"\xa1\xff", b"\x91")]
    batch += [_nested(depth, b"\x01", rng, key_containers) + b"\x00"]
    decoded = decode_both(batch, SPEC)
    # framing alone decides undecodable: only the 0xc1, the cut-off array and the trailing byte
    assert sorted(error.message_index for error in decoded.errors if error.kind == UNDECODABLE) == [4, 6, 7]


GOOD = {"id": "r-1", "entities": {"card_id": "c-1", "merchant_id": 7}, "features": {"amount": 2.5, "vec": [1, 2, 3]}}
DEPTHS = [100, 1000, 100_000]


def _with(*pairs: tuple[Any, Any], base: dict = GOOD) -> bytes:
    """GOOD with more (key, value) pairs written after its own (a repeated key: the later one wins)."""
    return pack(Pairs([*base.items(), *pairs]), random.Random(0))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kinds", ["a", "m", "k", "akmx"])
def test_an_unknown_key_is_skipped_at_any_depth(depth: int, kinds: str) -> None:
    deep = Raw(nested(depth, b"\x01", kinds))
    entities = Pairs([*GOOD["entities"].items(), ("junk", deep)])
    features = Pairs([("junk", deep), *GOOD["features"].items()])
    single = [_with(("junk", deep)), _with((deep, 1)), _with(("entities", entities)), _with(("features", features))]
    batch = decode_both([*single, pack([Pairs([("junk", deep), *GOOD.items()])] * 3, random.Random(0))], SPEC)
    assert batch.ids == ["r-1"] * 7 and not batch.errors
    assert batch.element.tolist() == [-1, -1, -1, -1, 0, 1, 2]
    assert batch.features.tolist() == [[2.5, 1, 2, 3, 12]] * 7


KNOWN_KEY_ERRORS = {
    "id": (BAD_ID, "'id' must be a non-empty str of at most 256 characters"),
    "entities": (BAD_ENTITIES, "'entities' must be a map, got list"),
    "features": (BAD_FEATURES, "'features' must be a map, got list"),
    "deadline_ms": (BAD_FIELD, "'deadline_ms' must be an int64 (epoch milliseconds)"),
    "sent_ms": (BAD_FIELD, "'sent_ms' must be an int64 (epoch milliseconds)"),
    "reply_to": (BAD_FIELD, "'reply_to' must be a non-empty str of at most 256 characters"),
    "version": (BAD_FIELD, "'version' must be a non-empty str of at most 256 characters"),
    "card_id": (BAD_ENTITY, "entity key 'card_id' must be an int or a non-empty str of at most 256 characters"),
    "amount": (BAD_FEATURE, "feature 'amount' must be a number, got list"),  # [deep]: a list of one list
    "vec": (BAD_FEATURE, "feature 'vec' must be a number, got list"),  # [1, deep, 3]
}


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("field", sorted(KNOWN_KEY_ERRORS))
def test_a_known_key_holding_deep_junk_is_its_type_error(depth: int, field: str) -> None:
    deep = Raw(nested(depth, b"\x01", "am"))
    if field == "card_id":
        request = Pairs([*GOOD.items(), ("entities", Pairs([("card_id", deep), ("merchant_id", 7)]))])
    elif field in ("amount", "vec"):
        inside = [deep] if field == "amount" else [1, deep, 3]
        request = Pairs([*GOOD.items(), ("features", Pairs([*GOOD["features"].items(), (field, inside)]))])
    else:
        request = Pairs([*GOOD.items(), (field, deep)])
    rng = random.Random(0)
    batch = decode_both([pack(request, rng), pack([GOOD, request, GOOD], rng)], SPEC)
    kind, detail = KNOWN_KEY_ERRORS[field]
    request_id = None if field == "id" else "r-1"
    assert [(error.message_index, error.element_index, error.kind, error.detail, error.request_id)
            for error in batch.errors] == [(0, -1, kind, detail, request_id), (1, 1, kind, detail, request_id)]
    assert batch.ids == ["r-1", "r-1"] and batch.element.tolist() == [0, 2]  # the siblings are answered


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_deep_element_is_dead_lettered_alone(depth: int) -> None:
    good = msgpack.packb(GOOD)
    elements = [good, nested(depth, b"\x80", "a"), good, nested(depth, b"\x80", "m"), nested(depth, b"\x01", "k"),
                good]
    message = b"\x96" + b"".join(elements)
    batch = decode_both([message], SPEC)
    assert batch.ids == ["r-1"] * 3 and batch.element.tolist() == [0, 2, 5]
    assert [(error.element_index, error.kind) for error in batch.errors] == [(1, NOT_A_MAP), (3, MISSING_ID),
                                                                             (4, MISSING_ID)]
    for row, element in enumerate((0, 2, 5)):
        start, end = batch.span[row]
        assert message[start:end] == elements[element] and msgpack.unpackb(message[start:end]) == GOOD
    for error, element in zip(batch.errors, (1, 3, 4), strict=True):
        assert error.span is not None
        assert message[error.span[0]:error.span[1]] == elements[element]


def test_a_repeated_key_keeps_its_last_value_whatever_the_first_held() -> None:
    """The twins once disagreed here: a deep first value made the compiled twin say undecodable."""
    deep = Raw(nested(65, b"\x01", "am"))
    batch = decode_both([_with(("junk", deep), ("junk", 1)), _with(("id", deep), ("id", "last")),
                         _with(("id", "last"), ("id", deep)),
                         _with(("features", deep), ("features", GOOD["features"]))], SPEC)
    assert batch.ids == ["r-1", "last", "r-1"]
    assert [(error.message_index, error.kind) for error in batch.errors] == [(2, BAD_ID)]


def _request(**fields: Any) -> dict:
    request: dict[str, Any] = {"id": "r-1", "entities": {"card_id": "c-1", "merchant_id": 7},
                               "features": {"amount": 2.5, "vec": [1, 2, 3]}}
    request.update(fields)
    return {name: value for name, value in request.items() if value is not ...}


def _request_with(*pairs: tuple[Any, Any]) -> bytes:
    """A good request (GOOD) followed by more entries, written as they are (Raw bytes included)."""
    return _with(*pairs)


# Not one complete msgpack object: the whole message is undecodable (and msgpack refuses it too).
MALFORMED = {
    "reserved 0xc1": b"\xc1",
    "reserved 0xc1 under an unknown key": _request_with(("x", Raw(b"\xc1"))),
    "trailing bytes": msgpack.packb(_request()) + b"\xc0",
    "truncated": msgpack.packb(_request())[:-1],
    "array longer than the message": b"\xdd\xff\xff\xff\xff\xc0",
    "map longer than the message": b"\xde\x00\x05\x01\x01\x01\x01\x01",
    "str longer than the message": b"\xdb\x00\x00\x10\x00abc",
    "bin longer than the message": b"\xc5\x01\x00abc",
    "ext header cut": b"\xc8\x00",
    "fixext cut": b"\xd8\x01" + b"\x00" * 15,
    "100000 levels, cut": b"\x91" * 100_000,
    "100000 levels, then a trailing byte": b"\x91" * 100_000 + b"\x01\x01",
    "a batch with a cut element": b"\x92" + msgpack.packb(_request()) + msgpack.packb(_request())[:-1],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_are_undecodable(name: str) -> None:
    batch = decode_both([MALFORMED[name]], SPEC)
    assert [(error.kind, error.element_index, error.span) for error in batch.errors] == [(UNDECODABLE, -1, None)]
    assert batch.errors[0].detail.startswith("not a valid msgpack message: ")
    with pytest.raises(Exception):  # noqa: B017 - msgpack refuses these as well
        msgpack.unpackb(MALFORMED[name], raw=False, strict_map_key=False)


# Complete msgpack objects that msgpack.unpackb refuses (UTF-8, ext types, unhashable keys, depth), with what the
# decoders make of them: what is not read is not judged; a str that is read must be valid UTF-8.
REFUSED_BY_MSGPACK = {
    "invalid utf-8 under an unknown key": (_request_with(("other", Raw(b"\xa2\xc3\x28"))), None),
    "invalid utf-8 as an unknown key": (_request_with((Raw(b"\xa2\xed\xa0"), 1)), None),
    "a list as a map key": (_request_with((Raw(b"\x91\x01"), 1)), None),
    "a map as a map key": (_request_with((Raw(b"\x80"), 1)), None),
    "a map as a key inside an unknown value": (_request_with(("x", Raw(b"\x81\x80\x01"))), None),
    "timestamp of 3 bytes": (_request_with(("t", Raw(b"\xc7\x03\xff\x00\x00\x00"))), None),
    "timestamp nanoseconds 10**9": (_request_with(("t", Raw(b"\xc7\x0c\xff" + struct.pack(">Iq", 10**9, 0)))), None),
    "timestamp64 nanoseconds 10**9": (_request_with(("t", Raw(b"\xd7\xff" + struct.pack(">Q", 10**9 << 34)))), None),
    "negative ext code": (_request_with(("t", Raw(b"\xd4\xfe\x00"))), None),
    "1025 levels under an unknown key": (_request_with(("deep", Raw(nested(1025)))), None),
    "an int map key at the top level": (_request_with((7, Raw(b"\xa2\xc3\x28"))), None),
    "surrogate in the id": (_request_with(("id", Raw(b"\xa3\xed\xa0\x80"))), (BAD_ID, "'id' is not valid UTF-8")),
    "overlong utf-8 in the id": (_request_with(("id", Raw(b"\xa2\xc0\xaf"))), (BAD_ID, "'id' is not valid UTF-8")),
    "beyond U+10FFFF in the id": (_request_with(("id", Raw(b"\xa4\xf4\x90\x80\x80"))),
                                  (BAD_ID, "'id' is not valid UTF-8")),
    "invalid utf-8 in a join key": (_request_with(("entities", Pairs([("card_id", Raw(b"\xa1\xff")),
                                                                       ("merchant_id", 7)]))),
                                    (BAD_ENTITY, "entity key 'card_id' is not valid UTF-8")),
    "invalid utf-8 in reply_to": (_request_with(("reply_to", Raw(b"\xa1\xff"))),
                                  (BAD_FIELD, "'reply_to' is not valid UTF-8")),
    "invalid utf-8 in version": (_request_with(("version", Raw(b"\xa1\xff"))),
                                 (BAD_FIELD, "'version' is not valid UTF-8")),
    "invalid utf-8 as a feature": (_request_with(("features", Pairs([("amount", Raw(b"\xa1\xff")),
                                                                      ("vec", [1, 2, 3])]))),
                                   (BAD_FEATURE, "feature 'amount' must be a number, got str")),
    "a bad ext as the id": (_request_with(("id", Raw(b"\xd4\xfe\x00"))),
                            (BAD_ID, "'id' must be a non-empty str of at most 256 characters")),
    "a bad timestamp as a feature": (_request_with(("features", Pairs([("amount", Raw(b"\xd4\xff\x00")),
                                                                        ("vec", [1, 2, 3])]))),
                                     (BAD_FEATURE, "feature 'amount' must be a number, got Timestamp")),
    "1025 levels": (b"\x91" * 1025 + b"\x01", (NOT_A_MAP, "a request must be a msgpack map, got list")),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BY_MSGPACK))
def test_what_msgpack_refuses_is_judged_only_where_it_is_read(name: str) -> None:
    message, error = REFUSED_BY_MSGPACK[name]
    with pytest.raises(Exception):  # noqa: B017 - msgpack refuses each of these
        msgpack.unpackb(message, raw=False, strict_map_key=False)
    batch = decode_both([message], SPEC)
    if error is None:
        assert batch.ids == ["r-1"] and not batch.errors
        assert batch.features.tolist() == [[2.5, 1, 2, 3, 12]]
    else:
        assert [(e.kind, e.detail) for e in batch.errors] == [error] and not batch.ids


def test_valid_unusual_msgpack_is_accepted() -> None:
    """Timestamps, ext, bin, float32, wide headers and repeated keys are valid msgpack: the request decodes."""
    rng = random.Random(1)
    request = Pairs([("id", "dup"), ("ts", msgpack.Timestamp(5, 999_999_999)), ("ext", msgpack.ExtType(127, b"")),
                     (b"id", b"bin key"), (msgpack.Timestamp(1, 0), 1), (None, [1, {"a": None}]),
                     ("entities", {"card_id": "c", "merchant_id": (1 << 64) - 1}),
                     ("features", Pairs([("amount", 1), ("vec", [1, 2, 3]), ("amount", 0.1)])),
                     ("id", "last"), ("version", None), ("sent_ms", -(1 << 63)), (7, "an int key"), (-1.5, 2)])
    batch = decode_both([pack(request, rng) for _ in range(20)], SPEC)
    assert batch.ids == ["last"] * 20 and not batch.errors
    assert batch.entities[1][0] == str((1 << 64) - 1)
    assert batch.features[0].tolist() == [np.float32(0.1), 1.0, 2.0, 3.0, 12.0]
    assert batch.sent_ms[0] == -(1 << 63)


@PARITY
@given(spec_and_messages())
def test_the_twin_reads_alike_with_and_without_msgpack(case: tuple[DecodeSpec, list[Any]]) -> None:
    """The twin's two roads (msgpack's objects, its own byte walker) give one result on every input."""
    spec, batch = case
    quick = _pure.decode_batch(batch, spec)
    with mock.patch.object(_pure, "_quick", lambda data, spec: None):
        assert_same(quick, _pure.decode_batch(batch, spec))


# ------------------------------------------------------------------------------------------------------------
# The semantics, by example (both implementations)
# ------------------------------------------------------------------------------------------------------------

ONE_ERROR: list[tuple[str, bytes | None]] = [
    (UNDECODABLE, b"\x92\x01"),
    (TOO_LARGE, msgpack.packb(_request(padding="x" * 100))),
    (TOO_LARGE, msgpack.packb([{}] * 3)),  # 3 requests, over 2
    (NOT_A_MAP, msgpack.packb("a request")),
    (EMPTY_BATCH, msgpack.packb([])),
    (MISSING_ID, msgpack.packb(_request(id=...))),
    (BAD_ID, msgpack.packb(_request(id=17))),
    (BAD_ID, msgpack.packb(_request(id=""))),
    (BAD_ID, msgpack.packb(_request(id="x" * 9))),
    (BAD_ENTITIES, msgpack.packb(_request(entities=["c-1"]))),
    (MISSING_ENTITY, msgpack.packb(_request(entities={"card_id": "c-1"}))),
    (BAD_ENTITY, msgpack.packb(_request(entities={"card_id": True, "merchant_id": 7}))),
    (BAD_ENTITY, msgpack.packb(_request(entities={"card_id": 1.5, "merchant_id": 7}))),
    (BAD_FEATURES, msgpack.packb(_request(features=None))),
    (MISSING_FEATURE, msgpack.packb(_request(features={"vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": "2.5", "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": True, "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": float("nan"), "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": 1e39, "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": 1.0, "vec": [1, 2]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": 1.0, "vec": [1, float("-inf"), 2]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": [1.0, 2.0], "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": [], "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": [[1.0]], "vec": [1, 2, 3]}))),
    (BAD_FEATURE, msgpack.packb(_request(features={"amount": 1.0, "vec": [[1, 2, 3]]}))),
    (BAD_FIELD, msgpack.packb(_request(deadline_ms=1.5))),
    (BAD_FIELD, msgpack.packb(_request(sent_ms=1 << 63))),
    (BAD_FIELD, msgpack.packb(_request(reply_to="not a topic!"))),
    (BAD_FIELD, msgpack.packb(_request(version=3))),
    (NULL_VALUE, None),
    (EMPTY_VALUE, b""),
]
SMALL_SPEC = DecodeSpec(entity_keys=SPEC.entity_keys, request_features=SPEC.request_features,
                        max_message_bytes=100, max_requests_per_message=2, max_str_len=8)


def test_every_error_kind_has_an_example() -> None:
    assert {kind for kind, _ in ONE_ERROR} == set(ERROR_KINDS)
    assert ERROR_KINDS[-2:] == (NULL_VALUE, EMPTY_VALUE) and len(set(ERROR_KINDS)) == len(ERROR_KINDS) == 15


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("kind", "message"), ONE_ERROR, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(ONE_ERROR)])
def test_each_error_kind(impl: Any, kind: str, message: bytes | None) -> None:
    good = msgpack.packb(_request(id="good"))
    batch = impl.decode_batch([good, message, good], SMALL_SPEC)
    assert batch.ids == ["good", "good"] and batch.source.tolist() == [0, 2]
    assert [(error.message_index, error.kind) for error in batch.errors] == [(1, kind)]
    error = batch.errors[0]
    assert error.element_index == -1 and error.span is None and error.detail
    assert error.request_id == ("r-1" if kind not in (UNDECODABLE, TOO_LARGE, NOT_A_MAP, EMPTY_BATCH, MISSING_ID,
                                                      BAD_ID, NULL_VALUE, EMPTY_VALUE) else None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("kind", "message"), [case for case in ONE_ERROR if case[1] and case[1][0] == 0x83],
                         ids=lambda case: str(case)[:12])
def test_each_request_error_in_a_batch_message_is_that_element_alone(impl: Any, kind: str, message: bytes) -> None:
    good = msgpack.packb(_request(id="good"))
    batch_message = b"\x93" + good + message + good
    spec = DecodeSpec(entity_keys=SPEC.entity_keys, request_features=SPEC.request_features, max_str_len=8)
    batch = impl.decode_batch([batch_message], spec)
    assert batch.ids == ["good", "good"] and batch.element.tolist() == [0, 2]
    assert batch.span.tolist() == [[1, 1 + len(good)], [1 + len(good) + len(message), len(batch_message)]]
    assert [(error.element_index, error.kind, error.span) for error in batch.errors] == [
        (1, kind, (1 + len(good), 1 + len(good) + len(message)))]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_valid_request_in_columns(impl: Any) -> None:
    message = msgpack.packb(_request(deadline_ms=1_700_000_000_500, sent_ms=1_700_000_000_000, reply_to="app.replies",
                                     version="v2", unknown={"nested": [1, 2]}))
    batch = impl.decode_batch([message, msgpack.packb([_request(id="a"), 5, _request(id="b")])], SPEC)
    assert batch.ids == ["r-1", "a", "b"]
    assert batch.entities == [["c-1"] * 3, ["7"] * 3]  # int join keys become their decimal str
    assert batch.features.dtype == np.float32 and batch.features.shape == (3, 5)
    assert batch.features[0].tolist() == [2.5, 1.0, 2.0, 3.0, 12.0]  # "hour" absent: its default
    assert batch.deadline_ms.tolist() == [1_700_000_000_500, NO_DEADLINE, NO_DEADLINE]
    assert batch.sent_ms.tolist() == [1_700_000_000_000, 0, 0]
    assert batch.reply_to == ["app.replies", None, None] and batch.version == ["v2", None, None]
    assert batch.source.dtype == np.int32 and batch.source.tolist() == [0, 1, 1]
    assert batch.element.dtype == np.int32 and batch.element.tolist() == [-1, 0, 2]
    single, a, b = len(message), len(msgpack.packb(_request(id="a"))), len(msgpack.packb(_request(id="b")))
    assert batch.span.dtype == np.int64 and batch.span.tolist() == [[0, single], [1, 1 + a], [2 + a, 2 + a + b]]
    assert [(error.message_index, error.element_index, error.kind, error.span) for error in batch.errors] == [
        (1, 1, NOT_A_MAP, (1 + a, 2 + a))]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_ints_round_through_float64_like_numpy(impl: Any) -> None:
    value = (1 << 60) + (1 << 36) + 1  # float64 rounds it onto a float32 tie, which goes to even: 2**60
    batch = impl.decode_batch([msgpack.packb(_request(features={"amount": value, "vec": [1, 2, (1 << 64) - 1]}))], SPEC)
    assert batch.features[0, 0] == np.float32(float(value)) == np.float32(1 << 60)
    assert batch.features[0, 3] == np.float32(2.0**64)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_str_limits_count_characters_not_bytes(impl: Any) -> None:
    spec = DecodeSpec(entity_keys=("card_id",), request_features=(), max_str_len=3)
    good = msgpack.packb({"id": "😀é€", "entities": {"card_id": "€€€"}})
    bad = msgpack.packb({"id": "😀é€a", "entities": {"card_id": "€€€"}})
    batch = impl.decode_batch([good, bad], spec)
    assert batch.ids == ["😀é€"] and [error.kind for error in batch.errors] == [BAD_ID]


def test_twin_float32_overflow_is_an_error_not_a_warning() -> None:
    """np.float32(1e39) warns (an error under pytest): the twin checks the range before converting."""
    batch = _pure.decode_batch([msgpack.packb(_request(features={"amount": 3.5e38, "vec": [1, 2, 3]}))], SPEC)
    assert [error.kind for error in batch.errors] == [BAD_FEATURE]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_negative_feature_size_is_rejected(impl: Any) -> None:
    spec = DecodeSpec(entity_keys=(), request_features=(RequestFeature("a", size=-1),))
    with pytest.raises(ValueError, match="size"):
        impl.decode_batch([], spec)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_batch_of_messages(impl: Any) -> None:
    batch = impl.decode_batch([], SPEC)
    assert len(batch) == 0 and batch.features.shape == (0, 5) and batch.source.shape == (0,)


def test_bytes_like_messages() -> None:
    message = msgpack.packb(_request())
    words = array.array("B", message)
    batch = decode_both([bytearray(message), memoryview(message), message, words, memoryview(words)[1:]], SPEC)
    assert batch.ids == ["r-1"] * 4 and batch.span.tolist() == [[0, len(message)]] * 4
    assert [(error.message_index, error.kind) for error in batch.errors] == [(4, UNDECODABLE)]  # "id", then more


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tombstones_empty_values_and_non_bytes_are_per_message_errors(impl: Any) -> None:
    good = msgpack.packb(_request())
    released = memoryview(good)
    released.release()
    values = [good, None, b"", bytearray(), memoryview(b""), "a str", 17, object(), [good], released,
              array.array("i", [1, 2]), good]
    batch = impl.decode_batch(values, SPEC)  # no exception, whatever the values
    assert batch.ids == ["r-1", "r-1"] and batch.source.tolist() == [0, 11]
    assert [(error.message_index, error.kind) for error in batch.errors] == [
        (1, NULL_VALUE), (2, EMPTY_VALUE), (3, EMPTY_VALUE), (4, EMPTY_VALUE), (5, UNDECODABLE), (6, UNDECODABLE),
        (7, UNDECODABLE), (8, UNDECODABLE), (9, UNDECODABLE), (10, UNDECODABLE)]
    assert all(error.element_index == -1 and error.span is None and error.request_id is None
               for error in batch.errors)
    assert batch.errors[0].detail == ("the message value is null (a Kafka tombstone); a request must be a msgpack "
                                      "map or array")
    assert batch.errors[4].detail == "not a valid msgpack message: a message value must be bytes, got str"
    assert batch.errors[-1].detail == "not a valid msgpack message: 7 trailing byte(s) after the object"  # 01 00..
    assert_same(_pure.decode_batch(values, SPEC), _fast.decode_batch(values, SPEC))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_size_one_feature_may_be_a_one_element_list(impl: Any) -> None:
    features = [{"amount": [129.5], "vec": [1, 2, 3]}, {"amount": 129.5, "vec": [1, 2, 3]},
                {"amount": [129.5], "vec": [1, 2, 3], "hour": [7]}, {"amount": [1 << 64 - 1], "vec": [1, 2, 3]}]
    bad = [{"amount": [], "vec": [1, 2, 3]}, {"amount": [1, 2], "vec": [1, 2, 3]}, {"amount": [[1]], "vec": [1, 2, 3]},
           {"amount": ["1"], "vec": [1, 2, 3]}, {"amount": [float("inf")], "vec": [1, 2, 3]},
           {"amount": 1, "vec": [1]}, {"amount": 1, "vec": 1}]
    batch = impl.decode_batch([msgpack.packb(_request(features=value)) for value in features + bad], SPEC)
    assert batch.features.tolist() == [[129.5, 1, 2, 3, 12], [129.5, 1, 2, 3, 12], [129.5, 1, 2, 3, 7],
                                       [float(np.float32(1 << 64 - 1)), 1, 2, 3, 12]]
    assert [(error.message_index, error.kind) for error in batch.errors] == [(index, BAD_FEATURE)
                                                                             for index in range(4, 11)]
    assert [error.detail for error in batch.errors[:5]] == [
        "feature 'amount' must be a number or a list of one number, got a list of 0",
        "feature 'amount' must be a number or a list of one number, got a list of 2",
        "feature 'amount' must be a number, got list",
        "feature 'amount' must be a number, got str",
        "feature 'amount' must be finite in float32, got inf"]
    decode_both([msgpack.packb(_request(features=value)) for value in features + bad], SPEC)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_deadline_is_not_deadline_zero(impl: Any) -> None:
    deadlines = [..., None, 0, -1, -(1 << 63), 1, 1_700_000_000_000, (1 << 63) - 2]
    batch = impl.decode_batch([msgpack.packb(_request(deadline_ms=value)) for value in deadlines], SPEC)
    assert not batch.errors and batch.deadline_ms.dtype == np.int64
    assert batch.deadline_ms.tolist() == [NO_DEADLINE, NO_DEADLINE, 0, -1, -(1 << 63), 1, 1_700_000_000_000,
                                          (1 << 63) - 2]
    now = 1_700_000_000_000
    assert (batch.deadline_ms <= now).tolist() == [False, False, True, True, True, True, True, False]
    assert batch.sent_ms.tolist() == [0] * len(deadlines)  # sent_ms keeps 0 for absent


def test_no_deadline_is_exported() -> None:
    assert fastpath.NO_DEADLINE == NO_DEADLINE == (1 << 63) - 1 == np.iinfo(np.int64).max
    assert "NO_DEADLINE" in fastpath.__all__


def test_decode_error_is_built_as_before_and_with_a_span() -> None:
    """workers/pipeline.py builds DecodeError positionally: (message, element, kind, detail, request id[, span])."""
    old = DecodeError(3, -1, BAD_FIELD, "detail", "r-1")
    assert (old.message_index, old.element_index, old.kind, old.detail, old.request_id, old.span) == (
        3, -1, BAD_FIELD, "detail", "r-1", None)
    assert DecodeError(3, 2, BAD_FIELD, "detail", "r-1", (5, 9)).span == (5, 9)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_spans_are_the_elements_bytes(impl: Any) -> None:
    """message[start:end] of a row, or of an element's error, unpacks to that very element."""
    rng = random.Random(5)
    elements = [_request(id="a"), _request(id="b", features={"amount": [1.5], "vec": [1, 2, 3]}), "not a map",
                _request(id=17), {"x": [[[[1]]]]}, _request(id="c", junk={"deep": [[{"k": 1}]]}), [1, 2]]
    messages = [pack(elements, rng) for _ in range(10)] + [msgpack.packb(_request(id="single"))]
    batch = impl.decode_batch(messages, SPEC)
    assert batch.ids == ["a", "b", "c"] * 10 + ["single"]
    assert batch.element.tolist() == [0, 1, 5] * 10 + [-1]
    for row in range(len(batch)):
        message = messages[batch.source[row]]
        start, end = batch.span[row]
        if batch.element[row] < 0:
            assert (start, end) == (0, len(message))
        else:
            assert msgpack.unpackb(message[start:end]) == elements[batch.element[row]]
    assert [(error.element_index, error.kind) for error in batch.errors] == [(2, NOT_A_MAP), (3, BAD_ID),
                                                                             (4, MISSING_ID), (6, NOT_A_MAP)] * 10
    for error in batch.errors:
        assert error.span is not None
        start, end = error.span
        assert msgpack.unpackb(messages[error.message_index][start:end]) == elements[error.element_index]


# ------------------------------------------------------------------------------------------------------------
# assemble parity
# ------------------------------------------------------------------------------------------------------------


@st.composite
def assemble_cases(draw: st.DrawFn) -> tuple[np.ndarray, list[ViewBlock], list[InputColumn]]:
    rows = draw(st.integers(0, 12))
    elements = st.floats(width=32, allow_nan=True, allow_infinity=True)
    request_width = draw(st.integers(0, 4))
    request = np.array(draw(st.lists(elements, min_size=rows * request_width, max_size=rows * request_width)),
                       dtype=np.float32).reshape(rows, request_width)
    blocks = []
    for _ in range(draw(st.integers(0, 3))):
        view_rows, width = draw(st.integers(0, 5)), draw(st.integers(1, 4))
        values = np.array(draw(st.lists(elements, min_size=view_rows * width, max_size=view_rows * width)),
                          dtype=np.float32).reshape(view_rows, width)
        row_of_request = np.array(draw(st.lists(st.integers(-3, view_rows - 1), min_size=rows, max_size=rows)),
                                  dtype=np.int32)
        defaults = np.array(draw(st.lists(elements, min_size=width, max_size=width)), dtype=np.float32)
        if draw(st.booleans()):
            values = np.asfortranarray(values)  # any memory layout
        blocks.append(ViewBlock(values=values, row_of_request=row_of_request, defaults=defaults))
    choices = [(True, 0, column) for column in range(-request_width, request_width)]
    choices += [(False, index, column) for index, block in enumerate(blocks)
                for column in range(-block.values.shape[1], block.values.shape[1])]
    columns = [InputColumn(*choice) for choice in draw(st.lists(st.sampled_from(choices), max_size=8))] if choices \
        else []
    return request, blocks, columns


@PARITY
@given(assemble_cases())
def test_assemble_parity(case: tuple[np.ndarray, list[ViewBlock], list[InputColumn]]) -> None:
    request, blocks, columns = case
    expected = _pure.assemble(request, blocks, columns)
    actual = _fast.assemble(request, blocks, columns)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert np.array_equal(actual, expected, equal_nan=True)


@pytest.mark.parametrize("column", [InputColumn(True, 0, 5), InputColumn(False, 0, 9), InputColumn(False, 3, 0)])
def test_assemble_bad_index_raises_in_both(column: InputColumn) -> None:
    block = ViewBlock(values=np.ones((2, 2), np.float32), row_of_request=np.array([0, 1], np.int32),
                      defaults=np.zeros(2, np.float32))
    for impl in (_pure, _fast):
        with pytest.raises(IndexError):
            impl.assemble(np.ones((2, 3), np.float32), [block], [column])


def test_assemble_row_outside_the_view_raises_in_both() -> None:
    block = ViewBlock(values=np.ones((2, 2), np.float32), row_of_request=np.array([0, 2], np.int32),
                      defaults=np.zeros(2, np.float32))
    for impl in (_pure, _fast):
        with pytest.raises(IndexError):
            impl.assemble(np.ones((2, 1), np.float32), [block], [InputColumn(False, 0, 0)])


def test_assemble_converts_other_dtypes_like_the_twin() -> None:
    block = ViewBlock(values=np.arange(6, dtype=np.float64).reshape(3, 2) / 3, row_of_request=np.array([2, -1, 0]),
                      defaults=np.array([7.0, 8.0]))
    request = np.arange(6, dtype=np.float64).reshape(3, 2) / 7
    columns = [InputColumn(True, 0, 1), InputColumn(False, 0, 0), InputColumn(False, 0, -1)]
    assert np.array_equal(_fast.assemble(request, [block], columns), _pure.assemble(request, [block], columns))


# ------------------------------------------------------------------------------------------------------------
# encode_predictions byte identity
# ------------------------------------------------------------------------------------------------------------

LINEAGE_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), MSGPACK_INTS, FLOATS, TEXT, st.binary(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3),
                               st.tuples(children)),
    max_leaves=8)


@st.composite
def prediction_batches(draw: st.DrawFn) -> tuple[PredictionBatch, int]:
    rows = draw(st.integers(0, 6))
    values = st.floats(allow_nan=True, allow_infinity=True)
    dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_])

    def column(width: int | None) -> np.ndarray:
        shape = (rows,) if width is None else (rows, width)
        dtype = draw(dtypes)
        raw = np.array(draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))))
        with np.errstate(invalid="ignore", over="ignore"):
            data = np.nan_to_num(raw).astype(dtype) if np.dtype(dtype).kind in "iub" else raw.astype(dtype)
        return data.reshape(shape)

    outputs = {name: column(draw(st.one_of(st.none(), st.integers(0, 3))))
               for name in draw(st.lists(TEXT, max_size=3, unique=True))}
    timestamps = st.lists(st.one_of(st.just(0), INT64), min_size=rows, max_size=rows)
    lineage = draw(st.dictionaries(st.one_of(TEXT, st.just("feature_ts_ms"), MSGPACK_INTS), LINEAGE_VALUES,
                                   max_size=5))
    batch = PredictionBatch(
        ids=draw(st.lists(TEXT, min_size=rows, max_size=rows)),
        model=draw(TEXT),
        version=draw(TEXT),
        status=draw(st.lists(st.one_of(st.sampled_from(["ok", "ok", "expired", "error"]), TEXT), min_size=rows,
                             max_size=rows)),
        outputs=outputs,
        errors=draw(st.lists(st.one_of(st.none(), st.tuples(TEXT, TEXT)), min_size=rows, max_size=rows)),
        degraded=draw(st.lists(st.lists(TEXT, max_size=3), min_size=rows, max_size=rows)),
        lineage=lineage,
        feature_ts_ms={view: np.array(draw(timestamps), dtype=np.int64)
                       for view in draw(st.lists(TEXT, max_size=3, unique=True))},
        timings_us=draw(st.dictionaries(TEXT, MSGPACK_INTS, max_size=4)),
        received_ms=np.array(draw(st.lists(INT64, min_size=rows, max_size=rows)), dtype=np.int64),
    )
    return batch, draw(MSGPACK_INTS)


@PARITY
@given(prediction_batches())
def test_encode_is_byte_identical(case: tuple[PredictionBatch, int]) -> None:
    batch, sent_ms = case
    expected = _pure.encode_predictions(batch, sent_ms)
    assert _fast.encode_predictions(batch, sent_ms) == expected
    for encoded in expected:
        assert msgpack.unpackb(encoded, strict_map_key=False)["sent_ms"] == sent_ms


def _one_prediction(**changes: Any) -> PredictionBatch:
    batch = PredictionBatch(ids=["r-1"], model="m", version="1", status=["ok"], outputs={"score": np.ones(1)},
                            errors=[None], degraded=[[]], lineage={"code_version": "0.1"},
                            feature_ts_ms={"cards": np.zeros(1, np.int64)}, timings_us={"decode": 3},
                            received_ms=np.zeros(1, np.int64))
    for name, value in changes.items():
        setattr(batch, name, value)
    return batch


@pytest.mark.parametrize(("changes", "error"), [
    ({"lineage": {"worker": object()}}, TypeError),
    ({"timings_us": {"decode": 1 << 64}}, OverflowError),
    ({"ids": ["\ud800"]}, UnicodeEncodeError),
    ({"ids": ["a", "b"]}, IndexError),
])
def test_encode_rejects_what_msgpack_rejects(changes: dict, error: type[Exception]) -> None:
    for impl in (_pure, _fast):
        with pytest.raises(error):
            impl.encode_predictions(_one_prediction(**changes), 0)


def test_encode_hands_unusual_values_to_msgpack() -> None:
    """numpy scalars, subclasses, ExtType, Timestamp and deep nesting come out exactly as msgpack writes them."""
    deep: Any = "leaf"
    for _ in range(1022):  # a lineage value sits 2 levels down: 1022 more is msgpack's limit of 1024
        deep = [deep]
    for lineage in ({"a": np.float64(1.5), "b": msgpack.ExtType(3, b"x"), "c": msgpack.Timestamp(1, 2),
                     "d": bytearray(b"xy"), "e": (1, (2,)), "f": memoryview(b"z"), "g": np.str_("s"),
                     "h": HTTPStatus.OK, "i": OrderedDict(a=1)}, {"deep": deep}):
        batch = _one_prediction(lineage=lineage, outputs={"p": np.ones((1, 2), np.float16),
                                                          "q": np.array([0.5 + 2j]).real.astype(np.longdouble)})
        assert _fast.encode_predictions(batch, 5) == _pure.encode_predictions(batch, 5)
    deeper = _one_prediction(lineage={"deep": [deep]})
    for impl in (_pure, _fast):
        with pytest.raises(ValueError, match="recursion limit"):
            impl.encode_predictions(deeper, 0)
