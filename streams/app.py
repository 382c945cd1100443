"""The worker: a Faust app with one agent per model on ``<prefix>.<model>.requests``.

Each agent takes batches bounded by size and time, runs the model's pipeline, publishes the predictions and
dead letters, and only returns once Kafka acknowledged all of them. Faust acks a batch's events after the
agent returns from it, and commits acked offsets: a crash may repeat a batch, never lose one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
import mode

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import load_views
from streamscore.settings import Settings
from streamscore.workers.pipeline import BatchOutcome, BatchPipeline, Inbound, Outbound
from streamscore.workers.runtime import load_model

from . import topics
from .client import ensure_topics
from .kafka import faust_broker, faust_credentials
from .wire import HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE, HEADER_MODEL, HEADER_SOURCE

log = logging.getLogger(__name__)

_PIPELINE_ATTEMPTS = 3
_PUBLISH_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class Publisher:
    """Sends a batch's messages with the app's producer and waits for Kafka's acknowledgement of every one.
    Failed sends are retried (only those), so a batch is acknowledged whole before its offsets move."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.retries = 0

    async def publish(self, messages: Sequence[Outbound]) -> None:
        pending = list(messages)
        attempt = 0
        while pending:
            failed = await self._send_all(pending)
            if not failed:
                return
            delay = _PUBLISH_BACKOFF_S[min(attempt, len(_PUBLISH_BACKOFF_S) - 1)]
            log.warning("%d of %d messages were not acknowledged by Kafka (%r); retrying in %.1f s",
                        len(failed), len(pending), failed[0][1], delay)
            self.retries += len(failed)
            attempt += 1
            pending = [message for message, _ in failed]
            await asyncio.sleep(delay)

    async def _send_all(self, messages: Sequence[Outbound]) -> list[tuple[Outbound, BaseException]]:
        producer = self.app.producer
        futures: list[Any] = []
        for message in messages:
            try:
                futures.append(await producer.send(message.topic, message.key, message.value, None, None,
                                                   message.headers))
            except Exception as exc:  # the send could not even be queued: retried like a failed ack
                futures.append(_failed(exc))
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [(message, result) for message, result in zip(messages, results, strict=True)
                if isinstance(result, BaseException)]


def _failed(exc: BaseException) -> asyncio.Future:
    future: asyncio.Future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


class ModelAgent:
    """Everything one model's agent needs: the pipeline, the publisher and the counters it reports."""

    def __init__(self, pipeline: BatchPipeline, publisher: Publisher) -> None:
        self.pipeline = pipeline
        self.publisher = publisher
        self.answered = 0
        self.dead_lettered = 0
        self.batches = 0
        self.last_timings: dict[str, int] = {}

    async def handle(self, batch: list[Inbound]) -> None:
        outcome = await self._process(batch)
        await self.publisher.publish([*outcome.predictions, *outcome.dead_letters])
        self.batches += 1
        self.answered += outcome.answered
        self.dead_lettered += len(outcome.dead_letters)
        self.last_timings = outcome.timings_us

    async def _process(self, batch: list[Inbound]) -> BatchOutcome:
        """Run the pipeline; a batch that keeps failing is dead-lettered whole rather than lost or retried
        forever (Faust acks the events once the agent returns, whatever happened)."""
        for attempt in range(1, _PIPELINE_ATTEMPTS + 1):
            try:
                return await self.pipeline.process(batch)
            except Exception as exc:
                log.exception("batch of %d messages failed (attempt %d of %d)", len(batch), attempt,
                              _PIPELINE_ATTEMPTS)
                last = exc
                await asyncio.sleep(0.2 * attempt)
        return BatchOutcome([], [self._failed_letter(message, last) for message in batch], 0, 0, {})

    def _failed_letter(self, message: Inbound, exc: BaseException) -> Outbound:
        headers = [
            (HEADER_ERROR_KIND, b"processing_failed"),
            (HEADER_ERROR_MESSAGE, f"{type(exc).__name__}: {exc}".encode()),
            (HEADER_MODEL, self.pipeline.model.name.encode()),
            (HEADER_SOURCE, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        return Outbound(self.pipeline.dlq_topic, message.key, message.value, headers)


def _inbound(event: Any) -> Inbound:
    message = event.message
    return Inbound(message.value, message.key, message.topic, message.partition, message.offset)


def create_app(settings: Settings, model_names: Sequence[str]) -> tuple[faust.App, dict[str, ModelAgent]]:
    """Build the worker app: load the views and models, connect the feature store, declare one agent per model."""
    views = load_views(settings.views_file)
    store = FeatureStore(settings, views)
    store.connect()
    app = faust.App(
        f"{settings.topic_prefix}-worker",
        broker=faust_broker(settings.kafka),
        broker_credentials=faust_credentials(settings.kafka),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.worker.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_port=settings.worker.web_port,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        producer_acks=-1,
        producer_linger_ms=2,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 4 * settings.worker.batch_max),
    )
    prefix = settings.topic_prefix
    asyncio.run(ensure_topics(settings, [name for model in model_names for name in (
        topics.requests(prefix, model), topics.predictions(prefix, model), topics.dead_letters(prefix, model))],
        partitions=settings.worker.partitions))
    publisher = Publisher(app)
    agents: dict[str, ModelAgent] = {}
    for name in model_names:
        runtime = load_model(settings.models_dir, name, views, settings.worker)
        agents[name] = ModelAgent(BatchPipeline(runtime, store, settings.topic_prefix, settings.worker.worker_id),
                                  publisher)
        _declare_agent(app, settings, agents[name])
    _declare_reporting(app, agents)

    @app.service
    class FeatureStoreService(mode.Service):
        """Closes the feature store's connections when the worker stops."""

        async def on_stop(self) -> None:
            await store.close()

    return app, agents


def _declare_agent(app: faust.App, settings: Settings, agent: ModelAgent) -> None:
    name = agent.pipeline.model.name
    topic = app.topic(topics.requests(settings.topic_prefix, name), key_type=bytes, value_type=bytes)
    app.topic(agent.pipeline.predictions_topic, key_type=bytes, value_type=bytes)
    app.topic(agent.pipeline.dlq_topic, key_type=bytes, value_type=bytes)
    batch_max, window_s = settings.worker.batch_max, settings.worker.batch_window_ms / 1000

    async def score(stream: Any) -> None:  # faust.Stream; take_events is missing from StreamT
        async for events in stream.take_events(batch_max, within=window_s):
            await agent.handle([_inbound(event) for event in events])

    score.__name__ = f"score_{name.replace('-', '_')}"
    app.agent(topic, name=f"score-{name}", concurrency=1)(score)


def _declare_reporting(app: faust.App, agents: dict[str, ModelAgent]) -> None:
    started = time.monotonic()

    @app.timer(interval=10.0)
    async def report() -> None:
        for name, agent in agents.items():
            log.info("%s: %d answered, %d dead-lettered, %d batches in %.0f s; last batch stage times (us): %s",
                     name, agent.answered, agent.dead_lettered, agent.batches, time.monotonic() - started,
                     agent.last_timings)

    @app.page("/status")
    async def status(web: Any, request: Any) -> Any:
        return web.json({name: {"answered": agent.answered, "dead_lettered": agent.dead_lettered,
                                "batches": agent.batches, "model_version": agent.pipeline.model.version,
                                "provider": agent.pipeline.model.provider, "last_timings_us": agent.last_timings}
                         for name, agent in agents.items()})


def run_worker(settings: Settings, model_names: Sequence[str], loglevel: str = "info") -> None:
    """Run the worker in the foreground until SIGTERM/SIGINT."""
    app, _ = create_app(settings, model_names)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
