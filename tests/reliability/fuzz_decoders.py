"""Fuzz both request decoders (the compiled ``_fast`` and the pure-Python ``_pure``) with arbitrary bytes.

Run as a subprocess (``python -m tests.reliability.fuzz_decoders --seconds 10 --out DIR``) so that a crash of
the compiled module (a segfault) ends this process, not pytest. Every input is split into one to three messages
(sometimes with a null value, a Kafka tombstone, after them) and decoded by both twins: neither may crash or
raise (a bad message must become a DecodeError), and both must give the same result: every column (element and
span included) and every error with its detail and span. (The one divergence once excluded here, a repeated key
whose dropped value nested deeper than 64 levels, went with the depth rule: no depth is too deep now.) With
atheris (libFuzzer, coverage-guided on the pure twin's Python) a failing input is written to
``DIR/crash-<sha1>``; without it, a seeded random mutator runs and the input being decoded is kept in
``DIR/last-input`` so a segfault still leaves it behind.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the platform
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from streamscore.fastpath import _pure
else:  # pragma: no cover
    from streamscore.fastpath import _pure
from streamscore.fastpath import DecodeSpec, RequestFeature, _fast

SPEC = DecodeSpec(
    entity_keys=("card_id", "merchant_id"),
    request_features=(RequestFeature("amount"), RequestFeature("hour", default=12.0),
                      RequestFeature("embedding", size=3, default=0.0)),
    max_message_bytes=4096,
    max_requests_per_message=16,
    max_str_len=64,
)
"""Small limits, so that the fuzzer reaches them with short inputs."""


def split(data: bytes) -> list[bytes | None]:
    """One to three messages out of one input: the first byte says how many and where the cuts are; its top bit
    adds a null value (a Kafka tombstone) after them."""
    if len(data) < 2:
        return [data]
    count = 1 + data[0] % 3
    body = data[1:]
    cuts = sorted({len(body) * (index + 1) // count for index in range(count - 1)})
    bounds = [0, *cuts, len(body)]
    messages: list[bytes | None] = [body[start:end] for start, end in itertools.pairwise(bounds)]
    return [*messages, None] if data[0] & 0x80 else messages


def summary(decoded: Any) -> tuple[Any, ...]:
    """What both twins must agree on: everything, error details included."""
    return (decoded.ids, decoded.entities, decoded.features.tobytes(), decoded.features.shape,
            decoded.deadline_ms.tolist(), decoded.sent_ms.tolist(), decoded.reply_to, decoded.version,
            decoded.source.tolist(), decoded.element.tolist(), decoded.span.tolist(),
            [(error.message_index, error.element_index, error.kind, error.request_id, error.detail, error.span)
             for error in decoded.errors])


def check(data: bytes) -> None:
    messages = split(data)
    compiled = _fast.decode_batch(messages, SPEC)
    pure = _pure.decode_batch(messages, SPEC)
    assert compiled.features.dtype == np.float32 == pure.features.dtype
    if summary(compiled) != summary(pure):
        raise AssertionError(f"the twins disagree on {data!r}:\ncompiled {summary(compiled)}\npure     {summary(pure)}")


def seeds() -> list[bytes]:
    """A few valid and nearly valid requests, so mutations start from the shape the decoders expect."""
    request = {"id": "r-1", "entities": {"card_id": "card-1", "merchant_id": 7},
               "features": {"amount": 12.5, "hour": 3, "embedding": [0.1, 0.2, 0.3]},
               "deadline_ms": 1, "sent_ms": 2, "reply_to": "topic.x", "version": "1"}
    packed = msgpack.packb(request)
    deep = b"\x91" * 2000 + b"\x01"
    with_deep_key = bytes([packed[0] + 1]) + packed[1:] + b"\xa4junk" + deep  # an unknown key, 2000 levels down
    return [b"\x00" + packed, b"\x01" + packed + packed, b"\x00" + msgpack.packb([request, request]),
            b"\x00" + msgpack.packb({**request, "features": {"amount": float("nan")}}), b"\x00" + b"\x91" * 70,
            b"\x80" + with_deep_key, b"\x00\x93" + packed + deep + packed,
            b"\x00" + msgpack.packb({**request, "features": {"amount": [1.5], "hour": [3]}})]


def fuzz_with_atheris(seconds: float, out: Path) -> None:
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds()):
        (corpus / f"seed-{index}").write_bytes(seed)
    argv = [sys.argv[0], f"-max_total_time={int(seconds)}", "-max_len=4096", "-rss_limit_mb=2048", "-timeout=20",
            f"-artifact_prefix={out}/", "-print_final_stats=1", str(corpus)]
    atheris.Setup(argv, check)
    atheris.Fuzz()


def fuzz_with_random(seconds: float, out: Path, seed: int = 7) -> None:  # pragma: no cover - without atheris
    rng = random.Random(seed)
    pool = seeds()
    last = out / "last-input"
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(pool))
        last.write_bytes(data)
        try:
            check(data)
        except Exception:
            (out / "crash-random").write_bytes(data)
            raise
        runs += 1
        if rng.random() < 0.01:
            pool.append(data)
    print(f"random fuzzing: {runs} inputs, no crash")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    edits: Sequence[Callable[[], None]] = (
        lambda: buffer.__setitem__(rng.randrange(len(buffer)), rng.randrange(256)) if buffer else None,
        lambda: buffer.insert(rng.randrange(len(buffer) + 1), rng.randrange(256)),
        lambda: buffer.__delitem__(rng.randrange(len(buffer))) if buffer else None,
        lambda: buffer.extend(rng.randbytes(rng.randrange(64))),
        lambda: buffer.__delitem__(slice(rng.randrange(len(buffer) + 1), None)),
    )
    for _ in range(rng.randint(1, 8)):
        rng.choice(edits)()
    return bytes(buffer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if atheris is not None:
        fuzz_with_atheris(args.seconds, args.out)
    else:
        fuzz_with_random(args.seconds, args.out)


if __name__ == "__main__":
    main()
