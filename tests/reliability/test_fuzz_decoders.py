"""Fuzz the fast path's request decoders, compiled and pure-Python, with arbitrary bytes (atheris/libFuzzer when
installed, a seeded mutator otherwise), in a subprocess: a segfault fails this test with the input that caused
it instead of killing pytest. Neither twin may crash or raise, and both must agree on every column, error,
detail and span (fuzz_decoders.py)."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Tally

REPO_ROOT = Path(__file__).resolve().parents[2]


def fuzz(seconds: float, out: Path) -> str:
    if importlib.util.find_spec("streamscore.fastpath._fast") is None:
        pytest.skip("the compiled fast path is not built")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_decoders", "--seconds", str(seconds),
                          "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=seconds + 120)
    if run.returncode == 0:
        return run.stdout + run.stderr
    crashes = sorted(out.glob("crash-*")) or sorted(out.glob("last-input"))
    inputs = "\n".join(f"{path.name}: {path.read_bytes().hex()} (base64 {base64.b64encode(path.read_bytes()).decode()})"
                       for path in crashes)
    how = f"killed by signal {-run.returncode}" if run.returncode < 0 else f"exit code {run.returncode}"
    pytest.fail(f"a decoder failed on fuzzed input ({how}); inputs (split into messages by "
                f"tests.reliability.fuzz_decoders.split):\n{inputs or '(none saved)'}\n"
                f"output:\n{(run.stdout + run.stderr)[-6000:]}", pytrace=False)


@pytest.mark.timeout(180)
def test_decoders_survive_fuzzed_bytes(tmp_path: Path) -> None:
    fuzz(8, tmp_path)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_decoders_survive_fuzzed_bytes(tmp_path: Path, soak_report: Callable[[Tally], None]) -> None:
    output = fuzz(300, tmp_path)

    runs = re.search(r"stat::number_of_executed_units: (\d+)|random fuzzing: (\d+) inputs", output)
    assert runs, output[-2000:]
    inputs = int(runs.group(1) or runs.group(2))
    engine = "atheris (libFuzzer)" if runs.group(1) else "seeded random mutator"
    # a row of its own kind: every input decoded by both twins; "lost" would be an input that crashed one
    soak_report(Tally("decoder_fuzz", sent=inputs, answered=inputs, duplicated=0, lost=0, dead_lettered=0,
                      seconds=300, notes={"engine": engine, "crashes": 0, "twin_disagreements": 0}))
