"""The benchmark's pieces that need no servers: the workload's 95/5 split, the latency join, the targets and
the files the report writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from streamscore_bench import loadgen
from streamscore_bench.harness import _latency_entry, make_plan
from streamscore_bench.processes import machine_cpu_s, process_cpu_s
from streamscore_bench.report import evaluate_targets, write_report
from streamscore_bench.workload import COLD_EVERY, ColdIds, Workload, cold_count, partition_of, request_index


@pytest.fixture(scope="module")
def workload() -> Workload:
    return Workload(pool_size=300)


def _cards(value: bytes) -> list[str]:
    decoded = msgpack.unpackb(value)
    return [request["entities"]["card_id"] for request in (decoded if isinstance(decoded, list) else [decoded])]


def test_one_request_in_twenty_is_cold_and_each_cold_number_is_used_once(workload: Workload) -> None:
    messages = workload.messages("max1", 400, 1, cold_base=7)
    cards = [card for _, value in messages for card in _cards(value)]
    cold = [card for card in cards if card.startswith("card-cold-")]
    assert len(cold) == cold_count(400) == 400 // COLD_EVERY
    assert cold == [f"card-cold-{number}" for number in range(7, 7 + len(cold))]
    assert set(cards) - set(cold) <= set(workload.hot_entities()["card_stats"])


def test_batch_messages_carry_32_requests_keyed_by_the_first_card(workload: Workload) -> None:
    messages = workload.messages("max32", 96, 32, cold_base=0)
    assert len(messages) == 3
    for key, value in messages:
        requests = msgpack.unpackb(value)
        assert len(requests) == 32 and key.decode() == requests[0]["entities"]["card_id"]
    ids = [request["id"] for _, value in messages for request in msgpack.unpackb(value)]
    assert [request_index(request_id) for request_id in ids] == list(range(96))
    assert all(0 <= partition_of(key, 4) < 4 for key, _ in messages)


def test_cold_numbers_are_never_handed_out_twice() -> None:
    cold = ColdIds()
    first, second = cold.take(1000), cold.take(20)
    assert second >= first + cold_count(1000)
    assert cold.next >= second + cold_count(20)


def test_latency_entry_joins_send_and_arrival_times(tmp_path: Path) -> None:
    sent = np.arange(1, 1001, dtype=np.int64) * 1000  # one request per ms
    arrived = sent + 5_000  # 5 ms each
    arrived[-10:] = 0  # ten never answered
    np.save(tmp_path / loadgen.SENT_FILE, sent)
    np.save(tmp_path / loadgen.ARRIVED_FILE, arrived)
    (tmp_path / loadgen.PRODUCER_FILE).write_text(json.dumps({"most_behind_schedule_ms": 0.5,
                                                              "send_duration_s": 1.0}))
    entry = _latency_entry(tmp_path, 0.7, 1000.0, 1)
    assert entry["answered"] == 990 and entry["requests"] == 1000
    assert entry["p50"] == pytest.approx(5.0, abs=0.01) and entry["p99"] == pytest.approx(5.0, abs=0.01)


def _results() -> dict:
    latency = {"offered_eps": 700.0, "achieved_eps": 690.0, "p50": 4.0, "p95": 9.0, "p99": 15.0, "answered": 10,
               "requests": 10}
    return {
        "smoke": True, "date": "2026-01-01T00:00:00+00:00", "machine": {"cpu_count": 2, "stack": {"kafka": "4.1"}},
        "raw_aiokafka_eps": 10_000.0, "faust_per_event_eps": 300.0, "streamscore_eps": 6_000.0,
        "streamscore_eps_2_workers": 9_000.0, "latency_ms": {"70%": latency},
        "runs": {"streamscore": {"max1": {"batch_size": 1, "requests": 10, "answered": 10, "span_s": 1.0,
                                          "eps": 6_000.0, "cpu": {}}}},
        "latency": [{"variant": "streamscore", "batch_size": 1, "fraction_of_max": 0.7, **latency,
                     "cpu": {"cores": 2.0, "busy_cores": 1.5, "other_cores": 0.1,
                             "per_process_cores": {"streamscore-1": 0.9, "producer-x": 0.3, "kafka": 0.2}}}],
    }


def test_targets_are_ratios_from_the_run() -> None:
    targets = evaluate_targets(_results())
    assert targets["streamscore_vs_raw"]["value"] == 0.6 and targets["streamscore_vs_raw"]["met"]
    assert targets["streamscore_vs_faust"]["value"] == 20.0 and targets["streamscore_vs_faust"]["met"]
    assert targets["p99_ms_at_70pct"]["value"] == 15.0 and targets["p99_ms_at_70pct"]["met"]
    assert targets["two_workers_vs_one"]["value"] == 1.5 and not targets["two_workers_vs_one"]["met"]
    missing = evaluate_targets({**_results(), "faust_per_event_eps": 0.0, "latency_ms": {}})
    assert missing["streamscore_vs_faust"]["value"] is None and not missing["streamscore_vs_faust"]["met"]
    assert missing["p99_ms_at_70pct"]["value"] is None and not missing["p99_ms_at_70pct"]["met"]


def test_report_writes_json_markdown_and_png(tmp_path: Path) -> None:
    paths = write_report(_results(), tmp_path)
    assert [path.name for path in paths] == ["e2e.json", "e2e.md", "e2e.png"]
    assert json.loads(paths[0].read_text())["targets"]["two_workers_vs_one"]["met"] is False
    assert "| c. streamscore worker | 1 | 10 | 10 | 1.00 | 6,000 |" in paths[1].read_text()
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_plans_keep_the_smoke_small_and_round_backlogs_to_whole_batches() -> None:
    smoke, full = make_plan(True), make_plan(False, requests=1000)
    assert smoke.smoke and smoke.requests <= 2048 and smoke.seconds <= 5 and len(smoke.rate_fractions) == 1
    assert full.requests % full.batch_size == 0 and full.rate_fractions == (0.5, 0.7, 0.9)


def test_cpu_readings_come_from_proc() -> None:
    busy, total = machine_cpu_s()
    assert 0 < busy <= total
    assert (process_cpu_s(os.getpid()) or 0) > 0


def test_the_hop_split_adds_up_to_the_end_to_end_time(tmp_path: Path) -> None:
    import numpy as np

    from streamscore_bench import loadgen
    from streamscore_bench.harness import hop_split

    sent_us = np.array([1_000_000, 1_010_000, 1_020_000, 0], dtype=np.int64)  # the last never answered
    arrived_us = np.array([1_009_000, 1_020_000, 1_031_000, 0], dtype=np.int64)
    # received_ms, sent_ms (the worker's), the prediction's append time: 2 + 3 + 1 ms, then to the client
    hops = np.array([[1_002, 1_005, 1_006], [1_012, 1_015, 1_016], [1_022, 1_026, 1_027], [0, 0, 0]])
    np.save(tmp_path / loadgen.HOPS_FILE, hops)
    np.save(tmp_path / loadgen.TO_BROKER_FILE, np.array([1_000, 1_500], dtype=np.int64))
    split = hop_split(tmp_path, sent_us, arrived_us)
    assert split["client->worker"]["p50"] == 2.0 and split["in worker"]["p50"] == 3.0
    assert split["worker->broker"]["p50"] == 1.0 and split["broker->client"]["p50"] == 4.0
    assert split["client->broker"]["p50"] == 1.25
    assert split["in worker"]["p99"] == pytest.approx(3.98)
