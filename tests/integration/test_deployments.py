"""The deployment state against the real Kafka: every transition round-trips through the compacted
``<prefix>.<model>.deployments`` topic, a refused change publishes nothing, a change prepared while the topic
moved is refused, and ``streamscore models`` prints one line per change and one line per refusal (exit 1).

Each test gets its own topic prefix; the library (a temp folder) holds the tiny model as v1, v2 and v3, plus a
v0 whose artifact no longer matches its sha256."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streamscore.settings import Settings
from streamscore.streams.client import partitions_of
from streamscore.streams.kafka import client_kwargs
from streamscore.workers import deployments as d
from streamscore.workers.library import MANIFEST
from tests.contract.artifacts import register_onnx

MODEL = "tiny"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deployments") / "models"
    first = register_onnx(root, "1")
    manifest = json.loads((first / MANIFEST).read_text())
    for version in ("2", "3", "0"):  # copies of v1's artifact: the sha256 still matches (v0's is then corrupted)
        folder = shutil.copytree(first, root / MODEL / version)
        (folder / MANIFEST).write_text(json.dumps({**manifest, "version": version}))
    (root / MODEL / "0" / "model.onnx").write_bytes(b"not the registered artifact")
    return root


@pytest.fixture
def settings(stack: Any, models_dir: Path) -> Iterator[Settings]:
    prefix = f"dep{uuid.uuid4().hex[:8]}"
    settings = Settings(topic_prefix=prefix, models_dir=models_dir)
    yield settings
    asyncio.run(_delete_topic(settings))


async def _delete_topic(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        topic = d.topic_of(settings, MODEL)
        if topic in await admin.list_topics():
            await admin.delete_topics([topic])
    finally:
        await admin.close()


def change(settings: Settings, fn: d.ChangeFn) -> tuple[d.Deployment, d.Deployment]:
    return asyncio.run(d.change_deployment(settings, MODEL, fn, by="tester@here"))


def records(settings: Settings) -> list[d.Record]:
    return asyncio.run(d.read_records(settings, MODEL))


def current(settings: Settings) -> d.Deployment | None:
    return asyncio.run(d.read_deployment(settings, MODEL))


async def _cleanup_policy(settings: Settings) -> str:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, d.topic_of(settings, MODEL), {"cleanup.policy": None})])
    finally:
        await admin.close()
    return described[0].to_object()["resources"][0]["config_entries"][0]["config_value"]


def test_no_topic_means_no_state(settings: Settings) -> None:
    assert current(settings) is None and records(settings) == []


def test_the_first_change_creates_a_compacted_topic_and_starts_from_the_newest_version(settings: Settings) -> None:
    old, new = change(settings, lambda state, library: d.canary(state, "2", 0.05, library))
    assert (old.production, old.seq) == ("3", 0)  # implicit: the newest version, as workers serve today
    assert (new.production, new.canary, new.seq) == ("3", d.Canary(version="2", weight=0.05), 1)
    assert new.changed.by == "tester@here" and new.changed.what == "canary tiny v2 at weight 0.05"
    assert new.changed.at_ms > 0
    assert current(settings) == new
    assert asyncio.run(_cleanup_policy(settings)) == "compact"
    assert asyncio.run(partitions_of(settings, d.topic_of(settings, MODEL))) == [0]


def test_every_transition_round_trips_and_the_records_are_the_audit_trail(settings: Settings) -> None:
    steps: list[d.ChangeFn] = [
        lambda s, lib: d.promote(s, "1", lib),
        lambda s, lib: d.canary(s, "2", 0.1, lib),
        lambda s, lib: d.shadow(s, "3", lib),
        lambda s, lib: d.promote(s, "2", lib),
        lambda s, lib: d.retire(s, "3", lib),
        lambda s, lib: d.rollback(s, lib),
    ]
    published = []
    for step in steps:
        old, new = change(settings, step)
        assert new.seq == old.seq + 1
        assert current(settings) == new
        published.append(new)
    final = published[-1]
    # 3 (implicit) -> 1 -> 2, and 3 retired from shadow and history: the rollback returns to 1, nothing before it
    assert (final.production, final.canary, final.shadow, final.history) == ("1", None, (), ())
    trail = records(settings)
    assert [record.state for record in trail] == published
    assert [record.state.seq for record in trail if record.state] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(("fn", "message"), [
    (lambda s, lib: d.promote(s, "9", lib), "has no version '9'"),
    (lambda s, lib: d.promote(s, "0", lib), "fails its check"),
    (lambda s, lib: d.canary(s, "2", 1.5, lib), "outside 0..1"),
    (lambda s, lib: d.canary(s, "3", 0.5, lib), "a canary must be another version"),
    (lambda s, lib: d.rollback(s, lib), "no previous production version"),
    (lambda s, lib: d.retire(s, "3", lib), "promote another version first"),
    (lambda s, lib: d.retire(s, "1", lib), "is not deployed"),
])
def test_a_refused_change_publishes_nothing(settings: Settings, fn: d.ChangeFn, message: str) -> None:
    change(settings, lambda s, lib: d.canary(s, "2", 0.05, lib))  # production 3 (implicit), canary 2
    before = records(settings)
    with pytest.raises(d.DeploymentError, match=message):
        change(settings, fn)
    assert records(settings) == before


def test_a_change_prepared_while_the_topic_moved_is_refused(settings: Settings) -> None:
    change(settings, lambda s, lib: d.promote(s, "1", lib))

    def racing(state: d.Deployment, library: d.Library) -> d.Deployment:
        other = threading.Thread(target=change, args=(settings, lambda s, lib: d.shadow(s, "3", lib)))
        other.start()
        other.join()
        return d.canary(state, "2", 0.2, library)

    with pytest.raises(d.DeploymentError, match="changed while this change was prepared"):
        change(settings, racing)
    latest = current(settings)
    assert latest is not None and (latest.seq, latest.shadow, latest.canary) == (2, ("3",), None)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
           "STREAMSCORE_MODELS_DIR": str(settings.models_dir)}
    return subprocess.run([sys.executable, "-m", "streamscore", "models", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_cli_changes_lists_shows_and_refuses_in_one_line(settings: Settings) -> None:
    done = cli(settings, "canary", MODEL, "2", "--weight", "0.05")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["canary tiny v2 at weight 0.05: canary - -> 2 (0.05) (seq 1)"]
    promoted = cli(settings, "promote", MODEL, "2")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip().endswith(
        "production 3 -> 2, canary 2 (0.05) -> -, history [] -> ['3'] (seq 2)")
    before = records(settings)
    for args, message in ((("canary", MODEL, "9", "--weight", "0.05"), "has no version '9'"),
                          (("canary", MODEL, "1", "--weight", "2"), "outside 0..1"),
                          (("retire", MODEL, "2"), "cannot be retired"),
                          (("promote", MODEL, "0"), "fails its check")):
        refused = cli(settings, *args)
        assert refused.returncode == 1, refused
        assert refused.stdout == ""
        assert len(refused.stderr.strip().splitlines()) == 1 and message in refused.stderr, refused.stderr
    assert records(settings) == before

    listed = cli(settings, "list", MODEL)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[2:]}
    assert {version: row[1] for version, row in rows.items()} == \
        {"0": "-", "1": "-", "2": "production", "3": "-"}
    assert rows["0"][6] == "BAD" and rows["2"][6] == "ok"  # the created column is 3 words

    shown = cli(settings, "show", MODEL)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("tiny: production 2, canary -, shadow -, history ['3'] (seq 2")
    assert "seq 2" in lines[2] and "promote tiny v2" in lines[2]
    assert "seq 1" in lines[3] and "canary tiny v2 at weight 0.05" in lines[3]


def test_the_cli_says_in_one_line_when_kafka_does_not_answer(settings: Settings) -> None:
    env = {**os.environ, "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
           "STREAMSCORE_MODELS_DIR": str(settings.models_dir), "STREAMSCORE_KAFKA__BOOTSTRAP": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "streamscore", "models", "show", MODEL], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "Kafka at 127.0.0.1:1 did not answer" in done.stderr


def test_a_workers_follower_reads_only_what_changed_and_skips_what_is_not_a_state(settings: Settings) -> None:
    from aiokafka import AIOKafkaProducer

    async def scenario() -> list[Any]:
        follower = d.Follower(settings, MODEL)
        seen: list[Any] = [await follower.read()]  # creates the (compacted) topic; no record yet
        try:
            await d.change_deployment(settings, MODEL, lambda state, library: d.promote(state, "2", library))
            seen.append(await follower.read())
            await d.change_deployment(settings, MODEL, lambda state, library: d.canary(state, "3", 0.1, library))
            seen.append(await follower.read())
            seen.append(await follower.read())  # nothing appended: the same state
            producer = AIOKafkaProducer(**client_kwargs(settings.kafka))
            await producer.start()
            try:
                topic = d.topic_of(settings, MODEL)
                await producer.send_and_wait(topic, b"{not a state", key=MODEL.encode())
                seen.append((await follower.read(), follower.invalid))
                await producer.send_and_wait(topic, None, key=MODEL.encode())  # a tombstone: no deployment
                seen.append(await follower.read())
            finally:
                await producer.stop()
        finally:
            await follower.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] is None
    assert seen[1].production == "2" and seen[1].canary is None
    assert seen[2].canary is not None and seen[2].canary.version == "3" and seen[3] == seen[2]
    state, invalid = seen[4]
    assert state == seen[2] and invalid is not None and "not a deployment state" in invalid
    assert seen[5] is None
    assert asyncio.run(_cleanup_policy(settings)) == "compact"
