"""Batch scoring without servers: the requests table's checks, rows through the worker's pipeline in chunks
(order kept, bad rows rejected with the decoder's kinds, the output schema the same for every chunk), the
summary, and the score command's schedule and exit code."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from streamscore import cli, fastpath
from streamscore.featurestore.memory import MemoryStore
from streamscore.featurestore.store import FeatureStore
from streamscore.settings import Settings
from streamscore.workers.batch import (
    BatchInputError,
    BatchScorer,
    RequestColumns,
    Summary,
    check_schema,
    public,
    status_counts,
    summary_path,
)

from .test_pipeline import TinyRuntime

COLUMNS = RequestColumns(("card_id",), (fastpath.RequestFeature("amount"), fastpath.RequestFeature("hour", 1, 12.0),
                                        fastpath.RequestFeature("embedding", 2, None)))


def _settings(chunk_rows: int = 3) -> Settings:
    return Settings(online_store="memory", cache="none", batch={"chunk_rows": chunk_rows})


def _scorer(settings: Settings) -> BatchScorer:
    runtime = TinyRuntime(manifest=SimpleNamespace(sha256="ab" * 32, stages=()))
    store = FeatureStore(settings, {}, use_cache=False, online=MemoryStore({}))
    scorer = BatchScorer(settings, runtime, {}, "unit", store=store)  # type: ignore[arg-type]
    asyncio.run(scorer.start(BatchScorer.probe_schema(settings, runtime, {})))  # type: ignore[arg-type]
    return scorer


def test_a_table_without_a_column_the_model_needs_or_of_the_wrong_type_is_refused_in_one_line() -> None:
    good = pa.schema([("id", pa.string()), ("card_id", pa.int64()), ("amount", pa.float32()),
                      ("embedding", pa.list_(pa.float64())), ("deadline_ms", pa.int64())])
    check_schema(good, COLUMNS, "r.parquet")
    cases = {
        "column 'amount' is missing": pa.schema([("id", pa.string()), ("card_id", pa.string()),
                                                 ("embedding", pa.list_(pa.float64()))]),
        "column 'id' is int64, not string": good.set(0, pa.field("id", pa.int64())),
        "column 'card_id' is double, not string or integer": good.set(1, pa.field("card_id", pa.float64())),
        "column 'amount' is string, not a number": good.set(2, pa.field("amount", pa.string())),
        "column 'embedding' is double, not a list of 2 numbers": good.set(3, pa.field("embedding", pa.float64())),
        "column 'deadline_ms' is double, not integer": good.set(4, pa.field("deadline_ms", pa.float64())),
    }
    for problem, schema in cases.items():
        with pytest.raises(BatchInputError) as refused:
            check_schema(schema, COLUMNS, "r.parquet")
        assert str(refused.value) == (f"r.parquet: {problem} (the model's requests have columns: id, card_id, "
                                      "amount, hour (optional), embedding; optional: deadline_ms, version)")


def test_rows_go_through_the_pipeline_in_chunks_in_order_and_bad_rows_are_rejected_with_the_decoders_kind() -> None:
    settings = _settings(chunk_rows=3)
    scorer = _scorer(settings)
    amounts = [0.5, math.nan, None, 2.0, 3.0, 4.0, 1e39, 7.0]
    table = pa.table({"id": [f"r{i}" for i in range(8)], "amount": pa.array(amounts, pa.float64()),
                      "deadline_ms": [None, None, None, None, 1, None, None, None]})
    scored = asyncio.run(scorer.score(table, 100, "in.parquet"))
    rows = public(scored).to_pylist()

    assert [row["id"] for row in rows] == [f"r{i}" for i in range(8)]
    assert [row["status"] for row in rows] == ["ok", "rejected", "rejected", "ok", "expired", "ok", "rejected", "ok"]
    assert [row["error_kind"] for row in rows] == [None, "bad_feature", "missing_feature", None, "expired", None,
                                                   "bad_feature", None]
    assert [row["score"] for row in rows] == [0.5, None, None, 2.0, None, 4.0, None, 7.0]
    assert {row["batch_id"] for row in rows} == {"unit/1", "unit/2", "unit/3"}  # one pipeline batch per chunk
    assert all(row["artifact_sha256"] == "ab" * 32 for row in rows if row["status"] != "rejected")
    assert scored.column("_row").to_pylist() == list(range(100, 108))
    counts, degraded = status_counts(scored)
    assert (counts, degraded) == ({"ok": 4, "rejected": 3, "expired": 1}, 0)


def test_a_chunk_without_one_scored_row_has_the_same_columns() -> None:
    scorer = _scorer(_settings())
    scored = asyncio.run(scorer.score(pa.table({"id": ["x"], "amount": pa.array([None], pa.float64())}), 0, "in"))
    assert scored.schema == scorer.tabulate.schema
    assert public(scored).column_names == ["id", "model", "version", "status", "score", "error_kind",
                                           "error_message", "degraded", "artifact_sha256", "code_version",
                                           "batch_id", "worker_id"]


def test_the_summary_counts_lost_rows_and_lives_beside_the_output(tmp_path: Any) -> None:
    summary = Summary("local", "m", "1", "in.parquet", str(tmp_path / "p.parquet"), rows=10)
    summary.count({"ok": 6, "expired": 1, "rejected": 2}, degraded=3)
    assert (summary.answered, summary.output_rows, summary.lost, summary.degraded) == (7, 9, 1, 3)
    assert summary.write() == tmp_path / "p.summary.json" == summary_path(tmp_path / "p.parquet")


def test_score_exits_non_zero_when_rows_were_lost_and_parses_its_schedule(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Any) -> None:
    def lossy(*args: Any) -> Summary:
        summary = Summary("local", "m", "1", "in.parquet", str(tmp_path / "out.parquet"), rows=5)
        summary.count({"ok": 4}, 0)
        return summary

    monkeypatch.setattr(cli, "_score_once", lossy)
    result = CliRunner().invoke(cli.main, ["score", "--model", "m", "--input", "in.parquet", "--output",
                                           str(tmp_path / "out.parquet")])
    assert result.exit_code == cli.EXIT_ROWS_LOST
    assert '"lost": 1' in result.output and (tmp_path / "out.summary.json").exists()
    assert [cli._duration(text) for text in ("90", "90s", "15m", "6h", "1d")] == [90, 90, 900, 21600, 86400]
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(click.BadParameter):
            cli._duration(bad)
    assert np.isclose(cli._duration("0.5s") or 0, 0.5)


def test_the_cronjob_manifest_runs_a_score_command_the_cli_takes() -> None:
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).parents[3] / "deploy/k8s/score-cronjob.yaml").read_text()
    command = re.search(r"command: (\[.*?\])", text, re.S)
    args = re.search(r"args: (\[.*?\])", text, re.S)
    assert command is not None and args is not None
    assert json.loads(command.group(1)) == ["streamscore"]
    score, *options = json.loads(args.group(1))
    context = cli.main.commands[score].make_context(score, options)
    assert context.params["model"] == "fraud" and "{run}" in context.params["output_path"]


def test_a_failed_spark_job_is_told_by_the_executors_own_error() -> None:
    from streamscore.workers.spark_job import failure_line

    text = ("An error occurred while calling o97.parquet.\n: org.apache.spark.SparkException: Job aborted due to stage "
            "failure: Task 0 in stage 7.0 failed 1 times\n  File \"/w/batch.py\", line 3, in score\n"
            "streamscore.featurestore.online.FeatureStoreUnavailable: Cassandra at 10.0.0.9:9042 did not answer\n"
            "\tat org.apache.spark.api.python.BasePythonRunner.handlePythonException(PythonRunner.scala:1097)\n")
    assert failure_line(RuntimeError(text)) == ("streamscore.featurestore.online.FeatureStoreUnavailable: Cassandra at "
                                                "10.0.0.9:9042 did not answer")
    assert failure_line(RuntimeError("something odd\nmore")) == "something odd"
