"""The progress watchdog: a worker that cannot make progress says so and exits; it never sits alive and silent.

It runs in a thread of its own, so it sees a blocked event loop too (a stage that blocks, a C call that hangs).
Three things are watched, each against ``stall_timeout_s``:

- the oldest batch in flight (or offsets waiting to be committed) has waited that long without a commit;
- the fetch loop has not come round for that long (while it is not simply waiting for room in flight);
- the event loop has not run a heartbeat callback for that long.

On the first two the worker is marked not ready (``reason``), the reason is logged, and ``on_stall`` is called
in the event loop (the worker then shuts down within its bound and exits with code 70). A blocked loop cannot
run a graceful shutdown: the process exits at once with code 70. Nothing is lost either way: what was not
committed is read again by the next owner of its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

EXIT_STALLED = 70
"""Exit code of a worker stopped by its watchdog (EX_SOFTWARE)."""
EXIT_SHUTDOWN_TIMEOUT = 71
"""Exit code of a worker whose shutdown took longer than ``shutdown_timeout_s``."""


class Progress(Protocol):
    """What the watchdog reads (``BatchDelivery`` has it)."""

    waiting_since: float | None
    fetch_beat: float
    waiting_for_room: bool

    @property
    def oldest_flight(self) -> object | None: ...


def hard_exit(code: int, why: str) -> None:
    """Log why and leave now, from any thread (no cleanup: the loop may be blocked)."""
    log.critical("%s; exiting with code %d", why, code)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # nothing more can be done on the way out
            handler.flush()
    sys.stderr.flush()
    os._exit(code)


class Watchdog:
    def __init__(self, progress: Progress | None, stall_timeout_s: float, on_stall: Callable[[str], None],
                 check_every_s: float | None = None) -> None:
        self.progress = progress
        self.stall_timeout_s = stall_timeout_s
        self.on_stall = on_stall
        self.check_every_s = check_every_s or min(1.0, stall_timeout_s / 4)
        self.reason: str | None = None
        """Why the worker is not ready (None while it is)."""
        self.loop_beat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.reason is None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.loop_beat = time.monotonic()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="streamscore-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _beat(self) -> None:
        self.loop_beat = time.monotonic()
        if self._loop is not None and not self._stopped.is_set():
            self._loop.call_later(self.check_every_s, self._beat)

    def _run(self) -> None:
        while not self._stopped.wait(self.check_every_s):
            now = time.monotonic()
            if now - self.loop_beat > self.stall_timeout_s:
                hard_exit(EXIT_STALLED, f"the event loop has been blocked for {now - self.loop_beat:.1f} s "
                                        f"(STREAMSCORE_WORKER__STALL_TIMEOUT_S={self.stall_timeout_s:g})")
            if self.reason is None:
                stall = self.stalled(now)
                if stall is not None:
                    self._report(stall)

    def stalled(self, now: float) -> str | None:
        """Why the worker is not making progress, or None."""
        progress, bound = self.progress, self.stall_timeout_s
        if progress is None:
            return None
        waiting = progress.waiting_since
        if waiting is not None and now - waiting > bound:
            oldest = progress.oldest_flight
            what = oldest.describe() if oldest is not None and hasattr(oldest, "describe") \
                else "offsets are waiting to be committed"
            return f"no batch committed for {now - waiting:.1f} s: {what}"
        if not progress.waiting_for_room and now - progress.fetch_beat > bound:
            return f"the fetch loop has not come round for {now - progress.fetch_beat:.1f} s"
        return None

    def _report(self, stall: str) -> None:
        self.reason = f"{stall} (STREAMSCORE_WORKER__STALL_TIMEOUT_S={self.stall_timeout_s:g})"
        log.error("worker cannot make progress: %s; stopping so that it is restarted", self.reason)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_stall, self.reason)
