"""The prediction-log stage without servers: the sampled share, the debug flag, what a logged row holds, and a
full writer queue that drops (counted) instead of holding the batch up."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import msgpack

from streamscore.settings import Settings
from streamscore.streams.records import Inbound
from streamscore.workers.pipeline import BatchPipeline
from streamscore.workers.predlog import (
    COLUMNS,
    STAGE,
    LogWriter,
    PredictionLog,
    fnv1a,
    sample_mask,
)
from streamscore.workers.stages import STAGES

from .test_pipeline import NoViews, TinyRuntime


class RecordingWriter(LogWriter):
    """Keeps what is offered instead of writing it."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings or Settings())
        self.rows: list[tuple] = []

    def offer(self, model: str, rows: list[tuple]) -> bool:
        self.rows.extend(rows)
        return True


class StuckWriter(LogWriter):
    """A writer whose thread never takes anything off its queue (Cassandra hanging)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.release = threading.Event()

    def _run(self) -> None:
        self.release.wait(10)


def runtime() -> TinyRuntime:
    manifest = SimpleNamespace(sha256="ab" * 32, stages=(), inputs=(SimpleNamespace(name="amount", size=1),))
    return TinyRuntime(manifest=manifest)


def logging_pipeline(stage: PredictionLog) -> BatchPipeline:
    scoring = BatchPipeline(runtime(), NoViews(), "p", worker_id="w")  # type: ignore[arg-type]
    scoring.add(stage)
    return scoring


def message(value: Any) -> Inbound:
    return Inbound(msgpack.packb(value), b"k", "t", 0, 1)


def request(request_id: str, amount: float = 1.5, **extra: Any) -> dict[str, Any]:
    return {"id": request_id, "features": {"amount": amount}, **extra}


def test_the_sampled_share_is_a_stable_hash_of_the_id_and_roughly_the_share() -> None:
    ids = [f"req-{i}" for i in range(20_000)] + ["ünïcode-ид-1", "x", "a" * 256]
    mask = sample_mask(ids, 0.05)

    assert mask.tolist() == [fnv1a(i) < 0.05 * 2**32 for i in ids]
    assert 0.04 < mask[:20_000].mean() < 0.06
    assert fnv1a("a") == 0xE40C292C  # FNV-1a-32 of b"a", the published test vector
    assert not sample_mask(ids, 0.0).any() and sample_mask(ids, 1.0).all()
    assert (sample_mask(ids[:100], 0.05) == mask[:100]).all()  # the same id, in any batch
    half = sample_mask(ids, 0.5)
    for start in [*range(0, 60, 3), len(ids) - 3]:  # small batches are hashed one id at a time: the same answer
        assert sample_mask(ids[start:start + 3], 0.5).tolist() == half[start:start + 3].tolist()
    assert half[:60].any() and not half[:60].all()  # both answers were compared


def test_debug_requests_are_always_logged_with_their_inputs_sources_outputs_and_lineage() -> None:
    writer = RecordingWriter()
    scoring = logging_pipeline(PredictionLog(share=0.0, writer=writer))
    batch = [
        message(request("plain")),
        message(request("flagged", 2.25, debug=True)),
        message([request("e0"), request("e1", 3.5, debug=True), request("e2", debug=False)]),
        message(request("a-str", note="debug")),  # the bytes occur, the flag does not
        message(request("not-bool", debug="yes")),
        Inbound(None, b"k", "t", 0, 2),  # a tombstone in the batch: dead-lettered, and no obstacle
        Inbound(b"\x83" + b"".join(map(msgpack.packb, ("id", "str8", "features", {"amount": 1.0})))
                + b"\xd9\x05debug\xc3", b"k", "t", 0, 3),  # the key as a str8, as some encoders write it
    ]
    outcome = asyncio.run(scoring.process(batch))

    assert outcome.answered == 8
    logged = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in writer.rows}
    assert set(logged) == {"flagged", "e1", "str8"}
    row = logged["e1"]
    assert (row["model"], row["version"], row["debug"]) == ("tiny", "1", True)
    assert (row["input_names"], row["input_values"], row["input_sources"]) == (["amount"], [3.5], ["request"])
    assert row["outputs"] == '{"score": 3.5}'
    assert row["lineage"]["artifact_sha256"] == "ab" * 32 and row["lineage"]["batch_id"] == "w/1"
    assert STAGES[STAGE] is PredictionLog


def test_a_full_queue_drops_and_counts_the_rows_and_never_holds_the_batch_up() -> None:
    writer = StuckWriter(Settings(prediction_log={"queue_batches": 2}))
    scoring = logging_pipeline(PredictionLog(share=1.0, writer=writer))
    try:
        outcomes = [asyncio.run(scoring.process([message(request(f"b{n}-{i}")) for i in range(3)]))
                    for n in range(5)]
    finally:
        writer.release.set()

    assert all(outcome.answered == 3 for outcome in outcomes)
    assert (writer.queued, writer.dropped) == (6, 9)  # two batches queued, three batches of 3 rows dropped


def test_a_batch_without_a_logged_row_offers_nothing() -> None:
    writer = RecordingWriter()
    scoring = logging_pipeline(PredictionLog(share=0.0, writer=writer))
    asyncio.run(scoring.process([message([request(f"r{i}", debug=False) for i in range(50)])]))
    assert writer.rows == []
