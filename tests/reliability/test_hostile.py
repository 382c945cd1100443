"""Hostile input: thousands of malformed messages (random bytes, truncated msgpack, wrong types, very long
strings and arrays, deep nesting, messages over 1 MiB, NaN and inf, unknown versions, refused reply_to topics,
gigabyte length headers) interleaved with valid requests (some with unknown entities, some batches, some with a
reply_to), and the contract cases: what other clients produce (tombstones and empty values, ext types, bin for
str, non-str map keys, invalid UTF-8, deep nesting under unknown keys, duplicate keys, every documented limit and
one past it), partly through confluent-kafka (librdkafka), each with its outcome written from
docs/wire-format.md. The worker never dies, its memory stays bounded, every bad message becomes exactly one dead
letter with its reason (a bad element of a batch message: one dead letter carrying that element's bytes), every
valid request is answered."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable

import pytest

from streamscore import fastpath

from .checks import assert_nothing_lost
from .harness import Scenario, Tally
from .hostile import (
    FLOAT32_MAX,
    FLOAT32_TO_INF,
    HostileOutcome,
    contract_table,
    decoder_disagreements,
    demo_spec,
    hostile,
    offline_contract,
)

RSS_GROWTH_LIMIT_MB = 400
"""A worker starts at a few hundred MiB; hostile input may not make it grow by more than this."""


def check(outcome: HostileOutcome) -> None:
    result = outcome.tally
    print(contract_table(outcome.contract_rows))  # shown with -s, and with the failure
    assert_nothing_lost(result, repeat_bound=0)
    assert not outcome.contract_mismatches, \
        f"{len(outcome.contract_mismatches)} contract cases differ from docs/wire-format.md:\n" + \
        "\n".join(outcome.contract_mismatches[:30])
    assert not outcome.mismatched, f"dead letters per message differ from one per bad message/element: " \
                                   f"{outcome.mismatched[:5]}"
    assert outcome.letter_kinds == outcome.expected.kinds, (outcome.letter_kinds, outcome.expected.kinds)
    assert result.dead_lettered == sum(outcome.expected.letters.values())
    assert outcome.expected.unknown_entity_ids and not outcome.not_marked_missing, outcome.not_marked_missing[:5]
    assert outcome.max_rss_mb < outcome.start_rss_mb + RSS_GROWTH_LIMIT_MB, \
        f"RSS grew from {outcome.start_rss_mb:.0f} to {outcome.max_rss_mb:.0f} MiB"
    assert outcome.expected.categories["tombstone"] and outcome.foreign_messages, "nothing went through librdkafka"


def test_float32_limits_are_what_the_contract_cases_say() -> None:
    """The two constants the float32 cases rest on, checked with the C cast (struct), not with a decoder."""
    assert struct.pack(">f", FLOAT32_MAX) == b"\x7f\x7f\xff\xff"
    assert struct.pack(">f", math.nextafter(FLOAT32_TO_INF, 0.0)) == b"\x7f\x7f\xff\xff"
    with pytest.raises(OverflowError):  # struct refuses exactly the doubles that round to inf
        struct.pack(">f", FLOAT32_TO_INF)


def test_the_decoder_agrees_with_the_contract_cases() -> None:
    """Every contract case through the decoder the worker loads, without Kafka: a quick, precise report of
    where the decoder and docs/wire-format.md part (the hostile scenarios below then check the worker)."""
    cases = [make() for make in offline_contract().variants()]
    disagreements = decoder_disagreements(cases, demo_spec(), fastpath.decode_batch)

    assert not disagreements, f"{fastpath.IMPLEMENTATION} decoder vs docs/wire-format.md:\n" + \
        "\n".join(disagreements)


@pytest.mark.timeout(240)
def test_hostile_input_is_dead_lettered_and_the_rest_answered(scenario: Callable[..., Scenario]) -> None:
    outcome = asyncio.run(hostile(scenario("hostile"), bad_count=5_000, good_count=1_500, oversized=3, rate=2_000,
                                  contract_count=400, fixed_rounds=1))

    check(outcome)
    assert outcome.expected.bad_messages >= 5_000 * 0.9


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_hostile_input(scenario: Callable[..., Scenario], soak_report: Callable[[Tally], None]) -> None:
    outcome = asyncio.run(hostile(scenario("hostile"), bad_count=112_000, good_count=25_000, oversized=20,
                                  rate=2_500, contract_count=20_000, fixed_rounds=5))
    soak_report(outcome.tally)

    check(outcome)
    assert outcome.expected.bad_messages >= 100_000  # a few of the generated "bad" ones turn out valid
