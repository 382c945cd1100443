"""Assertions every scenario shares."""

from __future__ import annotations

from .harness import Tally


def assert_nothing_lost(result: Tally, repeat_bound: int | None = None) -> None:
    """Every id sent is answered (or dead-lettered), no prediction for an id never sent, repeats bounded."""
    print(result.describe())  # shown with -s, and with the failure
    assert result.lost == 0, f"lost requests: {result.describe()}"
    assert result.unexpected == 0, f"predictions for ids never sent: {result.describe()}"
    assert result.sent > 0 and result.answered + result.dead_lettered >= result.sent - result.lost, result.describe()
    if repeat_bound is not None:
        assert result.duplicated <= repeat_bound, f"more repeats than batches in flight: {result.describe()}"
