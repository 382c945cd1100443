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


@pytest.mark.timeout(240)
def test_exactly_once_sigkill_three_times_answers_every_request_once(scenario: Callable[..., Scenario]) -> None:
    """processing_guarantee exactly_once: each batch's answers and offsets in one transaction; a reader with
    read_committed sees every request answered exactly once across three SIGKILLs (at_least_once repeats the
    batches in flight at each kill)."""
    crashing = scenario("crash_exactly_once")
    crashing.extra_env.update({"STREAMSCORE_WORKER__PROCESSING_GUARANTEE": "exactly_once",
                               "STREAMSCORE_WORKER__WORKER_ID": "crash-eos"})
    result = asyncio.run(crash(crashing, count=3_000, rate=200, kills=2))
    print(result.describe())

    assert_nothing_lost(result, 0)
    assert result.duplicated == 0 and result.dead_lettered == 0, result.describe()
    assert result.notes["kills_mid_stream"] >= 1, result.describe()


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_sigkill_three_times_loses_nothing(scenario: Callable[..., Scenario],
                                                soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(crash(scenario("crash"), count=50_000, rate=1_000))
    soak_report(result)

    assert_nothing_lost(result, result.notes["repeat_bound"])
