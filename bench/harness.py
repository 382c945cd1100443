"""The benchmark run: set up once, measure each variant in turn, write the files.

1. the local stack (started if down, never stopped); the fraud model trained and registered in a scratch
   model library; the feature views; the hot and cold rows in the bench keyspace (``workload.py``);
2. for each variant: fresh topics (4 partitions) under its own prefix, its cache namespace warmed, its
   process(es) started and probed until every partition answers, then for each measured phase: freeze the
   process(es), load the backlog, thaw, wait until every request was answered, read the predictions and
   take events/s from their Kafka timestamps (``measure.py``);
3. latency for the streamscore worker: open-loop producer and subscriber processes (``loadgen.py``) at
   fixed fractions of its measured maximum;
4. topics and cache entries of the run deleted; ``report.py`` writes e2e.json, e2e.md and e2e.png.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from streamscore.featurestore.views import load_views
from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import ensure_topics
from streamscore_examples.fraud.data import write_views
from streamscore_examples.fraud.model import build_and_register

from . import BenchFailed, loadgen
from .measure import DrainResult, PredictionTopic, check_alive, summarize, wait_drained, wait_for_leaders, wait_ready
from .processes import CpuMeter, Process, Processes, free_port, python_module
from .workload import COLD_EVERY, BenchRows, ColdIds, Workload, cold_count, is_cold, load_backlog, warm_cache

MODEL = "fraud"
Echo = Callable[[str], None]

RAW = "raw_aiokafka"
FAUST = "faust_per_event"
STREAMSCORE = "streamscore"
STREAMSCORE_2 = "streamscore_2_workers"


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how big."""

    smoke: bool
    requests: int
    """Backlog of each max-throughput run of a and c (a multiple of batch_size)."""
    faust_requests: int
    """Backlog of b's run (it is an order of magnitude slower)."""
    seconds: float
    """Length of each open-loop latency run."""
    rate_fractions: tuple[float, ...]
    """Offered rates of the latency runs, as fractions of c's measured maximum."""
    batch_rate_fractions: tuple[float, ...]
    """The same for 32-request messages (against c's batch maximum)."""
    floor_fractions: tuple[float, ...]
    """The same producer and subscriber through a (raw passthrough), at these fractions of c's maximum: the
    latency floor of Kafka, the load generator and the machine, without features or a model."""
    batch_size: int = 32
    partitions: int = 4
    workers: int = 2
    pool_size: int = 20_000
    """Demo transactions the requests are cycled from."""
    n_train: int = 20_000
    max_iter: int = 100
    drain_timeout_s: float = 600.0
    stall_s: float = 30.0
    max_latency_rate: float | None = None
    """Cap on the offered rate (smoke: a tiny backlog overstates the maximum, and the run must stay short)."""
    min_span_s: float = 0.0
    """A drain shorter than this is run again with a backlog sized for ``target_span_s`` (0: never)."""
    target_span_s: float = 3.0
    max_requests: int = 480_000
    fixed_rates: tuple[float, ...] = ()
    """Open-loop runs at these absolute rates (requests/s, one per message), each up to 1.2x c's maximum."""
    """Largest backlog a rerun may use (memory, and the seconds the load takes while a process is frozen)."""


def make_plan(smoke: bool, requests: int | None = None, seconds: float | None = None) -> Plan:
    if smoke:
        count = _round_up(requests or 1_024, 32)
        return Plan(smoke=True, requests=count, faust_requests=max(64, count // 4), seconds=seconds or 3.0,
                    rate_fractions=(0.7,), batch_rate_fractions=(), floor_fractions=(), pool_size=2_000,
                    n_train=2_000, max_iter=20, drain_timeout_s=120.0, stall_s=20.0, max_latency_rate=1_000.0,
                    fixed_rates=(100.0,))
    count = _round_up(requests or 60_000, 32)
    return Plan(smoke=False, requests=count, faust_requests=max(1_000, count // 12), seconds=seconds or 20.0,
                rate_fractions=(0.5, 0.7, 0.9), batch_rate_fractions=(0.7,), floor_fractions=(0.5, 0.7), min_span_s=2.0,
                fixed_rates=(100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0))


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


@dataclass
class Variant:
    name: str
    settings: Settings
    env: dict[str, str]
    features: bool
    """The variant reads features: its cache is warmed and its cold rows must exist."""
    cold: ColdIds = field(default_factory=ColdIds)
    cache: dict[str, Any] = field(default_factory=dict)
    cold_requests: int = 0
    """Requests sent with cold entities: each makes two lookups that must miss the cache."""
    web_ports: dict[str, int] = field(default_factory=dict)

    @property
    def requests_topic(self) -> str:
        return topics.requests(self.settings.topic_prefix, MODEL)

    @property
    def predictions_topic(self) -> str:
        return topics.predictions(self.settings.topic_prefix, MODEL)

    @property
    def dlq_topic(self) -> str:
        return topics.dead_letters(self.settings.topic_prefix, MODEL)


class Bench:
    def __init__(self, base: Settings, plan: Plan, scratch: Path, echo: Echo, stack_pids: dict[str, int]) -> None:
        self.plan = plan
        self.stack_pids = stack_pids
        self.processes: Processes | None = None
        self.scratch = scratch
        self.echo = echo
        self.run_id = uuid.uuid4().hex[:6]
        self.keyspace = f"{base.cassandra.keyspace}_bench"
        # the harness writes the cache entries it warms with a long TTL, so a variant that runs for minutes
        # keeps its hot set; the processes under test keep their own settings
        self.base = base.model_copy(update={
            "models_dir": scratch / "models",
            "views_file": scratch / "views.json",
            "data_dir": scratch,
            "cassandra": base.cassandra.model_copy(update={"keyspace": self.keyspace}),
            "redis": base.redis.model_copy(update={"cache_ttl_s": 1800}),
            "worker": base.worker.model_copy(update={"partitions": plan.partitions}),
        })
        self.views: dict[str, Any] = {}
        self.workload: Workload | None = None
        self.rows: BenchRows | None = None
        self.results: dict[str, Any] = {"runs": {}, "latency": []}

    # --- setup ------------------------------------------------------------------------------------------------

    async def setup(self) -> None:
        started = time.monotonic()
        write_views(self.base.views_file)
        self.views = load_views(self.base.views_file)
        manifest, _ = build_and_register(self.base.models_dir, n_train=self.plan.n_train, max_iter=self.plan.max_iter)
        self.results["model"] = {"name": manifest.name, "version": manifest.version,
                                 "sha256": manifest.sha256, "summary": manifest.description.summary}
        self.workload = Workload(self.plan.pool_size)
        self.rows = BenchRows(self.base, self.views, self.workload.rows)
        await self.rows.open()
        hot = await self.rows.ensure_hot()
        cold = await self.rows.ensure_cold(self._cold_needed())
        self.echo(f"   model trained and registered; views declared; rows in keyspace {self.keyspace}: "
                  f"{hot} hot and {cold} cold written ({'already there' if not hot + cold else 'filled'}) "
                  f"in {time.monotonic() - started:.1f} s")

    def _cold_needed(self) -> int:
        """Cold numbers the throughput phases of the busiest variant use (latency runs top up later)."""
        return 2 * (cold_count(self.plan.requests) + 1)

    def variant(self, name: str, features: bool) -> Variant:
        prefix = f"bench-{self.run_id}-{name.replace('_', '-')}"
        settings = self.base.model_copy(update={"topic_prefix": prefix})
        env = {
            "STREAMSCORE_TOPIC_PREFIX": prefix,
            "STREAMSCORE_MODELS_DIR": str(settings.models_dir),
            "STREAMSCORE_VIEWS_FILE": str(settings.views_file),
            "STREAMSCORE_DATA_DIR": str(settings.data_dir),
            "STREAMSCORE_CASSANDRA__KEYSPACE": self.keyspace,
            "STREAMSCORE_WORKER__PARTITIONS": str(self.plan.partitions),
            "PYTHONUNBUFFERED": "1",
        }
        return Variant(name, settings, env, features)

    # --- a variant's processes ----------------------------------------------------------------------------------

    async def start(self, processes: Processes, variant: Variant, argv: Sequence[str], count: int = 1
                    ) -> list[Process]:
        names = [variant.requests_topic, variant.predictions_topic, variant.dlq_topic]
        await ensure_topics(variant.settings, names, partitions=self.plan.partitions)
        await wait_for_leaders(variant.settings, names)
        await log_append_time(variant.settings, names[:2])
        if variant.features and not variant.cache:
            assert self.workload is not None
            hits, lookups = await warm_cache(variant.settings, self.views, self.workload.hot_entities())
            variant.cache = {"hot_entities_cached": hits, "hot_entities": lookups}
        started = time.monotonic()
        running = []
        for number in range(1, count + 1):
            name, port = f"{variant.name}-{number}", free_port()
            variant.web_ports[name] = port
            running.append(processes.start(name, argv, {**variant.env, "STREAMSCORE_WORKER__WEB_PORT": str(port)}))
        await wait_ready(variant.settings, variant.requests_topic, variant.predictions_topic,
                                                running, self.plan.partitions, self._probe)
        self.echo(f"   {count} process(es) answering on all {self.plan.partitions} partitions after "
                  f"{time.monotonic() - started:.1f} s")
        return running

    def _pids(self) -> dict[str, int]:
        assert self.processes is not None
        return {**self.processes.pids(), **self.stack_pids, "harness": os.getpid()}

    def _probe(self, request_id: str) -> dict[str, Any]:
        assert self.workload is not None
        return {**self.workload.request("probe", 0, 0, int(time.time() * 1000)), "id": request_id}

    # --- max throughput -----------------------------------------------------------------------------------------

    async def max_throughput(self, variant: Variant, running: Sequence[Process], batch_size: int, requests: int
                             ) -> DrainResult:
        """Drain a backlog; when it went too fast to trust (startup effects, millisecond timestamps), drain
        one sized for ``target_span_s`` at the rate just seen, and keep that one."""
        phase = f"max{batch_size}"
        result = await self.drain(variant, running, phase, requests, batch_size)
        runs = self.results["runs"].setdefault(variant.name, {})
        if self.plan.min_span_s and result.span_s < self.plan.min_span_s and result.answered == requests:
            bigger = min(self.plan.max_requests, _round_up(int(result.eps * self.plan.target_span_s), batch_size))
            if bigger > requests:
                self.echo(f"   {phase}: {result.span_s:.2f} s is too short to trust; again with {bigger} requests")
                runs[f"{phase}_short"] = result.as_dict()
                result = await self.drain(variant, running, f"{phase}r", bigger, batch_size)
        runs[phase] = result.as_dict()
        return result

    async def drain(self, variant: Variant, running: Sequence[Process], phase: str, requests: int,
                    batch_size: int) -> DrainResult:
        """Freeze the processes, load ``requests`` requests, thaw them and wait until all are answered."""
        assert self.workload is not None and self.rows is not None
        cold_base = variant.cold.take(requests)
        variant.cold_requests += cold_count(requests)
        if variant.features:
            await self.rows.ensure_cold(variant.cold.next)
        messages = self.workload.messages(phase, requests, batch_size, cold_base)
        reader = await PredictionTopic(variant.settings, variant.predictions_topic).open()
        try:
            for process in running:
                process.freeze()
            try:
                loading = time.monotonic()
                await load_backlog(variant.settings, variant.requests_topic, messages, self.plan.partitions)
                load_s = time.monotonic() - loading
            finally:
                for process in running:
                    process.thaw()
            result = await self._collect(running, reader, phase, requests, len(messages), batch_size, load_s)
        finally:
            await reader.close()
        missing = f", {result.requests - result.answered} UNANSWERED" if result.answered < result.requests else ""
        self.echo(f"   {phase}: {result.answered}/{requests} requests answered in {len(messages)} messages, "
                  f"{result.eps:,.0f} requests/s over {result.span_s:.2f} s (loaded in {load_s:.1f} s){missing}")
        return result

    async def _collect(self, running: Sequence[Process], reader: PredictionTopic, phase: str, requests: int,
                       messages: int, batch_size: int, load_s: float) -> DrainResult:
        thawed = time.monotonic()
        records: list[Any] = []
        expected = requests
        cpu: dict[str, Any] = {}
        with tqdm(total=requests, desc=f"   {phase}", unit="pred", file=sys.stderr, leave=False,
                  disable=None) as progress:
            while True:
                # the cores are measured over the drain only, not over the reading of its predictions
                async with CpuMeter(self._pids) as meter:
                    complete = await wait_drained(reader, expected, running, self.plan.drain_timeout_s,
                                                  self.plan.stall_s, progress.update)
                cpu = cpu or meter.result
                records.extend(await reader.read_to_end())
                result = summarize(phase, records, requests, messages, batch_size, load_s, time.monotonic() - thawed)
                if result.answered >= requests or not complete:
                    result.cpu = cpu
                    return result
                # repeats (or late probe answers) filled the count: wait for the requests still missing
                expected = len(records) + requests - result.answered

    # --- latency ------------------------------------------------------------------------------------------------

    async def latency(self, processes: Processes, variant: Variant, running: Sequence[Process], fraction: float,
                      max_eps: float, batch_size: int, absolute: float | None = None) -> dict[str, Any]:
        """One open-loop run at ``fraction`` of ``max_eps`` (or at ``absolute`` requests/s): a subscriber, then
        the producer for ``seconds``."""
        assert self.rows is not None
        if absolute is not None:
            rate, fraction = absolute, absolute / max(max_eps, 1.0)
            phase = f"rate{round(absolute)}" + (f"b{batch_size}" if batch_size > 1 else "")
        else:
            rate = max(min(fraction * max_eps, self.plan.max_latency_rate or math.inf), float(batch_size))
            phase = f"lat{round(fraction * 100)}" + (f"b{batch_size}" if batch_size > 1 else "")
        requests = max(1, round(rate * self.plan.seconds / batch_size)) * batch_size
        folder = self.scratch / f"{variant.name}-{phase}"
        if folder.exists():
            raise ValueError(f"latency phase {phase} of {variant.name} was already run")
        folder.mkdir()
        cold_base = variant.cold.take(requests)
        variant.cold_requests += cold_count(requests)
        if variant.features:
            await self.rows.ensure_cold(variant.cold.next)
        subscriber = processes.start(f"subscriber-{folder.name}", python_module(
            "streamscore_bench.loadgen", "subscribe", "--topic", variant.predictions_topic, "--phase", phase,
            "--out", str(folder), "--expect", str(requests), "--timeout", str(self.plan.seconds * 4 + 120)),
            variant.env)
        try:
            await _wait_for_file(folder / loadgen.READY_FILE, [subscriber, *running], 60.0)
            async with CpuMeter(self._pids) as meter:
                await self._offer(processes, variant, running, subscriber, folder, phase, rate, batch_size,
                                  cold_base)
        finally:
            processes.stop_named(f"producer-{folder.name}", f"subscriber-{folder.name}")
        entry = {"variant": variant.name, "phase": phase, "fixed": absolute is not None,
                 **_latency_entry(folder, fraction, rate, batch_size), "cpu": meter.result}
        self.results["latency"].append(entry)
        self.echo(f"   {phase}: offered {rate:,.0f}/s, achieved {entry['achieved_eps']:,.0f}/s, "
                  f"{entry['answered']}/{requests} answered; latency p50 {entry['p50']} ms, p95 {entry['p95']} ms, "
                  f"p99 {entry['p99']} ms (producer at most {entry['producer_behind_ms']} ms behind schedule)")
        return entry

    async def _offer(self, processes: Processes, variant: Variant, running: Sequence[Process], subscriber: Process,
                     folder: Path, phase: str, rate: float, batch_size: int, cold_base: int) -> None:
        """Run the open-loop producer, then wait until the subscriber has every prediction (or gives up)."""
        producer = processes.start(f"producer-{folder.name}", python_module(
            "streamscore_bench.loadgen", "open-loop", "--topic", variant.requests_topic, "--phase", phase,
            "--out", str(folder), "--rate", f"{rate:.3f}", "--seconds", str(self.plan.seconds),
            "--batch-size", str(batch_size), "--cold-base", str(cold_base),
            "--partitions", str(self.plan.partitions), "--pool-size", str(self.plan.pool_size)), variant.env)
        with tqdm(total=round(self.plan.seconds), desc=f"   {phase} @ {rate:,.0f}/s", unit="s", file=sys.stderr,
                  leave=False, disable=None) as progress:
            code = await _wait_exit(producer, running, self.plan.seconds + 120, progress.update)
        if code != 0:
            raise BenchFailed(f"the open-loop producer exited with {code}:\n{producer.log_tail()}")
        # a worker that fell behind still answers everything: give it the time to catch up
        await _wait_exit(subscriber, running, self.plan.seconds * 3 + 60)

    # --- the whole run ------------------------------------------------------------------------------------------

    async def run(self, processes: Processes) -> dict[str, Any]:
        plan = self.plan
        self.processes = processes
        worker = python_module("streamscore", "worker", "--model", MODEL)
        raw_argv = python_module("streamscore_bench.baselines", "raw-passthrough", "--model", MODEL)
        faust_argv = python_module("streamscore_bench.baselines", "faust-per-event", "--model", MODEL)

        self.echo(f"== 2/6 a. raw aiokafka passthrough ({plan.requests} requests; then in messages of "
                  f"{plan.batch_size})")
        raw = self.variant(RAW, features=False)
        running = await self.start(processes, raw, raw_argv)
        raw_single = await self.max_throughput(raw, running, 1, plan.requests)
        raw_batch = await self.max_throughput(raw, running, plan.batch_size, plan.requests)
        processes.stop(*running)

        self.echo(f"== 3/6 b. per-event Faust agent ({plan.faust_requests} requests)")
        faust = self.variant(FAUST, features=True)
        running = await self.start(processes, faust, faust_argv)
        faust_single = await self.max_throughput(faust, running, 1, plan.faust_requests)
        processes.stop(*running)

        self.echo(f"== 4/6 c. streamscore worker ({plan.requests} requests; then in messages of {plan.batch_size}; "
                  f"latency at {', '.join(f'{f:.0%}' for f in plan.rate_fractions)} of its maximum)")
        ours = self.variant(STREAMSCORE, features=True)
        running = await self.start(processes, ours, worker)
        ours_single = await self.max_throughput(ours, running, 1, plan.requests)
        ours_batch = await self.max_throughput(ours, running, plan.batch_size, plan.requests)
        latency = {f"{fraction:.0%}": await self.latency(processes, ours, running, fraction, ours_single.eps, 1)
                   for fraction in plan.rate_fractions}
        latency_batch = {f"{fraction:.0%}": await self.latency(processes, ours, running, fraction, ours_batch.eps,
                                                               plan.batch_size)
                         for fraction in plan.batch_rate_fractions}
        # fixed rates, the load of a user's day (those the maximum allows, with a margin for saturation)
        fixed = {f"{rate:g}/s": await self.latency(processes, ours, running, 0.0, ours_single.eps, 1, absolute=rate)
                 for rate in plan.fixed_rates if rate <= 1.2 * ours_single.eps}
        closed = await self.closed_loop(ours)
        ours.cache |= worker_cache_counts(ours, running)
        processes.stop(*running)
        floor = {}
        if plan.floor_fractions:
            self.echo("   latency floor: the same load through a (raw passthrough: no features, no model)")
            running = await self.start(processes, raw, raw_argv)
            floor = {f"{fraction:.0%}": await self.latency(processes, raw, running, fraction, ours_single.eps, 1)
                     for fraction in plan.floor_fractions}
            processes.stop(*running)

        self.echo(f"== 5/6 c. streamscore worker, {plan.workers} processes in one group ({plan.requests} requests)")
        two = self.variant(STREAMSCORE_2, features=True)
        running = await self.start(processes, two, worker, count=plan.workers)
        two_single = await self.max_throughput(two, running, 1, plan.requests)
        two.cache |= worker_cache_counts(two, running)
        processes.stop(*running)

        self.results.update({
            "raw_aiokafka_eps": round(raw_single.eps, 1),
            "raw_aiokafka_eps_batch32": round(raw_batch.eps, 1),
            "faust_per_event_eps": round(faust_single.eps, 1),
            "streamscore_eps": round(ours_single.eps, 1),
            "streamscore_eps_batch32": round(ours_batch.eps, 1),
            "streamscore_eps_2_workers": round(two_single.eps, 1),
            "latency_ms": {label: _percentiles(entry) for label, entry in latency.items()},
            "latency_ms_batch32": {label: _percentiles(entry) for label, entry in latency_batch.items()},
            "latency_ms_raw_floor": {label: _percentiles(entry) for label, entry in floor.items()},
            "latency_ms_fixed_rates": {label: {**_percentiles(entry), "hops_ms": entry["hops_ms"],
                                               "generator_behind": entry["generator_behind"]}
                                       for label, entry in fixed.items()},
            "closed_loop_ms": closed,
            "cache": {variant.name: variant.cache for variant in (faust, ours, two)},
            "all_answered": all(result.answered == result.requests for result in (
                raw_single, raw_batch, faust_single, ours_single, ours_batch, two_single)) and all(
                entry["answered"] == entry["requests"] for entry in self.results["latency"]),
        })
        return self.results

    async def closed_loop(self, variant: Variant) -> dict[str, Any]:
        """One client, one request at a time (``predict``: send, wait for the answer, send the next) for
        ``seconds``: the latency of a request on an otherwise idle worker."""
        from streamscore.streams.client import Client

        assert self.workload is not None
        latencies: list[float] = []
        async with Client(variant.settings) as client:
            deadline = time.monotonic() + self.plan.seconds
            index = 0
            while time.monotonic() < deadline:
                index += 1
                if is_cold(index):  # hot entities only: the cache's hit path, as most requests meet
                    continue
                request = {**self.workload.request("closed", index, 0, time.time_ns() // 1_000_000),
                           "id": f"closed-{self.run_id}-{index}"}
                started = time.perf_counter()
                await client.predict(MODEL, request, timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)
        values = np.array(latencies[min(10, len(latencies) // 10):])  # the first answers warm the reply path
        entry = {"requests": len(latencies), "p50": round(float(np.percentile(values, 50)), 2),
                 "p99": round(float(np.percentile(values, 99)), 2), "max": round(float(values.max()), 2)}
        self.echo(f"   closed loop: {entry['requests']} requests one at a time, p50 {entry['p50']} ms, "
                  f"p99 {entry['p99']} ms")
        return entry

    async def cleanup(self) -> None:
        """Delete the run's topics and cache entries (the bench keyspace's rows are kept for the next run).
        A failure here is reported, never raised over the run's own outcome."""
        prefix = f"bench-{self.run_id}-"
        for what, action in (("topics", self._delete_topics), ("cache entries", self._delete_cache_entries)):
            try:
                await action(prefix)
            except Exception as exc:
                self.echo(f"   could not delete the run's {what} ({prefix}*): {exc!r}")
        if self.rows is not None:
            await self.rows.close()

    async def _delete_topics(self, prefix: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        from streamscore.streams.kafka import client_kwargs

        admin = AIOKafkaAdminClient(**client_kwargs(self.base.kafka))
        await admin.start()
        try:
            ours = [name for name in await admin.list_topics() if name.startswith(prefix)]
            if ours:
                await admin.delete_topics(ours)
        finally:
            await admin.close()

    async def _delete_cache_entries(self, prefix: str) -> None:
        from streamscore.featurestore.cache import connect as connect_redis

        client = connect_redis(self.base.redis.model_copy(update={"socket_timeout_s": 10.0}))
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=5000)]
            for start in range(0, len(keys), 5000):
                await client.unlink(*keys[start:start + 5000])
        finally:
            await client.aclose()


async def _wait_for_file(path: Path, processes: Sequence[Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        check_alive(processes)
        if time.monotonic() > deadline:
            raise BenchFailed(f"{path.name} did not appear within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def _wait_exit(process: Process, watched: Sequence[Process], timeout_s: float,
                     progress: Callable[[int], Any] | None = None) -> int | None:
    """Wait for ``process`` to exit, failing early if one of ``watched`` dies; its exit code (None: timeout)."""
    deadline, ticks, started = time.monotonic() + timeout_s, 0, time.monotonic()
    while process.running() and time.monotonic() < deadline:
        check_alive(watched)
        await asyncio.sleep(0.2)
        if progress is not None and int(time.monotonic() - started) > ticks:
            progress(1)
            ticks += 1
    return process.returncode


async def log_append_time(settings: Settings, names: Sequence[str]) -> None:
    """Make the topics stamp records with the broker's append time (``message.timestamp.type``), which the
    hop split reads: the acknowledgement of a request and the record of a prediction then carry it."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from streamscore.streams.kafka import client_kwargs

    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name,
                                                  {"message.timestamp.type": "LogAppendTime"}) for name in names])
    finally:
        await admin.close()


HOPS = ("client->broker", "client->worker", "in worker", "worker->broker", "broker->client")


def hop_split(folder: Path, sent_us: np.ndarray, arrived_us: np.ndarray) -> dict[str, dict[str, float]]:
    """p50/p99 ms of each hop: client->broker (per producer batch, the broker's append clock), client->worker
    (send stamp to the worker's ``received_ms``: client->broker plus broker->worker), in worker (``received_ms``
    to ``sent_ms``), worker->broker (``sent_ms`` to the prediction's append time), broker->client (append time
    to arrival at the subscriber). Clocks: one machine's, so the hops add up to the end-to-end time."""
    hops_path, broker_path = folder / loadgen.HOPS_FILE, folder / loadgen.TO_BROKER_FILE
    if not hops_path.exists() or not broker_path.exists():
        return {}
    hops = np.load(hops_path)
    answered = (arrived_us > 0) & (hops[:, 0] > 0) & (hops[:, 2] > 0)
    if not answered.any():
        return {}
    received, published, appended = (hops[answered, column].astype(np.float64) for column in range(3))
    sent_ms, arrived_ms = sent_us[answered] / 1000, arrived_us[answered] / 1000
    values = {
        "client->broker": np.load(broker_path) / 1000,
        "client->worker": received - sent_ms,
        "in worker": published - received,
        "worker->broker": appended - published,
        "broker->client": arrived_ms - appended,
    }
    return {hop: {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2)}
            for hop, v in values.items() if len(v)}


def _latency_entry(folder: Path, fraction: float, rate: float, batch_size: int) -> dict[str, Any]:
    sent_us = np.load(folder / loadgen.SENT_FILE)
    arrived_us = np.load(folder / loadgen.ARRIVED_FILE)
    producer = json.loads((folder / loadgen.PRODUCER_FILE).read_text())
    answered = arrived_us > 0
    latencies_us = np.maximum(arrived_us[answered] - sent_us[answered], 1)
    histogram = HdrHistogram(1, 3_600_000_000, 3)
    for value, count in zip(*np.unique(latencies_us, return_counts=True), strict=True):
        histogram.record_value(int(value), int(count))
    span_s = (int(arrived_us[answered].max()) - int(sent_us.min())) / 1e6 if answered.any() else 0.0
    return {
        "fraction_of_max": fraction, "batch_size": batch_size, "offered_eps": round(rate, 1),
        "requests": int(sent_us.size), "answered": int(answered.sum()),
        "achieved_eps": round(int(answered.sum()) / span_s, 1) if span_s > 0 else 0.0,
        **{name: round(histogram.get_value_at_percentile(p) / 1000, 2) if answered.any() else None
           for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("p999", 99.9))},
        "max": round(histogram.get_max_value() / 1000, 2) if answered.any() else None,
        "producer_behind_ms": producer["most_behind_schedule_ms"],
        "send_duration_s": producer["send_duration_s"],
        # the load generator fell behind its schedule by more than a 10th of the run: its rate is not the offer
        "generator_behind": producer["most_behind_schedule_ms"] > 100 * producer.get("seconds", math.inf),
        "hops_ms": hop_split(folder, sent_us, arrived_us),
    }


def worker_cache_counts(variant: Variant, running: Sequence[Process]) -> dict[str, Any]:
    """The workers' own cache counters (``/metrics``, summed over processes) next to the misses the workload
    must cause: two per cold request. The counters count distinct entities per batch, so hot entities repeated
    within a batch count once: the hit share they give is below the 95% of requests. Best effort: a worker
    without these metrics gives None."""
    hits = misses = 0.0
    for process in running:
        port = variant.web_ports.get(process.name)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                      if line.startswith(("streamscore_cache_hits ", "streamscore_cache_misses "))}
            hits += values["streamscore_cache_hits"]
            misses += values["streamscore_cache_misses"]
        except (OSError, KeyError, ValueError, IndexError):
            return {"worker_cache_hits": None, "worker_cache_misses": None,
                    "cold_lookups_sent": 2 * variant.cold_requests}
    return {"worker_cache_hits": int(hits), "worker_cache_misses": int(misses),
            "cold_lookups_sent": 2 * variant.cold_requests}


def _percentiles(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key in ("offered_eps", "achieved_eps", "p50", "p95", "p99", "answered", "requests")}


# --- machine facts --------------------------------------------------------------------------------------------

def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def code_version() -> str:
    """Package version, git commit, and ``.dirty`` when the working tree (which the processes under test
    run from) has changes not in that commit."""
    from streamscore import __version__

    root = Path(__file__).resolve().parent  # in a checkout, git finds the repository from here
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=root, timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=root, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if changes else ''}"


def machine_info(stack: Sequence[Any]) -> dict[str, Any]:
    from streamscore.fastpath import IMPLEMENTATION

    packages = ["streamscore", "aiokafka", "faust-streaming", "onnxruntime-gpu", "onnxruntime", "msgpack", "redis",
                "cassandra-driver", "numpy", "hdrhistogram"]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "code_version": code_version(),
        "fastpath": IMPLEMENTATION,
        "packages": {name: version for name in packages if (version := _version(name)) is not None},
        "stack": {server.name: server.version for server in stack},
        # the machine may be shared: other processes' load makes every figure noisier and lower
        "load_average_1_5_15_min": {"start": [round(value, 2) for value in os.getloadavg()]},
    }


# --- entry point ----------------------------------------------------------------------------------------------

def run_bench(settings: Settings, plan: Plan, out_dir: Path, echo: Echo = print) -> dict[str, Any]:
    """Run the benchmark against the local stack and write e2e.json, e2e.md and e2e.png into ``out_dir``."""
    from streamscore_stack import Stack, StackError

    from .report import write_report

    started = time.monotonic()
    echo(f"== 1/6 stack, model, feature rows ({'smoke' if plan.smoke else 'full'} run)")
    try:
        stack = Stack(settings.stack, echo=echo).ensure_up()
    except StackError as exc:
        raise BenchFailed(str(exc)) from exc
    machine = machine_info(stack)
    scratch = Path(tempfile.mkdtemp(prefix="streamscore-bench-"))
    bench = Bench(settings, plan, scratch, echo, {server.name: server.pid for server in stack if server.pid})
    failed = True
    try:
        results = asyncio.run(_run(bench))
        failed = False
    finally:
        if failed:
            echo(f"logs of the benchmark's processes are kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    machine["load_average_1_5_15_min"]["end"] = [round(value, 2) for value in os.getloadavg()]
    results = {
        "benchmark": "streamscore end-to-end",
        "smoke": plan.smoke,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "plan": asdict(plan),
        "workload": {"model": MODEL, "cache_hit_share": 1 - 1 / COLD_EVERY, "cassandra_share": 1 / COLD_EVERY,
                     "lookups_per_request": 2, "partitions": plan.partitions, "batch_size": plan.batch_size},
        **results,
    }
    echo("== 6/6 report")
    for path in write_report(results, out_dir):
        echo(f"   wrote {path}")
    return results


class _NewTopicNoise(logging.Filter):
    """aiokafka logs NotLeaderForPartition at ERROR while a topic created a moment ago elects its leaders, and
    retries until it has one; for the bench's fresh topics that is expected, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NotLeaderForPartitionError" not in record.getMessage()


async def _run(bench: Bench) -> dict[str, Any]:
    noise = _NewTopicNoise()
    logging.getLogger("aiokafka.consumer.fetcher").addFilter(noise)
    try:
        return await _run_variants(bench)
    finally:
        logging.getLogger("aiokafka.consumer.fetcher").removeFilter(noise)


async def _run_variants(bench: Bench) -> dict[str, Any]:
    with Processes(bench.scratch, dict(os.environ)) as processes:
        try:
            await bench.setup()
            return await bench.run(processes)
        finally:
            processes.stop_all()
            await bench.cleanup()
