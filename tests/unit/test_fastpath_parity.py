"""The compiled fast path and its pure-Python twin give the same results, on good, edge and malformed input.

Both modules are imported directly, whichever one ``streamscore.fastpath`` selected. Messages are written by a
small msgpack writer of our own so that the tests can produce what ``msgpack.packb`` never does: repeated map
keys, non-minimal headers (a short str in str16, a small int in uint64), invalid UTF-8, bad timestamps.
"""

from __future__ import annotations

import os
import random
import struct
from collections import OrderedDict
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamscore.fastpath import _pure, parse_flag
from streamscore.fastpath._types import (
    BAD_ENTITIES,
    BAD_ENTITY,
    BAD_FEATURE,
    BAD_FEATURES,
    BAD_FIELD,
    BAD_ID,
    EMPTY_BATCH,
    ERROR_KINDS,
    MISSING_ENTITY,
    MISSING_FEATURE,
    MISSING_ID,
    NOT_A_MAP,
    TOO_LARGE,
    UNDECODABLE,
    DecodedBatch,
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
SCALARS = st.one_of(st.none(), st.booleans(), MSGPACK_INTS, FLOATS, TEXT, st.binary(max_size=8),
                    st.builds(msgpack.Timestamp, INT64, st.integers(0, 10**9 - 1)),
                    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)))
HASHABLE_KEYS = st.one_of(TEXT, MSGPACK_INTS, st.none(), st.binary(max_size=4), st.booleans())
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
    if size == 1:
        return mostly(GOOD_NUMBERS, st.one_of(NUMBERS, SCALARS))
    near_sizes = st.lists(NUMBERS, min_size=max(0, size - 1), max_size=size + 1)
    return mostly(st.lists(GOOD_NUMBERS, min_size=size, max_size=size), st.one_of(NUMBERS, near_sizes, SCALARS))


@st.composite
def specs(draw: st.DrawFn) -> DecodeSpec:
    names = st.sampled_from(["card_id", "merchant_id", "é", "amount", "vec", "x", "id", ""])
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
def spec_and_messages(draw: st.DrawFn, fixed_spec: bool = False) -> tuple[DecodeSpec, list[bytes]]:
    spec = SPEC if fixed_spec else draw(specs())
    return spec, draw(st.lists(messages(spec), max_size=6))


# ------------------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------------------


def error_rows(batch: DecodedBatch) -> list[tuple]:
    return [(error.message_index, error.element_index, error.kind, error.request_id, error.detail)
            for error in batch.errors]


def assert_same(expected: DecodedBatch, actual: DecodedBatch) -> None:
    assert actual.ids == expected.ids
    assert actual.entities == expected.entities
    for name in ("features", "deadline_ms", "sent_ms", "source"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    assert actual.reply_to == expected.reply_to
    assert actual.version == expected.version
    assert error_rows(actual) == error_rows(expected)
    for column in (*actual.entities, actual.ids, actual.reply_to, actual.version):
        assert all(type(value) in (str, type(None)) for value in column)


def decode_both(messages: Sequence[bytes], spec: DecodeSpec) -> DecodedBatch:
    expected = _pure.decode_batch(messages, spec)
    assert_same(expected, _fast.decode_batch(messages, spec))
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
def test_one_bad_message_changes_nothing_else(case: tuple[DecodeSpec, list[bytes]], data: st.DataObject) -> None:
    """A batch decodes as its messages decode alone: [good..., bad, good...] == the goods, indices aside."""
    spec, batch = case
    batch.insert(data.draw(st.integers(0, len(batch))), data.draw(st.one_of(st.binary(max_size=30), st.sampled_from(
        [b"", b"\xc1", b"\x90", b"\x91\x91", b"\x81\xa2id\xa1\xff", b"\x92\x80"]))))
    for impl in (_pure, _fast):
        whole = impl.decode_batch(batch, spec)
        alone = [impl.decode_batch([message], spec) for message in batch]
        assert whole.ids == [request_id for part in alone for request_id in part.ids]
        assert whole.source.tolist() == [index for index, part in enumerate(alone) for _ in part.ids]
        assert np.array_equal(whole.features, np.concatenate([part.features for part in alone]))
        assert whole.entities == [[value for part in alone for value in part.entities[key]] for key in range(2)]
        for name in ("deadline_ms", "sent_ms"):
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
            data = b"\x81" + data + b"\x01"  # a container as a map key: unhashable
    return data


@pytest.mark.parametrize("depth", [1, 2, 63, 64, 65, 66, 200, 1023, 1024, 1025, 1100])
@pytest.mark.parametrize("key_containers", [False, True])
def test_decode_parity_deep_nesting(depth: int, key_containers: bool) -> None:
    rng = random.Random(depth)
    request = msgpack.packb({"id": "deep", "entities": {"card_id": "c", "merchant_id": 1},
                             "features": {"amount": 1.0, "vec": [1, 2, 3]}})
    batch = [_nested(depth, leaf, rng, key_containers) for leaf in (b"\x01", b"\x90", b"\x80", request, b"\xc1",
                                                                    b"\xa1\xff", b"\x91")]
    batch += [_nested(depth, b"\x01", rng, key_containers) + b"\x00"]
    decode_both(batch, SPEC)


@pytest.mark.parametrize("depth", [63, 64, 65])
def test_nesting_limit_is_64_containers(depth: int) -> None:
    batch = decode_both([b"\x91" * (depth - 1) + b"\x90"], SPEC)
    assert [error.kind for error in batch.errors] == [NOT_A_MAP if depth <= 64 else UNDECODABLE]
    assert depth <= 64 or "nested deeper than 64" in batch.errors[0].detail


def _request(**fields: Any) -> dict:
    request: dict[str, Any] = {"id": "r-1", "entities": {"card_id": "c-1", "merchant_id": 7},
                               "features": {"amount": 2.5, "vec": [1, 2, 3]}}
    request.update(fields)
    return {name: value for name, value in request.items() if value is not ...}


MALFORMED = {
    "empty": b"",
    "reserved 0xc1": b"\xc1",
    "trailing bytes": msgpack.packb(_request()) + b"\xc0",
    "truncated": msgpack.packb(_request())[:-1],
    "invalid utf-8 in a value": b"\x82\xa2id\xa1r\xa5other\xa2\xc3\x28",
    "invalid utf-8 in a key": b"\x82\xa2id\xa1r\xa2\xed\xa0\x01",
    "surrogate in a str": b"\x81\xa2id\xa3\xed\xa0\x80",
    "overlong utf-8": b"\x81\xa2id\xa2\xc0\xaf",
    "beyond U+10FFFF": b"\x81\xa2id\xa4\xf4\x90\x80\x80",
    "list as a map key": b"\x82\xa2id\xa1r\x91\x01\x01",
    "map as a map key": b"\x82\xa2id\xa1r\x80\x01",
    "timestamp of 3 bytes": b"\x82\xa2id\xa1r\xa1t\xc7\x03\xff\x00\x00\x00",
    "timestamp nanoseconds 10**9": b"\x81\xa1t\xc7\x0c\xff" + struct.pack(">Iq", 10**9, 0),
    "timestamp64 nanoseconds 10**9": b"\x81\xa1t\xd7\xff" + struct.pack(">Q", 10**9 << 34),
    "negative ext code": b"\x81\xa1t\xd4\xfe\x00",
    "array longer than the message": b"\xdd\xff\xff\xff\xff\xc0",
    "map longer than half the message": b"\xde\x00\x05\x01\x01\x01\x01\x01",
    "str longer than the message": b"\xdb\x00\x00\x10\x00abc",
    "ext header cut": b"\xc8\x00",
    "1025 levels": b"\x91" * 1025 + b"\x01",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_are_undecodable(name: str) -> None:
    batch = decode_both([MALFORMED[name]], SPEC)
    assert [(error.kind, error.element_index) for error in batch.errors] == [(UNDECODABLE, -1)]
    with pytest.raises(Exception):  # noqa: B017 - the twin's rule: whatever unpackb raises
        msgpack.unpackb(MALFORMED[name], raw=False, strict_map_key=False)


def test_valid_unusual_msgpack_is_accepted() -> None:
    """Timestamps, ext, bin, float32, wide headers and repeated keys are valid msgpack: the request decodes."""
    rng = random.Random(1)
    request = Pairs([("id", "dup"), ("ts", msgpack.Timestamp(5, 999_999_999)), ("ext", msgpack.ExtType(127, b"")),
                     (b"id", b"bin key"), (msgpack.Timestamp(1, 0), 1), (None, [1, {"a": None}]),
                     ("entities", {"card_id": "c", "merchant_id": (1 << 64) - 1}),
                     ("features", Pairs([("amount", 1), ("vec", [1, 2, 3]), ("amount", 0.1)])),
                     ("id", "last"), ("version", None), ("sent_ms", -(1 << 63))])
    batch = decode_both([pack(request, rng) for _ in range(20)], SPEC)
    assert batch.ids == ["last"] * 20 and not batch.errors
    assert batch.entities[1][0] == str((1 << 64) - 1)
    assert batch.features[0].tolist() == [np.float32(0.1), 1.0, 2.0, 3.0, 12.0]
    assert batch.sent_ms[0] == -(1 << 63)


# ------------------------------------------------------------------------------------------------------------
# The semantics, by example (both implementations)
# ------------------------------------------------------------------------------------------------------------

ONE_ERROR = [
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
    (BAD_FIELD, msgpack.packb(_request(deadline_ms=1.5))),
    (BAD_FIELD, msgpack.packb(_request(sent_ms=1 << 63))),
    (BAD_FIELD, msgpack.packb(_request(reply_to="not a topic!"))),
    (BAD_FIELD, msgpack.packb(_request(version=3))),
]
SMALL_SPEC = DecodeSpec(entity_keys=SPEC.entity_keys, request_features=SPEC.request_features,
                        max_message_bytes=100, max_requests_per_message=2, max_str_len=8)


def test_every_error_kind_has_an_example() -> None:
    assert {kind for kind, _ in ONE_ERROR} == set(ERROR_KINDS)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("kind", "message"), ONE_ERROR, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(ONE_ERROR)])
def test_each_error_kind(impl: Any, kind: str, message: bytes) -> None:
    good = msgpack.packb(_request(id="good"))
    batch = impl.decode_batch([good, message, good], SMALL_SPEC)
    assert batch.ids == ["good", "good"] and batch.source.tolist() == [0, 2]
    assert [(error.message_index, error.kind) for error in batch.errors] == [(1, kind)]
    error = batch.errors[0]
    assert error.element_index == -1 and error.detail
    assert error.request_id == ("r-1" if kind not in (UNDECODABLE, TOO_LARGE, NOT_A_MAP, EMPTY_BATCH, MISSING_ID,
                                                      BAD_ID) else None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_valid_request_in_columns(impl: Any) -> None:
    message = msgpack.packb(_request(deadline_ms=1_700_000_000_500, sent_ms=1_700_000_000_000, reply_to="app.replies",
                                     version="v2", unknown={"nested": [1, 2]}))
    batch = impl.decode_batch([message, msgpack.packb([_request(id="a"), 5, _request(id="b")])], SPEC)
    assert batch.ids == ["r-1", "a", "b"]
    assert batch.entities == [["c-1"] * 3, ["7"] * 3]  # int join keys become their decimal str
    assert batch.features.dtype == np.float32 and batch.features.shape == (3, 5)
    assert batch.features[0].tolist() == [2.5, 1.0, 2.0, 3.0, 12.0]  # "hour" absent: its default
    assert batch.deadline_ms.tolist() == [1_700_000_000_500, 0, 0]
    assert batch.sent_ms.tolist() == [1_700_000_000_000, 0, 0]
    assert batch.reply_to == ["app.replies", None, None] and batch.version == ["v2", None, None]
    assert batch.source.dtype == np.int32 and batch.source.tolist() == [0, 1, 1]
    assert [(error.message_index, error.element_index, error.kind) for error in batch.errors] == [(1, 1, NOT_A_MAP)]


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
    decode_both([bytearray(message), memoryview(message), message], SPEC)


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
