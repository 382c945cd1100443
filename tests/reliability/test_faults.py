"""Faults injected inside a real worker (tests/reliability/faulty_worker.py) against the real stack.

- An exception in each pipeline stage, in the publisher and in the offset commit: the batch still ends
  answered or dead-lettered, and the good requests sent after it are answered.
- A batch that hangs, or a stage that blocks the event loop: the worker reports not ready, says why and exits
  with code 70 within its stall bound; a worker started after it answers everything, the hung request too.
- SIGTERM while a batch is stuck: the worker is gone within its shutdown bound.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from streamscore.streams.client import Client

from .harness import MODEL, Collector, Scenario, WorkerProcess, cleanup, request, wait_answering, wait_for

ISOLATED = ("decode", "features", "assemble", "encode")
"""Stages whose failure is isolated to the request at fault: it is dead-lettered processing_failed."""


def _outcome(collector: Collector, request_id: str) -> str | None:
    """'ok'/'error'/... for a prediction, 'dlq:<kind>' for a dead letter keyed by the id, None for nothing."""
    if request_id in collector.first:
        return str(collector.first[request_id]["status"])
    kinds = [letter.kind for letter in collector.letters if letter.key == request_id.encode()]
    return f"dlq:{kinds[0]}" if kinds else None


async def _fault_then_good(client: Client, collector: Collector, stage: str) -> tuple[str | None, int]:
    fault_id = f"fault-{stage}-1"
    await client.produce(MODEL, request(fault_id, "card-1", "merchant-1"), key=fault_id)
    await wait_for(lambda: _outcome(collector, fault_id) is not None, 45, f"an outcome for {fault_id}")
    good = [f"good-after-{stage}-{index}" for index in range(10)]
    for request_id in good:
        await client.produce(MODEL, request(request_id, "card-2", "merchant-2"))
    await wait_for(lambda: all(request_id in collector.first for request_id in good), 45,
                   f"the good requests after the {stage} fault")
    return _outcome(collector, fault_id), sum(collector.first[request_id]["status"] == "ok" for request_id in good)


async def _every_fault(scenario: Scenario) -> dict[str, tuple[str | None, int]]:
    await scenario.create_topics()
    worker = scenario.worker("faulty", faulty=True)
    outcomes = {}
    with cleanup(worker.start()):
        await wait_answering(scenario, worker)
        collector = await Collector(scenario).start()
        try:
            async with Client(scenario.settings) as client:
                for stage in (*ISOLATED, "infer", "publish", "commit"):
                    outcomes[stage] = await _fault_then_good(client, collector, stage)
        finally:
            await collector.stop()
        assert worker.alive, worker.log_tail()
        log = worker.log_text()
    for stage in (*ISOLATED, "infer", "publish", "commit"):
        assert f"fault injected: {stage}" in log, f"the {stage} fault never fired"
    return outcomes


@pytest.mark.timeout(400)
def test_an_exception_in_any_stage_the_publisher_or_the_commit_never_stalls_the_worker(
        scenario: Callable[..., Scenario]) -> None:
    outcomes = asyncio.run(_every_fault(scenario("faults")))

    for stage in ISOLATED:
        assert outcomes[stage] == ("dlq:processing_failed", 10), (stage, outcomes[stage])
    assert outcomes["infer"] == ("error", 10)  # a model failure answers its batch with status error
    assert outcomes["publish"] == ("ok", 10)  # published again until Kafka took it
    assert outcomes["commit"] == ("ok", 10)  # committed with the next commit


async def _hang(scenario: Scenario, marker: str, worker: WorkerProcess) -> tuple[float, list[str]]:
    """Send a request that hangs the worker; return how long it lived after that, and its /readyz reasons."""
    await scenario.create_topics()
    worker.start()
    await wait_answering(scenario, worker)
    reasons: list[str] = []
    async with Client(scenario.settings) as client:
        await client.produce(MODEL, request(f"{marker}-1", "card-1", "merchant-1"), key=marker)
    sent = time.monotonic()
    while worker.alive and time.monotonic() - sent < 60:
        ready = worker.status("readyz")
        if ready is not None and not ready.get("ready"):
            reasons.append(str(ready.get("reason")))
        await asyncio.sleep(0.2)
    return time.monotonic() - sent, reasons


@pytest.mark.timeout(300)
@pytest.mark.parametrize("marker", ["fault-hang", "fault-block"])
def test_a_worker_that_cannot_make_progress_says_so_and_exits(scenario: Callable[..., Scenario],
                                                              marker: str) -> None:
    run = scenario(marker.replace("fault-", "stall-"))
    stuck = run.worker("stuck", faulty=True, STREAMSCORE_WORKER__STALL_TIMEOUT_S="4",
                       STREAMSCORE_WORKER__SHUTDOWN_TIMEOUT_S="4")
    healthy = run.worker("after", faulty=False, STREAMSCORE_TEST_FAULTS="off")
    with cleanup(stuck, healthy):
        lived, reasons = asyncio.run(_hang(run, marker, stuck))
        assert not stuck.alive, f"still running {lived:.0f} s after the {marker} request:\n{stuck.log_tail()}"
        assert stuck.returncode == 70, stuck.log_tail()
        assert lived < 4 + 4 + 6, f"exited {lived:.1f} s after the stall began"
        assert "cannot make progress" in stuck.log_text() or "event loop has been blocked" in stuck.log_text()
        if marker == "fault-hang":  # the loop is free: /readyz said why before the exit
            assert any("no batch committed" in reason for reason in reasons), reasons

        async def answered_after_restart() -> None:
            collector = await Collector(run).start()
            try:
                healthy.start()
                await wait_for(lambda: f"{marker}-1" in collector.first, 90, "the hung request, answered")
            finally:
                await collector.stop()

        asyncio.run(answered_after_restart())  # nothing was committed for it: the next worker answers it


async def _terminate_while_stuck(scenario: Scenario, worker: WorkerProcess) -> tuple[float, int | None]:
    await scenario.create_topics()
    worker.start()
    await wait_answering(scenario, worker)
    async with Client(scenario.settings) as client:
        await client.produce(MODEL, request("fault-hang-1", "card-1", "merchant-1"), key="fault-hang")
    await wait_for(lambda: "fault injected: hang" in worker.log_text(), 30, "the batch to hang")
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    while worker.alive and time.monotonic() - started < 60:
        await asyncio.sleep(0.1)
    return time.monotonic() - started, worker.returncode


@pytest.mark.timeout(200)
def test_sigterm_with_a_stuck_batch_exits_within_the_shutdown_bound(scenario: Callable[..., Scenario]) -> None:
    run = scenario("sigterm-stuck")
    worker = run.worker("stuck", faulty=True, STREAMSCORE_WORKER__STALL_TIMEOUT_S="120",
                        STREAMSCORE_WORKER__SHUTDOWN_TIMEOUT_S="5")
    with cleanup(worker):
        took, code = asyncio.run(_terminate_while_stuck(run, worker))
        assert not worker.alive, worker.log_tail()
        assert took < 5 + 2, f"SIGTERM took {took:.1f} s (bound 5 s)"
        assert code == 71, f"exit code {code}:\n{worker.log_tail()}"
        assert "shutdown still not finished" in worker.log_text()
