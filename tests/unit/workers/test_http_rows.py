"""HTTP rows without servers: the protocol's tensors read into rows (JSON and binary alike), the bound on waiting
rows, whole requests taken into batches, and a mixed batch's answers routed: HTTP rows to their requests, the
Kafka messages left to be published."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from streamscore import fastpath
from streamscore.settings import HttpSettings
from streamscore.streams.delivery import Flight
from streamscore.streams.records import Inbound
from streamscore.workers.http import HTTP_TOPIC, HttpFlight, HttpRows, ProtocolError, Waiting, encode_rows, parse_infer
from streamscore.workers.pipeline import BatchPipeline

from .test_pipeline import NoViews, TinyRuntime, message

SPEC = fastpath.DecodeSpec(("card_id",), (fastpath.RequestFeature("amount"),
                                          fastpath.RequestFeature("hour", default=12.0)))


def _body(**tensors: tuple[str, list[int], list[Any]]) -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}
                                  for name, (datatype, shape, data) in tensors.items()]}).encode()


def test_json_and_binary_tensors_give_the_same_rows() -> None:
    cards, amounts = ["c-1", "c-é"], [1.5, 2.25]
    from_json = parse_infer(_body(card_id=("BYTES", [2], cards), amount=("FP32", [2, 1], [[1.5], [2.25]])), None,
                            SPEC, 16)
    strings = b"".join(struct.pack("<I", len(card.encode())) + card.encode() for card in cards)
    numbers = np.array(amounts, "<f4").tobytes()
    header = json.dumps({"inputs": [
        {"name": "card_id", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(strings)}},
        {"name": "amount", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": len(numbers)}}]})
    from_binary = parse_infer(header.encode() + strings + numbers, str(len(header)), SPEC, 16)

    for rows in (from_json, from_binary):
        assert (rows.count, rows.entities, rows.features, rows.feature_names) == (2, [cards], [amounts], ["amount"])
    decoded = fastpath.decode_batch([encode_rows(from_json, ["a", "b"], None)], SPEC)
    assert decoded.ids == ["a", "b"] and decoded.entities == [cards] and not decoded.errors
    np.testing.assert_array_equal(decoded.features, [[1.5, 12.0], [2.25, 12.0]])  # hour: its default


@pytest.mark.parametrize(("body", "says"), [
    (_body(card_id=("BYTES", [1], ["c"]), amount=("FP32", [1], [float("nan")])), "finite in float32"),
    (_body(card_id=("BYTES", [1], ["c"]), amount=("BOOL", [1], [True])), "datatype BOOL"),
    (_body(card_id=("BYTES", [1], ["c"]), amount=("FP32", [1], [True])), "True is not a number"),
    (_body(card_id=("BYTES", [1], [""]), amount=("FP32", [1], [1.0])), "1 to 256 are taken"),
    (_body(card_id=("FP32", [1], [1.0]), amount=("FP32", [1], [1.0])), "takes BYTES or an integer type"),
    (_body(card_id=("BYTES", [0], []), amount=("FP32", [0], [])), "1 to 16 rows"),
    (_body(card_id=("BYTES", [1], ["c"]), amount=("FP32", [1], [1.0]), id=("BYTES", [2], ["a", "b"])),
     "batch dimension"),
])
def test_bad_tensors_say_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says) as raised:
        parse_infer(body, None, SPEC, 16)
    assert raised.value.status == 400


def _waiting(sequence: int, amounts: list[float], loop: asyncio.AbstractEventLoop) -> Waiting:
    ids = [f"h-{sequence}.{row}" for row in range(len(amounts))]
    requests = [{"id": row_id, "features": {"amount": amount}} for row_id, amount in zip(ids, amounts, strict=True)]
    value = msgpack.packb(requests[0] if len(requests) == 1 else requests)
    return Waiting(Inbound(value, None, HTTP_TOPIC, -1, sequence), [row_id.encode() for row_id in ids],
                   loop.create_future())


def test_waiting_rows_are_bounded_and_taken_as_whole_requests() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started: list[Flight] = []

        async def put(flight: Flight) -> None:
            started.append(flight)

        rows = HttpRows(HttpSettings(max_waiting_rows=5, batch_window_ms=1), batch_max=4, put=put)
        first, second, third = _waiting(1, [1.0, 2.0], loop), _waiting(2, [3.0, 4.0, 5.0], loop), _waiting(3, [6.0],
                                                                                                            loop)
        assert rows.offer(first) and rows.offer(second) and not rows.offer(third)  # 2 + 3 rows, then over 5
        await asyncio.sleep(0.01)
        assert len(started) == 1 and isinstance(started[0], HttpFlight)  # one batch started after the window
        kafka_batch = Flight([message("k-1", 1.0), message("k-2", 1.0)], {}, loop.create_future())
        assert rows.take(kafka_batch) == [first]  # 2 Kafka messages + 2 rows fill batch_max 4; 3 more do not fit
        assert rows.take(started[0]) == [second] and rows.waiting_rows == 0

    asyncio.run(scenario())


def test_a_mixed_batch_answers_http_rows_and_leaves_kafkas_messages_to_publish() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pipeline = BatchPipeline(TinyRuntime(), NoViews(), "p")  # type: ignore[arg-type]
        http = [_waiting(1, [0.25, 0.5], loop), _waiting(2, [0.75], loop)]
        broken = Waiting(Inbound(b"\xc1", None, HTTP_TOPIC, -1, 3), [b"h-3.0"], loop.create_future())
        kafka = [message("k-1", 7.0), message("k-2", 8.0), Inbound(b"\xc1", b"k", "t", 0, 9)]

        outcome = await pipeline.process([*kafka, *(waiting.message for waiting in [*http, broken])])
        published, answered = HttpRows.settle([*http, broken], outcome)

        assert answered == 3 and all(waiting.future.done() for waiting in [*http, broken])
        assert sorted(key for _, key, _, _ in published.predictions) == [b"k-1", b"k-2"]
        assert [dict(letter.headers)["streamscore-source"] for letter in published.dead_letters] == [b"t/0/9"]
        scores = {row: msgpack.unpackb(value)["outputs"]["score"] for waiting in http
                  for row, (_, value) in waiting.answers.items()}
        assert scores == {b"h-1.0": 0.25, b"h-1.1": 0.5, b"h-2.0": 0.75}
        assert broken.answers[b"h-3.0"][0] == "dead_letter" and broken.answers[b"h-3.0"][1][0] == "undecodable"

    asyncio.run(scenario())


def test_the_deadline_comes_from_the_parameter_or_the_header() -> None:
    tensors = {"card_id": ("BYTES", [1], ["c"]), "amount": ("FP32", [1], [1.0])}
    with_parameter = json.loads(_body(**tensors)) | {"parameters": {"deadline_ms": 1234}}
    assert parse_infer(json.dumps(with_parameter).encode(), None, SPEC, 4, "99").deadline_ms == 1234
    assert parse_infer(_body(**tensors), None, SPEC, 4, "99").deadline_ms == 99
    assert parse_infer(_body(**tensors), None, SPEC, 4).deadline_ms is None
    with pytest.raises(ProtocolError, match="Streamscore-Deadline-Ms 'soon' is not an integer"):
        parse_infer(_body(**tensors), None, SPEC, 4, "soon")
