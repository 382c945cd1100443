"""On-demand HTTP latency of one worker (the Open Inference Protocol endpoint), beside Kafka at the same rates.

    python -m streamscore_bench.http_bench [--rates 250,500,1000,2000] [--seconds 8] [--out bench/results]

In one run, against one worker (4 request partitions, the default batch settings) and the local stack:

1. closed loop: ``wrk`` (Debian's package) with 1, 4, 16 and 64 connections, each sending its next request
   when the last is answered: the worker's capacity over HTTP and the latency at each concurrency;
2. open loop over HTTP: ``hey`` (Debian's package) at 1,000 requests/s (the target), 0.9 of the capacity
   measured in 1, and each rate of ``--rates`` up to 1.1 times that capacity: 25 hey processes started a
   fraction of a tick apart (one hey's connections tick together: alone it sends bursts), each connection
   paced at most 20 requests/s (``-c``, ``-q``), so a request is due about every 1/rate s whatever the answers
   do, as long as each answer comes within 50 ms (hey waits for a connection's answer before its next send:
   a slower worker shows as an achieved rate below the offered one, reported beside it);
3. open loop over Kafka at the same rates: the project's producer and subscriber processes (``loadgen.py``),
   latency from the request's send to its prediction's arrival.

HTTP and Kafka send the same one-row requests: the demo's transactions against its cards and merchants, all
in the cache (the HTTP rows cycle through 2,000 request bodies; hey sends one). Writes ``http.json``,
``http.md`` and ``http.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from streamscore.featurestore.views import load_views
from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import ensure_topics
from streamscore_examples.fraud.data import write_views
from streamscore_examples.fraud.model import build_and_register

from . import BenchFailed, loadgen
from .fastpath_bench import machine_info
from .harness import _latency_entry, _wait_exit, _wait_for_file
from .measure import wait_for_leaders, wait_ready
from .processes import Process, Processes, free_port, process_cpu_s, python_module
from .workload import BenchRows, Workload, warm_cache

MODEL = "fraud"
PARTITIONS = 4
CONNECTIONS = (1, 4, 16, 64)
BODIES = 2000
TARGET_RATE, TARGET_P99_MS = 1000.0, 20.0
PER_CONNECTION_RATE = 20.0
"""Most requests/s one hey connection is asked for in the open loop (50 ms between its sends)."""
HEY_PROCESSES = 25


def infer_body(request: dict[str, Any]) -> str:
    """One request as the protocol's input tensors (docs/http.md)."""
    inputs = [{"name": key, "datatype": "BYTES", "shape": [1], "data": [value]}
              for key, value in request["entities"].items()]
    inputs += [{"name": name, "datatype": "FP32", "shape": [1], "data": [value]}
               for name, value in request["features"].items()]
    return json.dumps({"inputs": inputs}, separators=(",", ":"))


def wrk_script(bodies: list[str], path: str) -> str:
    """A wrk script cycling through the bodies; its ``done`` prints the run's numbers as one JSON line."""
    quoted = ",\n".join(f"[==[{body}]==]" for body in bodies)
    return f"""local bodies = {{
{quoted}
}}
local counter = 0
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  counter = counter + 1
  return wrk.format("POST", "{path}", headers, bodies[(counter % #bodies) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format('RESULT {{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
"""


def closed_loop(url: str, script: Path, connections: int, seconds: float, worker: Process) -> dict[str, Any]:
    cpu_before = process_cpu_s(worker.pid) or 0.0
    completed = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d",
                                f"{seconds:g}s", "--timeout", "5s", "-s", str(script), url],
                               capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((line for line in completed.stdout.splitlines() if line.startswith("RESULT ")), None)
    if completed.returncode != 0 or line is None:
        raise BenchFailed(f"wrk failed ({completed.returncode}): {completed.stdout[-2000:]} {completed.stderr[-2000:]}")
    result = json.loads(line[len("RESULT "):])
    duration_s = result["duration_us"] / 1e6
    return {"connections": connections, "requests": result["requests"],
            "rps": round(result["requests"] / duration_s, 1),
            **{name: round(result[f"{name}_us"] / 1000, 2) for name in ("p50", "p90", "p99", "p999", "max")},
            "non_2xx": result["non_2xx"], "socket_errors": result["socket_errors"],
            "worker_cores": round(((process_cpu_s(worker.pid) or 0.0) - cpu_before) / duration_s, 2)}


def open_loop_http(url: str, body: Path, rate: float, seconds: float, worker: Process) -> dict[str, Any]:
    """``rate`` requests/s from HEY_PROCESSES hey processes started a fraction of a tick apart: one hey paces
    each of its connections by its own ticker, and those tick together, so a single hey at 1,000/s over 100
    connections sends bursts of 100 every 100 ms; staggered processes spread the sends over the tick."""
    connections = max(HEY_PROCESSES, math.ceil(rate / PER_CONNECTION_RATE))
    per_process = math.ceil(connections / HEY_PROCESSES)
    per_connection = rate / (per_process * HEY_PROCESSES)
    stagger = 1.0 / per_connection / HEY_PROCESSES
    cpu_before = process_cpu_s(worker.pid) or 0.0
    started = time.monotonic()
    heys = []
    for number in range(HEY_PROCESSES):
        heys.append(subprocess.Popen(["hey", "-z", f"{seconds:g}s", "-c", str(per_process), "-q",
                                      f"{per_connection:.4f}", "-m", "POST", "-T", "application/json", "-D",
                                      str(body), "-t", "5", "-o", "csv", url],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(max(0.0, started + (number + 1) * stagger - time.monotonic()))
    rows = []
    for hey in heys:
        out, err = hey.communicate(timeout=seconds + 60)
        if hey.returncode != 0:
            raise BenchFailed(f"hey failed ({hey.returncode}): {err[-2000:]}")
        rows += list(csv.DictReader(io.StringIO(out)))
    elapsed = time.monotonic() - started
    latencies_ms = np.array([float(row["response-time"]) * 1000 for row in rows])
    ok = sum(1 for row in rows if row["status-code"] == "200")
    return {"offered_rps": rate, "connections": per_process * HEY_PROCESSES, "requests": len(rows), "ok": ok,
            "achieved_rps": round(len(rows) / seconds, 1), **_percentiles_ms(latencies_ms),
            "worker_cores": round(((process_cpu_s(worker.pid) or 0.0) - cpu_before) / elapsed, 2)}


def _percentiles_ms(latencies_ms: np.ndarray) -> dict[str, float | None]:
    if not len(latencies_ms):
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None}
    values = np.percentile(latencies_ms, [50, 90, 99, 99.9])
    return {"p50": round(float(values[0]), 2), "p90": round(float(values[1]), 2), "p99": round(float(values[2]), 2),
            "p999": round(float(values[3]), 2), "max": round(float(latencies_ms.max()), 2)}


async def open_loop_kafka(processes: Processes, env: dict[str, str], settings: Settings, scratch: Path, rate: float,
                          seconds: float, worker: Process) -> dict[str, Any]:
    phase = f"k{round(rate)}"
    folder = scratch / phase
    folder.mkdir()
    requests = max(1, round(rate * seconds))
    predictions = topics.predictions(settings.topic_prefix, MODEL)
    subscriber = processes.start(f"subscriber-{phase}", python_module(
        "streamscore_bench.loadgen", "subscribe", "--topic", predictions, "--phase", phase, "--out", str(folder),
        "--expect", str(requests), "--timeout", str(seconds * 4 + 60), "--idle", "5"), env)
    cpu_before = process_cpu_s(worker.pid) or 0.0
    started = time.monotonic()
    try:
        await _wait_for_file(folder / loadgen.READY_FILE, [subscriber, worker], 60.0)
        producer = processes.start(f"producer-{phase}", python_module(
            "streamscore_bench.loadgen", "open-loop", "--topic", topics.requests(settings.topic_prefix, MODEL),
            "--phase", phase, "--out", str(folder), "--rate", f"{rate:.3f}", "--seconds", str(seconds),
            "--partitions", str(PARTITIONS), "--hot-only"), env)
        code = await _wait_exit(producer, [worker], seconds + 60)
        if code != 0:
            raise BenchFailed(f"the open-loop producer exited with {code}:\n{producer.log_tail()}")
        await _wait_exit(subscriber, [worker], seconds * 3 + 60)
    finally:
        processes.stop_named(f"producer-{phase}", f"subscriber-{phase}")
    elapsed = time.monotonic() - started
    entry = _latency_entry(folder, 0.0, rate, 1)
    return {"offered_rps": rate, "requests": entry["requests"], "ok": entry["answered"],
            "achieved_rps": entry["achieved_eps"], "p50": entry["p50"], "p90": None, "p99": entry["p99"],
            "p999": entry["p999"], "max": entry["max"], "producer_behind_ms": entry["producer_behind_ms"],
            "worker_cores": round(((process_cpu_s(worker.pid) or 0.0) - cpu_before) / elapsed, 2)}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _http_buckets(web_port: int) -> dict[float, float]:
    """The worker's own histogram of HTTP request time (arrival to answer), cumulative count per upper bound."""
    _, text = _get(f"http://127.0.0.1:{web_port}/metrics")
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("streamscore_http_request_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def _in_worker(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """Upper bounds (ms) of the buckets holding the p50 and p99 of the requests answered between two reads."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts.get(math.inf, 0.0)

    def bound_at(share: float) -> float | None:
        bound = next((bound for bound, count in counts.items() if total and count >= share * total), None)
        return None if bound is None or bound == math.inf else round(bound * 1000, 2)

    return {"in_worker_p50_at_most": bound_at(0.5), "in_worker_p99_at_most": bound_at(0.99)}


def _source_counts(web_port: int) -> dict[str, float]:
    """Requests answered by source, from the worker's /metrics."""
    _, text = _get(f"http://127.0.0.1:{web_port}/metrics")
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("streamscore_answered_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            counts[source] = counts.get(source, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            raise BenchFailed(f"{tool} is not installed: `apt-get install wrk hey` (Debian packages)")
    scratch = Path(tempfile.mkdtemp(prefix="http-bench-"))
    base = Settings()
    settings = base.model_copy(update={
        "topic_prefix": f"httpbench-{uuid.uuid4().hex[:6]}", "models_dir": scratch / "models",
        "views_file": scratch / "views.json", "data_dir": scratch,
        "cassandra": base.cassandra.model_copy(update={"keyspace": f"{base.cassandra.keyspace}_bench"}),
        "redis": base.redis.model_copy(update={"cache_ttl_s": 1800})})
    write_views(settings.views_file)
    views = load_views(settings.views_file)
    build_and_register(settings.models_dir, n_train=4000, max_iter=60)
    workload = Workload(hot_only=True)
    rows = BenchRows(settings, views, workload.rows)
    await rows.open()
    try:
        await rows.ensure_hot()
    finally:
        await rows.close()
    http_port, web_port = free_port(), free_port()
    env = {"STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix, "STREAMSCORE_MODELS_DIR": str(settings.models_dir),
           "STREAMSCORE_VIEWS_FILE": str(settings.views_file), "STREAMSCORE_DATA_DIR": str(scratch),
           "STREAMSCORE_CASSANDRA__KEYSPACE": settings.cassandra.keyspace,
           "STREAMSCORE_WORKER__PARTITIONS": str(PARTITIONS), "STREAMSCORE_WORKER__WEB_PORT": str(web_port),
           "STREAMSCORE_HTTP__PORT": str(http_port), "PYTHONUNBUFFERED": "1"}
    names = [topics.requests(settings.topic_prefix, MODEL), topics.predictions(settings.topic_prefix, MODEL),
             topics.dead_letters(settings.topic_prefix, MODEL)]
    await ensure_topics(settings, names, partitions=PARTITIONS)
    await wait_for_leaders(settings, names)
    await warm_cache(settings, views, workload.hot_entities())
    requests = [workload.request("http", index, 0, 0) for index in range(BODIES)]
    bodies = [infer_body(request) for request in requests]
    path = f"/v2/models/{MODEL}/infer"
    url = f"http://127.0.0.1:{http_port}{path}"
    script, body = scratch / "infer.lua", scratch / "body.json"
    script.write_text(wrk_script(bodies, path))
    body.write_text(bodies[0])
    results: dict[str, Any] = {"machine": machine_info(()), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "seconds_per_phase": args.seconds, "closed_loop": [], "open_loop": []}
    with Processes(scratch, {**os.environ}) as processes:
        worker = processes.start("worker", python_module("streamscore", "worker", "--model", MODEL), env)
        await wait_ready(settings, topics.requests(settings.topic_prefix, MODEL),
                         topics.predictions(settings.topic_prefix, MODEL), [worker], PARTITIONS,
                         lambda request_id: {**workload.request("probe", 0, 0, int(time.time() * 1000)),
                                             "id": request_id})
        status, text = _get(f"http://127.0.0.1:{http_port}/v2/health/ready")
        if status != 200:
            raise BenchFailed(f"the worker's HTTP endpoint is not ready: {text}")
        closed_loop(url, script, 4, 3, worker)  # warm-up
        for connections in CONNECTIONS:
            entry = closed_loop(url, script, connections, args.seconds, worker)
            results["closed_loop"].append(entry)
            print(f"closed loop, {connections} connections: {entry['rps']:,.0f} requests/s, p50 {entry['p50']} ms, "
                  f"p99 {entry['p99']} ms", flush=True)
        capacity = max(entry["rps"] for entry in results["closed_loop"])
        # the target rate always; the others up to a little past the capacity, and 0.9 of it
        rates = sorted({TARGET_RATE, round(0.9 * capacity, -1)} | {rate for rate in args.rates
                                                                    if rate <= 1.1 * capacity})
        results["capacity_rps"] = capacity
        for rate in rates:
            before = _http_buckets(web_port)
            http = open_loop_http(url, body, rate, args.seconds, worker)
            http.update(_in_worker(before, _http_buckets(web_port)))
            kafka = await open_loop_kafka(processes, env, settings, scratch, rate, args.seconds, worker)
            results["open_loop"].append({"rate": rate, "http": http, "kafka": kafka})
            print(f"open loop at {rate:,.0f}/s: HTTP achieved {http['achieved_rps']:,.0f}/s p50 {http['p50']} ms "
                  f"p99 {http['p99']} ms; Kafka achieved {kafka['achieved_rps']:,.0f}/s p50 {kafka['p50']} ms "
                  f"p99 {kafka['p99']} ms", flush=True)
        results["answered_by_source"] = _source_counts(web_port)
    at_target = next((entry for entry in results["open_loop"] if entry["rate"] == TARGET_RATE), None)
    results["target"] = {"rate": TARGET_RATE, "p99_ms_at_most": TARGET_P99_MS,
                         "http_p99_ms": at_target["http"]["p99"] if at_target else None,
                         "met": bool(at_target and at_target["http"]["p99"] is not None
                                     and at_target["http"]["p99"] <= TARGET_P99_MS
                                     and at_target["http"]["achieved_rps"] >= 0.95 * TARGET_RATE)}
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    machine, target = results["machine"], results["target"]
    lines = [
        "# On-demand HTTP (Open Inference Protocol) against Kafka, one worker, one run", "",
        f"{results['date']}; {machine['cpu_count']} cores ({machine['cpu']}), load average at the start "
        f"{machine['load_average'][0]:.1f} (the machine is shared); {results['seconds_per_phase']:g} s per phase; "
        "one-row requests, features all cached. Latency: HTTP from send to answer (wrk, hey), Kafka from send "
        "to the prediction's arrival at a subscriber; 'in the worker' is the worker's own histogram of HTTP "
        "request time (arrival to answer; the upper bound of the bucket holding the p99).", "",
        "## Closed loop (wrk): each connection sends when answered", "",
        "| connections | requests/s | p50 ms | p99 ms | p99.9 ms | non-2xx | worker cores |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["closed_loop"]:
        lines.append(f"| {entry['connections']} | {entry['rps']:,.0f} | {entry['p50']} | {entry['p99']} | "
                     f"{entry['p999']} | {entry['non_2xx'] + entry['socket_errors']} | {entry['worker_cores']} |")
    lines += ["", f"Capacity over HTTP (best closed-loop rate): {results['capacity_rps']:,.0f} requests/s.", "",
              "## Open loop: the same rates over HTTP (hey) and Kafka (the project's producer)", "",
              "| offered/s | HTTP achieved/s | HTTP p50 ms | HTTP p99 ms | HTTP max ms | in the worker: p99 at most, "
              "ms | Kafka achieved/s | Kafka p50 ms | Kafka p99 ms | Kafka max ms |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in results["open_loop"]:
        http, kafka = entry["http"], entry["kafka"]
        lines.append(f"| {entry['rate']:,.0f} | {http['achieved_rps']:,.0f} | {http['p50']} | {http['p99']} | "
                     f"{http['max']} | {http['in_worker_p99_at_most']} | {kafka['achieved_rps']:,.0f} | "
                     f"{kafka['p50']} | {kafka['p99']} | {kafka['max']} |")
    verdict = "met" if target["met"] else "NOT met"
    lines += ["", f"Target: HTTP p99 at most {target['p99_ms_at_most']:g} ms at {target['rate']:,.0f} requests/s: "
              f"{verdict} (p99 {target['http_p99_ms']} ms).", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates = [entry["rate"] for entry in results["open_loop"]]
    for source, style in (("http", "-o"), ("kafka", "--s")):
        for percentile in ("p50", "p99"):
            left.plot(rates, [entry[source][percentile] for entry in results["open_loop"]], style,
                      label=f"{source.upper() if source == 'http' else 'Kafka'} {percentile}")
    left.axhline(TARGET_P99_MS, color="grey", linewidth=0.8, linestyle=":")
    left.set(xlabel="offered requests/s (open loop)", ylabel="latency, ms", yscale="log",
             title="Open loop: HTTP and Kafka at the same rates")
    left.legend()
    closed = results["closed_loop"]
    right.plot([entry["rps"] for entry in closed], [entry["p99"] for entry in closed], "-o", label="p99")
    right.plot([entry["rps"] for entry in closed], [entry["p50"] for entry in closed], "-o", label="p50")
    for entry in closed:
        right.annotate(f"{entry['connections']} conn", (entry["rps"], entry["p99"]), fontsize=8)
    right.set(xlabel="requests/s achieved", ylabel="latency, ms", yscale="log", title="Closed loop over HTTP (wrk)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamscore_bench.http_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=lambda text: [float(rate) for rate in text.split(",")],
                        default=[250.0, 500.0, 1000.0, 2000.0], help="open-loop rates, requests/s")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    try:
        results = asyncio.run(run(args))
    except BenchFailed as exc:
        print(f"http bench failed: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "http.md").write_text(markdown(results))
    plot(results, args.out / "http.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
