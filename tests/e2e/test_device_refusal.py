"""A worker asked for the GPU on a machine that cannot give it one refuses to start: a real ``streamscore worker``
process with ``STREAMSCORE_WORKER__DEVICE=cuda`` exits non-zero with one line naming what is missing and what to
install, no traceback, before it connects to anything (so it needs no stack)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamscore.workers import devices


@pytest.mark.skipif(not devices.cuda_check(), reason="CUDA is usable here: the worker would start on it")
def test_a_worker_asked_for_cuda_without_it_exits_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMSCORE_WORKER__DEVICE": "cuda", "STREAMSCORE_MODELS_DIR": str(tmp_path / "models"),
           "STREAMSCORE_VIEWS_FILE": str(tmp_path / "views.json"), "STREAMSCORE_DATA_DIR": str(tmp_path),
           "STREAMSCORE_KAFKA__BOOTSTRAP": "127.0.0.1:1"}
    completed = subprocess.run([sys.executable, "-m", "streamscore", "worker", "--model", "fraud"], env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1, completed.stderr
    output = (completed.stdout + completed.stderr).strip().splitlines()
    assert "Traceback" not in completed.stderr
    assert len(output) == 1, output
    line = output[0]
    assert line.startswith("Error: worker.device=cuda (STREAMSCORE_WORKER__DEVICE) needs a usable GPU, and this "
                           "machine lacks ")
    assert any(name in line for name in ("libcuda.so.1", "a GPU", "the CUDA provider")), line
    assert "pip install" in line
    assert not (tmp_path / "faust").exists(), "refused before the worker set anything up"
