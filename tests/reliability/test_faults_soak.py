"""Faults under load: a stream of good requests through the faulty worker (tests/reliability/faulty_worker.py)
with fault markers sprinkled in, every stage at many moments, while the worker keeps many batches in flight.

A marker is a request id: ``fault-<stage>-N``. Each outcome is the one test_faults.py expects of a single fault:

- ``decode``, ``features``, ``assemble``, ``encode``: the stage raises for every batch holding the marker, so the
  worker splits the batch down to that message and dead-letters it alone, ``processing_failed``, the message
  byte for byte (element -1), keyed by its original key; the rest of each of those batches is answered;
- ``publish``: the first two sends of its prediction raise; it is published again until Kafka took it: answered;
- ``commit``: the two offset commits after its prediction was queued raise; it is committed with a later one:
  answered.

Asserted: nothing lost, every fault request exactly one outcome (its dead letter and no prediction, or its
answer and no dead letter), every good request answered ``ok``, no dead letter but the faults', every fault
fired, and repeats bounded: there is no crash and no rebalance here, so the only repeats are those of a
publication that failed (an injected publish fault) and was sent again whole, groups Kafka had already taken
included (streams/delivery.py, "repeats are within at-least-once"): at most one batch per injected failure.
How many there were is in the row's notes (``repeated_ids``, ``most_repeated``, ``repeated_fault_ids``).

The pace matters. Each batch holding an isolated-stage fault costs the worker over a second (three attempts with
0.2, 0.4 and 0.6 s pauses, then the halving), one batch at a time; a stream faster than that makes batches grow to
``batch_max`` and gather many faults each. A publication holding n ``fault-publish`` requests then fails 2n times
in a row, its backoff grows to 5 s (the attempt count is not reset when an attempt gets further), and past about
eight such failures no batch is committed for ``STALL_TIMEOUT_S`` and the watchdog stops the worker (exit 70).
At 1,000 requests/s with 300 faults that happened; the soak runs at 200/s (a fault every ~1 s).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest

from .checks import assert_nothing_lost
from .harness import Collector, Letter, Load, Message, Scenario, Tally, request, request_messages, tally
from .scenarios import streaming

ISOLATED = ("decode", "features", "assemble", "encode")
"""Stages whose failure is isolated to the request at fault: it is dead-lettered processing_failed."""
ANSWERED = ("publish", "commit")
"""Faults after the prediction was made: it is still published, once."""


@dataclass
class FaultOutcome:
    tally: Tally
    problems: list[str] = field(default_factory=list)
    """Fault or good requests whose outcome is not the documented one (must be empty)."""


def fault_plan(prefix: str, count: int, per_stage: int, cards: list[str], merchants: list[str],
               seed: int) -> tuple[list[Message], dict[str, Message]]:
    """``count`` good requests keyed by card and ``per_stage`` fault requests per stage keyed by their id,
    sprinkled over the stream: the stream is cut in as many stretches as there are faults, and each fault (stages
    shuffled) goes at a random place of its own stretch, so faults come at a steady pace, not in clusters."""
    rng = random.Random(seed)
    good = request_messages(prefix, count, cards, merchants, seed)
    faults = {}
    for stage in (*ISOLATED, *ANSWERED):
        for number in range(per_stage):
            fault_id = f"fault-{stage}-{number}"
            body = request(fault_id, rng.choice(cards), rng.choice(merchants), round(rng.uniform(1, 400), 2))
            faults[fault_id] = Message(fault_id.encode(), msgpack.packb(body), (fault_id,))
    order = list(faults.values())
    rng.shuffle(order)
    stretch = count / len(order)
    at = {min(count, round(index * stretch + rng.uniform(0.05, 0.95) * stretch)): fault
          for index, fault in enumerate(order)}
    assert len(at) == len(order), "two faults at one place"
    messages = []
    for index, message in enumerate(good):
        if index in at:
            messages.append(at[index])
        messages.append(message)
    messages += [fault for index, fault in at.items() if index >= len(good)]
    return messages, faults


async def faults_under_load(scenario: Scenario, count: int, per_stage: int, rate: float,
                            seed: int = 19) -> FaultOutcome:
    await scenario.create_topics()
    messages, faults = fault_plan(scenario.prefix, count, per_stage, scenario.library.cards,
                                  scenario.library.merchants, seed)
    isolated = {fault_id for fault_id in faults if fault_id.split("-")[1] in ISOLATED}
    worker = scenario.worker("faulty", faulty=True)
    started = time.monotonic()
    async with streaming(scenario, worker) as collector:
        load = Load(scenario.settings, scenario.requests_topic, rate)
        await load.send_all(messages)
        sent_s = time.monotonic() - started
        answered_ids = load.sent_ids - isolated
        lettered_keys = {fault_id.encode() for fault_id in isolated}

        def done() -> bool:
            return answered_ids <= collector.counts.keys() and \
                lettered_keys <= {letter.key for letter in collector.letters}

        await collector.settle(done, timeout=240)
        assert worker.alive, f"the faulty worker died:\n{worker.log_tail()}"
        log = worker.log_text()
    result = tally(scenario.name, collector, load.sent_ids - isolated, load.attempted_ids,
                   expected_letters=Counter(dict.fromkeys(lettered_keys, 1)), seconds=time.monotonic() - started)
    fired = {stage: log.count(f"fault injected: {stage}") for stage in (*ISOLATED, *ANSWERED)}
    repeated = sorted(((count, request_id) for request_id, count in collector.counts.items() if count > 1),
                      reverse=True)
    # no crash and no rebalance: the only repeats allowed come from a publication that failed and was sent
    # again as a whole (its groups Kafka already took included), at most one batch per injected failure
    bound = fired["publish"] * scenario.settings.worker.batch_max
    result.notes.update(faults=len(faults), dead_lettered_faults=len(isolated), fired=fired,
                        sent_after_s=round(sent_s, 1), repeat_bound=bound, repeated_ids=len(repeated),
                        most_repeated=repeated[:3], repeated_fault_ids={
                            request_id: count for count, request_id in repeated if request_id in faults})
    (scenario.folder / "repeated.txt").write_text("".join(f"{request_id} x{count}\n" for count, request_id in repeated))
    problems = _problems(collector, faults, isolated, load.sent_ids)
    problems += [f"the {stage} fault never fired" for stage, times in fired.items() if not times]
    return FaultOutcome(result, problems)


def _problems(collector: Collector, faults: dict[str, Message], isolated: set[str], sent_ids: set[str]) -> list[str]:
    letters_by_key: dict[bytes | None, list[Letter]] = {}
    for letter in collector.letters:
        letters_by_key.setdefault(letter.key, []).append(letter)
    problems = []
    for fault_id, message in faults.items():
        letters = letters_by_key.get(message.key, [])
        answers = collector.counts.get(fault_id, 0)
        if fault_id in isolated:
            wanted = ("processing_failed", -1, hashlib.sha256(message.value).hexdigest())
            seen = [(letter.kind, letter.element, letter.value_sha256) for letter in letters]
            if seen != [wanted] or answers:
                problems.append(f"{fault_id}: expected one dead letter processing_failed [-1] carrying the message; "
                                f"got {len(letters)} letters {[(kind, element) for kind, element, _ in seen]} "
                                f"(value the message: {[sha == wanted[2] for _, _, sha in seen]}), {answers} answers")
        elif not answers or letters or collector.first[fault_id]["status"] != "ok":
            status = collector.first.get(fault_id, {}).get("status")
            problems.append(f"{fault_id}: expected an answer ok and no dead letter; got {answers} answers (first "
                            f"{status}), {len(letters)} letters {[letter.kind for letter in letters]}")
    fault_keys = {message.key for message in faults.values()}
    stray = [letter for letter in collector.letters if letter.key not in fault_keys]
    if stray:
        problems.append(f"{len(stray)} dead letters of good requests, e.g. {stray[:3]}")
    not_ok = [(request_id, collector.first[request_id]["status"]) for request_id in sent_ids - set(faults)
              if request_id in collector.first and collector.first[request_id]["status"] != "ok"]
    if not_ok:
        problems.append(f"{len(not_ok)} good requests answered but not ok, e.g. {not_ok[:5]}")
    return problems


def check(outcome: FaultOutcome) -> None:
    result = outcome.tally
    assert_nothing_lost(result, result.notes["repeat_bound"])
    assert not outcome.problems, "\n".join(outcome.problems[:30])
    assert result.dead_lettered == result.notes["dead_lettered_faults"], result.describe()


@pytest.mark.timeout(240)
def test_faults_sprinkled_in_a_stream_each_get_one_outcome(scenario: Callable[..., Scenario]) -> None:
    outcome = asyncio.run(faults_under_load(scenario("faults-stream"), count=3_000, per_stage=4, rate=500))

    check(outcome)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_faults_under_load(scenario: Callable[..., Scenario], soak_report: Callable[[Tally], None]) -> None:
    # 240 faults in 50k requests. The pace is what one faulty worker absorbs: a batch holding a fault of an
    # isolated stage costs it over a second (three attempts with pauses, then the halving), so at 200 requests/s a
    # fault comes every ~1 s and the worker keeps up; much faster and its batches grow to thousands of messages
    # that each hold many faults (see the module docstring)
    outcome = asyncio.run(faults_under_load(scenario("faults-soak"), count=50_000, per_stage=40, rate=200))
    soak_report(outcome.tally)

    check(outcome)
