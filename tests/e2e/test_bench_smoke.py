"""`streamscore bench --smoke`: runs end to end against the real local stack and writes its three files.

Only that it runs and what it writes are checked: no timing is asserted (a shared 2-core machine makes any
figure noise), the full benchmark is `make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchsmoke

KEYS = {"raw_aiokafka_eps", "faust_per_event_eps", "streamscore_eps", "streamscore_eps_2_workers", "latency_ms",
        "streamscore_eps_batch32", "raw_aiokafka_eps_batch32", "targets", "machine", "smoke"}


@pytest.mark.timeout(300)
def test_smoke_run_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "results"
    completed = subprocess.run([sys.executable, "-m", "streamscore", "bench", "--smoke", "--out", str(out)],
                               capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert completed.returncode == 0, f"bench --smoke failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"

    for name in ("e2e.json", "e2e.md", "e2e.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "e2e.json").read_text())
    assert set(results) >= KEYS, KEYS - set(results)
    assert results["smoke"] is True
    assert set(results["latency_ms"]) and all({"p50", "p95", "p99"} <= set(entry)
                                              for entry in results["latency_ms"].values())
    assert (out / "e2e.png").read_bytes().startswith(b"\x89PNG")
    fixed = results["latency_ms_fixed_rates"]["100/s"]  # the per-hop split of a fixed-rate run
    assert set(fixed["hops_ms"]) == {"client->broker", "client->worker", "in worker", "worker->broker",
                                     "broker->client"}
    assert all(hop["p50"] >= 0 for hop in fixed["hops_ms"].values())
    assert results["closed_loop_ms"]["requests"] > 0 and results["closed_loop_ms"]["p99"] > 0
