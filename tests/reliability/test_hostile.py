"""Hostile input: thousands of malformed messages (random bytes, truncated msgpack, wrong types, very long
strings and arrays, deep nesting, messages over 1 MiB, NaN and inf, unknown versions, refused reply_to topics,
gigabyte length headers) interleaved with valid requests (some with unknown entities, some batches, some with a
reply_to). The worker never dies, its memory stays bounded, every bad message becomes exactly one dead letter
with its reason, every valid request is answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .checks import assert_nothing_lost
from .harness import Scenario, Tally
from .hostile import HostileOutcome, hostile

RSS_GROWTH_LIMIT_MB = 400
"""A worker starts at a few hundred MiB; hostile input may not make it grow by more than this."""


def check(outcome: HostileOutcome) -> None:
    result = outcome.tally
    assert_nothing_lost(result, repeat_bound=0)
    assert not outcome.mismatched, f"dead letters per message differ from one per bad message/element: " \
                                   f"{outcome.mismatched[:5]}"
    assert outcome.letter_kinds == outcome.expected.kinds, (outcome.letter_kinds, outcome.expected.kinds)
    assert result.dead_lettered == sum(outcome.expected.letters.values())
    assert outcome.expected.unknown_entity_ids and not outcome.not_marked_missing, outcome.not_marked_missing[:5]
    assert outcome.max_rss_mb < outcome.start_rss_mb + RSS_GROWTH_LIMIT_MB, \
        f"RSS grew from {outcome.start_rss_mb:.0f} to {outcome.max_rss_mb:.0f} MiB"


@pytest.mark.timeout(240)
def test_hostile_input_is_dead_lettered_and_the_rest_answered(scenario: Callable[..., Scenario]) -> None:
    outcome = asyncio.run(hostile(scenario("hostile"), bad_count=5_000, good_count=1_500, oversized=3, rate=2_000))

    check(outcome)
    assert outcome.expected.bad_messages >= 5_000 * 0.9


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_hostile_input(scenario: Callable[..., Scenario], soak_report: Callable[[Tally], None]) -> None:
    outcome = asyncio.run(hostile(scenario("hostile"), bad_count=102_000, good_count=25_000, oversized=20,
                                  rate=2_500))
    soak_report(outcome.tally)

    check(outcome)
    assert outcome.expected.bad_messages >= 100_000  # a few of the generated "bad" ones turn out valid
