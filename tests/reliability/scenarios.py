"""The reliability scenarios, each an async function of its size, shared by the short tests (normal suite) and
the soak (``make soak``). Each returns a ``Tally`` and asserts what must hold while it runs; the callers assert
the tally (nothing lost, repeats bounded) so the soak can record every row before it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from .harness import (
    MODEL,
    Collector,
    Load,
    Message,
    PrivateStack,
    RedisProcess,
    Scenario,
    Tally,
    TcpProxy,
    WorkerProcess,
    cleanup,
    request,
    request_messages,
    tally,
    wait_answering,
    wait_for,
)


class Outage(Protocol):
    """A server a scenario takes away and brings back."""

    name: str

    async def down(self) -> None: ...

    async def up(self) -> None: ...


@dataclass
class StackServerOutage:
    """A private stack server killed by its pid (SIGKILL: no goodbye) and started again through the Stack API."""

    stack: PrivateStack
    name: str
    signum: signal.Signals = signal.SIGKILL

    async def down(self) -> None:
        await asyncio.to_thread(self.stack.kill, self.name, self.signum)

    async def up(self) -> None:
        await asyncio.to_thread(self.stack.up)


@dataclass
class RedisOutage:
    redis: RedisProcess
    name: str = "redis"

    async def down(self) -> None:
        await asyncio.to_thread(self.redis.kill)

    async def up(self) -> None:
        await asyncio.to_thread(self.redis.start)


@dataclass
class ProxyOutage:
    proxy: TcpProxy
    name: str = "cassandra (proxy)"

    async def down(self) -> None:
        await asyncio.to_thread(self.proxy.cut)

    async def up(self) -> None:
        await asyncio.to_thread(self.proxy.restore)


@contextlib.asynccontextmanager
async def streaming(scenario: Scenario, *workers: WorkerProcess, follow: Sequence[str] = ()) -> Any:
    """Workers started and answering, a collector reading every outcome (predictions on ``follow`` topics too);
    all stopped on the way out."""
    with cleanup(*workers):
        for worker in workers:
            worker.start()
        for worker in workers:
            await wait_answering(scenario, worker)
        collector = await Collector(scenario, follow).start()
        try:
            yield collector
        finally:
            await collector.stop()


async def _finish(sending: asyncio.Task) -> None:
    if not sending.done():
        sending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sending


def in_flight_bound(scenario: Scenario, events: int) -> int:
    """Most repeats ``events`` crashes or rebalances may cause: every batch in flight, each time."""
    worker = scenario.settings.worker
    return events * worker.max_batches_in_flight * worker.batch_max


# ------------------------------------------------------------------------------------------------ crash


async def crash(scenario: Scenario, count: int, rate: float, kills: int = 3, seed: int = 11) -> Tally:
    """SIGKILL the worker at random moments while requests stream (once a random share of them was sent and
    the worker answered something since its last start), and start it again each time."""
    rng = random.Random(seed)
    await scenario.create_topics()
    worker = scenario.worker("crash")
    started = time.monotonic()
    shares = sorted(rng.uniform(0.1, 0.7) for _ in range(kills))
    mid_stream = 0
    async with streaming(scenario, worker) as collector:
        load = Load(scenario.settings, scenario.requests_topic, rate)
        sending = asyncio.create_task(load.send_all(request_messages(scenario.prefix, count, scenario.library.cards,
                                                                     scenario.library.merchants, seed)))

        def caught_up() -> bool:  # nothing left to answer: a kill now is no longer mid-stream
            return sending.done() and load.sent_ids <= collector.counts.keys()

        try:
            for share in shares:
                progressed = _progress(collector)
                try:
                    await wait_for(lambda: (load.acked >= share * count and progressed()) or caught_up(),  # noqa: B023
                                   120, "the worker to make progress")
                except AssertionError as stuck:
                    raise AssertionError(f"{stuck}; its stacks:\n{worker.stacks()}\n{worker.log_tail()}") from None
                mid_stream += not sending.done()
                worker.kill()
                worker.start()
            await sending
            await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=120)
        finally:
            await _finish(sending)
        assert worker.alive, f"the restarted worker died:\n{worker.log_tail()}"
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    result.notes.update(kills=kills, kills_mid_stream=mid_stream, repeat_bound=in_flight_bound(scenario, kills))
    return result


def _progress(collector: Collector) -> Callable[[], bool]:
    """True once something more was answered than now."""
    mark = collector.answered
    return lambda: collector.answered > mark


# -------------------------------------------------------------------------------------------- rebalance


async def rebalance(scenario: Scenario, count: int, rate: float, seed: int = 12) -> Tally:
    """A second worker joins mid-stream (partitions move to it), then the first leaves (SIGTERM)."""
    await scenario.create_topics()
    first, second = scenario.worker("first"), scenario.worker("second")
    started = time.monotonic()
    async with streaming(scenario, first) as collector, contextlib.AsyncExitStack() as stack:
        stack.callback(second.stop, 20)
        load = Load(scenario.settings, scenario.requests_topic, rate)
        sending = asyncio.create_task(load.send_all(request_messages(scenario.prefix, count, scenario.library.cards,
                                                                     scenario.library.merchants, seed)))
        try:
            await wait_for(lambda: load.acked >= count // 3, 120, "a third of the requests to be sent")
            second.start()
            await wait_for(lambda: _assigned(second), 60, "the second worker's first partitions")
            await wait_for(lambda: load.acked >= 2 * count // 3, 120, "two thirds of the requests to be sent")
            first_answered = _answered(first)
            code = await asyncio.to_thread(first.stop)
            assert code == 0, f"the first worker did not stop cleanly ({code}):\n{first.log_tail()}"
            await sending
            await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=120)
        finally:
            await _finish(sending)
        assert second.alive, f"the second worker died:\n{second.log_tail()}"
        answered_by = {"first_until_sigterm": first_answered, "second": _answered(second)}
        stopped_cleanly = "stopping: drained" in first.log_text() or first.returncode == 0
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    result.notes.update(repeat_bound=in_flight_bound(scenario, 2), drains=_drains(first) + _drains(second),
                        answered_by=answered_by, first_exit_code=first.returncode, stopped_cleanly=stopped_cleanly)
    return result


def _assigned(worker: WorkerProcess) -> bool:
    """Whether the worker's batch delivery got partitions (its own log line, not Faust's)."""
    return re.search(r"assigned [1-9]\d* partitions", worker.log_text()) is not None


def _answered(worker: WorkerProcess) -> int:
    """How many requests the worker answered so far, from its /status page (-1 when it does not answer)."""
    status = worker.status()
    return int(status[MODEL]["answered"]) if status else -1


def _drains(worker: WorkerProcess) -> int:
    return worker.log_text().count("drained")


# ------------------------------------------------------------------------------------------- redis down


async def redis_outage(scenario: Scenario, outage: Outage, count: int, rate: float, seed: int = 13) -> Tally:
    """Redis killed mid-stream: features come from Cassandra (cache bypassed, said in the log and counted in
    /status); Redis back: the cache is used again. Nothing is lost and nothing is degraded."""
    await scenario.create_topics()
    worker = scenario.worker("redis")
    started = time.monotonic()
    async with streaming(scenario, worker) as collector:
        load = Load(scenario.settings, scenario.requests_topic, rate)
        sending = asyncio.create_task(load.send_all(request_messages(scenario.prefix, count, scenario.library.cards,
                                                                     scenario.library.merchants, seed)))
        try:
            await wait_for(lambda: _cache(worker).get("hits", 0) > 0, 60, "the worker to use the cache")
            await outage.down()
            await wait_for(lambda: _cache(worker).get("bypassed", 0) > 0, 30, "the cache to be bypassed")
            mark = collector.answered
            await wait_for(lambda: collector.answered > mark + 50, 60, "answers while Redis is down")
            bypassed_during = _cache(worker)["bypassed"]
            await outage.up()
            hits = _cache(worker)["hits"]
            await wait_for(lambda: _cache(worker).get("hits", 0) > hits, 60, "the cache to be used again")
            await sending
            await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=120)
        finally:
            await _finish(sending)
        log = worker.log_text()
        assert "did not answer" in log and "serving features from Cassandra without the cache" in log, \
            f"no log line says the cache is bypassed:\n{worker.log_tail()}"
        assert "cache in use again" in log, f"no log line says the cache is back:\n{worker.log_tail()}"
        final = _cache(worker)
    degraded = sum(1 for first in collector.first.values() if first["degraded"])
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    result.notes.update(bypassed_batches=final["bypassed"], bypassed_during_outage=bypassed_during,
                        cache_hits=final["hits"], degraded=degraded)
    return result


def _cache(worker: WorkerProcess) -> dict[str, Any]:
    status = worker.status() or {}
    return dict(status.get(MODEL, {}).get("feature_store", {}).get("cache", {}))


# --------------------------------------------------------------------------------------- cassandra down


@dataclass
class CassandraOutcome:
    tally: Tally
    recovery_s: float


async def cassandra_outage(scenario: Scenario, outage: Outage, count: int, rate: float,
                           seed: int = 14) -> CassandraOutcome:
    """Cassandra gone mid-stream. Cards split in two: warm ones (cached before the outage) are requested all
    along and must be answered normally; cold ones are requested only during the outage (answered with the
    view's defaults and ``card_stats:unavailable:<card>``) and after it (answered normally once the driver
    reconnected: how long that took is measured)."""
    await scenario.create_topics()
    library = scenario.library
    half = len(library.cards) // 2
    warm, cold = library.cards[:half], library.cards[half:]
    worker = scenario.worker("cassandra")
    started = time.monotonic()
    async with streaming(scenario, worker) as collector:
        settings = scenario.settings
        warming = [single(f"{scenario.prefix}-warm-{card}", card, library.merchants[0]) for card in warm]
        warming += [single(f"{scenario.prefix}-warm-{merchant}", warm[0], merchant) for merchant in library.merchants]
        first_load = Load(settings, scenario.requests_topic, rate)
        await first_load.send_all(warming)
        await collector.settle(lambda: first_load.sent_ids <= collector.counts.keys(), timeout=60, grace=0.5)

        background = Load(settings, scenario.requests_topic, rate / 2)
        sending = asyncio.create_task(background.send_all(
            request_messages(f"{scenario.prefix}-bg", count, warm, library.merchants, seed)))
        loads = [first_load, background]
        try:
            await asyncio.sleep(1.0)
            await outage.down()
            during = Load(settings, scenario.requests_topic, rate / 2)
            loads.append(during)
            await during.send_all(_cold_requests(f"{scenario.prefix}-down", cold, library.merchants, count // 4))
            await collector.settle(lambda: during.sent_ids <= collector.counts.keys(), timeout=120, grace=0.5)
            assert worker.alive, f"the worker died while Cassandra was down:\n{worker.log_tail()}"
            outage_ids = set(during.sent_ids)
            await outage.up()
            recovery_s = await _until_cold_served(scenario, collector, cold, loads)
            after = Load(settings, scenario.requests_topic, rate / 2)
            loads.append(after)
            await after.send_all(_cold_requests(f"{scenario.prefix}-after", cold, library.merchants, count // 4))
            await sending
            sent_ids = set().union(*(load.sent_ids for load in loads))
            await collector.settle(lambda: sent_ids <= collector.counts.keys(), timeout=120)
        finally:
            await _finish(sending)
        assert worker.alive, f"the worker died:\n{worker.log_tail()}"
    _check_degradation(collector, outage_ids, {*first_load.sent_ids, *background.sent_ids, *after.sent_ids})
    attempted = set().union(*(load.attempted_ids for load in loads))
    result = tally(scenario.name, collector, sent_ids, attempted, seconds=time.monotonic() - started)
    degraded_during = sum(1 for request_id in outage_ids if collector.first.get(request_id, {}).get("degraded"))
    result.notes.update(during_outage=len(outage_ids), degraded_during_outage=degraded_during,
                        recovery_s=round(recovery_s, 1))
    return CassandraOutcome(result, recovery_s)


def single(request_id: str, card: str, merchant: str) -> Message:
    """One valid request message, keyed by its card."""
    return Message(card.encode(), msgpack.packb(request(request_id, card, merchant)), (request_id,))


def _cold_requests(prefix: str, cards: Sequence[str], merchants: Sequence[str], count: int) -> list[Message]:
    return [single(f"{prefix}-{index}", cards[index % len(cards)], merchants[index % len(merchants)])
            for index in range(count)]


async def _until_cold_served(scenario: Scenario, collector: Collector, cold: Sequence[str],
                             loads: list[Load], timeout: float = 180.0) -> float:
    """After the outage: probe cold cards until one is answered without degradation; seconds it took."""
    started = time.monotonic()
    for attempt in range(10_000):
        probe = Load(scenario.settings, scenario.requests_topic, 100)
        loads.append(probe)
        request_id = f"{scenario.prefix}-probe-{attempt}"
        card = cold[attempt % len(cold)]
        await probe.send_all([single(request_id, card, "merchant-0")])
        await wait_for(lambda: request_id in collector.first, 60, f"an answer to {request_id}")  # noqa: B023
        if not collector.first[request_id]["degraded"]:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still degraded {timeout:.0f} s after Cassandra came back"
        await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


def _check_degradation(collector: Collector, outage_ids: set[str], normal_ids: set[str]) -> None:
    """During the outage a cold card is answered with the defaults, marked unavailable; every other request
    (warm cards all along, cold cards after recovery) is answered normally."""
    for request_id in outage_ids:
        first = collector.first[request_id]
        assert first["status"] == "ok", first
        assert len(first["degraded"]) == 1 and first["degraded"][0].startswith("card_stats:unavailable:card-"), first
    degraded = {request_id: collector.first[request_id]["degraded"] for request_id in normal_ids
                if collector.first.get(request_id, {}).get("degraded")}
    assert not degraded, f"{len(degraded)} requests outside the outage were degraded, e.g. " \
                         f"{list(degraded.items())[:3]}"


# ---------------------------------------------------------------------------------------- kafka restart


async def kafka_restart(scenario: Scenario, outage: Outage, count: int, rate: float, seed: int = 15) -> Tally:
    """The broker killed mid-stream and started again: the worker reconnects and resumes; nothing is lost."""
    await scenario.create_topics()
    worker = scenario.worker("kafka")
    started = time.monotonic()
    async with streaming(scenario, worker) as collector:
        load = Load(scenario.settings, scenario.requests_topic, rate)
        sending = asyncio.create_task(load.send_all(request_messages(scenario.prefix, count, scenario.library.cards,
                                                                     scenario.library.merchants, seed)))
        try:
            await wait_for(lambda: collector.answered > count // 5, 120, "a fifth of the requests answered")
            down_at = time.monotonic()
            await outage.down()
            await outage.up()
            broker_away_s = time.monotonic() - down_at
            mark = collector.answered
            resumed_s = await wait_for(lambda: collector.answered > mark, 120, "answers after the restart")
            await sending
            await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=180)
        finally:
            await _finish(sending)
        assert worker.alive, f"the worker died:\n{worker.log_tail()}"
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    result.notes.update(broker_away_s=round(broker_away_s, 1), resumed_after_s=round(resumed_s, 1),
                        producer_resends=load.resent, repeat_bound=in_flight_bound(scenario, 1))
    return result


# ---------------------------------------------------------------------------------------- tampered model


async def tampered_model(scenario: Scenario, count: int, rate: float, seed: int = 17) -> Tally:
    """A new model version whose artifact does not match its manifest's sha256 appears mid-stream: refused,
    and the worker keeps serving the version it had; every request is answered by it."""
    import json
    import shutil

    models = scenario.folder / "models"  # a copy: the session's library stays as it is
    shutil.copytree(scenario.library.data_dir / "models", models)
    scenario.extra_env.update({"STREAMSCORE_MODELS_DIR": str(models), "STREAMSCORE_WORKER__RELOAD_INTERVAL_S": "1"})
    await scenario.create_topics()
    library = models / MODEL
    worker = scenario.worker("tamper")
    started = time.monotonic()
    tampered = library / "999"
    try:
        async with streaming(scenario, worker) as collector:
            load = Load(scenario.settings, scenario.requests_topic, rate)
            sending = asyncio.create_task(load.send_all(request_messages(
                scenario.prefix, count, scenario.library.cards, scenario.library.merchants, seed)))
            try:
                await wait_for(lambda: collector.answered > count // 4, 120, "a quarter answered")
                shutil.copytree(library / "1", tampered)
                manifest = json.loads((tampered / "manifest.json").read_text())
                (tampered / "manifest.json").write_text(json.dumps({**manifest, "version": "999"}))
                with (tampered / "model.onnx").open("ab") as artifact:
                    artifact.write(b"\0")
                await wait_for(lambda: "refusing v999" in worker.log_text(), 30, "the tampered version refused")
                await sending
                await collector.settle(lambda: load.sent_ids <= collector.counts.keys(), timeout=120)
            finally:
                await _finish(sending)
            assert worker.alive
    finally:
        shutil.rmtree(tampered, ignore_errors=True)
    versions = Counter(first["version"] for first in collector.first.values())
    assert set(versions) == {"1"}, f"answered by versions {versions}"
    result = tally(scenario.name, collector, load.sent_ids, load.attempted_ids, seconds=time.monotonic() - started)
    result.notes.update(served_versions=dict(versions))
    return result

