"""A smoke run of every Makefile target, so a recipe that no longer resolves (a moved module, a build-only
dependency imported at run time) fails here and not in someone's fresh clone.

Every target is dry-run (``make -n``) and each command it would run is resolved: the program exists, a
``streamscore`` subcommand or ``python -m`` module answers ``--help``, a pytest selection collects, the paths
given to a linter exist, a script parses. The cheap ones also run for real: ``make bench-fastpath`` (``--quick``,
into a temporary folder) and ``streamscore stack status``. ``make test``, ``make soak``, ``make demo`` and
``make bench`` take minutes and are only dry-run here (``streamscore bench --smoke`` has its own test,
tests/e2e/test_bench_smoke.py); ``stack-up``/``stack-down`` are never run: the stack is shared.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
TARGETS = ["bootstrap", "demo", "demo-lifecycle", "demo-drift", "test", "lint", "lint-chart", "stack-up",
           "stack-down", "bench-fastpath", "bench", "soak", "soak-cluster"]
"""Every target of the Makefile; a new one must be added here (and so get its smoke run)."""

needs_venv = pytest.mark.skipif(not (VENV_BIN / "python").is_file(),
                                reason="the Makefile runs from .venv, which scripts/bootstrap creates")


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _failure(completed: subprocess.CompletedProcess[str]) -> str:
    return f"{shlex.join(completed.args)} exited {completed.returncode}:\n{completed.stdout[-3000:]}\n" \
           f"{completed.stderr[-3000:]}"


def _dry_run(target: str, *variables: str) -> list[list[str]]:
    completed = _run(["make", "--no-print-directory", "-n", target, *variables])
    assert completed.returncode == 0, _failure(completed)
    return [shlex.split(line) for line in completed.stdout.splitlines() if line.strip()]


def test_every_target_is_listed_here_and_phony() -> None:
    text = (REPO / "Makefile").read_text()
    defined = re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, flags=re.MULTILINE)
    phony = re.search(r"^\.PHONY:(.*)$", text, flags=re.MULTILINE)

    assert sorted(defined) == sorted(TARGETS), "a target without its smoke run here (or a stale one)"
    assert phony is not None and sorted(phony.group(1).split()) == sorted(TARGETS)


def _check_command(argv: list[str]) -> None:
    """The command ``make`` would run resolves; each tool gets the cheapest check that proves it."""
    program = REPO / argv[0] if "/" in argv[0] else Path(shutil.which(argv[0]) or argv[0])
    assert program.is_file() and os.access(program, os.X_OK), f"{argv[0]}: no such program"
    name, args = program.name, argv[1:]
    if program.parent == REPO / "scripts":
        completed = _run(["bash", "-n", str(program)])
    elif name == "streamscore":
        subcommand = list(itertools.takewhile(lambda arg: not arg.startswith("-"), args))
        completed = _run([str(program), *subcommand, "--help"])
    elif name == "python" and args[:1] == ["-m"]:
        completed = _run([str(program), "-m", args[1], "--help"])
    elif name == "pytest":
        completed = _run([str(program), "--collect-only", "-q", *args], timeout=300)
    elif name == "mypy":
        missing = [arg for arg in args if not arg.startswith("-") and not (REPO / arg).exists()]
        assert not missing, f"mypy is given paths that do not exist: {missing}"
        return
    elif name == "ruff":
        completed = _run([str(program), *args[:1], "--help"])
    elif name == "hadolint":
        missing = [arg for arg in args if not arg.startswith("-") and not (REPO / arg).exists()]
        assert not missing, f"hadolint is given files that do not exist: {missing}"
        completed = _run([str(program), "--version"])
    else:
        pytest.fail(f"no smoke check for {shlex.join(argv)}: add one to {Path(__file__).name}")
    assert completed.returncode == 0, _failure(completed)


@needs_venv
@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", TARGETS)
def test_dry_run_resolves(target: str) -> None:
    commands = _dry_run(target)

    assert commands, f"make -n {target} runs nothing"
    for argv in commands:
        _check_command(argv)


def test_bench_targets_pass_args_through() -> None:
    for target in ("bench", "bench-fastpath"):
        assert _dry_run(target, "ARGS=--out /tmp/x")[-1][-2:] == ["--out", "/tmp/x"], target


@needs_venv
@pytest.mark.timeout(300)
def test_bench_fastpath_runs_quick_into_a_temporary_folder(tmp_path: Path) -> None:
    """The real recipe (bootstrap taken as done: it may reinstall), seconds long, writing outside bench/results."""
    results = REPO / "bench" / "results"
    before = {path.name: path.stat().st_mtime_ns for path in results.glob("fastpath.*")}

    completed = _run(["make", "--no-print-directory", "-o", "bootstrap", "bench-fastpath",
                      f"ARGS=--quick --out {tmp_path}"], timeout=280)

    assert completed.returncode == 0, _failure(completed)
    report = json.loads((tmp_path / "fastpath.json").read_text())
    assert report["quick"] is True and report["table"]
    assert isinstance(report["machine"]["cython"], str)  # a version or "not installed": never an import
    assert (tmp_path / "fastpath.md").read_text().startswith("# Fast path micro-benchmark")
    assert {path.name: path.stat().st_mtime_ns for path in results.glob("fastpath.*")} == before


@needs_venv
@pytest.mark.timeout(120)
def test_stack_status_answers_in_lines_without_a_traceback(tmp_path: Path) -> None:
    """From any directory: up (0) or down (1), one line per server of this checkout's stack."""
    completed = subprocess.run([str(VENV_BIN / "streamscore"), "stack", "status"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=100)

    assert completed.returncode in (0, 1), _failure(completed)
    assert "Traceback" not in completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["kafka", "cassandra", "redis"], completed.stdout
    assert all(str(REPO / ".stack") in line for line in lines), "the stack dir is the checkout's, not the cwd's"
