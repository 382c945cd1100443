"""The shared deployment state of a model: which library version is production, which one is the canary (and its
share of the traffic), which ones shadow it, and the previous production versions a rollback returns to.

Stored in a compacted Kafka topic ``<prefix>.<model>.deployments`` (one partition, ``cleanup.policy=compact``,
created when missing). Key: the model name; value: the JSON of the whole state (``Deployment``, see
docs/wire-format.md). Every change is one new record: until compaction the records are the audit trail; the
``history`` field keeps rollback possible after it. The newest record is the state.

The transitions (``promote``, ``canary``, ``shadow``, ``rollback``, ``retire``) are pure: they take a state and
a ``Library`` snapshot and return the next state, or raise ``DeploymentError`` with one line that says what is
wrong and what to do. ``change_deployment`` does the I/O around them: read the state, apply one, check every
version the new state serves against the library (present, sha256 matching), publish it.

Rules:

- a version holds at most one stage: production, canary or shadow;
- promote: the old production goes onto ``history`` (newest last, at most ``HISTORY_MAX``); promoting the canary
  or a shadow version takes it out of that stage; any other canary stays;
- rollback: production becomes the newest ``history`` entry, which leaves the history; the rolled-back version
  leaves every stage (it is not pushed onto the history, so a second rollback goes one further back, never
  back to the bad version); a canary of another version stays;
- retire: takes a version out of canary, shadow and history (so a rollback cannot bring it back); the production
  version cannot be retired: promote another first.

Concurrent changers: read-check-write on ``seq``. A change reads the state up to the topic's end offset, computes
the next state with ``seq + 1``, and just before publishing checks that the end offset has not moved (else it is
refused: run it again). Two changers that pass that check at the same instant both publish: the last write wins
(it is the newest record) and the seq shows it (two records with the same seq). Kafka transactions would not
close that window (they make writes atomic, not conditional), so none is used; the producer is idempotent with
acks=all, so a retried send is never written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import math
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.clock import now_ms
from streamscore.streams.kafka import client_kwargs, new_topic

from .library import ModelError, newest_primary, read_manifest, verified_artifact, versions

HISTORY_MAX = 20
"""Previous production versions kept for rollback (the oldest drop off)."""
log = logging.getLogger(__name__)

READ_TIMEOUT_S = 15.0
"""Longest a read of the deployments topic (beginning to end) may take."""


class DeploymentError(RuntimeError):
    """A deployment change that is refused, or a state that cannot be read; one line: what and what to do."""


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    """The library version under test."""
    weight: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    """Share of the requests it answers (0..1); production answers the rest."""


class Change(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    by: str
    """Who made it: ``user@host``."""
    at_ms: int
    """When (epoch ms)."""
    what: str
    """One sentence, e.g. 'canary fraud v2 at weight 0.05'."""


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """The model's name (the library folder, the record's key)."""
    production: str | None
    """The version that answers requests (the part the canary does not take); None: nothing is deployed."""
    canary: Canary | None = None
    """A version that answers a share of the requests, or None."""
    shadow: tuple[str, ...] = ()
    """Versions that score the same requests as production, whose predictions are compared, not answered."""
    history: tuple[str, ...] = ()
    """Previous production versions, newest last, at most ``HISTORY_MAX``: what ``rollback`` returns to."""
    seq: int = Field(ge=0)
    """Number of this state: one more than the state it replaced (0: the implicit state, never published)."""
    changed: Change
    """The change that made this state."""

    @model_validator(mode="after")
    def _one_stage_per_version(self) -> Deployment:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", self.model):
            raise ValueError(f"model name {self.model!r}: lower-case letters, digits, '_' and '-' only")
        if self.canary is not None and self.canary.version == self.production:
            raise ValueError(f"version {self.production!r} is both production and canary")
        if len(set(self.shadow)) != len(self.shadow):
            raise ValueError(f"shadow {list(self.shadow)} names a version twice")
        staged = {self.production, self.canary.version if self.canary else None}
        if staged & set(self.shadow):
            raise ValueError(f"shadow {list(self.shadow)} names the production or canary version")
        if len(self.history) > HISTORY_MAX:
            raise ValueError(f"history holds {len(self.history)} versions, at most {HISTORY_MAX}")
        return self

    def stage_of(self, version: str) -> str:
        """'production', 'canary (0.05)', 'shadow' or '-'."""
        if version == self.production:
            return "production"
        if self.canary is not None and version == self.canary.version:
            return f"canary ({self.canary.weight:g})"
        return "shadow" if version in self.shadow else "-"

    @property
    def serving(self) -> tuple[str, ...]:
        """Every version a worker loads for this state: production, canary, shadows."""
        named = [self.production, self.canary.version if self.canary else None, *self.shadow]
        return tuple(version for version in named if version is not None)

    def summary(self) -> str:
        """One line: 'production 2, canary 3 (0.05), shadow 4, history [1]'."""
        canary = f"{self.canary.version} ({self.canary.weight:g})" if self.canary else "-"
        return (f"production {self.production or '-'}, canary {canary}, shadow {', '.join(self.shadow) or '-'}, "
                f"history {list(self.history)}")


@dataclass(frozen=True)
class Library:
    """What the transitions know of the library: the versions present and those that fail their checks."""

    model: str
    versions: tuple[str, ...]
    """Versions present, oldest first."""
    broken: Mapping[str, str] = field(default_factory=dict)
    """Version -> why it cannot be served (its sha256 does not match, its manifest is invalid)."""
    where: str = ""
    """The models folder, for messages."""

    def require(self, version: str) -> None:
        """Refuse a version that is not in the library or fails its checks."""
        if version not in self.versions:
            present = ", ".join(self.versions) or "none"
            place = f" in {self.where}" if self.where else ""
            raise DeploymentError(f"model {self.model!r} has no version {version!r}{place} (the library has: "
                                  f"{present}): register it first, or name one of those")
        if version in self.broken:
            raise DeploymentError(f"version {version!r} of {self.model!r} cannot be deployed, it fails its check: "
                                  f"{self.broken[version]}")


# --------------------------------------------------------------------------------------------- transitions
# Pure: a state (and the library snapshot) in, the next state out; no I/O. ``by`` and ``at_ms`` are stamped
# by change_deployment, which replaces ``changed``.

def _next(state: Deployment, what: str, **changes: object) -> Deployment:
    fields = {**state.model_dump(), **changes, "seq": state.seq + 1,
              "changed": Change(by=state.changed.by, at_ms=state.changed.at_ms, what=what)}
    try:
        return Deployment.model_validate(fields)
    except ValidationError as exc:  # a rule the transitions below should have caught first
        first = exc.errors()[0]
        raise DeploymentError(f"refusing the change of {state.model!r}: {first['msg']}") from None


def _pushed(history: tuple[str, ...], version: str | None) -> tuple[str, ...]:
    if version is None:
        return history
    return (*[entry for entry in history if entry != version], version)[-HISTORY_MAX:]


def promote(state: Deployment, version: str, library: Library) -> Deployment:
    """Make ``version`` production; the old production goes onto the history."""
    library.require(version)
    if version == state.production:
        raise DeploymentError(f"{state.model} v{version} is already production: nothing to promote")
    kept = state.canary if state.canary is None or state.canary.version != version else None
    was = [f"was {state.production}" if state.production else "nothing was"]
    if state.canary is not None and kept is None:
        was.append(f"canary at weight {state.canary.weight:g} until now")
    if version in state.shadow:
        was.append("shadow until now")
    return _next(state, f"promote {state.model} v{version} to production ({'; '.join(was)})",
                 production=version, canary=kept, shadow=tuple(v for v in state.shadow if v != version),
                 history=_pushed(tuple(v for v in state.history if v != version), state.production))


def canary(state: Deployment, version: str, weight: float, library: Library) -> Deployment:
    """Let ``version`` answer ``weight`` (0..1) of the requests; replaces another canary."""
    if not isinstance(weight, int | float) or math.isnan(weight) or not 0.0 <= weight <= 1.0:
        raise DeploymentError(f"canary weight {weight} is outside 0..1: give the share of requests, e.g. 0.05")
    library.require(version)
    if state.production is None:
        raise DeploymentError(f"{state.model} has no production version to canary against: promote one first")
    if version == state.production:
        raise DeploymentError(f"{state.model} v{version} is production: a canary must be another version")
    old = state.canary
    if old is not None and old.version == version and old.weight == weight:
        raise DeploymentError(f"{state.model} v{version} is already the canary at weight {weight:g}: nothing to "
                              "change")
    what = f"canary {state.model} v{version} at weight {weight:g}"
    if old is not None:
        what += (f" (was {old.weight:g})" if old.version == version
                 else f" (replaces canary v{old.version} at {old.weight:g})")
    if version in state.shadow:
        what += " (was shadow)"
    return _next(state, what, canary=Canary(version=version, weight=weight),
                 shadow=tuple(v for v in state.shadow if v != version))


def shadow(state: Deployment, version: str, library: Library) -> Deployment:
    """Add ``version`` to the shadows (scores production's requests; its predictions are not answered)."""
    library.require(version)
    if version == state.production:
        raise DeploymentError(f"{state.model} v{version} is production: shadow another version")
    if version in state.shadow:
        raise DeploymentError(f"{state.model} v{version} is already in shadow: nothing to change")
    was_canary = state.canary is not None and state.canary.version == version
    return _next(state, f"shadow {state.model} v{version}" + (" (was the canary)" if was_canary else ""),
                 canary=None if was_canary else state.canary, shadow=(*state.shadow, version))


def rollback(state: Deployment, library: Library) -> Deployment:
    """Production goes back to the previous production version; the current one leaves every stage."""
    if not state.history:
        raise DeploymentError(f"{state.model} has no previous production version to roll back to (the history is "
                              f"empty; production is {state.production or '-'}): promote the version you want")
    target = state.history[-1]
    library.require(target)
    kept = state.canary if state.canary is None or state.canary.version != target else None
    return _next(state, f"rollback {state.model} from v{state.production} to v{target}",
                 production=target, canary=kept, shadow=tuple(v for v in state.shadow if v != target),
                 history=state.history[:-1])


def retire(state: Deployment, version: str, library: Library) -> Deployment:
    """Take ``version`` out of canary, shadow and history. The production version cannot be retired."""
    del library  # a version may be retired once it has left the library
    if version == state.production:
        raise DeploymentError(f"{state.model} v{version} is production and cannot be retired: promote another "
                              "version first (or roll back)")
    is_canary = state.canary is not None and state.canary.version == version
    if not is_canary and version not in state.shadow and version not in state.history:
        raise DeploymentError(f"{state.model} v{version} is not deployed ({state.summary()}): nothing to retire")
    stages = [name for name, held in (("canary", is_canary), ("shadow", version in state.shadow),
                                      ("history", version in state.history)) if held]
    return _next(state, f"retire {state.model} v{version} (from {', '.join(stages)})",
                 canary=None if is_canary else state.canary,
                 shadow=tuple(v for v in state.shadow if v != version),
                 history=tuple(v for v in state.history if v != version))


def implicit(model: str, library: Library) -> Deployment:
    """The state before any change: production is the newest version in the library, as workers serve today."""
    if not library.versions:
        place = f" in {library.where}" if library.where else ""
        raise DeploymentError(f"no model {model!r}{place}: register it first (streamscore demo does for 'fraud')")
    production = (newest_primary(Path(library.where), model) if library.where else None) or library.versions[-1]
    return Deployment(model=model, production=production, seq=0,
                      changed=Change(by="-", at_ms=0, what="implicit: the newest version in the library "
                                                           "that is not a variant"))


def check_serving(state: Deployment, library: Library) -> None:
    """Refuse a state that serves a version not in the library, or one that fails its checks."""
    for version in state.serving:
        library.require(version)


def describe_change(old: Deployment, new: Deployment) -> str:
    """'production 1 -> 2, canary 2 (0.05) -> -': the stages that differ."""
    def canary_text(state: Deployment) -> str:
        return f"{state.canary.version} ({state.canary.weight:g})" if state.canary else "-"

    parts = []
    for name, before, after in (("production", old.production or "-", new.production or "-"),
                                ("canary", canary_text(old), canary_text(new)),
                                ("shadow", ", ".join(old.shadow) or "-", ", ".join(new.shadow) or "-"),
                                ("history", str(list(old.history)), str(list(new.history)))):
        if before != after:
            parts.append(f"{name} {before} -> {after}")
    return ", ".join(parts) or "no stage changed"


def default_by() -> str:
    """``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# --------------------------------------------------------------------------------------------- the library

def scan_library(models_dir: Path, model: str, verify: tuple[str, ...] | None = None) -> Library:
    """The versions present; those in ``verify`` (all when None) have their manifest read and their artifact's
    sha256 checked (library.read_manifest, library.verified_artifact), and are ``broken`` when they fail."""
    present = tuple(versions(models_dir, model))
    broken: dict[str, str] = {}
    for version in present if verify is None else [v for v in verify if v in present]:
        folder = Path(models_dir) / model / version
        try:
            manifest = read_manifest(folder)
            if manifest.name != model or manifest.version != version:
                raise ModelError(f"{folder} holds the manifest of {manifest.name} v{manifest.version}: "
                                 "re-register the model")
            verified_artifact(folder, manifest)
        except ModelError as exc:
            broken[version] = str(exc)
    return Library(model=model, versions=present, broken=broken, where=str(models_dir))


# --------------------------------------------------------------------------------------------- the topic

@dataclass(frozen=True)
class Record:
    """One record of the deployments topic: a state, where and when it was written."""

    offset: int
    timestamp_ms: int
    state: Deployment | None
    """None: a tombstone (the state was deleted)."""


def topic_of(settings: Settings, model: str) -> str:
    """The model's deployments topic; refuses a name no model can have (and no topic should get)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", model):
        raise DeploymentError(f"{model!r} is not a model name (lower-case letters, digits, '_' and '-', starting "
                              "with a letter): name a model of the library")
    return topics.deployments(settings.topic_prefix, model)


async def _topic_exists(settings: Settings, topic: str) -> bool:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        return topic in set(await admin.list_topics())
    finally:
        await admin.close()


async def ensure_topic(settings: Settings, model: str) -> str:
    """Create ``<prefix>.<model>.deployments`` when missing (1 partition, compacted, replicated as
    ``kafka.topic_replication_factor`` says); refuse an existing one that is not compacted (retention would delete the
    state). Returns its name."""
    topic = topic_of(settings, model)
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([new_topic(settings.kafka, topic, 1, {"cleanup.policy": "compact"})])
            return topic
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})])
        entries = [entry for response in described for resource in response.to_object()["resources"]
                   for entry in resource["config_entries"] if entry["config_names"] == "cleanup.policy"]
        policy = entries[0]["config_value"] if entries else "unknown"
        if "compact" not in str(policy):
            raise DeploymentError(
                f"topic {topic} exists with cleanup.policy={policy}: retention would delete the deployment state; "
                f"make it compacted (kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
                "--add-config cleanup.policy=compact)")
        return topic
    finally:
        await admin.close()


class _Reader:
    """A group-less consumer assigned the topic's one partition: reads it from the beginning to its end."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.partition = TopicPartition(topic, 0)
        self.consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False, group_id=None,
                                         auto_offset_reset="earliest")

    async def __aenter__(self) -> _Reader:
        await self.consumer.start()
        self.consumer.assign([self.partition])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def end_offset(self) -> int:
        return (await self.consumer.end_offsets([self.partition]))[self.partition]

    async def read_all(self, model: str) -> tuple[list[Record], int]:
        """Every record of ``model`` up to the end offset taken first; and that offset."""
        end = await self.end_offset()
        # an explicit offset: seek_to_beginning right after assign() can lose to the assignment's own reset
        self.consumer.seek(self.partition, (await self.consumer.beginning_offsets([self.partition]))[self.partition])
        records: list[Record] = []
        async with asyncio.timeout(READ_TIMEOUT_S):
            while await self.consumer.position(self.partition) < end:
                batch = await self.consumer.getmany(self.partition, timeout_ms=500)
                for message in batch.get(self.partition, []):
                    if message.offset >= end or message.key != model.encode():
                        continue
                    records.append(Record(message.offset, message.timestamp, _parse(message.value, message.offset,
                                                                                     self.topic)))
        return records, end


def _parse(value: bytes | None, offset: int, topic: str) -> Deployment | None:
    if value is None:
        return None
    try:
        return Deployment.model_validate_json(value)
    except ValidationError as exc:
        raise DeploymentError(f"record {offset} of {topic} is not a deployment state "
                              f"({exc.errors()[0]['msg']}): publish a valid one with `streamscore models`") from None


async def read_records(settings: Settings, model: str) -> list[Record]:
    """Every record of the model's deployments topic still in it, oldest first (empty when it does not exist)."""
    topic = topic_of(settings, model)
    if not await _topic_exists(settings, topic):
        return []
    async with _Reader(settings, topic) as reader:
        records, _ = await reader.read_all(model)
    return records


class Follower:
    """A worker's long-lived view of its model's deployment: one group-less consumer assigned the topic's one
    partition, reading at each look only what was appended since the last (an end-offset request when nothing
    was). Reading the whole topic with a new admin client and consumer at every reload check cost a worker most
    of its idle CPU (a listing of every topic of the cluster each time). The topic is created (compacted) at the
    first look, as the worker creates its other topics. A record that is not a deployment state is logged once
    and skipped: the state stays the last valid one."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.model = model
        self.topic = topic_of(settings, model)
        self.partition = TopicPartition(self.topic, 0)
        self._consumer: AIOKafkaConsumer | None = None
        self._state: Deployment | None = None
        self.invalid: str | None = None
        """Why the newest record of the model was skipped (None when it was read)."""

    async def read(self) -> Deployment | None:
        """The deployment state in force (None: no record, or a tombstone); on a failure the consumer is
        closed and the next look starts from the beginning again."""
        try:
            return await self._read()
        except BaseException:
            await self.close()
            raise

    async def _read(self) -> Deployment | None:
        consumer = self._consumer
        if consumer is None:
            await ensure_topic(self.settings, self.model)
            consumer = AIOKafkaConsumer(**client_kwargs(self.settings.kafka), enable_auto_commit=False,
                                        group_id=None, auto_offset_reset="earliest")
            await consumer.start()
            consumer.assign([self.partition])
            consumer.seek(self.partition, (await consumer.beginning_offsets([self.partition]))[self.partition])
            self._consumer, self._state = consumer, None
        end = (await consumer.end_offsets([self.partition]))[self.partition]
        key = self.model.encode()
        consumer.resume(self.partition)
        async with asyncio.timeout(READ_TIMEOUT_S):
            while await consumer.position(self.partition) < end:
                batch = await consumer.getmany(self.partition, timeout_ms=500)
                for message in batch.get(self.partition, []):
                    if message.key != key:
                        continue
                    try:
                        self._state = _parse(message.value, message.offset, self.topic)
                        self.invalid = None
                    except DeploymentError as exc:
                        self.invalid = str(exc)
                        log.error("%s: skipped: %s", self.model, exc)
        consumer.pause(self.partition)  # between two looks it fetches nothing
        return self._state

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def read_deployment(settings: Settings, model: str) -> Deployment | None:
    """The model's deployment state: the newest record of its topic; None when there is none (or the topic
    does not exist): workers then serve the newest library version."""
    records = await read_records(settings, model)
    return records[-1].state if records else None


ChangeFn = Callable[[Deployment, Library], Deployment]
"""A transition with its arguments bound, e.g. ``lambda state, library: canary(state, "2", 0.05, library)``."""


async def change_deployment(settings: Settings, model: str, change_fn: ChangeFn,
                            by: str | None = None) -> tuple[Deployment, Deployment]:
    """Read the state (or the implicit one), apply ``change_fn``, check every version the new state serves
    (present in the library, sha256 matching), publish the new state (acks=all) and return (old, new). Refused
    with ``DeploymentError`` (nothing published) when the change is invalid or the topic moved meanwhile."""
    topic = await ensure_topic(settings, model)
    async with _Reader(settings, topic) as reader:
        records, end = await reader.read_all(model)
        current = records[-1].state if records else None
        listed = scan_library(settings.models_dir, model, verify=())
        old = current if current is not None else implicit(model, listed)
        proposed = change_fn(old, listed)
        checked = scan_library(settings.models_dir, model, verify=proposed.serving)
        check_serving(proposed, checked)
        new = proposed.model_copy(update={
            "seq": old.seq + 1, "changed": Change(by=by or default_by(), at_ms=now_ms(), what=proposed.changed.what)})
        if await reader.end_offset() != end:
            raise DeploymentError(f"the deployment of {model!r} changed while this change was prepared: look at "
                                  f"`streamscore models show {model}` and run the command again")
        producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await producer.send_and_wait(topic, new.model_dump_json().encode(), key=model.encode())
        finally:
            await producer.stop()
    return old, new
