"""The benchmark's subprocesses: each in its own process group, logging to a file, always cleaned up.

A process under test can be *frozen* (SIGSTOP) while the harness loads a backlog and *thawed* (SIGCONT) to
drain it: the measured drain then starts with a process that is already running, connected and in its
consumer group, and nothing else competes for the 2 cores while it drains. A freeze lasts the few seconds the
load takes, well inside Kafka's consumer session timeouts, so no rebalance follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Process:
    """One subprocess in a new session (its own process group), stdout and stderr into ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def _signal_group(self, signum: int) -> None:
        # start_new_session made the child a group leader: its pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def freeze(self) -> None:
        if self.running():
            self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running():
            self._signal_group(signal.SIGCONT)

    def wait(self, timeout: float) -> int | None:
        """Wait for the process to exit; its return code, or None when it is still running."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (after SIGCONT, in case it was frozen), then SIGKILL if it is still there after ``timeout``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGTERM)
            if self.wait(timeout) is None:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Processes:
    """Every subprocess the harness started; ``stop_all`` (also on exit of the ``with`` block) stops them in
    reverse order of start, so nothing outlives the benchmark, whatever failed."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self._started: list[Process] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.cwd / f"{name}.log"
        process = Process(name, argv, {**self.env, **(env or {})}, self.cwd, log_path)
        self._started.append(process)
        return process.start()

    def stop(self, *processes: Process) -> None:
        for process in processes:
            process.stop()
            if process in self._started:
                self._started.remove(process)

    def pids(self) -> dict[str, int]:
        """Pids of the processes started and not yet stopped, by name."""
        return {process.name: process.pid for process in self._started if process.running()}

    def stop_named(self, *names: str) -> None:
        self.stop(*[process for process in self._started if process.name in names])

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


# --- where the cores went -------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads), from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


class CpuMeter:
    """Cores used per named process, and by the rest of the machine, over a phase. A background task samples
    every ``interval_s`` so processes that start or exit during the phase are counted up to their last sample
    (the sampling reads a few /proc files: nothing next to what it measures)."""

    def __init__(self, pids: Callable[[], dict[str, int]], interval_s: float = 0.5) -> None:
        self._pids = pids
        self._interval_s = interval_s
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._started = 0.0
        self._machine_start = (0.0, 0.0)
        self._baseline_names: set[str] = set()
        self.result: dict[str, Any] = {}

    def _sample(self) -> None:
        for name, pid in self._pids().items():
            cpu = process_cpu_s(pid)
            if cpu is not None:
                self._first.setdefault(name, cpu if name in self._baseline_names else 0.0)
                self._last[name] = cpu

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self._sample()

    async def __aenter__(self) -> CpuMeter:
        self._started = time.monotonic()
        self._machine_start = machine_cpu_s()
        # processes already running count from now; ones started later from their start (their CPU so far)
        self._baseline_names = set(self._pids())
        self._sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sample()
        wall_s = max(time.monotonic() - self._started, 1e-3)
        busy_end, total_end = machine_cpu_s()
        busy_s, total_s = busy_end - self._machine_start[0], total_end - self._machine_start[1]
        per_process = {name: round((self._last[name] - self._first[name]) / wall_s, 2) for name in self._last}
        busy_cores = busy_s / wall_s
        self.result = {
            "wall_s": round(wall_s, 2),
            "cores": round(total_s / wall_s, 2),
            "busy_cores": round(busy_cores, 2),
            "per_process_cores": per_process,
            "other_cores": round(max(busy_cores - sum(per_process.values()), 0.0), 2),
        }
