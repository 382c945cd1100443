"""Retraining on a trigger: a new version trained on what production saw, shadowed beside production.

``retrain(settings, model)`` (``streamscore retrain``, ``--every``, and ``streamscore monitor --retrain-on RULE``):

1. read the ground truth: every label of ``<prefix>.<model>.labels`` (msgpack ``{id, label, event_ms}``, the last
   label of an id wins), up to the end offsets taken at the start;
2. join it with the prediction log by request id: the exact input vectors the model scored (rows logged with
   other input columns than the base version reads are left out);
3. add the version's original training data when asked (``with_training_data``);
4. train the model's recipe on it, profile the training data and the new model's outputs on it, register the new
   version (``parent``: the version it was retrained from; ``made_by``: ``retrain`` with the parameters, the row
   counts and the training data's sha256) and deploy it in shadow.

A recipe is a plain callable, named per model in ``STREAMSCORE_RETRAIN__RECIPES`` (``module:callable``)::

    def train(inputs: np.ndarray, labels: np.ndarray, base: Manifest, artifact: Path) -> dict[str, Any]

(``inputs`` float32 rows x the base version's columns, ``labels`` 0/1; it writes the model to ``artifact`` in the
format of the base version's runtime and returns its training parameters, JSON values). The original training
data comes from a second callable, ``STREAMSCORE_RETRAIN__TRAINING_DATA``: ``(base: Manifest) -> (inputs,
labels)``. The demo's are in ``streamscore_examples.fraud.retrain``.

``retrain`` blocks (Kafka, Cassandra, training); from an event loop run it in a thread.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamscore.featurestore.cassandra import connect
from streamscore.settings import Settings
from streamscore.streams import topics

from .library import Manifest, ModelError, newest_primary, read_manifest, register, version_dir, versions
from .predlog import column_names, table_of

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
READ_CHUNK = 100
"""Ids per prediction-log query (``WHERE id IN ? AND model = ?``)."""


class RetrainError(RuntimeError):
    """Retraining that cannot go on; the message says why and what to do."""


@dataclass
class Labels:
    by_id: dict[str, int] = field(default_factory=dict)
    read: int = 0
    unreadable: int = 0
    """Records that were not a label map with a str id and a 0/1 label (the monitor dead-letters them)."""


@dataclass
class TrainingSet:
    inputs: np.ndarray
    labels: np.ndarray
    from_log: int
    original: int
    defaulted: np.ndarray | None = None
    """bool (rows x columns): the values that were a view's default, where known."""


def _log(progress: Progress | None, message: str) -> None:
    log.info("%s", message)
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------------------------- labels


def _label_of(value: bytes | None) -> tuple[str, int] | None:
    import msgpack

    try:
        record = msgpack.unpackb(value, raw=False, strict_map_key=False) if value else None
    except Exception:
        return None
    if not isinstance(record, dict):
        return None
    request_id, label = record.get("id"), record.get("label")
    if not isinstance(request_id, str) or not request_id or isinstance(label, float) or label not in (0, 1):
        return None
    return request_id, int(label)


async def read_labels(settings: Settings, model: str) -> Labels:
    """Every label of ``<prefix>.<model>.labels``, from the beginning of each partition to its end offset taken at
    the start. A missing topic is no label."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streamscore.streams.kafka import client_kwargs

    topic = topics.labels(settings.topic_prefix, model)
    labels = Labels()
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        numbers = consumer.partitions_for_topic(topic)
        if numbers is None:
            await consumer._client.force_metadata_update()  # the topic's metadata, once, before saying it is absent
            numbers = consumer.partitions_for_topic(topic)
        if not numbers:
            return labels
        partitions = [TopicPartition(topic, number) for number in sorted(numbers)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, starts[tp])
        pending = {tp for tp in partitions if ends[tp] > starts[tp]}
        loop = asyncio.get_running_loop()
        progress = loop.time()
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500)
            if batch:
                progress = loop.time()
            elif loop.time() - progress > settings.retrain.label_wait_s:
                raise RetrainError(f"{topic}: no record for {settings.retrain.label_wait_s:g} s short of its end "
                                   "offsets (STREAMSCORE_RETRAIN__LABEL_WAIT_S); is Kafka up?")
            for tp, messages in batch.items():
                for message in messages:
                    if message.offset >= ends[tp]:
                        break
                    labels.read += 1
                    parsed = _label_of(message.value)
                    if parsed is None:
                        labels.unreadable += 1
                    else:
                        labels.by_id[parsed[0]] = parsed[1]
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return labels


# ------------------------------------------------------------------------------------ the log, joined


def logged_inputs(settings: Settings, model: str, ids: list[str],
                  names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The logged input vectors of those ids (model ``model``) whose columns are ``names``: (ids found, float32
    matrix, bool matrix of the values that were a view's default)."""
    from cassandra import InvalidRequest
    from cassandra.concurrent import execute_concurrent_with_args

    if not ids:
        return [], np.zeros((0, len(names)), dtype=np.float32), np.zeros((0, len(names)), dtype=bool)
    cluster, session = connect(settings.cassandra)
    try:
        try:
            select = session.prepare(f"SELECT id, input_names, input_values, input_sources FROM {table_of(settings)} "
                                     "WHERE id IN ? AND model = ?")
        except InvalidRequest as exc:
            raise RetrainError(f"no prediction log to train on ({table_of(settings)}: {exc}); workers write it "
                               "(STREAMSCORE_PREDICTION_LOG__ENABLED)") from exc
        chunks = [(ids[start:start + READ_CHUNK], model) for start in range(0, len(ids), READ_CHUNK)]
        results = execute_concurrent_with_args(session, select, chunks, concurrency=16, raise_on_first_error=True)
    finally:
        cluster.shutdown()
    found, rows, defaulted = [], [], []
    for _, result in results:
        for request_id, row_names, values, sources in result:
            if list(row_names or []) == names and len(values or []) == len(names):
                found.append(request_id)
                rows.append(values)
                defaulted.append([str(source).startswith("default:") for source in sources or [""] * len(names)])
    shape = (len(rows), len(names))
    return (found, np.asarray(rows, dtype=np.float32).reshape(shape),
            np.asarray(defaulted, dtype=bool).reshape(shape))


# --------------------------------------------------------------------------------------------- recipes


def _named(settings_map: dict[str, str], model: str, setting: str) -> Callable[..., Any]:
    spec = settings_map.get(model)
    if spec is None:
        raise RetrainError(f"no training recipe for model {model!r}: name one in {setting} (JSON map model -> "
                           f"'module:callable'); known: {sorted(settings_map)}")
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RetrainError(f"{setting} names {spec!r} for {model!r}, which cannot be imported: {exc}") from exc
    if not callable(function):
        raise RetrainError(f"{setting} names {spec!r} for {model!r}, which is not callable")
    return function


def base_version(settings: Settings, model: str) -> str:
    """What is retrained: the deployment's production version, else the library's newest primary version."""
    from .deployments import read_deployment

    state = asyncio.run(read_deployment(settings, model))
    version = state.production if state is not None and state.production else newest_primary(settings.models_dir,
                                                                                             model)
    if version is None:
        raise RetrainError(f"no version of {model!r} in {settings.models_dir} to retrain: register one first")
    return version


def next_version(models_dir: Path, model: str) -> str:
    """One more than the highest leading number of the library's versions ("3" after "2" and "2-int8")."""
    numbers = [int(match.group()) for version in versions(models_dir, model)
               if (match := re.match(r"\d+", version)) is not None]
    return str(max(numbers, default=0) + 1)


# --------------------------------------------------------------------------------------------- retrain


def training_set(settings: Settings, model: str, base: Manifest, with_training_data: bool,
                 progress: Progress | None = None) -> TrainingSet:
    """The prediction log joined with the labels (plus the original training data when asked)."""
    labels = asyncio.run(read_labels(settings, model))
    _log(progress, f"read {labels.read} label record(s) from {topics.labels(settings.topic_prefix, model)}: "
                   f"{len(labels.by_id)} request id(s) labelled, {labels.unreadable} unreadable")
    names = column_names(base)
    ids, inputs, defaulted = logged_inputs(settings, model, list(labels.by_id), names)
    targets = np.asarray([labels.by_id[request_id] for request_id in ids], dtype=np.int64)
    _log(progress, f"{len(ids)} of them in the prediction log {table_of(settings)} with v{base.version}'s "
                   f"{len(names)} input columns")
    needed = settings.retrain.min_rows
    if len(ids) < needed:
        raise RetrainError(
            f"too few labelled rows to retrain {model}: {len(ids)} in the prediction log (of {len(labels.by_id)} "
            f"labelled ids), {needed} needed (STREAMSCORE_RETRAIN__MIN_ROWS); log more of the traffic "
            "(STREAMSCORE_PREDICTION_LOG__SHARE, or requests sent with \"debug\": true) or wait for more labels")
    original = 0
    if with_training_data:
        maker = _named(settings.retrain.training_data, model, "STREAMSCORE_RETRAIN__TRAINING_DATA")
        try:
            extra_inputs, extra_labels = maker(base)
        except (ValueError, OSError) as exc:
            raise RetrainError(f"--with-training-data: {exc}") from exc
        extra_inputs = np.asarray(extra_inputs, dtype=np.float32)
        if extra_inputs.ndim != 2 or extra_inputs.shape[1] != len(names):
            raise RetrainError(f"the original training data of {model} has shape {extra_inputs.shape}, not "
                               f"(rows, {len(names)})")
        original = len(extra_inputs)
        inputs = np.vstack([extra_inputs, inputs])
        targets = np.concatenate([np.asarray(extra_labels, dtype=np.int64), targets])
        _log(progress, f"plus {original} row(s) of v{base.version}'s original training data")
    if len(np.unique(targets)) < 2:
        raise RetrainError(f"every labelled row of {model} has label {int(targets[0])}: training needs both 0 and 1")
    # which values were defaults is known for the logged rows only: with the original data, it is not profiled
    return TrainingSet(inputs, targets, len(ids), original, None if original else defaulted)


def retrain(settings: Settings, model: str, *, with_training_data: bool = False, deploy: str | None = "shadow",
            progress: Progress | None = None) -> str:
    """Train a new version of ``model`` on the prediction log joined with its labels, register it (with its
    profile and training data sha256) and put it in shadow; returns the new version."""
    started = time.monotonic()
    base_name = base_version(settings, model)
    try:
        base = read_manifest(version_dir(settings.models_dir, model, base_name))
    except ModelError as exc:
        raise RetrainError(str(exc)) from exc
    recipe = _named(settings.retrain.recipes, model, "STREAMSCORE_RETRAIN__RECIPES")
    data = training_set(settings, model, base, with_training_data, progress)
    version = next_version(settings.models_dir, model)
    _log(progress, f"training v{version} from v{base.version} on {len(data.inputs)} row(s) "
                   f"({int(data.labels.sum())} positive)")
    with tempfile.TemporaryDirectory() as scratch:
        artifact = Path(scratch) / base.artifact
        params = dict(recipe(data.inputs, data.labels, base, artifact) or {})
        manifest = _new_manifest(settings, base, version, params, data, artifact)
        folder = register(settings.models_dir, artifact, manifest)
    _log(progress, f"registered {model} v{version} (parent v{base.version}) in {folder}")
    if deploy == "shadow":
        from .deployments import change_deployment, describe_change, shadow

        old, new = asyncio.run(change_deployment(settings, model,
                                                 lambda state, library: shadow(state, version, library),
                                                 by="streamscore retrain"))
        _log(progress, f"{describe_change(old, new)} (deployment seq {new.seq})")
    _log(progress, f"retrained {model} v{version} in {time.monotonic() - started:.1f} s")
    return version


def _new_manifest(settings: Settings, base: Manifest, version: str, params: dict[str, Any], data: TrainingSet,
                  artifact: Path) -> dict[str, Any]:
    digest, profile = _profile(settings, base, data, artifact, params)
    made = {"method": "retrain", "created_at_ms": int(time.time() * 1000),
            "params": {**params, "rows_from_log": data.from_log, "rows_original": data.original,
                       "training_data_sha256": digest}}
    manifest = {**base.model_dump(), "version": version, "parent": base.version, "made_by": made}
    manifest.pop("sha256", None)
    summary = (f"retrained from v{base.version} on {data.from_log} labelled row(s) of the prediction log"
               + (f" and {data.original} of v{base.version}'s training data" if data.original else "")
               + f"; training data sha256 {digest[:12]}…")
    manifest["description"] = {**manifest["description"], "summary": summary}
    manifest["profile"] = profile
    return manifest


def _profile(settings: Settings, base: Manifest, data: TrainingSet, artifact: Path,
             params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The training data's sha256 and the new version's training profile (its inputs, and its outputs on them)."""
    from .profile import build_profile, data_sha256
    from .runtime import runtime_for

    digest = data_sha256(data.inputs, data.labels)
    unchecked = base.model_copy(update={"sha256": "0" * 64})
    views = _views_of(settings, base)
    runtime = runtime_for(unchecked, artifact.parent).load(unchecked, artifact, views, settings.worker)
    outputs = runtime.run(data.inputs)
    names = column_names(base)
    profile = build_profile({name: data.inputs[:, i] for i, name in enumerate(names)},
                            {name: values for name, values in outputs.items() if values.ndim == 1},
                            data_sha256=digest, params={**params, "rows_from_log": data.from_log,
                                                        "rows_original": data.original},
                            defaulted=None if data.defaulted is None else {
                                name: data.defaulted[:, i] for i, name in enumerate(names)})
    return digest, profile.model_dump()


def _views_of(settings: Settings, base: Manifest) -> dict[str, Any]:
    from streamscore.featurestore.views import ViewsError, load_views

    try:
        return load_views(settings.views_file)
    except ViewsError as exc:
        raise RetrainError(f"cannot load v{base.version}'s feature views to score the new version: {exc}") from exc


# -------------------------------------------------------------------------------------------- schedule


def parse_every(text: str) -> float:
    """``90s``, ``15m``, ``6h``, ``1d`` (or plain seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--every {text!r}: give a positive duration such as 90s, 15m, 6h or 1d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
