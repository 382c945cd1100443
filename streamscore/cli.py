"""The ``streamscore`` command line: the local stack, the worker, producing, subscribing, features, the demo.

The worker, produce, subscribe and features commands are the core. ``stack``, ``demo`` and ``bench`` run parts
that live outside the root package, imported only when the command runs: the local-stack tooling of a checkout
(``deploy/local/streamscore_stack``), the fraud example (``examples/``, extra ``[demo]``) and the benchmarks
(``bench/``, extra ``[bench]``). Where one is missing, the command says in one line what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click
from pydantic import ValidationError

from streamscore.settings import Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:  # one line, and never the input values: they may hold a secret
        problems = "; ".join(_settings_problem(error) for error in exc.errors())
        raise click.ClickException(f"invalid STREAMSCORE_* settings: {problems}") from None


def _settings_problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith("STREAMSCORE_"):  # the message names its variable already
        return message
    variable = "STREAMSCORE_" + "__".join(str(part).upper() for part in error["loc"])
    return f"{variable}: {message}"


def _setup_logging(level: str, log_format: str = "text") -> None:
    from streamscore.workers.logs import setup_logging

    setup_logging(level, log_format)


@contextlib.contextmanager
def _kafka_errors(settings: Settings) -> Iterator[None]:
    """A Kafka that cannot be reached, refuses the credentials or closes the connection ends the command with one
    line. The client's own error lines say why (the exception only says it could not bootstrap): they are held
    back while the command runs and their last one goes into that line."""
    from aiokafka.errors import KafkaConnectionError

    from streamscore.streams.kafka import connection_problem

    said: list[str] = []
    recorder = logging.Handler(logging.ERROR)
    recorder.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    client_log = logging.getLogger("aiokafka")
    client_log.addHandler(recorder)
    propagate, client_log.propagate = client_log.propagate, False
    level = client_log.level
    if client_log.getEffectiveLevel() > logging.ERROR:  # its error lines are what the one line quotes
        client_log.setLevel(logging.ERROR)
    try:
        yield
    except KafkaConnectionError as exc:
        # the telling line (credentials refused, a certificate not trusted) may be followed by plain timeouts of
        # the retries on a slow machine: it wins over the last one
        telling = [line for line in said if "SaslAuthenticationFailed" in line or "CERTIFICATE_VERIFY_FAILED" in line
                   or "SSL:" in line]
        detail = telling[-1] if telling else said[-1] if said else None
        raise click.ClickException(connection_problem(settings.kafka, exc, detail)) from None
    finally:
        client_log.removeHandler(recorder)
        client_log.propagate = propagate
        client_log.setLevel(level)


# --- the parts outside the core -------------------------------------------------------------------------------

DEMO_NEEDS = ("sklearn", "skl2onnx", "onnx", "hdrh")
"""Modules of the ``[demo]`` extra: the model is trained with scikit-learn and exported with skl2onnx."""
BENCH_NEEDS = (*DEMO_NEEDS, "matplotlib")
"""Modules of the ``[bench]`` extra (which includes ``[demo]``: the bench scores the demo's model)."""


def _optional(module: str, command: str, extra: str | None, needs: tuple[str, ...] = ()) -> Any:
    """``module``, imported; or, where it or one of ``needs`` is not installed, a one-line error naming what to
    install (``extra``) or, for the stack tooling (``extra`` None), where to run the command instead."""
    missing = [name for name in (module.split(".")[0], *needs) if importlib.util.find_spec(name) is None]
    if not missing:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = [exc.name or str(exc)]
    what = ", ".join(missing)
    if extra is None:
        raise click.ClickException(
            f"`streamscore {command}` is the local-stack tooling of a streamscore checkout (deploy/local/), which "
            f"this installation does not have (no module {what}): run it in a clone of the repository, after "
            "`scripts/bootstrap` (or `pip install -e '.[dev]'`)")
    raise click.ClickException(
        f"`streamscore {command}` needs the [{extra}] extra (not installed: {what}): pip install "
        f"'streamscore[{extra}]' (in a checkout: .venv/bin/pip install -e '.[{extra}]')")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """streamscore: Kafka in, features from Cassandra through Redis, ONNX Runtime, predictions out."""


# --- settings -------------------------------------------------------------------------------------------------

@main.command("settings")
@click.option("--markdown", is_flag=True, default=True, help="As a markdown table (the only format).")
@click.option("--write", "target", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Replace the table in this file (between its markers) instead of printing it, e.g. README.md.")
def settings_command(markdown: bool, target: Path | None) -> None:
    """Every setting: its variable, its default and what it does (from the settings model)."""
    from streamscore.settings import TABLE_BEGIN, TABLE_END, settings_table

    table = settings_table()
    if target is None:
        click.echo(table, nl=False)
        return
    text = target.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise click.ClickException(f"{target} has no settings table markers ({TABLE_BEGIN} ... {TABLE_END})")
    before, rest = text.split(TABLE_BEGIN, 1)
    after = rest.split(TABLE_END, 1)[1]
    target.write_text(f"{before}{TABLE_BEGIN}\n{table}{TABLE_END}{after}")
    click.echo(f"wrote the settings table ({table.count(chr(10)) - 2} settings) into {target}", err=True)


# --- stack ----------------------------------------------------------------------------------------------------

@main.group()
def stack() -> None:
    """The local stack of a checkout (deploy/local/): real Kafka, Cassandra and Redis on 127.0.0.1."""


def _print_status(statuses: list[Any]) -> None:
    for server in statuses:
        state = click.style("up", fg="green") if server.up else click.style("down", fg="red")
        click.echo(f"{server.name:<10} {state:<4}  pid {server.pid or '-':<8} {server.address:<22} "
                   f"version {server.version or '-':<10} log {server.log_file}"
                   + (f"  ({server.detail})" if server.detail else ""))


def _stack_call(action: str, *args: Any, cluster: bool = False) -> Any:
    stack_module = _optional("streamscore_stack", f"stack {action}", None)
    kind = stack_module.ClusterStack if cluster else stack_module.Stack
    try:
        return getattr(kind(_settings().stack, echo=click.echo), action)(*args)
    except stack_module.StackError as exc:
        raise click.ClickException(str(exc)) from exc


_CLUSTER = click.option("--cluster", is_flag=True, help="The cluster profile: three Kafka and three Cassandra "
                        "nodes and a Redis (STREAMSCORE_STACK__CLUSTER__*, in .stack-cluster/).")


@stack.command("up")
@_CLUSTER
def stack_up(cluster: bool) -> None:
    """Fetch (first time), start and wait for Kafka, Cassandra and Redis."""
    _print_status(_stack_call("up", cluster=cluster))


@stack.command("down")
@_CLUSTER
def stack_down(cluster: bool) -> None:
    """Stop the servers this stack started and wait until they are gone."""
    _stack_call("down", cluster=cluster)


@stack.command("status")
@_CLUSTER
def stack_status(cluster: bool) -> None:
    """Each server: up or down, pid, port, version."""
    statuses = _stack_call("status", cluster=cluster)
    _print_status(statuses)
    if not all(server.up for server in statuses):
        sys.exit(1)


@stack.command("logs")
@click.option("--lines", "-n", default=40, show_default=True, help="Lines of each log.")
@_CLUSTER
def stack_logs(lines: int, cluster: bool) -> None:
    """The tail of each server's log."""
    for name, text in _stack_call("logs", lines, cluster=cluster).items():
        click.echo(click.style(f"==> {name} <==", bold=True))
        click.echo(text)


# --- worker ---------------------------------------------------------------------------------------------------

@main.command()
@click.option("--model", "models", multiple=True, required=True, help="Model to serve (repeat for several).")
def worker(models: tuple[str, ...]) -> None:
    """Run an inference worker (a Faust app, one agent per model) until stopped."""
    from streamscore.featurestore.online import FeatureStoreUnavailable
    from streamscore.featurestore.views import ViewsError
    from streamscore.workers.app import run_worker
    from streamscore.workers.http import HttpBindError
    from streamscore.workers.library import ModelError

    settings = _settings()
    _setup_logging(settings.log_level, settings.log_format)
    try:
        with _kafka_errors(settings):
            run_worker(settings, models, loglevel=settings.log_level.lower())
    except (ModelError, ViewsError, HttpBindError, FeatureStoreUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc


# --- produce / subscribe --------------------------------------------------------------------------------------

def _json_lines(stream: TextIO) -> Iterator[Any]:
    for number, line in enumerate(stream, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise click.ClickException(f"line {number} is not JSON: {exc}") from exc


@main.command()
@click.option("--model", required=True, help="Model whose request topic to produce to.")
@click.option("--file", "source", type=click.File("r"), default="-", show_default=True,
              help="JSON lines, one request (or a list of requests: one batch message) per line.")
@click.option("--generate", type=int, default=None, help="Instead of --file: generate this many demo requests.")
@click.option("--rate", type=float, default=None, help="Target requests per second (default: as fast as possible).")
@click.option("--seed", type=int, default=11, show_default=True, help="Seed of the demo request generator.")
def produce(model: str, source: TextIO, generate: int | None, rate: float | None, seed: int) -> None:
    """Produce requests: JSON lines in, or a generator at a target rate, with a progress bar."""
    settings = _settings()
    if generate is not None:
        demo = _optional("streamscore_examples.fraud.requests", "produce --generate", "demo")
        requests: Any = demo.demo_requests(generate, seed)
        total: int | None = generate
    else:
        requests, total = _json_lines(source), None
    with _kafka_errors(settings):
        sent = asyncio.run(_produce(settings, model, requests, total, rate))
    click.echo(f"produced {sent} messages to {settings.topic_prefix}.{model}.requests", err=True)


async def _produce(settings: Settings, model: str, requests: Any, total: int | None, rate: float | None) -> int:
    from tqdm import tqdm

    from streamscore.streams.client import Client

    async with Client(settings) as client:
        with tqdm(total=total, unit="req", desc="produce", file=sys.stderr) as progress:
            return await client.produce_many(model, requests, rate, progress.update)


@main.command()
@click.option("--model", default=None, help="Model whose predictions to read.")
@click.option("--topic", default=None, help="Any topic instead (e.g. a dead-letter topic).")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest message instead of new ones.")
@click.option("--count", type=int, default=None, help="Stop after this many messages.")
def subscribe(model: str | None, topic: str | None, from_beginning: bool, count: int | None) -> None:
    """Print predictions as JSON lines."""
    if not model and not topic:
        raise click.UsageError("give --model or --topic")
    settings = _settings()
    with _kafka_errors(settings):
        asyncio.run(_subscribe(settings, model, topic, from_beginning, count))


async def _subscribe(settings: Settings, model: str | None, topic: str | None, from_beginning: bool,
                     count: int | None) -> None:
    from streamscore.streams.client import Client

    async with Client(settings) as client:
        seen = 0
        async for prediction in client.subscribe(model, topic, from_beginning):
            click.echo(json.dumps(prediction, default=repr))
            seen += 1
            if count is not None and seen >= count:
                return


# --- monitor / labels -----------------------------------------------------------------------------------------

MONITOR_NEEDS = ("sklearn",)
"""Modules of the ``[monitor]`` extra: the accuracy statistics are scikit-learn's."""


@main.command()
@click.option("--model", required=True, help="Model whose predictions and labels to join.")
@click.option("--retrain-on", "retrain_on", multiple=True, metavar="RULE",
              help="Retrain the model (streamscore.workers.retrain) when this alert rule is raised (repeatable).")
def monitor(model: str, retrain_on: tuple[str, ...]) -> None:
    """Join labels with predictions; publish live accuracy per version and window, and alerts, until stopped."""
    monitor_module = _optional("streamscore.workers.monitor", "monitor", "monitor", MONITOR_NEEDS)
    settings = _settings()
    _setup_logging(settings.log_level)
    hooks = [_retrain_hook(settings, model, retrain_on, monitor_module)] if retrain_on else []
    try:
        monitor_module.run_monitor(settings, model, hooks, loglevel=settings.log_level.lower())
    except ValueError as exc:  # a bad alert rule, named
        raise click.ClickException(f"{exc} (STREAMSCORE_MONITORING__ALERT_RULES)") from exc


def _retrain_hook(settings: Settings, model: str, rules: tuple[str, ...], monitor_module: Any) -> Any:
    """An on_alert hook that runs ``streamscore.workers.retrain.retrain(settings, model)`` in a thread when one of
    ``rules`` is raised (one retraining at a time); refused in one line where that module is missing or a rule is
    not configured."""
    import threading

    try:
        retrain = getattr(importlib.import_module("streamscore.workers.retrain"), "retrain", None)
    except ModuleNotFoundError as exc:
        raise click.ClickException("--retrain-on needs streamscore.workers.retrain (`streamscore retrain`), which "
                                   f"this installation does not have ({exc}): run the monitor without "
                                   "--retrain-on") from exc
    if not callable(retrain):
        raise click.ClickException("--retrain-on: streamscore.workers.retrain has no retrain(settings, model)")
    from streamscore.workers.alerts import parse_rules

    try:
        known = {rule.title for rule in parse_rules(settings.monitoring.alert_rules)}
    except ValueError as exc:
        raise click.ClickException(f"{exc} (STREAMSCORE_MONITORING__ALERT_RULES)") from exc
    unknown = [rule for rule in rules if rule not in known]
    if unknown:
        raise click.ClickException(f"--retrain-on {unknown[0]!r} is not an alert rule of the settings; rules: "
                                   f"{sorted(known) or 'none (STREAMSCORE_MONITORING__ALERT_RULES)'}")
    running = threading.Lock()
    log = logging.getLogger("streamscore.monitor.retrain")

    def run(event: dict[str, Any]) -> None:
        try:
            log.warning("alert %s on v%s: retraining %s", event["rule"], event["version"], model)
            retrain(settings, model)
        except Exception:
            log.exception("retraining %s after alert %s failed", model, event["rule"])
        finally:
            running.release()

    def on_alert(event: dict[str, Any]) -> None:
        if event["state"] != "raised" or event["rule"] not in rules:
            return
        if not running.acquire(blocking=False):
            log.warning("alert %s: a retraining of %s is already running; not starting another", event["rule"], model)
            return
        threading.Thread(target=run, args=(event,), name=f"retrain-{model}", daemon=True).start()

    return on_alert


@main.command()
@click.option("--model", required=True, help="Model whose labels topic to produce to.")
@click.option("--file", "source", type=click.File("r"), default="-", show_default=True,
              help='JSON lines: {"id": "t-1", "label": 1, "event_ms": 1767225600000} (event_ms: default now).')
def labels(model: str, source: TextIO) -> None:
    """Send ground truth: one label per request id, to <prefix>.<model>.labels."""
    rows = [_label_row(number, row) for number, row in enumerate(_json_lines(source), 1)]
    sent = _run_deployment(lambda settings: _send_labels(settings, model, rows))
    click.echo(f"sent {sent} labels to {_settings().topic_prefix}.{model}.labels", err=True)


def _label_row(number: int, row: Any) -> dict[str, Any]:
    """One label line, checked as the monitor checks it (a bad one is refused here, before anything is sent)."""
    import time

    if not isinstance(row, dict):
        raise click.ClickException(f'label {number}: need {{"id": ..., "label": 0 or 1}}, got {row!r:.80}')
    request_id, label, event_ms = row.get("id"), row.get("label"), row.get("event_ms", int(time.time() * 1000))
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
        raise click.ClickException(f"label {number}: 'id' must be a string of 1..256 characters, "
                                   f"got {request_id!r:.80}")
    if isinstance(label, bool):
        label = int(label)
    if label not in (0, 1) or not isinstance(label, int):
        raise click.ClickException(f"label {number}: 'label' must be 0 or 1, got {label!r:.80}")
    if not isinstance(event_ms, int) or isinstance(event_ms, bool):
        raise click.ClickException(f"label {number}: 'event_ms' must be an integer (epoch ms), got {event_ms!r:.80}")
    return {"id": request_id, "label": label, "event_ms": event_ms}


async def _send_labels(settings: Settings, model: str, rows: list[dict[str, Any]]) -> int:
    import msgpack
    from aiokafka import AIOKafkaProducer

    from streamscore.streams import topics
    from streamscore.streams.client import ensure_topics, partition_count
    from streamscore.streams.kafka import client_kwargs

    topic = topics.labels(settings.topic_prefix, model)
    predictions = await partition_count(settings, topics.predictions(settings.topic_prefix, model))
    await ensure_topics(settings, [topic], predictions or settings.worker.partitions)
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), linger_ms=5)
    await producer.start()
    try:
        sends = [await producer.send(topic, msgpack.packb(row, use_bin_type=True), key=row["id"].encode())
                 for row in rows]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    return len(rows)


# --- models ---------------------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """The model library and its deployments: versions, production/canary/shadow, optimized variants."""


# (the deployment commands and `optimize` are added below this group)


@models.command("optimize")
@click.argument("model")
@click.argument("version")
@click.option("--int8", "method", flag_value="int8", help="Int8 weights (ONNX Runtime dynamic quantization).")
@click.option("--distill", "method", flag_value="distill",
              help="A smaller student (MLP (8,)) trained on the version's scores over --inputs.")
@click.option("--inputs", "inputs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Model-input matrix (.npy, float, rows x columns): what --distill trains on, and what the "
                   "comparison scores. Default for the demo's 'fraud': its seeded training set and held-out set.")
@click.option("--seed", type=int, default=7, show_default=True, help="'fraud' without --inputs: the demo's seed.")
@click.option("--n-train", type=click.IntRange(min=100), default=60_000, show_default=True,
              help="'fraud' without --inputs: rows of the demo's training set (as the demo trains).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the comparison as <model>-<variant>.json and .md into this folder.")
def models_optimize(model: str, version: str, method: str | None, inputs_file: Path | None, seed: int,
                    n_train: int, report_dir: Path | None) -> None:
    """Register an optimized variant of MODEL VERSION (--int8 or --distill) and compare it with its parent."""
    if method is None:
        raise click.UsageError("give --int8 or --distill")
    needs = ("onnx", "sklearn", "skl2onnx") if method == "distill" else ("onnx",)
    variants = _optional("streamscore.workers.variants", "models optimize", "demo", needs)
    import numpy as np

    from streamscore.workers.library import ModelError, versions

    settings = _settings()
    try:
        variants.parent_of(settings.models_dir, model, version)  # unknown model/version, sha256: before any work
        train_inputs, holdout, labels = None, None, None
        if inputs_file is not None:
            try:
                train_inputs = holdout = np.load(inputs_file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise click.ClickException(f"{inputs_file}: not a .npy matrix ({exc})") from exc
        elif model == "fraud":
            demo = _optional("streamscore_examples.fraud.model", "models optimize fraud (without --inputs)", "demo",
                             DEMO_NEEDS)
            if method == "distill":
                train_inputs, _ = demo.training_set(seed, n_train)
            holdout, labels = demo.holdout_set(seed)
        elif method == "distill":
            raise click.ClickException(f"--distill of {model!r} needs --inputs FILE.npy: the model-input matrix to "
                                       "train the student on (the manifest does not record its training data)")
        made = (variants.quantize_int8(settings.models_dir, model, version) if method == "int8"
                else variants.distill(settings.models_dir, model, version, train_inputs))
        click.echo(f"registered {model} v{made.version}: {made.made_by.method} of v{made.parent} "
                   f"(sha256 {made.sha256[:12]}…) in {settings.models_dir / model / made.version}")
        if versions(settings.models_dir, model)[-1] == made.version:
            click.echo(f"note: v{made.version} is now the newest version of {model}; a worker serving {model} "
                       "without a pinned version loads the newest")
        if holdout is None:
            click.echo("no comparison: give --inputs FILE.npy to score both versions")
            return
        rows = variants.compare(settings.models_dir, model, [version, made.version], holdout, labels)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    what = "the demo's held-out set" if labels is not None else str(inputs_file)
    click.echo(f"\n{len(holdout)} rows of {what}; ONNX Runtime alone, CPU, 1 intra-op thread:\n")
    click.echo(variants.markdown_table(rows), nl=False)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        stem = report_dir / f"{model}-{made.version}"
        stem.with_suffix(".json").write_text(json.dumps(
            {"model": model, "parent": version, "variant": made.model_dump(), "compared_on": what,
             "rows": rows}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(f"# {model} v{made.version} against v{version}\n\n"
                                           f"{len(holdout)} rows of {what}.\n\n{variants.markdown_table(rows)}")
        click.echo(f"wrote {stem}.json and {stem}.md")


def _run_deployment(action: Any) -> Any:
    """Run ``action(settings)`` (a coroutine function); a refusal or an unreachable Kafka is one line."""
    from aiokafka.errors import KafkaError

    from streamscore.workers.deployments import DeploymentError
    from streamscore.workers.library import ModelError

    settings = _settings()
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)  # its connection warnings: the one line below says it
    try:
        return asyncio.run(action(settings))
    except (DeploymentError, ModelError) as exc:
        raise click.ClickException(str(exc)) from exc
    except (KafkaError, TimeoutError, OSError) as exc:
        raise click.ClickException(
            f"Kafka at {settings.kafka.bootstrap} did not answer ({type(exc).__name__}: {exc}): is it up "
            "(`streamscore stack status`)? check the STREAMSCORE_KAFKA__* settings") from exc
    finally:
        client_log.setLevel(level)  # for this command only (the CLI may run in a process that goes on)


def _when(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _change(model: str, change_fn: Any) -> None:
    """Apply one transition through the deployments topic and print one line: what changed, old -> new."""
    from streamscore.workers.deployments import change_deployment, describe_change

    old, new = _run_deployment(lambda settings: change_deployment(settings, model, change_fn))
    click.echo(f"{new.changed.what}: {describe_change(old, new)} (seq {new.seq})")


@models.command("list")
@click.argument("model")
def models_list(model: str) -> None:
    """Versions in the library: sha256, created, check, deployment stage, description."""
    from streamscore.workers.deployments import read_deployment, scan_library, topic_of
    from streamscore.workers.library import ModelError, read_manifest

    settings = _settings()
    library = scan_library(settings.models_dir, model)
    state = _run_deployment(lambda settings: read_deployment(settings, model))
    if not library.versions and state is None:
        raise click.ClickException(f"no model {model!r} in {settings.models_dir}: register it first")
    if state is None:
        click.echo(f"{model}: no deployment recorded in {topic_of(settings, model)}: the newest version serves")
    else:
        click.echo(f"{model}: deployment seq {state.seq}, changed {_when(state.changed.at_ms)} by "
                   f"{state.changed.by}")
    click.echo(f"{'version':<12} {'stage':<16} {'sha256':<12} {'created':<23} {'check':<6} description")
    for version in library.versions:
        folder = Path(settings.models_dir) / model / version
        if state is not None:
            stage = state.stage_of(version)
        else:
            stage = "production" if version == library.versions[-1] else "-"
        try:
            manifest = read_manifest(folder)
        except ModelError:
            click.echo(f"{version:<12} {stage:<16} {'-':<12} {'-':<23} {'BAD':<6} invalid manifest")
            continue
        made_by = getattr(manifest, "made_by", None)
        created = getattr(made_by, "created_at_ms", None) or int((folder / "manifest.json").stat().st_mtime * 1000)
        check = "BAD" if version in library.broken else "ok"
        text = manifest.description.summary or f"{manifest.description.domain}: {manifest.description.result_kind}"
        text = text if len(text) <= 60 else text[:57] + "..."
        click.echo(f"{version:<12} {stage:<16} {manifest.sha256[:12]:<12} {_when(created):<23} {check:<6} {text}")
    for version in state.serving if state is not None else ():
        if version not in library.versions:
            click.echo(f"{version:<12} {state.stage_of(version):<16} {'-':<12} {'-':<23} {'BAD':<6} "
                       "not in the library")


@models.command("show")
@click.argument("model")
@click.argument("version", required=False)
@click.option("--last", type=click.IntRange(min=1), default=10, show_default=True, help="Changes to list.")
def models_show(model: str, version: str | None, last: int) -> None:
    """The deployment state and its last changes (the records of the deployments topic); with VERSION, that
    version's manifest: artifact, inputs, outputs and its training profile."""
    from streamscore.workers.deployments import read_records, topic_of
    from streamscore.workers.library import versions

    settings = _settings()
    if version is not None:
        _show_version(settings, model, version)
        return
    records = _run_deployment(lambda settings: read_records(settings, model))
    topic = topic_of(settings, model)
    state = records[-1].state if records else None
    if state is None:
        present = versions(settings.models_dir, model)
        newest = f"v{present[-1]}" if present else f"nothing: no model {model!r} in {settings.models_dir}"
        click.echo(f"{model}: no deployment recorded in {topic}; workers serve the newest library version "
                   f"({newest})")
    else:
        click.echo(f"{model}: {state.summary()} (seq {state.seq}, topic {topic})")
    if records:
        click.echo(f"last changes, newest first ({len(records)} record(s) in the topic):")
    for record in reversed(records[-last:]):
        if record.state is None:
            click.echo(f"  offset {record.offset:<6} {_when(record.timestamp_ms)}  (tombstone: state deleted)")
            continue
        change = record.state.changed
        click.echo(f"  seq {record.state.seq:<4} {_when(change.at_ms)}  {change.by}  {change.what}")


def _show_version(settings: Settings, model: str, version: str) -> None:
    from streamscore.workers.library import ModelError, read_manifest, version_dir
    from streamscore.workers.profile import profile_table

    try:
        manifest = read_manifest(version_dir(settings.models_dir, model, version))
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{model} v{version}: sha256 {manifest.sha256}, runtime {manifest.runtime}, "
               f"{len(manifest.column_names)} input columns, outputs {[output.name for output in manifest.outputs]}"
               + (f", variant of v{manifest.parent}" if manifest.parent else ""))
    click.echo(manifest.description.summary or f"{manifest.description.domain}: {manifest.description.result_kind}")
    if manifest.profile is None:
        click.echo("no training profile in the manifest: the worker's drift stage stays off for this version "
                   "(register it with one: streamscore.workers.profile.build_profile)")
        return
    for line in profile_table(manifest.profile):
        click.echo(line)


@models.command("promote")
@click.argument("model")
@click.argument("version")
def models_promote(model: str, version: str) -> None:
    """Make VERSION production (the old production goes onto the history, for rollback)."""
    from streamscore.workers import deployments

    _change(model, lambda state, library: deployments.promote(state, version, library))


@models.command("canary")
@click.argument("model")
@click.argument("version")
@click.option("--weight", type=float, required=True, help="Share of the requests VERSION answers, 0..1.")
def models_canary(model: str, version: str, weight: float) -> None:
    """Let VERSION answer a share of the requests (replaces another canary)."""
    from streamscore.workers import deployments

    _change(model, lambda state, library: deployments.canary(state, version, weight, library))


@models.command("shadow")
@click.argument("model")
@click.argument("version")
def models_shadow(model: str, version: str) -> None:
    """Let VERSION score production's requests in shadow (its predictions are compared, not answered)."""
    from streamscore.workers import deployments

    _change(model, lambda state, library: deployments.shadow(state, version, library))


@models.command("rollback")
@click.argument("model")
def models_rollback(model: str) -> None:
    """Production goes back to the previous production version."""
    from streamscore.workers import deployments

    _change(model, deployments.rollback)


@models.command("retire")
@click.argument("model")
@click.argument("version")
def models_retire(model: str, version: str) -> None:
    """Take VERSION out of canary, shadow and the rollback history (not production: promote another first)."""
    from streamscore.workers import deployments

    _change(model, lambda state, library: deployments.retire(state, version, library))


@models.command("compare")
@click.argument("model")
@click.argument("v1")
@click.argument("v2")
@click.option("--max", "max_records", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Records of the pair to read at most (oldest first).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder for compare-<model>-<v1>-<v2>.png and .json.")
def models_compare(model: str, v1: str, v2: str, max_records: int, out_dir: Path) -> None:
    """Compare V1 and V2 on the requests both scored: the shadow records of <prefix>.<model>.shadow."""
    if v1 == v2:
        raise click.UsageError("give two different versions")
    _optional("matplotlib", "models compare", "bench")
    from streamscore.workers import compare
    from streamscore.workers.deployments import topic_of

    async def read_pair(settings: Settings) -> Any:
        topic_of(settings, model)  # refuses a name no model can have
        return await compare.read_shadow(settings, model, v1, v2, max_records)

    try:
        read = _run_deployment(read_pair)
    except compare.CompareError as exc:
        raise click.ClickException(str(exc)) from exc
    if not read.records:
        present = compare.describe_pairs(read.pairs) or "none readable"
        raise click.ClickException(f"no shadow records of {model} v{v1} against v{v2} in {read.topic} "
                                   f"({read.scanned} record(s) read); pairs present: {present}")
    summary = compare.summarize(read.records, v1, v2)
    limit = f", stopped at --max {max_records}" if read.truncated else ""
    click.echo(f"{model} v{v1} against v{v2}: {summary['records']} request(s) in {read.topic} "
               f"({', '.join(f'{k}: {n}' for k, n in summary['directions'].items())}; "
               f"{summary['duplicates']} duplicate(s) dropped{limit})")
    click.echo(compare.table(summary), nl=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"compare-{model}-{v1}-{v2}"
    drawn = compare.plot(read.records, summary, stem.with_suffix(".png"), model)
    stem.with_suffix(".json").write_text(json.dumps(
        {"model": model, "topic": read.topic, "scanned": read.scanned, "unreadable": read.unreadable,
         "truncated": read.truncated, "max": max_records, "plotted": drawn,
         "pairs": [{"answered_version": a, "version": b, "count": n} for (a, b), n in sorted(read.pairs.items())],
         **summary}, indent=2) + "\n")
    click.echo(f"wrote {stem}.png and {stem}.json")


# --- prediction log: explain, replay ---------------------------------------------------------------------------

def _logged(request_id: str, model: str | None) -> tuple[Settings, list[Any]]:
    """The logged predictions of an id, or a one-line error (not logged: the share and the debug flag)."""
    from streamscore.featurestore.online import FeatureStoreUnavailable
    from streamscore.workers import predlog

    settings = _settings()
    try:
        found = predlog.read_logged(settings, request_id, model)
    except (FeatureStoreUnavailable, predlog.LogError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not found:
        raise click.ClickException(predlog.not_logged_message(settings, request_id, model))
    return settings, found


@main.command()
@click.argument("request_id")
@click.option("--model", default=None, help="The model that scored it (default: every model that logged it).")
def explain(request_id: str, model: str | None) -> None:
    """Print a logged prediction: each input column's name, value and source, the outputs, version, lineage."""
    _, found = _logged(request_id, model)
    for logged in found:
        flag = ", sent with debug: true" if logged.debug else ""
        click.echo(f"{logged.model} v{logged.version}: request {logged.id}, received {_when(logged.received_ms)}, "
                   f"logged {_when(logged.logged_ms)}{flag}")
        click.echo("entities: " + (", ".join(f"{k}={v}" for k, v in logged.entities.items()) or "-"))
        click.echo(f"inputs ({len(logged.input_names)} columns, in the model's order):")
        width = max((len(name) for name in logged.input_names), default=4)
        for index, (name, value) in enumerate(zip(logged.input_names, logged.input_values, strict=True)):
            click.echo(f"  {name:<{width}}  {value:>14.7g}  {logged.source_of(index)}")
        click.echo("outputs: " + ", ".join(f"{name}={json.dumps(value)}" for name, value in logged.outputs.items()))
        click.echo("lineage: " + ", ".join(f"{key}={value}" for key, value in sorted(logged.lineage.items())))


@main.command()
@click.argument("request_id")
@click.option("--model", default=None, help="The model that scored it (needed when several logged the id).")
def replay(request_id: str, model: str | None) -> None:
    """Score a logged prediction's exact input again with the artifact its lineage names; exit 1 unless every
    output is the same (within 1e-6)."""
    from streamscore.featurestore.views import ViewsError, load_views
    from streamscore.workers import predlog

    settings, found = _logged(request_id, model)
    if len(found) > 1:
        raise click.ClickException(f"{request_id!r} was logged by {[logged.model for logged in found]}: "
                                   "give --model")
    logged = found[0]
    try:
        results = predlog.replay(settings, logged, load_views(settings.views_file))
    except (predlog.LogError, ViewsError) as exc:
        raise click.ClickException(str(exc)) from exc
    sha = logged.lineage.get("artifact_sha256", "")
    click.echo(f"{logged.model} v{logged.version} (sha256 {sha[:12]}…, verified) on the logged "
               f"{len(logged.input_values)}-column input of {logged.id}:")
    for result in results:
        diff = "" if result.difference is None else f"  |difference| {result.difference:.3g}"
        click.echo(f"  {result.output}: logged {json.dumps(result.logged)}, replayed {json.dumps(result.replayed)}"
                   f"{diff}  {'same' if result.same else 'DIFFERENT'}")
    if not all(result.same for result in results):
        raise click.ClickException(f"the replayed outputs differ from the logged ones (beyond "
                                   f"{predlog.REPLAY_TOLERANCE:g})")
    click.echo(f"same outputs (within {predlog.REPLAY_TOLERANCE:g})")


@main.command()
@click.option("--model", required=True, help="The model to retrain (its production version is the base).")
@click.option("--with-training-data", is_flag=True, help="Add the base version's original training data.")
@click.option("--every", default=None, metavar="DURATION",
              help="Retrain on a schedule (90s, 15m, 6h, 1d) until stopped; a round that fails says why and the "
                   "next one runs.")
@click.option("--deploy", type=click.Choice(["shadow", "none"]), default="shadow", show_default=True,
              help="Put the new version in shadow, or only register it.")
def retrain(model: str, with_training_data: bool, every: str | None, deploy: str) -> None:
    """Train a new version on the prediction log joined with the labels, register it with its profile and
    training data sha256, and put it in shadow."""
    import time

    from aiokafka.errors import KafkaError

    from streamscore.featurestore.online import FeatureStoreUnavailable
    from streamscore.workers import retrain as retraining
    from streamscore.workers.deployments import DeploymentError
    from streamscore.workers.library import ModelError

    settings = _settings()
    _setup_logging("WARNING")
    try:
        interval = retraining.parse_every(every) if every is not None else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc

    def one_round() -> None:
        try:
            version = retraining.retrain(settings, model, with_training_data=with_training_data,
                                         deploy=None if deploy == "none" else deploy, progress=click.echo)
        except (retraining.RetrainError, FeatureStoreUnavailable, DeploymentError, ModelError) as exc:
            raise click.ClickException(str(exc)) from exc
        except (KafkaError, OSError) as exc:
            raise click.ClickException(f"Kafka at {settings.kafka.bootstrap} did not answer ({exc!r})") from exc
        click.echo(f"{model} v{version} registered" + (" and in shadow" if deploy == "shadow" else ""))

    if interval is None:
        one_round()
        return
    while True:
        try:
            one_round()
        except click.ClickException as exc:
            click.echo(f"Error: {exc.message}", err=True)
        click.echo(f"next retraining in {every}", err=True)
        time.sleep(interval)


# --- features -------------------------------------------------------------------------------------------------

@main.group()
def features() -> None:
    """Write and read feature-view rows (JSON)."""


async def _with_store(settings: Settings, action: Any) -> Any:
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import load_views

    store = FeatureStore(settings, load_views(settings.views_file))
    store.connect()
    try:
        return await action(store)
    finally:
        await store.close()


def _run_store(action: Any) -> Any:
    from streamscore.featurestore.cache import CacheInvalidationFailed
    from streamscore.featurestore.cassandra import FeatureStoreUnavailable
    from streamscore.featurestore.views import ViewsError

    try:
        return asyncio.run(_with_store(_settings(), action))
    except (FeatureStoreUnavailable, CacheInvalidationFailed, ViewsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@features.command("init")
def features_init() -> None:
    """Create the keyspace and one table per view where missing (run once, as a role that may create them;
    workers and the other feature commands need only SELECT and MODIFY). Rows are kept; running it again
    changes nothing."""
    from streamscore.featurestore.cassandra import FeatureStoreUnavailable
    from streamscore.featurestore.store import FeatureStore
    from streamscore.featurestore.views import ViewsError, load_views

    settings = _settings()
    try:
        views = load_views(settings.views_file)
        store = FeatureStore(settings, views, use_cache=False)
        store.connect(create_schema=True)
        store.online.close()
        if settings.online_store == "cassandra" and settings.prediction_log.enabled:
            from streamscore.featurestore.cassandra import connect
            from streamscore.workers.predlog import ensure_table, table_of

            cluster, session = connect(settings.cassandra)
            try:
                ensure_table(session, settings)
            finally:
                cluster.shutdown()
            click.echo(f"prediction log table {table_of(settings)} in place", err=True)
    except (FeatureStoreUnavailable, ViewsError) as exc:
        raise click.ClickException(str(exc)) from exc
    where = f"keyspace {settings.cassandra.keyspace}" if settings.online_store == "cassandra" else settings.online_store
    click.echo(f"schema of {len(views)} view(s) in place ({where}): {', '.join(sorted(views))}", err=True)


@features.command("put")
@click.argument("view")
@click.option("--file", "source", type=click.File("r"), default="-", show_default=True,
              help='JSON lines: {"entity": "card-1", "features": {...}, "event_ts_ms": 1700000000000}')
def features_put(view: str, source: TextIO) -> None:
    """Write rows of a view (event_ts_ms defaults to now)."""
    rows = []
    for row in _json_lines(source):
        if not isinstance(row, dict) or "entity" not in row or not isinstance(row.get("features"), dict):
            raise click.ClickException(f'each line needs {{"entity": ..., "features": {{...}}}}, got {row!r}')
        rows.append((str(row["entity"]), row["features"], row.get("event_ts_ms")))
    written = _run_store(lambda store: store.put(view, rows))
    click.echo(f"wrote {written} rows to view {view}", err=True)


@features.command("get")
@click.argument("view")
@click.argument("entities", nargs=-1, required=True)
def features_get(view: str, entities: tuple[str, ...]) -> None:
    """Read rows of a view by entity id (through the cache); unknown entities print null."""
    rows = _run_store(lambda store: store.get(view, list(entities)))
    click.echo(json.dumps(rows, indent=2))


# --- score (batch) --------------------------------------------------------------------------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
EXIT_ROWS_LOST = 3
"""Exit code of a `score` run whose output has fewer rows than its input."""


def _duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``15m``, ``6h``, ``1d`` -> seconds."""
    if text is None:
        return None
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration such as 90s, 15m, 6h or 1d",
                                 param_hint="--every") from None
    if seconds <= 0:
        raise click.BadParameter(f"{text!r} must be longer than 0", param_hint="--every")
    return seconds


@main.command()
@click.option("--model", required=True, help="Model to score with.")
@click.option("--input", "input_path", required=True,
              help="Parquet requests: id, the model's entity keys and request features (README: Batch scoring).")
@click.option("--output", "output_path", required=True,
              help="Parquet predictions (spark: a folder of part files); '{run}' is replaced by the run's UTC time.")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True)
@click.option("--spark-master", default=None, help="Spark master URL (default: spark-submit's, else local[*]).")
@click.option("--version", default=None, help="Model version (default: the one workers serve).")
@click.option("--to-topic", is_flag=True, help="Also publish every prediction to the model's predictions topic.")
@click.option("--every", default=None, help="Run again every DURATION (90s, 15m, 6h, 1d) until stopped.")
def score(model: str, input_path: str, output_path: str, engine: str, spark_master: str | None,
          version: str | None, to_topic: bool, every: str | None) -> None:
    """Batch scoring: parquet requests through the worker's pipeline into parquet predictions, with a summary
    (rows, answered, degraded, duration, rows/s) printed and written beside the output; exit code 3 when
    rows were lost."""
    import time

    period = _duration(every)
    settings = _settings()
    _setup_logging("WARNING")
    while True:
        began = time.monotonic()
        summary = _score_once(settings, model, input_path, output_path.replace("{run}", _run_stamp()), engine,
                              spark_master, version, to_topic)
        summary.write()
        click.echo(summary.line())
        if summary.lost:
            click.echo(f"error: {summary.lost} of {summary.rows} rows have no output row", err=True)
            sys.exit(EXIT_ROWS_LOST)
        if period is None:
            return
        time.sleep(max(0.0, period - (time.monotonic() - began)))


def _run_stamp() -> str:
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _score_once(settings: Settings, model: str, input_path: str, output_path: str, engine: str,
                spark_master: str | None, version: str | None, to_topic: bool) -> Any:
    if importlib.util.find_spec("pyarrow") is None:
        raise click.ClickException("`streamscore score` needs the [batch] extra (not installed: pyarrow): pip "
                                   "install 'streamscore[batch]' (in a checkout: .venv/bin/pip install -e '.[batch]')")
    from streamscore.featurestore.cassandra import FeatureStoreUnavailable
    from streamscore.featurestore.views import ViewsError
    from streamscore.workers.batch import BatchInputError, BatchRunError, run_local
    from streamscore.workers.library import ModelError

    try:
        if engine == "spark":
            spark_job = _optional("streamscore.workers.spark_job", "score --engine spark", "spark",
                                  ("pyspark", "pandas"))
            return spark_job.run_spark(settings, model, input_path, output_path, version, spark_master, to_topic)
        return run_local(settings, model, Path(input_path), Path(output_path), version, to_topic)
    except (BatchInputError, BatchRunError, ModelError, ViewsError, FeatureStoreUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc


# --- demo -----------------------------------------------------------------------------------------------------

@main.command()
@click.option("--requests", "count", type=int, default=20_000, show_default=True, help="Requests to stream.")
@click.option("--rate", type=float, default=1500.0, show_default=True,
              help="Offered requests per second; 0 sends as fast as possible (latency then measures the backlog).")
@click.option("--lifecycle", is_flag=True,
              help="Instead: the model flow on live traffic through two workers: shadow of two cheaper variants "
                   "with their comparison, a canary, promote, rollback, throughput of each version "
                   "(--rate is the live rate; --requests is not used).")
@click.option("--drift", is_flag=True,
              help="Instead: a drift scenario: normal traffic, a population shift, the drift and accuracy alerts, "
                   "a retrained version in shadow, PSI and AUC over time (--rate is the live rate, default 100; "
                   "--requests is not used).")
def demo(count: int, rate: float, lifecycle: bool, drift: bool) -> None:
    """Card-fraud scoring end to end: stack, features, model, worker, 20k requests, checked offline."""
    example = _optional("streamscore_examples.fraud.run", "demo", "demo", DEMO_NEEDS)
    settings = _settings()
    _setup_logging("WARNING")
    try:
        if drift:
            _optional("matplotlib", "demo --drift", "bench")
            from streamscore_examples.fraud.drift import run_drift

            given = click.get_current_context().get_parameter_source("rate") != click.core.ParameterSource.DEFAULT
            run_drift(settings, rate if given and rate else 100.0, echo=click.echo)
            return
        if lifecycle:
            _optional("matplotlib", "demo --lifecycle", "bench")
            from streamscore_examples.fraud.lifecycle import run_lifecycle

            run_lifecycle(settings, rate or 1000.0, echo=click.echo)
            return
        example.run_demo(settings, count, rate or None, echo=click.echo)
    except example.DemoFailed as exc:
        raise click.ClickException(str(exc)) from exc


# --- bench ----------------------------------------------------------------------------------------------------

@main.command()
@click.option("--smoke", is_flag=True, help="A seconds-long run that only shows the benchmark works.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Folder for e2e.json, e2e.md and e2e.png.")
@click.option("--requests", "count", type=click.IntRange(min=32), default=None,
              help="Backlog of each max-throughput run (default 60000; smoke 1024); the per-event Faust "
                   "baseline gets a twelfth (smoke: a quarter).")
@click.option("--seconds", type=click.FloatRange(min=1.0), default=None,
              help="Length of each latency run (default 20; smoke 3).")
def bench(smoke: bool, out_dir: Path, count: int | None, seconds: float | None) -> None:
    """End-to-end benchmark on the local stack: raw aiokafka vs per-event Faust vs the streamscore worker."""
    harness = _optional("streamscore_bench.harness", "bench", "bench", BENCH_NEEDS)
    settings = _settings()
    _setup_logging("WARNING")
    try:
        results = harness.run_bench(settings, harness.make_plan(smoke, count, seconds), out_dir, echo=click.echo)
    except harness.BenchFailed as exc:
        raise click.ClickException(str(exc)) from exc
    for target in results["targets"].values():
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        click.echo(f"   {'met ' if target['met'] else 'MISS'}  {target['description']}: {value} "
                   f"({target['op']} {target['target']:g})")
    if not results["all_answered"]:
        raise click.ClickException(f"some requests were never answered (see 'answered' in {out_dir / 'e2e.json'}): "
                                   "the figures of those runs do not mean what they say")
