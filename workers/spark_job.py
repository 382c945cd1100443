"""Batch scoring on Apache Spark: the same ``BatchScorer`` (workers/batch.py) in every partition, via
``mapInArrow``.

``mapInArrow`` rather than ``mapInPandas``: the partition's rows reach the scorer as the Arrow batches Spark
made, with no pandas frame in between. Through pandas a null double becomes NaN and stays NaN, so a missing
request feature (its default applies) and a NaN one (the request is rejected, as on Kafka) could no longer be
told apart, and nullable integer columns turn into floats; the two pandas conversions per batch cost time too.

The driver reads the requests (``spark.read.parquet``: a file or a folder, local or on any file system Spark
reads), checks their columns, learns the output schema from the pipeline itself (``BatchScorer.probe_schema``),
and ships the model version's folder to the executors as a zip with ``SparkContext.addArchive`` (each
executor checks the artifact's sha256 again when it loads it). Each Python worker of an executor then keeps one
``BatchScorer`` for the job: one feature-store connection (a Cassandra session and a Redis client), one event
loop, one loaded model, reused by every partition it runs. A partition's rows arrive as Arrow batches of
``spark.sql.execution.arrow.maxRecordsPerBatch`` rows; each is scored in pipeline batches of
``STREAMSCORE_BATCH__CHUNK_ROWS`` (one Redis MGET, one concurrent round of Cassandra reads for the misses, one
assembly, one ONNX Runtime call each).

Why the project's own batch read rather than the Spark Cassandra Connector: the connector reads Cassandra
alone, past the Redis cache, and hands back rows as Spark columns, so the join, the defaults of a missing
entity, the ``degraded`` marks and the lineage timestamps would have to be written again in Spark SQL: a second
copy of the feature logic that could drift from the worker's. Through ``FeatureStore.fetch`` a partition gets
exactly what a worker gets, from the same cache, and the reads are already batched (docs: README "Batch
scoring").

pyspark is imported only here (``--engine spark``); the driver and the executors need the package installed
(``pip install 'streamscore[spark]'``) and the settings travel with the task.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from streamscore.featurestore.views import FeatureView
from streamscore.settings import BatchSettings, Settings

from .batch import (
    BatchInputError,
    BatchRunError,
    BatchScorer,
    RequestColumns,
    Summary,
    check_schema,
    host_id,
    prepare,
    public,
    utc_now,
)
from .library import version_dir

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparkJob:
    """What every task needs, pickled into the closure of ``mapInArrow``."""

    job_id: str
    settings: Settings
    views: dict[str, FeatureView]
    model: str
    version: str
    staged: str
    """Name under SparkFiles of the unpacked archive holding ``<model>/<version>/``: a models_dir of one version."""
    schema: bytes
    """The scorer's output Arrow schema (serialized; ``public`` of it is the written one)."""
    to_topic: bool


class _ExecutorState:
    """The scorer of one Python worker for one job, kept across the partitions it runs."""

    job_id: str | None = None
    loop: asyncio.AbstractEventLoop | None = None
    scorer: BatchScorer | None = None

    @classmethod
    def scorer_for(cls, job: SparkJob) -> tuple[asyncio.AbstractEventLoop, BatchScorer]:
        if cls.job_id != job.job_id or cls.scorer is None or cls.loop is None:
            cls.close()
            from pyspark import SparkFiles

            from .runtime import load_model

            models_dir = Path(SparkFiles.get(job.staged))
            settings = job.settings.model_copy(update={"models_dir": models_dir})
            model = load_model(models_dir, job.model, job.views, settings.worker, job.version)
            loop = asyncio.new_event_loop()
            scorer = BatchScorer(settings, model, job.views, f"spark:{job.job_id}:{host_id()}", job.to_topic)
            loop.run_until_complete(scorer.start(pa.ipc.read_schema(pa.py_buffer(job.schema))))
            cls.job_id, cls.loop, cls.scorer = job.job_id, loop, scorer
        assert cls.loop is not None and cls.scorer is not None
        return cls.loop, cls.scorer

    @classmethod
    def close(cls) -> None:
        if cls.scorer is not None and cls.loop is not None:
            try:
                cls.loop.run_until_complete(cls.scorer.close())
            except Exception:  # a connection that will not close must not fail the next job
                log.exception("closing the feature store of job %s", cls.job_id)
            cls.loop.close()
        cls.job_id, cls.loop, cls.scorer = None, None, None


atexit.register(_ExecutorState.close)


def score_partition(job: SparkJob, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``mapInArrow``'s function: each Arrow batch of the partition through the batch pipeline."""
    from pyspark import TaskContext

    loop, scorer = _ExecutorState.scorer_for(job)
    context = TaskContext.get()
    source = f"partition-{context.partitionId() if context is not None else 0}"
    first_row = 0
    for batch in batches:
        scored = loop.run_until_complete(scorer.score(pa.Table.from_batches([batch]), first_row, source))
        first_row += batch.num_rows
        yield from public(scored).to_batches()


def spark_session(master: str | None, app_name: str = "streamscore-score") -> SparkSession:
    """A session on ``master`` (``local[*]``, ``spark://host:7077``, ``yarn``, ``k8s://...``); without one, the
    master spark-submit was given, else ``local[*]``. On a local master the executors run this same Python
    (``PYSPARK_PYTHON`` defaults to it); on a cluster, ``PYSPARK_PYTHON`` names the executors' interpreter, which
    must have streamscore installed."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    conf = SparkConf()
    chosen = master or conf.get("spark.master", None) or "local[*]"
    builder = (builder.master(chosen).config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.ui.showConsoleProgress", "false"))
    if chosen.startswith("local"):
        # the executors' Python is PYSPARK_PYTHON, else "python3" on the PATH: not this virtualenv's
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # a local master's driver and executors talk over loopback only, and serve no web UI
        builder = (builder.config("spark.ui.enabled", "false").config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.driver.host", "127.0.0.1"))
        builder = builder.config("spark.sql.shuffle.partitions", "4")
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def run_spark(settings: Settings, model_name: str, input_path: str, output_path: str, version: str | None = None,
              master: str | None = None, to_topic: bool = False, spark: SparkSession | None = None) -> Summary:
    """Score a parquet dataset of requests into a parquet dataset of predictions (a folder of part files, one
    per partition) on Spark; the summary is counted from what was written."""
    started = time.monotonic()
    model, views = prepare(settings, model_name, version)
    phases = {"prepare_s": time.monotonic() - started}
    session = spark or spark_session(master)
    phases["spark_session_s"] = time.monotonic() - started - phases["prepare_s"]
    requests = _read_requests(session, input_path)
    columns = RequestColumns.of(model)
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    check_schema(to_arrow_schema(requests.schema), columns, input_path)
    phases["read_s"] = time.monotonic() - started - phases["prepare_s"] - phases["spark_session_s"]
    schema = BatchScorer.probe_schema(settings, model, views)
    phases["probe_s"] = time.monotonic() - started - sum(phases.values())
    summary = Summary("spark", model.name, model.version, input_path, output_path, started_at=utc_now(),
                      details={"master": session.sparkContext.master})
    staging = Path(tempfile.mkdtemp(prefix="streamscore-model-"))
    try:
        job_id = uuid.uuid4().hex[:12]
        archive = _model_archive(settings, model.name, model.version, staging / f"models-{job_id}")
        session.sparkContext.addArchive(str(archive))
        job = SparkJob(job_id, settings, dict(views), model.name, model.version, archive.name,
                       schema.serialize().to_pybytes(), to_topic)
        counting = time.monotonic()
        summary.rows = requests.count()
        phases["count_input_s"] = time.monotonic() - counting
        partitions = _partitions(session, summary.rows, settings.batch)
        if requests.rdd.getNumPartitions() < partitions:
            requests = requests.repartition(partitions)
        summary.details["partitions"] = requests.rdd.getNumPartitions()

        def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            return score_partition(job, batches)

        scoring = time.monotonic()
        scored = requests.mapInArrow(score, schema=from_arrow_schema(public(schema.empty_table()).schema))
        try:
            scored.write.mode("overwrite").parquet(output_path)
        except Exception as exc:  # Py4J's error holds the JVM's and the executor's whole stack: say what failed
            raise BatchRunError(f"the Spark job scoring {input_path} failed: {failure_line(exc)}") from exc
        phases["score_and_write_s"] = time.monotonic() - scoring
        _count_written(session, output_path, summary)
        phases["count_s"] = time.monotonic() - scoring - phases["score_and_write_s"]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if spark is None:
            session.stop()
    summary.details.update({name: round(seconds, 3) for name, seconds in phases.items()})
    summary.finish(started)
    return summary


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Unavailable|Failed)\b:? ?.*$")


def failure_line(exc: BaseException) -> str:
    """The last Python exception line in a Spark failure (the executor's own error), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if _EXCEPTION_LINE.match(line) and not line.startswith("at ")]
    python = [line for line in named if not line.startswith(("org.apache", "java.", "py4j", "scala."))]
    if python or named:
        return (python or named)[-1][:500]
    return (lines or [type(exc).__name__])[0][:500]


def _model_archive(settings: Settings, model: str, version: str, base: Path) -> Path:
    """A zip of ``<model>/<version>/`` (the version folder: artifact and manifest), for ``addArchive``: on a cluster
    Spark ships files and archives, not folders; each executor unpacks it once."""
    folder = base.with_name(base.name + "-tree")
    shutil.copytree(version_dir(settings.models_dir, model, version), folder / model / version)
    return Path(shutil.make_archive(str(base), "zip", root_dir=folder))


def _read_requests(session: SparkSession, input_path: str) -> DataFrame:
    from pyspark.errors import AnalysisException

    try:
        return session.read.parquet(input_path)
    except AnalysisException as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BatchInputError(f"{input_path}: Spark cannot read it as parquet ({first_line})") from None


def _partitions(session: SparkSession, rows: int, batch: BatchSettings) -> int:
    """Enough partitions for every core of the cluster (and ``spark_partition_rows`` each at most), but no
    more than there are pipeline batches: a partition costs a task, a small input keeps few."""
    wanted = max(session.sparkContext.defaultParallelism, math.ceil(rows / batch.spark_partition_rows))
    return max(1, min(wanted, math.ceil(rows / batch.chunk_rows)))


def _count_written(session: SparkSession, output_path: str, summary: Summary) -> None:
    """Rows by status and degraded rows, counted from the written files in one pass."""
    from pyspark.sql import functions as F

    written = session.read.parquet(output_path)
    counts = written.groupBy("status").agg(F.count(F.lit(1)).alias("rows"),
                                           F.sum((F.size("degraded") > 0).cast("long")).alias("degraded")).collect()
    summary.count({row["status"]: row["rows"] for row in counts}, sum(row["degraded"] or 0 for row in counts))
