"""What ``/healthz`` and ``/readyz`` say, and the consumer lag on ``/metrics``.

``/healthz`` is liveness: the process runs and its event loop answers (a blocked loop or a stalled worker is
ended by the watchdog, which is faster than any probe). ``/readyz`` is readiness, 200 only when all hold:

- the progress watchdog found no stall (its reason wins: the worker is about to exit and be restarted);
- every model is loaded (``model``);
- Kafka answers a metadata or end-offsets request (``kafka``);
- the online store answers a read of a view's table as a batch does (``cassandra``: the table exists and the
  role may read it) and the cache tier answers a read of the feature keys (``cache``: wrong credentials or a
  missing ACL permission make the worker not ready, and the body says which);
- the consumer group gave this consumer its assignment (``consumer``). An empty assignment (more workers than
  partitions) is ready: an idle replica must not block a rolling update.

The checks run in the background every ``worker.readiness_interval_s`` (a probe reads the last results, it
never waits on a server); a change of a check is logged once, not on every probe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import TopicPartition

from streamscore.featurestore.store import FeatureStore
from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.delivery import BatchDelivery
from streamscore.streams.watchdog import Watchdog

from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

OK = "ok"
NOT_CHECKED = "not checked yet"
_EXPECTED_AT_START = ("starting", "not assigned yet")


class Readiness:
    def __init__(self, settings: Settings, store: FeatureStore, served: Callable[[], Mapping[str, str]],
                 metrics: WorkerMetrics, watchdog: Watchdog | None) -> None:
        self.settings = settings
        self.store = store
        self.served = served
        """Model name -> the version served (``v3``), for the ``model`` check."""
        self.metrics = metrics
        self.watchdog = watchdog
        self.delivery: BatchDelivery | None = None
        self.checks: dict[str, str] = {"model": NOT_CHECKED, "kafka": NOT_CHECKED, "consumer": NOT_CHECKED,
                                       store.online.name: NOT_CHECKED}
        if store.cache is not None:
            self.checks["cache"] = NOT_CHECKED

    def body(self) -> tuple[int, dict[str, Any]]:
        """The /readyz status code and body: ``ready``, ``reason`` (one line, None when ready), ``checks``."""
        failing = [f"{name}: {state}" for name, state in self.checks.items() if not state.startswith(OK)]
        stall = self.watchdog.reason if self.watchdog is not None else None
        reason = stall or ("; ".join(failing) if failing else None)
        return (200 if reason is None else 503), {"ready": reason is None, "reason": reason,
                                                  "checks": dict(self.checks)}

    async def run(self) -> None:
        """Check every ``readiness_interval_s`` until cancelled."""
        interval = self.settings.worker.readiness_interval_s
        while True:
            try:
                await self.check_once(interval)
            except asyncio.CancelledError:
                raise
            except Exception:  # a check that breaks must not end the checking
                log.exception("the readiness checks failed")
            # while the clients start and the group is joined, look again soon: /readyz turns ready (and its
            # reasons turn current) within a fraction of a second of the worker being able to serve
            starting = any(state.startswith(_EXPECTED_AT_START) or state == NOT_CHECKED
                           for state in self.checks.values())
            await asyncio.sleep(min(interval, 0.25) if starting else interval)

    async def check_once(self, timeout_s: float) -> None:
        results = {"model": OK + ": " + ", ".join(f"{name} {what}" for name, what in self.served().items())}
        results["kafka"], results["consumer"] = await self._check_kafka(timeout_s)
        for name, problem in (await self.store.check(timeout_s)).items():
            results[name] = OK if problem is None else problem
        self._record(results)

    async def _check_kafka(self, timeout_s: float) -> tuple[str, str]:
        delivery = self.delivery
        if delivery is None or delivery.consumer is None or delivery.producer is None:
            return "starting: the Kafka clients are not started yet", "starting: not consuming yet"
        consumer = delivery.consumer
        group = topics.worker_group(self.settings.topic_prefix)
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        try:
            if assigned:
                ends = await asyncio.wait_for(consumer.end_offsets(assigned), timeout_s)
                await self._report_lag(delivery, ends, timeout_s)
            else:
                self.metrics.report_lag({})
                await asyncio.wait_for(delivery.producer.client.fetch_all_metadata(), timeout_s)
        except Exception as exc:
            said = " ".join(str(exc).split()) or type(exc).__name__
            kafka = (f"Kafka at {self.settings.kafka.bootstrap} did not answer within {timeout_s:g} s "
                     f"({type(exc).__name__}: {said})")
        else:
            kafka = OK
        if not delivery.joined:
            return kafka, f"not assigned yet: joining consumer group {group!r}"
        return kafka, f"{OK}: {len(assigned)} partition(s) of group {group!r}"

    async def _report_lag(self, delivery: BatchDelivery, ends: Mapping[TopicPartition, int], timeout_s: float
                          ) -> None:
        """Lag per assigned partition: its end offset less the last offset committed for the group."""
        assert delivery.consumer is not None
        lags = {}
        for tp, end in ends.items():
            committed = delivery.committed_offsets.get(tp)
            if committed is None:  # nothing committed by this consumer yet: ask the group coordinator once
                committed = await asyncio.wait_for(delivery.consumer.committed(tp), timeout_s)
                if committed is not None:
                    delivery.committed_offsets.setdefault(tp, committed)
            lags[tp] = max(0, end - (committed or 0))
        self.metrics.report_lag(lags)

    def _record(self, results: dict[str, str]) -> None:
        for name, state in results.items():
            before = self.checks.get(name, NOT_CHECKED)
            self.checks[name] = state
            if state.startswith(OK) and not before.startswith(OK) and before != NOT_CHECKED:
                log.warning("ready again: %s %s", name, state)
            elif not state.startswith(OK) and state != before:
                level = logging.INFO if state.startswith(_EXPECTED_AT_START) else logging.ERROR
                log.log(level, "not ready: %s: %s", name, state)
