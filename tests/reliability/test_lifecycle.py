"""Lifecycle: canary, promote and rollback (``streamscore models``) while requests stream through two workers, and
one worker SIGKILLed after the promote and started again.

Nothing is lost, no worker restarts except the one killed, and every prediction's version is one the deployment
in force allowed when its batch was received (``received_ms``): production, or the canary for a card the hash
puts on it (``canary_share``). After each change a transition window (reload interval + 1 s after the command
returned) allows the state before it too; outside the windows a version the state does not allow is a violation.
The killed worker comes back serving the deployment in force.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from streamscore.workers.deployments import Deployment, read_records
from streamscore.workers.stages import canary_share

from .checks import assert_nothing_lost
from .harness import (
    MODEL,
    Collector,
    Load,
    Scenario,
    Tally,
    cleanup,
    request_messages,
    tally,
    wait_answering,
    wait_for,
)
from .scenarios import _finish, in_flight_bound

RELOAD_S = 1.0
WINDOW_MS = int(RELOAD_S * 1000) + 1000
"""After a change's command returned: how long the state before it is still allowed."""
CANARY_WEIGHT = 0.3


@dataclass(frozen=True)
class Seen:
    """One prediction as it came (repeats included)."""

    id: str
    version: str
    received_ms: int
    sent_ms: int
    worker: str


class VersionCollector(Collector):
    """The harness's collector that also keeps every prediction's version, times and worker id."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self.seen: list[Seen] = []

    def _prediction(self, value: bytes, topic: str | None = None) -> None:
        super()._prediction(value, topic)
        prediction = msgpack.unpackb(value, raw=False)
        self.seen.append(Seen(prediction["id"], str(prediction["version"]), int(prediction["received_ms"]),
                              int(prediction["sent_ms"]), str(prediction["lineage"]["worker_id"])))


@dataclass
class ChangeRun:
    """One ``streamscore models`` command: its words, when it ran (epoch ms) and what it printed."""

    argv: tuple[str, ...]
    started_ms: int
    returned_ms: int
    output: str
    state: Deployment | None = None
    at_ms: int = 0
    """``changed.at_ms`` of the record it published (stamped just before publishing)."""


async def models_command(scenario: Scenario, *argv: str) -> ChangeRun:
    started = time.time_ns() // 1_000_000
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamscore", "models", *argv, env={**os.environ, **scenario.env},
        cwd=scenario.folder, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    returned = time.time_ns() // 1_000_000
    text = output.decode(errors="replace").strip()
    assert process.returncode == 0, f"streamscore models {' '.join(argv)} exited {process.returncode}: {text}"
    return ChangeRun(tuple(argv), started, returned, text)


def allowed(state: Deployment, card: str) -> str:
    """The version ``state`` routes ``card`` to."""
    assert state.production is not None
    if state.canary is not None and canary_share([card], state.canary.weight)[0]:
        return state.canary.version
    return state.production


def candidates(changes: list[ChangeRun], received_ms: int) -> list[Deployment]:
    """The states that may be in force at ``received_ms``: the newest one published by then, and the one before
    each change whose window had not passed yet."""
    states: list[Deployment] = []
    for before, change in itertools.pairwise(changes):
        if change.at_ms <= received_ms < change.returned_ms + WINDOW_MS and before.state is not None:
            states.append(before.state)
    in_force = [change.state for change in changes if change.at_ms <= received_ms and change.state is not None]
    return [*states, in_force[-1]] if in_force else states


async def lifecycle(scenario: Scenario, count: int, rate: float, seed: int = 21) -> Tally:
    """Canary at 0.3, promote, SIGKILL one worker and start it again, rollback, while ``count`` requests stream."""
    models = scenario.folder / "models"  # a copy: the session's library stays as it is
    shutil.copytree(scenario.library.data_dir / "models", models)
    v2 = models / MODEL / "2"
    shutil.copytree(models / MODEL / "1", v2)  # the same artifact, so its sha256 still matches
    manifest = json.loads((v2 / "manifest.json").read_text())
    (v2 / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    scenario.extra_env.update({"STREAMSCORE_MODELS_DIR": str(models),
                               "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": f"{RELOAD_S:g}"})
    await scenario.create_topics()
    # with v2 in the library the implicit production would be v2: start from an explicit v1
    changes = [await models_command(scenario, "promote", MODEL, "1")]

    messages = request_messages(scenario.prefix, count, scenario.library.cards, scenario.library.merchants, seed)
    # sent after the rollback's window whenever the rollback came (the restarted worker's return, which it
    # waits for, takes a session timeout and more on a loaded machine): the rollback always meets traffic
    tail = request_messages(f"{scenario.prefix}-tail", max(200, count // 25), scenario.library.cards,
                            scenario.library.merchants, seed + 1)
    card_of = {message.ids[0]: message.key.decode() for message in [*messages, *tail]}
    duration = count / rate
    first, second = scenario.worker("a"), scenario.worker("b")
    started = time.monotonic()
    killed_pid = restarted_pid = 0
    with cleanup(first, second):
        first.start()
        second.start()
        await wait_answering(scenario, first)
        await wait_answering(scenario, second)
        first_pid = first.pid
        collector = await VersionCollector(scenario).start()
        try:
            load = Load(scenario.settings, scenario.requests_topic, rate)
            sending = asyncio.create_task(load.send_all(messages))
            t0 = time.monotonic()

            async def at(share: float) -> None:
                await asyncio.sleep(max(0.0, t0 + share * duration - time.monotonic()))
                assert first.alive and second.alive, f"a worker died:\n{first.log_tail()}\n{second.log_tail()}"

            try:
                await at(0.05)
                changes.append(await models_command(scenario, "canary", MODEL, "2", "--weight", f"{CANARY_WEIGHT:g}"))
                await at(0.15)
                changes.append(await models_command(scenario, "promote", MODEL, "2"))
                await asyncio.sleep(WINDOW_MS / 1000)  # both workers serve the promoted v2 by now
                await at(0.25)
                killed_pid = second.pid
                second.kill()
                second.start()
                restarted_pid = second.pid
                # the rollback once the restarted worker answered (its partitions come back after the dead
                # member's session timed out): it must have come back serving the promoted v2
                await wait_for(lambda: any(seen.worker.endswith(f":{restarted_pid}") for seen in collector.seen),
                               60, "a prediction from the restarted worker")
                await at(0.6)
                changes.append(await models_command(scenario, "rollback", MODEL))
                await sending
                await asyncio.sleep(max(0.0, (changes[-1].returned_ms + WINDOW_MS) / 1000 - time.time()))
                await load.send_all(tail)
                await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=120)
            finally:
                await _finish(sending)
        finally:
            await collector.stop()
        alive = {"a": first.alive, "b": second.alive}
        first_pid_kept = first.alive and first.pid == first_pid
        starts = {"a": first.starts, "b": second.starts}
        logs = first.log_tail() + "\n" + second.log_tail()
    assert all(alive.values()), f"a worker died: {alive}\n{logs}"
    assert first_pid_kept and starts == {"a": 1, "b": 2}, f"a worker restarted: {starts}\n{logs}"

    records = {record.state.seq: record.state for record in await read_records(scenario.settings, MODEL)
               if record.state is not None}
    for number, change in enumerate(changes, 1):
        change.state = records[number]
        change.at_ms = change.state.changed.at_ms
    assert [change.state.summary() for change in changes if change.state] == [
        "production 1, canary -, shadow -, history ['2']",
        f"production 1, canary 2 ({CANARY_WEIGHT:g}), shadow -, history ['2']",
        "production 2, canary -, shadow -, history ['1']",
        "production 1, canary -, shadow -, history []"], [change.output for change in changes]

    (scenario.folder / "predictions.jsonl").write_text("".join(json.dumps(seen.__dict__) + "\n"
                                                               for seen in collector.seen))
    labels = {first_pid: "a", killed_pid: "b", restarted_pid: "b-restarted"}
    violations: list[Seen] = []
    in_window = 0
    for seen in collector.seen:
        if seen.id.startswith("probe-"):
            continue
        states = candidates(changes, seen.received_ms)
        in_window += len(states) > 1
        if seen.version not in {allowed(state, card_of[seen.id]) for state in states}:
            violations.append(seen)
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    result.notes.update(
        repeat_bound=in_flight_bound(scenario, 2), predictions=len(collector.seen), in_windows=in_window,
        violations=len(violations), violations_sample=[f"{v.id} v{v.version} at {v.received_ms} by "
                                                       f"{labels.get(_pid(v.worker), v.worker)}"
                                                       for v in violations[:5]],
        first_new_version_ms=_first_new(changes, collector.seen, card_of, labels),
        restarted_first=_restarted_first(collector.seen, restarted_pid, changes),
        after_rollback=sum(seen.received_ms >= changes[-1].returned_ms + WINDOW_MS for seen in collector.seen),
        changes_ms={change.argv[0] + ("-1" if index == 0 else ""): change.returned_ms - change.started_ms
                    for index, change in enumerate(changes)})
    return result


def _pid(worker_id: str) -> int:
    return int(worker_id.rsplit(":", 1)[1])


def _first_new(changes: list[ChangeRun], seen: list[Seen], card_of: dict[str, str],
               labels: dict[int, str]) -> dict[str, dict[str, int | None]]:
    """Per change and worker: ms from the command's return to the first prediction received that only the new
    state allows (for a card the change moved to another version)."""
    out: dict[str, dict[str, int | None]] = {}
    for before, change in itertools.pairwise(changes):
        assert before.state is not None and change.state is not None
        name = change.argv[0]
        firsts: dict[str, int | None] = {}
        for label in dict.fromkeys(labels.values()):
            times = [s.received_ms for s in seen if labels.get(_pid(s.worker)) == label and s.received_ms >=
                     change.at_ms and not s.id.startswith("probe-")
                     and s.version == allowed(change.state, card_of[s.id]) != allowed(before.state, card_of[s.id])]
            firsts[label] = min(times) - change.returned_ms if times else None
        out[name] = firsts
    return out


def _restarted_first(seen: list[Seen], pid: int, changes: list[ChangeRun]) -> dict[str, Any]:
    """The restarted worker's first prediction: its version, and which state was in force then."""
    mine = sorted((s for s in seen if _pid(s.worker) == pid), key=lambda s: s.received_ms)
    if not mine:
        return {}
    in_force = [change for change in changes if change.at_ms <= mine[0].received_ms]
    return {"version": mine[0].version, "in_force": in_force[-1].argv[0] if in_force else "-",
            "predictions": len(mine)}


def _check(result: Tally) -> None:
    assert_nothing_lost(result, result.notes["repeat_bound"])
    assert result.dead_lettered == 0, result.describe()
    assert result.notes["violations"] == 0, f"versions the deployment did not allow: {result.describe()}"
    assert result.notes["restarted_first"].get("in_force") == "promote", f"restarted late: {result.describe()}"
    assert result.notes["restarted_first"].get("version") == "2", result.describe()
    assert result.notes["after_rollback"] > 0, f"no prediction after the rollback's window: {result.describe()}"


@pytest.mark.timeout(240)
def test_promote_canary_rollback_while_streaming(scenario: Callable[..., Scenario]) -> None:
    result = asyncio.run(lifecycle(scenario("lifecycle"), count=10_000, rate=400))
    _check(result)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_promote_canary_rollback_while_streaming(scenario: Callable[..., Scenario],
                                                     soak_report: Callable[[Tally], None]) -> None:
    result = asyncio.run(lifecycle(scenario("lifecycle"), count=50_000, rate=1_000))
    soak_report(result)
    _check(result)
