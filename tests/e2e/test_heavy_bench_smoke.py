"""`python -m streamscore_bench.heavy_model --quick --e2e`: a worker serving the (stand-in) heavy model drains a
small backlog through the real stack, and the report has its requests/s and the ratio to the runtime alone.
Only that it runs is checked (no timing): the figures come from `make bench`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamscore_bench import heavy_model

pytestmark = pytest.mark.benchsmoke


@pytest.mark.timeout(300)
def test_quick_run_through_a_worker_reports_the_ratio(tmp_path: Path) -> None:
    assert heavy_model.main(["--quick", "--e2e", "--requests", "1024", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "heavy_model.json").read_text())
    [run] = report["end_to_end"]
    assert run["config"] == "cpu 1 thread" and run["answered"] == run["requests"] == 1024
    assert run["served"]["name"] == "fraud" and run["served"]["sha256"] == report["models"]["fraud-deep"]["sha256"]
    assert run["ratio"] == pytest.approx(run["eps"] / run["runtime_rows_per_s"], abs=1e-3)
    assert "| cpu 1 thread |" in (tmp_path / "heavy_model.md").read_text()
