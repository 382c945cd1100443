"""A model version whose artifact does not match its manifest's sha256 appears while requests stream: it is
refused and the worker keeps serving the version it had. The short version is the e2e test
``test_tampered_new_version_is_refused_and_a_good_one_is_served``; this is its row in the soak table."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from .checks import assert_nothing_lost
from .harness import Scenario, Tally
from .scenarios import tampered_model


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_tampered_version_is_refused_while_serving(scenario: Callable[..., Scenario],
                                                        soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(tampered_model(scenario("tampered_model"), count=10_000, rate=1_000))
    soak_report(result)

    assert_nothing_lost(result, repeat_bound=0)
