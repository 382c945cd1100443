"""Crash: SIGKILL the worker at random moments while requests stream, three times, restarting it each time.
Every request id gets a prediction, repeats are bounded by the batches in flight, no id is made up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .checks import assert_nothing_lost
from .harness import Scenario, Tally
from .scenarios import crash


@pytest.mark.timeout(240)
def test_sigkill_three_times_loses_nothing(scenario: Callable[..., Scenario]) -> None:
    result = asyncio.run(crash(scenario("crash"), count=5_000, rate=125))

    assert_nothing_lost(result, result.notes["repeat_bound"])
    assert result.dead_lettered == 0
    assert result.notes["kills_mid_stream"] >= 1, result.describe()


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_sigkill_three_times_loses_nothing(scenario: Callable[..., Scenario],
                                                soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(crash(scenario("crash"), count=50_000, rate=1_000))
    soak_report(result)

    assert_nothing_lost(result, result.notes["repeat_bound"])
