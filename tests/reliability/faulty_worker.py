"""``streamscore worker`` with faults injected, for the fault scenarios (tests/reliability/test_faults.py).

Run as ``python -m tests.reliability.faulty_worker --model fraud`` from the project root. A fault fires when a
request's raw bytes hold its marker (a request id such as ``fault-features-1``), so a test picks which batch
fails and where, on a real worker against the real stack:

- ``fault-decode``, ``fault-features``, ``fault-assemble``, ``fault-infer``, ``fault-encode``: that pipeline
  stage raises for every batch holding the marker;
- ``fault-publish``: the first two producer sends of a prediction keyed ``fault-publish…`` raise;
- ``fault-commit``: the two offset commits after that request's prediction was queued raise;
- ``fault-hang``: the features stage waits forever (the event loop stays free);
- ``fault-block``: the decode stage blocks the event loop (``time.sleep``).

``STREAMSCORE_TEST_FAULTS=off`` starts the same worker with no fault installed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("faulty_worker")

STAGES = ("decode", "features", "assemble", "infer", "encode", "hang", "block")
_present: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("faults", default=frozenset())
_commit_faults = [0]


class InjectedFault(RuntimeError):
    pass


def _fire(stage: str) -> None:
    if stage in _present.get():
        log.warning("fault injected: %s", stage)
        raise InjectedFault(f"fault injected in {stage}")


def install() -> None:
    from aiokafka import AIOKafkaConsumer

    from streamscore import fastpath
    from streamscore.featurestore.store import FeatureStore
    from streamscore.streams.delivery import BatchPublisher
    from streamscore.workers.pipeline import BatchPipeline
    from streamscore.workers.runtime import ModelRuntime

    process = BatchPipeline.process

    async def marked_process(self: Any, batch: Any) -> Any:
        values = [message.value or b"" for message in batch]
        found = frozenset(stage for stage in STAGES if any(f"fault-{stage}".encode() in v for v in values))
        token = _present.set(found)
        try:
            return await process(self, batch)
        finally:
            _present.reset(token)

    BatchPipeline.process = marked_process  # type: ignore[method-assign]

    def wrap_sync(owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if stage == "decode" and "block" in _present.get():
                log.warning("fault injected: block")
                time.sleep(3600)
            _fire(stage)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    wrap_sync(fastpath, "decode_batch", "decode")
    wrap_sync(fastpath, "assemble", "assemble")
    wrap_sync(fastpath, "encode_predictions", "encode")
    wrap_sync(ModelRuntime, "run", "infer")

    fetch = FeatureStore.fetch

    async def faulty_fetch(self: Any, *args: Any) -> Any:
        if "hang" in _present.get():
            log.warning("fault injected: hang")
            await asyncio.Event().wait()
        _fire("features")
        return await fetch(self, *args)

    FeatureStore.fetch = faulty_fetch  # type: ignore[method-assign]

    send = BatchPublisher.send
    publish_faults: dict[bytes, int] = {}

    async def faulty_send(self: Any, topic: str, partition: int, group: list[Any]) -> Any:
        for message in group:
            key = message[1] or b""
            if key.startswith(b"fault-publish") and publish_faults.get(key, 0) < 2:
                publish_faults[key] = publish_faults.get(key, 0) + 1
                log.warning("fault injected: publish (%d)", publish_faults[key])
                raise InjectedFault("fault injected in publish")
            if key.startswith(b"fault-commit") and key not in publish_faults:
                publish_faults[key] = 0
                _commit_faults[0] = 2
        return await send(self, topic, partition, group)

    BatchPublisher.send = faulty_send  # type: ignore[method-assign]

    commit = AIOKafkaConsumer.commit

    async def faulty_commit(self: Any, offsets: Any = None) -> Any:
        if _commit_faults[0] > 0:
            _commit_faults[0] -= 1
            log.warning("fault injected: commit")
            raise InjectedFault("fault injected in commit")
        return await commit(self, offsets)

    AIOKafkaConsumer.commit = faulty_commit  # type: ignore[method-assign]


def main() -> None:
    if os.environ.get("STREAMSCORE_TEST_FAULTS", "on") != "off":
        install()
    from streamscore.cli import main as cli

    sys.argv = ["streamscore", "worker", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
