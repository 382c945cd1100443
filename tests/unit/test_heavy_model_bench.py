"""`python -m streamscore_bench.heavy_model --quick`: both models on the CPU, its three files written (figures
not checked: a smoke run on a shared machine). The end-to-end part (``--e2e``) is the harness of
`streamscore bench`, smoke-tested in tests/e2e/test_bench_smoke.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamscore_bench import heavy_model

pytestmark = pytest.mark.benchsmoke


def test_quick_run_writes_both_models_rows_per_batch(tmp_path: Path) -> None:
    assert heavy_model.main(["--quick", "--out", str(tmp_path), "--name", "heavy"]) == 0
    report = json.loads((tmp_path / "heavy.json").read_text())
    rows = report["runtime_alone"]
    assert {row["model"] for row in rows} == {"fraud", "fraud-deep"}
    assert {row["provider"] for row in rows} == {"CPUExecutionProvider"}
    assert all(set(row["rows_per_s"]) == {"256", "1024", "4096"} for row in rows)
    assert report["weights"]["fraud-deep"] == 64 * 14 + 64 + 64 * 64 + 64 + 64 * 2 + 2
    assert "| fraud-deep |" in (tmp_path / "heavy.md").read_text()
    assert (tmp_path / "heavy.png").read_bytes().startswith(b"\x89PNG")


def test_cuda_asked_for_without_it_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from streamscore.workers import devices

    monkeypatch.setattr(devices, "cuda_check", lambda: (devices.Missing("cuDNN 9 (libcudnn.so.9)", "x"),))
    assert heavy_model.main(["--quick", "--devices", "cpu,cuda", "--out", str(tmp_path)]) == 1
    assert "lacks cuDNN 9 (libcudnn.so.9): x." in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
