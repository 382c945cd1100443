"""Rebalance: a second worker joins mid-stream, then the first one leaves (SIGTERM). No loss; the partitions
that move are drained and committed first, so repeats stay within the batches in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .checks import assert_nothing_lost
from .harness import Scenario, Tally
from .scenarios import rebalance


@pytest.mark.timeout(240)
def test_worker_joins_then_leaves_loses_nothing(scenario: Callable[..., Scenario]) -> None:
    result = asyncio.run(rebalance(scenario("rebalance"), count=4_000, rate=250))

    assert_nothing_lost(result, result.notes["repeat_bound"])
    assert result.notes["answered_by"]["second"] > 0, "the second worker never got a partition"
    assert result.notes["first_exit_code"] == 0


@pytest.mark.timeout(240)
def test_exactly_once_worker_joins_then_leaves_answers_every_request_once(scenario: Callable[..., Scenario]) -> None:
    """exactly_once across two rebalances: the partitions that move start at the offsets the previous owner's
    last transaction committed, read stable (a plain read in the gap before the transaction's markers gave the
    older offsets, and the new owner answered that batch again)."""
    moving = scenario("rebalance_exactly_once")
    moving.extra_env["STREAMSCORE_WORKER__PROCESSING_GUARANTEE"] = "exactly_once"
    result = asyncio.run(rebalance(moving, count=6_000, rate=200))

    assert_nothing_lost(result, 0)
    assert result.duplicated == 0, result.describe()
    assert result.notes["answered_by"]["second"] > 0, "the second worker never got a partition"


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_worker_joins_then_leaves_loses_nothing(scenario: Callable[..., Scenario],
                                                     soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(rebalance(scenario("rebalance"), count=50_000, rate=1_000))
    soak_report(result)

    assert_nothing_lost(result, result.notes["repeat_bound"])
