"""The per-batch pipeline: a list of stages (workers/stages.py), run in order and timed by name.

It takes the raw messages of one batch and returns what must be published: one prediction per valid
request (``ok`` or ``expired``, or ``error`` when inference failed) and one dead letter per bad message or
array element. It publishes nothing itself, so the delivery layer decides when offsets may be committed.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamscore import __version__
from streamscore.featurestore.store import FeatureStore
from streamscore.streams import topics
from streamscore.streams.clock import now_ms
from streamscore.streams.records import Inbound, Outbound

from .deadletters import DeadLetters
from .runtime import ModelRuntime
from .stages import (
    ERROR,
    EXPIRED,
    Assemble,
    Decode,
    Encode,
    Features,
    Infer,
    Route,
    ScoringBatch,
    Screen,
    Serving,
    Shadow,
    Stage,
    place,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    predictions: list[Outbound]
    dead_letters: list[Outbound]
    answered: int
    """Predictions made (any status)."""
    expired: int
    """Of which status ``expired``."""
    timings_us: dict[str, int]
    """Microseconds per stage, by stage name."""
    errored: int = 0
    """Of which status ``error`` (the model failed on the batch)."""
    by_version: dict[str, int] = field(default_factory=dict)
    """Predictions made, by the version that made them."""
    status_by_version: dict[str, dict[str, int]] = field(default_factory=dict)
    """Predictions made, by version and status."""
    runtime_s_by_version: dict[str, float] = field(default_factory=dict)
    """Seconds of each version's runtime call (the versions that answered rows of this batch)."""
    inference_failures_by_version: dict[str, int] = field(default_factory=dict)
    """Runtime calls that raised, by version."""
    extra: list[Outbound] = field(default_factory=list)
    """Other messages published with the batch (shadow records), acknowledged before its commit like the rest."""


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}"


def default_stages(store: FeatureStore, topic_prefix: str, model_name: str,
                   reply_to_prefixes: Sequence[str] | None, lineage: Lineage,
                   registry: CollectorRegistry | None = None) -> list[Stage]:
    """The built-in pipeline: decode -> screen -> route -> features -> assemble -> infer -> shadow -> encode."""
    return [Decode(), Screen(topic_prefix, reply_to_prefixes), Route(), Features(store), Assemble(), Infer(),
            Shadow(topics.shadow(topic_prefix, model_name), lineage, registry),
            Encode(topics.predictions(topic_prefix, model_name), lineage)]


class Lineage:
    """What every prediction of a batch shares: the artifact, the code, the batch and the worker."""

    def __init__(self, pipeline: BatchPipeline, worker_id: str) -> None:
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.code_version = code_version()
        self._batch_seq = itertools.count(1)

    def __call__(self) -> dict[str, object]:
        return {
            "artifact_sha256": self.pipeline.model.manifest.sha256,
            "code_version": self.code_version,
            "batch_id": f"{self.worker_id}/{next(self._batch_seq)}",
            "worker_id": self.worker_id,
        }


class BatchPipeline:
    """One model's pipeline. ``stages`` (when given) replaces the built-in list; ``add`` places one more."""

    def __init__(self, model: ModelRuntime, store: FeatureStore, topic_prefix: str,
                 worker_id: str | None = None, reply_to_prefixes: Sequence[str] | None = None,
                 stages: Sequence[Stage] | None = None, registry: CollectorRegistry | None = None) -> None:
        self.serving = Serving(model)
        self.store = store
        self.prefix = topic_prefix
        self.predictions_topic = topics.predictions(topic_prefix, model.name)
        self.dlq_topic = topics.dead_letters(topic_prefix, model.name)
        self.shadow_topic = topics.shadow(topic_prefix, model.name)
        self.letters = DeadLetters(model.name, self.dlq_topic)
        self.lineage = Lineage(self, worker_id or f"{socket.gethostname()}:{os.getpid()}")
        self.stages: list[Stage] = list(stages) if stages is not None else default_stages(
            store, topic_prefix, model.name, reply_to_prefixes, self.lineage, registry)

    @property
    def model(self) -> ModelRuntime:
        """The production version."""
        return self.serving.production

    @model.setter
    def model(self, runtime: ModelRuntime) -> None:
        self.serving = Serving(runtime)

    @property
    def worker_id(self) -> str:
        return self.lineage.worker_id

    def add(self, stage: Stage, before: str | None = None, after: str | None = None) -> None:
        """Place a stage of your own before or after a stage of that name (the end when neither is given)."""
        self.stages = place(self.stages, stage, before, after)

    def add_from_manifest(self, registry: CollectorRegistry | None) -> None:
        """Place the stages the model's manifest names (``stages``), built from the stage registry."""
        from .stages import build_stage

        for spec in self.model.manifest.stages:
            self.add(build_stage(spec, registry, self.model.name), spec.before, spec.after)

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    async def process(self, batch: Sequence[Inbound]) -> BatchOutcome:
        serving = self.serving
        scoring = ScoringBatch(batch, serving.production, now_ms(), self.letters, serving=serving)
        timings = scoring.timings_us
        last = time.perf_counter_ns()
        for stage in self.stages:
            await stage(scoring)
            now = time.perf_counter_ns()
            timings[stage.name] = (now - last) // 1000
            last = now
        status = scoring.status
        return BatchOutcome(scoring.predictions, scoring.dead_letters, answered=len(scoring.predictions),
                            expired=int((status == EXPIRED).sum()), timings_us=timings,
                            errored=int((status == ERROR).sum()),
                            by_version=scoring.context.get("answered_by_version", {}),
                            status_by_version=scoring.context.get("status_by_version", {}),
                            runtime_s_by_version=scoring.context.get("runtime_s_by_version", {}),
                            inference_failures_by_version=scoring.context.get("inference_failures_by_version", {}),
                            extra=scoring.context.get("extra", []))
