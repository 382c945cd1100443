"""The Cassandra store's concurrent round (``featurestore/cassandra.py``) when the driver reports a statement's
outcome twice, as cassandra-driver does with speculative execution when both executions answer: the second
report must change nothing. Counted twice, it resolved the round before the other statements had answered,
and their entities read as absent (defaults, cached as negative entries)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from streamscore.featurestore.cassandra import _ConcurrentRound


class TwiceAnsweringFuture:
    """Answers on a thread after ``delay`` seconds, then once more (a second, speculative execution)."""

    def __init__(self, rows: Any, delay: float) -> None:
        self.rows, self.delay = rows, delay

    def add_callbacks(self, callback: Any, errback: Any, callback_args: tuple = (), errback_args: tuple = ()) -> None:
        def answer() -> None:
            callback(self.rows, *callback_args)
            callback(self.rows, *callback_args)

        threading.Timer(self.delay, answer).start()


class Session:
    def __init__(self, delays: list[float]) -> None:
        self.delays = delays

    def execute_async(self, statement: Any, params: tuple) -> TwiceAnsweringFuture:
        index = params[0]
        return TwiceAnsweringFuture([f"row-{index}"], self.delays[index])


def test_a_statement_answered_twice_counts_once_and_the_round_waits_for_every_other() -> None:
    async def scenario() -> list[Any]:
        delays = [0.0, 0.1, 0.5, 0.5]  # the first answers (twice) at once, the second soon, the others later
        work: list[tuple[Any, tuple]] = [(None, (index,)) for index in range(len(delays))]
        round_ = _ConcurrentRound(Session(delays), work, concurrency=2, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        return await asyncio.wait_for(round_.start(), 5)

    results = asyncio.run(scenario())

    assert results == [["row-0"], ["row-1"], ["row-2"], ["row-3"]]
