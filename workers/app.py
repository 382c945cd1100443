"""The worker: a Faust app with one agent per model.

The request topics ``<prefix>.<model>.requests`` are consumed in batches by ``BatchDelivery`` (a service of
the app, see ``delivery.py`` for why below Faust's stream layer); each batch reaches its model's agent as one
event. The agent runs the pipeline and queues the predictions and dead letters as producer batches; the
batch's offsets are committed once Kafka acknowledged all of them: a crash may repeat a batch, never lose one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faust
import mode
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from streamscore.featurestore.store import FeatureStore
from streamscore.featurestore.views import FeatureView, load_views
from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import ensure_topics
from streamscore.streams.delivery import BatchDelivery, Flight
from streamscore.streams.kafka import faust_broker, faust_credentials
from streamscore.streams.records import Inbound, Outbound
from streamscore.streams.watchdog import EXIT_SHUTDOWN_TIMEOUT, EXIT_STALLED, Watchdog, hard_exit
from streamscore.workers.metrics import WorkerMetrics

from . import devices
from .deadletters import DeadLetters
from .deployments import Follower, read_deployment
from .drift import Drift
from .health import Readiness
from .http import HttpRows, InferenceServer, listen
from .library import ModelError, newest_primary
from .logs import logging_config
from .pipeline import BatchOutcome, BatchPipeline
from .predlog import attach as attach_prediction_log
from .predlog import close_writers
from .runtime import ModelRuntime, load_model
from .stages import Serving, import_stage_modules

log = logging.getLogger(__name__)

_PIPELINE_ATTEMPTS = 3


class ModelScorer:
    """Everything one model's agent needs: the pipeline, the delivery (for its publisher) and counters."""

    def __init__(self, pipeline: BatchPipeline, metrics: WorkerMetrics) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.delivery: BatchDelivery | None = None
        self.http: HttpRows | None = None
        """HTTP requests' rows waiting to join a batch (None: no HTTP endpoint)."""
        self.answered = 0
        self.expired = 0
        self.dead_lettered = 0
        self.batches = 0
        self.requests_per_batch = 0.0
        self.last_timings: dict[str, int] = {}
        self.pending_serving: Serving | None = None
        """What to serve next (a new production version, a canary), loaded and verified; swapped in between two
        batches."""
        self._refused: set[tuple[Wanted, tuple[float, ...]]] = set()
        self.looking = False
        self.scoring = False
        """True while a batch is in the pipeline: a new serving is swapped in only between two batches."""
        self.follower: Follower | None = None
        """The deployment reader of the reload checks, made at the first."""
        self.refusal: str | None = None
        """Why the version the worker should serve was refused (shown at /status), None when it is served."""

    @property
    def letters(self) -> DeadLetters:
        return self.pipeline.letters

    async def handle(self, flight: Flight) -> None:
        """Score a batch and queue its messages; the flight is acknowledged once Kafka has all of them.

        The invariant, kept here for every batch: it ends answered or dead-lettered, whatever is raised. The
        pipeline is tried again, then split to find the messages at fault (``_process``); should even that
        fail, every message of the batch is dead-lettered ``processing_failed``. Publishing never raises
        (the publisher retries until Kafka has everything; the watchdog stops a worker that cannot)."""
        flight.state = "scoring"
        taken = self.http.take(flight) if self.http is not None else []
        records = [*flight.records, *(waiting.message for waiting in taken)] if taken else flight.records
        self.scoring = True
        try:
            self._swap_in_pending_model()
            outcome = await self._process(records)
        except Exception as exc:
            log.exception("scoring a batch of %d messages failed beyond its isolation; dead-lettering each",
                          len(records))
            outcome = BatchOutcome([], [self.letters.failed(message, exc) for message in records], 0, 0, {})
        finally:
            self.scoring = False
        http_answered = 0
        if taken:  # HTTP rows are answered over HTTP: their messages leave the outcome before it is published
            try:
                outcome, http_answered = HttpRows.settle(taken, outcome)
            except Exception as exc:
                log.exception("answering %d HTTP requests failed", len(taken))
                HttpRows.fail(taken, f"internal error: {type(exc).__name__}: {exc}")
        flight.state = "publishing"
        assert self.delivery is not None and self.delivery.publisher is not None
        acked = await self.delivery.publish(flight, [*outcome.predictions, *outcome.dead_letters, *outcome.extra],
                                            self._undeliverable)
        acked.add_done_callback(lambda done: _acknowledged(flight, done))
        try:
            self._count(records, outcome, http_answered)
        except Exception:  # bookkeeping must never hold a batch up
            log.exception("counting a batch failed")

    def _swap_in_pending_model(self) -> None:
        if self.pending_serving is not None:
            previous, self.pipeline.serving, self.pending_serving = self.pipeline.serving, self.pending_serving, None
            now = self.pipeline.serving
            log.warning("%s: now serving %s (sha256 %s…), was %s", now.production.name,
                        _describe(_served(now)), now.production.manifest.sha256[:12], _describe(_served(previous)))
            self.report_model()

    def _count(self, records: list[Inbound], outcome: BatchOutcome, http_answered: int = 0) -> None:
        self.batches += 1
        self.answered += outcome.answered
        self.expired += outcome.expired
        self.dead_lettered += len(outcome.dead_letters)
        self.requests_per_batch = 0.9 * self.requests_per_batch + 0.1 * len(records)
        self.last_timings = outcome.timings_us
        self.metrics.observe_batch(self.pipeline.model.name, len(records), outcome)
        self.metrics.observe_sources(self.pipeline.model.name, outcome.answered - http_answered, http_answered)

    def report_model(self) -> None:
        model = self.pipeline.model
        self.metrics.serve_model(model.name, model.version, model.manifest.sha256, model.provider)
        self.metrics.serve_provider(model.name, model.version, model.provider, model.device_note)

    async def look_for_new_version(self, settings: Settings, views: dict[str, FeatureView]) -> None:
        """Load what the worker should serve if it is not what it serves: the deployment's production version
        and canary (``streamscore models promote/canary/rollback``), or without a deployment the library's
        newest version that is not a variant. A version that fails its checks (missing, sha256 mismatch, bad
        manifest, a canary that reads other inputs than production) is refused, logged once, and what is
        served keeps serving. The swap happens between two batches (or at once when no batch is in the
        pipeline). One look at a time: a look still loading when the next is due lets that one pass."""
        if self.looking:
            return
        self.looking = True
        try:
            await self._look(settings, views)
        finally:
            self.looking = False

    async def _look(self, settings: Settings, views: dict[str, FeatureView]) -> None:
        if not self.scoring:  # no batch in the pipeline (no traffic): what was loaded is served from now on
            self._swap_in_pending_model()
        serving = self.pipeline.serving
        name = serving.production.name
        if self.follower is None:
            self.follower = Follower(settings, name)
        wanted = await wanted_serving(settings, name, self.follower)
        if wanted is None or self.pending_serving is not None:
            return
        have = _served(serving)
        if wanted == have:
            if self.refusal is not None:
                log.warning("%s: the deployment names %s again, which is served: refusal cleared", name,
                            _describe(have))
            self.refusal = None
            return
        named = [version for version in (wanted[0], wanted[1], *wanted[3]) if version]
        stamp = (wanted, _folder_stamp(settings.models_dir / name, named))
        if stamp in self._refused:
            return
        loaded = {runtime.version: runtime for runtime in (serving.production, serving.canary, *serving.shadows)
                  if runtime}

        def load(version: str) -> ModelRuntime:
            return loaded[version] if version in loaded else load_model(settings.models_dir, name, views,
                                                                        settings.worker, version)

        production_version, canary_version, weight, shadow_versions = wanted
        loop = asyncio.get_running_loop()
        try:
            production = await loop.run_in_executor(None, load, production_version)
            canary = None
            if canary_version is not None:
                canary = await loop.run_in_executor(None, load, canary_version)
                _same_inputs(production, canary)
            shadows = []
            for version in shadow_versions:
                shadows.append(await loop.run_in_executor(None, load, version))
                _same_inputs(production, shadows[-1])
        except ModelError as exc:
            self._refused.add(stamp)
            self.refusal = f"refusing {_describe(wanted)}, still serving {_describe(have)}: {exc}"
            log.error("%s: %s", name, self.refusal)
            return
        self.refusal = None
        self.pending_serving = Serving(production, canary, weight if canary is not None else 0.0, tuple(shadows))

    async def _process(self, batch: list[Inbound]) -> BatchOutcome:
        """Run the pipeline, trying again on failure; a batch that keeps failing is split to find the messages
        at fault: only those are dead-lettered (processing_failed), never lost nor retried forever while they
        hold up their partitions (a poison batch), and the rest of the batch is answered."""
        for attempt in range(1, _PIPELINE_ATTEMPTS + 1):
            try:
                return await self.pipeline.process(batch)
            except Exception as exc:
                log.exception("batch of %d messages failed (attempt %d of %d)", len(batch), attempt,
                              _PIPELINE_ATTEMPTS)
                last = exc
                await asyncio.sleep(0.2 * attempt)
        return await self._isolate(batch, last)

    async def _isolate(self, batch: list[Inbound], failure: BaseException) -> BatchOutcome:
        """Halves tried once each, recursively, down to the single messages that fail on their own."""
        if len(batch) == 1:
            return BatchOutcome([], [self.letters.failed(batch[0], failure)], 0, 0, {})
        middle = len(batch) // 2
        outcomes = []
        for half in (batch[:middle], batch[middle:]):
            try:
                outcomes.append(await self.pipeline.process(half))
            except Exception as exc:
                outcomes.append(await self._isolate(half, exc))
        return merge_outcomes(*outcomes)

    def _undeliverable(self, message: Outbound, error: BaseException) -> Outbound | None:
        """The dead letter that replaces a message Kafka will never take on its topic (a reply_to topic that is
        missing, invalid or not writable). None for the worker's own topics: those are retried until an
        operator fixes them (and the watchdog restarts a worker that cannot get them out)."""
        own = (self.pipeline.predictions_topic, self.pipeline.dlq_topic, self.pipeline.shadow_topic,
               topics.monitoring(self.pipeline.prefix, self.pipeline.model.name))
        if message[0] in own:  # a plain tuple, often
            return None
        return self.letters.undeliverable(message, error)


def _summed(first: dict, second: dict) -> dict:
    return {key: first.get(key, 0) + second.get(key, 0) for key in {**first, **second}}


def merge_outcomes(first: BatchOutcome, second: BatchOutcome) -> BatchOutcome:
    """The outcome of a batch scored as two halves: everything of both, counts added (shadow records and
    monitoring reports included, so a split batch loses none of them)."""
    return BatchOutcome(
        first.predictions + second.predictions, first.dead_letters + second.dead_letters,
        first.answered + second.answered, first.expired + second.expired, second.timings_us or first.timings_us,
        first.errored + second.errored, by_version=_summed(first.by_version, second.by_version),
        status_by_version={version: _summed(first.status_by_version.get(version, {}),
                                            second.status_by_version.get(version, {}))
                           for version in {**first.status_by_version, **second.status_by_version}},
        runtime_s_by_version=_summed(first.runtime_s_by_version, second.runtime_s_by_version),
        inference_failures_by_version=_summed(first.inference_failures_by_version,
                                              second.inference_failures_by_version),
        extra=first.extra + second.extra)


Wanted = tuple[str, str | None, float, tuple[str, ...]]
"""(production version, canary version or None, canary weight, shadow versions)."""


async def wanted_serving(settings: Settings, model: str, follower: Follower | None = None) -> Wanted | None:
    """What a worker should serve: the deployment's production and canary, or the library's newest version
    that is not a variant without a deployment (None: nothing to serve; the library says why). ``follower``
    (the worker's long-lived reader) reads what changed since its last look; without it the topic is read."""
    try:
        reading = follower.read() if follower is not None else read_deployment(settings, model)
        state = await asyncio.wait_for(reading, 10.0)
    except Exception as exc:
        log.warning("%s: the deployment could not be read (%r); serving what is served", model, exc)
        return None
    if state is not None and state.production is not None:
        canary = state.canary
        return (state.production, canary.version if canary else None, canary.weight if canary else 0.0,
                tuple(state.shadow))
    newest = newest_primary(settings.models_dir, model)
    return None if newest is None else (newest, None, 0.0, ())


def _served(serving: Serving) -> Wanted:
    return (serving.production.version, serving.canary.version if serving.canary else None, serving.weight,
            tuple(shadow.version for shadow in serving.shadows))


def _describe(wanted: Wanted) -> str:
    production, canary, weight, shadows = wanted
    return (f"v{production}" + (f" with canary v{canary} at weight {weight:g}" if canary else "")
            + (f" and shadow {', '.join('v' + v for v in shadows)}" if shadows else ""))


def _folder_stamp(model_dir: Path, wanted: list[str]) -> tuple[float, ...]:
    """When the wanted versions' folders last changed: a refused version is looked at again once it changes."""
    stamps = []
    for version in wanted:
        folder = model_dir / version
        stamps.append(max((entry.stat().st_mtime for entry in folder.iterdir()), default=0.0)
                      if folder.is_dir() else 0.0)
    return tuple(stamps)


def _same_inputs(production: ModelRuntime, canary: ModelRuntime) -> None:
    """Versions scored in one batch share its decoding and its feature fetch: they must read the same inputs."""
    if canary.decode_spec != production.decode_spec or [v.name for v in canary.views] != \
            [v.name for v in production.views] or canary.columns != production.columns:
        raise ModelError(f"v{canary.version} reads other inputs than production v{production.version} (request "
                         "features, views or column order): a canary or shadow must read the inputs production reads")


async def wanted_version(settings: Settings, model: str) -> str | None:
    """The version a worker should serve: the deployment's production version when the model has a deployment
    (a deployment that cannot be read leaves it to the library, and says so), else the newest version of the
    library that is not a variant (None: let the library say what is missing)."""
    try:
        state = await asyncio.wait_for(read_deployment(settings, model), 10.0)
    except Exception as exc:
        log.warning("%s: the deployment could not be read (%r); serving by the library", model, exc)
        state = None
    if state is not None and state.production is not None:
        return state.production
    return newest_primary(settings.models_dir, model)


def _acknowledged(flight: Flight, published: asyncio.Future) -> None:
    """A flight is acknowledged once Kafka has all its messages; a publication cancelled (the worker is
    stopping) leaves it uncommitted, read again by the next owner of its partitions."""
    if not published.cancelled() and published.exception() is None:
        flight.state = "acknowledged"
        _resolve(flight.acked)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


Customize = Callable[[BatchPipeline, WorkerMetrics], None]
"""Called with each model's pipeline (manifest stages already placed) and the worker's metrics when the worker
is composed: place stages of your own (``pipeline.add(stage, after="infer")``) and register metrics of your own
in ``metrics.registry`` (served at /metrics)."""


def create_app(settings: Settings, model_names: Sequence[str], watchdog: Watchdog | None = None,
               customize: Customize | None = None) -> tuple[faust.App, dict[str, ModelScorer]]:
    """Build the worker app: load the views and models, connect the feature store, compose one pipeline per
    model (built-in stages, the manifest's stages, then ``customize``), declare one agent per model and the
    batch delivery that feeds them (watched by ``watchdog`` when given)."""
    devices.preflight(settings.worker)  # a device asked for and missing stops the worker before it connects
    import_stage_modules(settings.worker.stage_modules)
    views = load_views(settings.views_file)
    store = FeatureStore(settings, views)
    store.connect()
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}-worker",
        broker=faust_broker(settings.kafka),
        broker_credentials=faust_credentials(settings.kafka),
        store="memory://",
        # Faust keeps its table state under datadir; the data folder, not "<app id>-data" in the current directory
        datadir=str(settings.data_dir / "faust" / "{conf.name}"),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.worker.partitions,
        topic_replication_factor=settings.kafka.topic_replication_factor,
        web_port=settings.worker.web_port,
        # Faust's own consumer group carries nothing here (the batches come through BatchDelivery's group),
        # but a worker starts serving only once Faust joined it, and a killed member holds that join up for
        # its whole session timeout: 60 s by default, 10 s here (as Kafka clients' own default).
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        web_bind=settings.worker.web_bind,
        web_host=settings.worker.web_bind if settings.worker.web_bind not in ("0.0.0.0", "::") else "127.0.0.1",
    )
    prefix = settings.topic_prefix
    asyncio.run(ensure_topics(settings, [name for model in model_names for name in (
        topics.requests(prefix, model), topics.predictions(prefix, model), topics.dead_letters(prefix, model),
        topics.shadow(prefix, model), topics.monitoring(prefix, model))],
        partitions=settings.worker.partitions))
    agents: dict[str, ModelScorer] = {}
    channels: dict[str, Any] = {}
    metrics = WorkerMetrics()
    for name in model_names:
        runtime = load_model(settings.models_dir, name, views, settings.worker,
                             asyncio.run(wanted_version(settings, name)))
        pipeline = BatchPipeline(runtime, store, prefix, settings.worker.worker_id, settings.worker.reply_to_prefixes,
                                 registry=metrics.registry)
        pipeline.add_from_manifest(metrics.registry)
        attach_prediction_log(pipeline, settings, metrics.registry)
        if settings.monitoring.drift and "drift" not in pipeline.stage_names:
            # after shadow (itself after infer), so that shadow versions' outputs are watched too
            pipeline.add(Drift(topics.monitoring(prefix, name), settings.monitoring, metrics.registry, name,
                               pipeline.worker_id), after="shadow" if "shadow" in pipeline.stage_names else "infer")
        if customize is not None:
            customize(pipeline, metrics)
        log.info("%s v%s pipeline: %s", name, runtime.version, " -> ".join(pipeline.stage_names))
        agents[name] = ModelScorer(pipeline, metrics)
        agents[name].report_model()
        channels[topics.requests(prefix, name)] = _declare_agent(app, agents[name])
    readiness = Readiness(settings, store, lambda: {name: f"v{agent.pipeline.model.version}"
                                                    for name, agent in agents.items()}, metrics, watchdog)
    _declare_services(app, settings, store, agents, channels, watchdog, readiness)
    _declare_reporting(app, agents, store, metrics, watchdog, readiness)
    if settings.http.port is not None:
        _declare_http(app, settings, agents, channels, store, metrics, watchdog)
    if settings.worker.reload_interval_s > 0:
        @app.timer(interval=settings.worker.reload_interval_s)
        async def reload_models() -> None:
            for agent in agents.values():
                await agent.look_for_new_version(settings, views)

    return app, agents


class FlightChannel(faust.Channel):
    """An in-memory channel of Flights that Faust's flow control leaves alone.

    Faust suspends and clears agents' buffers whenever its own consumer group rebalances (a worker joining,
    leaving or killed), and until the first assignment: right for events Faust re-reads from Kafka, not for
    Flights. A Flight put on hold stalls the batch path for as long as that group takes (a killed member's
    whole session timeout); a Flight cleared is never acknowledged, so the in-order commits behind it wait
    forever and the revocation that follows never finishes draining. This queue has a flow control of its
    own that is never suspended."""

    @property
    def queue(self) -> Any:
        if self._queue is None:
            self._queue = ThrowableQueue(maxsize=self.maxsize, flow_control=FlowControlEvent(initially_suspended=False))
        return self._queue


def _declare_agent(app: faust.App, agent: ModelScorer) -> Any:
    """A Faust agent reading whole batches (Flights) from an in-memory channel: one event per batch."""
    name = agent.pipeline.model.name
    channel = FlightChannel(app, maxsize=8)

    async def score(stream: Any) -> None:
        async for flight in stream:
            try:
                await agent.handle(flight)
            except Exception:  # handle() keeps the invariant; this only keeps the agent alive if it did not
                log.exception("the %s agent failed on a batch (%s)", name, flight.describe())

    score.__name__ = f"score_{name.replace('-', '_')}"
    app.agent(channel, name=f"score-{name}", concurrency=1)(score)
    return channel


def _declare_services(app: faust.App, settings: Settings, store: FeatureStore, agents: dict[str, ModelScorer],
                      channels: dict[str, Any], watchdog: Watchdog | None, readiness: Readiness) -> None:
    @app.service
    class Delivery(BatchDelivery):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(settings, channels, **kwargs)
            for agent in agents.values():
                agent.delivery = self
            readiness.delivery = self
            if watchdog is not None:
                watchdog.progress = self

        async def on_started(self) -> None:
            await super().on_started()
            if watchdog is not None:
                watchdog.start(asyncio.get_running_loop())

        async def on_stop(self) -> None:
            await super().on_stop()
            if watchdog is not None:
                watchdog.stop()
            for agent in agents.values():
                if agent.follower is not None:
                    await agent.follower.close()

    @app.on_before_shutdown.connect
    async def finish_batches(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Faust stops the agents and the feature store before the services it was given: stop fetching and
        finish the batches in flight first, so a worker stopped with SIGTERM commits all it answered."""
        delivery = next(iter(agents.values())).delivery
        if delivery is not None:
            await delivery.finish(settings.worker.shutdown_timeout_s / 2)

    @app.service
    class FeatureStoreService(mode.Service):
        """Closes the feature store's connections when the worker stops."""

        async def on_stop(self) -> None:
            await asyncio.get_running_loop().run_in_executor(None, close_writers)  # the queued log rows
            await store.close()


def _declare_http(app: faust.App, settings: Settings, agents: dict[str, ModelScorer], channels: dict[str, Any],
                  store: FeatureStore, metrics: WorkerMetrics, watchdog: Watchdog | None) -> None:
    """The Open Inference Protocol endpoint (workers/http.py): its rows join each model's batches through the
    agent's channel. The socket is opened here, so a taken port fails the start with a one-line error."""
    sock = listen(settings.http)
    for name, agent in agents.items():
        agent.http = HttpRows(settings.http, settings.worker.batch_max,
                              channels[topics.requests(settings.topic_prefix, name)].put)
    server = InferenceServer(settings, agents, store, metrics, watchdog)
    metrics.watch(lambda: {"streamscore_http_waiting_rows": (
        "Rows of HTTP requests waiting for a batch", float(sum(agent.http.waiting_rows for agent in agents.values()
                                                               if agent.http is not None)))})

    @app.service
    class HttpService(mode.Service):
        """Serves the endpoint while the worker runs; stops taking requests before the batches are finished."""

        async def on_started(self) -> None:
            await server.start(sock)

        async def on_stop(self) -> None:
            await server.stop()

    @app.on_before_shutdown.connect
    async def stop_http(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await server.stop()


def _declare_reporting(app: faust.App, agents: dict[str, ModelScorer], store: FeatureStore,
                       metrics: WorkerMetrics, watchdog: Watchdog | None, readiness: Readiness) -> None:
    started = time.monotonic()

    def live_values() -> dict[str, tuple[str, float]]:
        cache, delivery = store.cache, next(iter(agents.values())).delivery
        values = {"streamscore_store_read_errors": ("Cassandra reads that failed (defaults used)",
                                                    float(store.store_errors))}
        if cache is not None:
            values |= {"streamscore_cache_hits": ("Feature rows served by the cache (Redis or the near cache)",
                                                  float(cache.hits)),
                       "streamscore_cache_near_hits": ("Of those, feature rows served from the worker's near cache "
                                                       "(no Redis round trip)", float(cache.near_hits)),
                       "streamscore_cache_misses": ("Feature rows read through to Cassandra", float(cache.misses)),
                       "streamscore_cache_bypassed": ("Batches served without Redis (it did not answer)",
                                                      float(cache.bypassed))}
        if delivery is not None:
            values |= {"streamscore_batches_in_flight": ("Batches fetched, not yet committed",
                                                         float(len(delivery.flights))),
                       "streamscore_commit_failures": ("Offset commits that failed (rebalance)",
                                                       float(delivery.commit_failures))}
        return values

    metrics.watch(live_values)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.timer(interval=10.0)
    async def report() -> None:
        for name, agent in agents.items():
            log.info("%s: %d answered (%d expired), %d dead-lettered, %d batches (%.0f requests each) in %.0f s; "
                     "last batch stage times (us): %s", name, agent.answered, agent.expired, agent.dead_lettered,
                     agent.batches, agent.requests_per_batch, time.monotonic() - started, agent.last_timings)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """Liveness: the process answers (the watchdog ends a worker whose loop is blocked or that stalled)."""
        return web.json({"alive": True})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """200 when the worker can serve; 503 naming what fails (a stall, Kafka, Cassandra, Redis, the consumer
        group), see ``health``."""
        status, body = readiness.body()
        return web.json(body, status=status)

    @app.task
    async def check_readiness() -> None:
        await readiness.run()

    @app.page("/status")
    async def status(web: Any, request: Any) -> Any:
        return web.json({name: {"answered": agent.answered, "expired": agent.expired,
                                "dead_lettered": agent.dead_lettered, "batches": agent.batches,
                                "model_version": agent.pipeline.model.version,
                                "artifact_sha256": agent.pipeline.model.manifest.sha256,
                                "provider": agent.pipeline.model.provider,
                                "device": agent.pipeline.model.device_note, "last_timings_us": agent.last_timings,
                                "stages": agent.pipeline.stage_names, "version_refused": agent.refusal,
                                "feature_store": _store_counters(agent.pipeline.store)}
                         for name, agent in agents.items()})


def _store_counters(store: FeatureStore) -> dict[str, Any]:
    """Cache use (``bypassed``: batches read straight from Cassandra because Redis did not answer) and the
    Cassandra reads that failed (those requests got the view defaults, marked unavailable)."""
    cache = store.cache
    return {
        "cache": None if cache is None else {"bypassed": cache.bypassed, "hits": cache.hits,
                                             "near_hits": cache.near_hits, "misses": cache.misses,
                                             "available": cache.available},
        "store_errors": store.store_errors,
    }


def _tune_gc() -> None:
    """Every batch allocates thousands of short-lived objects; with the default thresholds the cyclic GC ran
    often and walked the long-lived heap (drivers, model, views) each time. Freeze what exists after start-up
    and collect young objects less often: the hot path makes no reference cycles of its own."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class _BoundedWorker(faust.Worker):
    """Faust's worker with a bound on shutdown: once a stop begins (SIGTERM, SIGINT, or the watchdog), the
    process exits at ``shutdown_timeout_s`` whatever is still running; and a worker stopped by its watchdog
    exits non-zero."""

    def __init__(self, app: faust.App, watchdog: Watchdog, shutdown_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.watchdog = watchdog
        self.shutdown_timeout_s = shutdown_timeout_s
        self._deadline: threading.Timer | None = None

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if self._deadline is None:
            self._deadline = threading.Timer(self.shutdown_timeout_s, self._out_of_time)
            self._deadline.daemon = True
            self._deadline.start()
        super()._schedule_shutdown(signal)

    def stop_on_stall(self, reason: str) -> None:
        self._schedule_shutdown(signal.SIGTERM)

    def _out_of_time(self) -> None:
        code = EXIT_STALLED if not self.watchdog.ready else EXIT_SHUTDOWN_TIMEOUT
        hard_exit(code, f"shutdown still not finished after {self.shutdown_timeout_s:g} s "
                        "(STREAMSCORE_WORKER__SHUTDOWN_TIMEOUT_S); batches not committed will be read again")


def _use_event_loop(name: str) -> None:
    """Make the worker's event loop uvloop's (``worker.event_loop``), before Faust asks for a loop."""
    if name != "uvloop":
        return
    try:
        import uvloop
    except ImportError:
        log.warning("worker.event_loop is uvloop but uvloop is not installed (pip install uvloop): running on "
                    "asyncio's own loop; set STREAMSCORE_WORKER__EVENT_LOOP=asyncio to say so")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(settings: Settings, model_names: Sequence[str], loglevel: str = "info",
               customize: Customize | None = None) -> None:
    """Run the worker in the foreground until SIGTERM/SIGINT, or until its watchdog finds it cannot make
    progress (then it exits with code 70, so that its supervisor restarts it)."""
    holder: list[_BoundedWorker] = []
    _use_event_loop(settings.worker.event_loop)
    watchdog = Watchdog(None, settings.worker.stall_timeout_s, lambda reason: holder[0].stop_on_stall(reason))
    app, _ = create_app(settings, model_names, watchdog, customize)
    _tune_gc()
    # Faust installs a log format of its own unless handed one: the same configuration as the CLI's
    worker = _BoundedWorker(app, watchdog, settings.worker.shutdown_timeout_s, loglevel=loglevel, quiet=True,
                            logging_config=logging_config(settings.log_level, settings.log_format))
    holder.append(worker)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if not watchdog.ready:
            raise SystemExit(EXIT_STALLED) from None
        raise
