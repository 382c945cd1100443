"""The benchmark's files: ``e2e.json`` (every figure, the targets as ratios from this run, the machine),
``e2e.md`` (short tables) and ``e2e.png`` (throughput achieved and latency percentiles against offered rate)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

JSON_FILE = "e2e.json"
MARKDOWN_FILE = "e2e.md"
PLOT_FILE = "e2e.png"

Results = dict[str, Any]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def _p99_at_70(results: Results) -> float | None:
    entry = results.get("latency_ms", {}).get("70%")
    return None if entry is None else entry.get("p99")


def _fixed_p99(label: str) -> Callable[[Results], float | None]:
    def measure(results: Results) -> float | None:
        entry = results.get("latency_ms_fixed_rates", {}).get(label)
        return None if entry is None else entry.get("p99")
    return measure


def _p99_over_floor_at_50(results: Results) -> float | None:
    ours = results.get("latency_ms", {}).get("50%", {}).get("p99")
    floor = results.get("latency_ms_raw_floor", {}).get("50%", {}).get("p99")
    return _ratio(ours, floor)


TARGETS: list[tuple[str, str, Callable[[Results], float | None], str, float]] = [
    ("closed_loop_p99_ms", "c's p99 at most 10 ms closed loop (one request at a time)",
     lambda r: (r.get("closed_loop_ms") or {}).get("p99"), "<=", 10.0),
    ("p99_ms_at_1k", "c's p99 at most 20 ms at 1,000 requests/s", _fixed_p99("1000/s"), "<=", 20.0),
    ("p99_ms_at_5k", "c's p99 at most 40 ms at 5,000 requests/s", _fixed_p99("5000/s"), "<=", 40.0),
    ("p99_vs_floor_at_50pct", "c's p99 at 50% of its maximum at most 2x the floor (a) at the same rate",
     _p99_over_floor_at_50, "<=", 2.0),
    ("streamscore_vs_raw", "c (streamscore) at least 50% of a's (raw aiokafka) events/s",
     lambda r: _ratio(r["streamscore_eps"], r["raw_aiokafka_eps"]), ">=", 0.5),
    ("streamscore_vs_faust", "c at least 15x b (per-event Faust)",
     lambda r: _ratio(r["streamscore_eps"], r["faust_per_event_eps"]), ">=", 15.0),
    ("p99_ms_at_70pct", "c's p99 latency at most 20 ms at 70% of its maximum", _p99_at_70, "<=", 20.0),
    ("two_workers_vs_one", "two worker processes at least 1.6x one (4 partitions)",
     lambda r: _ratio(r["streamscore_eps_2_workers"], r["streamscore_eps"]), ">=", 1.6),
]


def evaluate_targets(results: Results) -> dict[str, dict[str, Any]]:
    evaluated = {}
    for key, description, measure, op, target in TARGETS:
        value = measure(results)
        met = value is not None and (value >= target if op == ">=" else value <= target)
        evaluated[key] = {"description": description, "value": None if value is None else round(value, 3),
                          "op": op, "target": target, "met": met}
    return evaluated


def write_report(results: Results, out_dir: Path) -> list[Path]:
    """Add the targets to ``results`` and write the three files; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    paths = [out_dir / JSON_FILE, out_dir / MARKDOWN_FILE, out_dir / PLOT_FILE]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths


# --- markdown -------------------------------------------------------------------------------------------------

def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


VARIANT_LABELS = {
    "raw_aiokafka": "a. raw aiokafka passthrough",
    "faust_per_event": "b. per-event Faust agent",
    "streamscore": "c. streamscore worker",
    "streamscore_2_workers": "c. streamscore worker, 2 processes",
}


def _throughput_rows(results: Results) -> list[str]:
    rows = []
    for variant, phases in results.get("runs", {}).items():
        for phase, run in phases.items():
            note = "too short to trust: rerun below" if phase.endswith("_short") else ""
            rows.append(f"| {VARIANT_LABELS.get(variant, variant)} | {run['batch_size']} | {run['requests']:,} | "
                        f"{run['answered']:,} | {run['span_s']:.2f} | {_number(run['eps'])} | {note} |")
    return rows


def _cpu_roles(cpu: dict[str, Any], variant: str) -> list[float | None]:
    """Cores of: the processes under test, the load generator, Kafka, Cassandra, Redis, the harness, the rest
    of the machine, idle."""
    if not cpu:
        return [None] * 8
    per_process = cpu.get("per_process_cores", {})

    def total(matches: Callable[[str], bool]) -> float:
        return sum(cores for name, cores in per_process.items() if matches(name))

    return [total(lambda name: name.startswith(f"{variant}-")),
            total(lambda name: name.startswith(("producer-", "subscriber-"))),
            per_process.get("kafka"), per_process.get("cassandra"), per_process.get("redis"),
            per_process.get("harness"), cpu.get("other_cores"), max(cpu["cores"] - cpu["busy_cores"], 0.0)]


def _cpu_rows(results: Results) -> list[str]:
    runs = [(f"{VARIANT_LABELS.get(variant, variant)}: drain, {run['batch_size']}/message", variant, run["cpu"])
            for variant, phases in results.get("runs", {}).items()
            for phase, run in phases.items() if not phase.endswith("_short") and run.get("cpu")]
    runs += [(f"{VARIANT_LABELS.get(entry['variant'], entry['variant'])}: open loop at {_number(entry['offered_eps'])}"
              f"/s, {entry['batch_size']}/message", entry["variant"], entry["cpu"])
             for entry in results.get("latency", []) if entry.get("cpu")]
    return [f"| {label} | " + " | ".join(_number(value, 2) for value in _cpu_roles(cpu, variant)) + " |"
            for label, variant, cpu in runs]


def _latency_rows(results: Results) -> list[str]:
    return [f"| {VARIANT_LABELS.get(entry['variant'], entry['variant'])} | {entry['batch_size']} | "
            f"{entry['fraction_of_max']:.0%} | {_number(entry['offered_eps'])} | "
            f"{_number(entry['achieved_eps'])} | {_number(entry['p50'], 2)} | {_number(entry['p95'], 2)} | "
            f"{_number(entry['p99'], 2)} | {entry['answered']:,}/{entry['requests']:,} |"
            for entry in results.get("latency", [])]


def _fixed_rows(results: Results) -> list[str]:
    from .harness import HOPS

    rows = []
    for entry in sorted((e for e in results.get("latency", []) if str(e.get("phase", "")).startswith("rate")
                         or e.get("fixed")), key=lambda e: e["offered_eps"]):
        hops = entry.get("hops_ms") or {}
        cells = [f"{_number(hops[h]['p50'], 1)} / {_number(hops[h]['p99'], 1)}" if h in hops else "-" for h in HOPS]
        behind = " (generator behind)" if entry.get("generator_behind") else ""
        rows.append(f"| {_number(entry['offered_eps'])}{behind} | {_number(entry['achieved_eps'])} | "
                    f"{_number(entry['p50'], 2)} | {_number(entry['p99'], 2)} | {_number(entry['max'], 1)} | "
                    + " | ".join(cells) + " |")
    return rows


def markdown(results: Results) -> str:
    machine = results.get("machine", {})
    stack = ", ".join(f"{name} {version}" for name, version in machine.get("stack", {}).items())
    lines = [
        "# streamscore end-to-end benchmark",
        "",
        f"{results.get('date', '')}: {machine.get('cpu_count')} cores ({machine.get('cpu_model')}), "
        f"Python {machine.get('python')}, {stack}; code {machine.get('code_version')} "
        f"(fast path {machine.get('fastpath')}). Fraud model, 95% of feature lookups Redis hits, 5% Cassandra.",
    ]
    for variant, cache in results.get("cache", {}).items():
        if cache.get("worker_cache_misses") is not None:
            lines += ["", f"{VARIANT_LABELS.get(variant, variant)}: the worker counted {cache['worker_cache_hits']:,} "
                          f"cache hits and {cache['worker_cache_misses']:,} misses (distinct entities per batch); "
                          f"{cache['cold_lookups_sent']:,} cold lookups were sent, each a miss by construction."]
    if results.get("smoke"):
        lines += ["", "**Smoke run**: seconds long, tiny backlogs; the numbers say nothing about performance."]
    lines += [
        "",
        "## Max throughput (a backlog drained; requests/s from the predictions' Kafka timestamps)",
        "",
        "| variant | requests/message | requests | answered | drain s | requests/s | |",
        "|---|---:|---:|---:|---:|---:|---|",
        *_throughput_rows(results),
        "",
        "## Latency (open-loop producer at fractions of c's maximum; request sent_ms to prediction arrival at a "
        "subscriber)",
        "",
        "a's rows are the floor: the same producer, subscriber and Kafka hops with no features and no model.",
        "",
        "| through | requests/message | offered (of c's max) | offered/s | achieved/s | p50 ms | p95 ms | p99 ms | "
        "answered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_latency_rows(results),
        "",
        "## Latency at fixed rates, by hop (c, one request per message; p50 / p99 ms of each hop)",
        "",
        "client->broker: the request's send stamp to the broker's append time (per producer batch); "
        "client->worker: to the worker's received_ms (client->broker + broker->worker); in worker: received_ms "
        "to sent_ms; worker->broker: to the prediction's append time; broker->client: to the subscriber's "
        "arrival. Closed loop (one request at a time, `predict`): "
        f"p50 {_number((results.get('closed_loop_ms') or {}).get('p50'), 2)} ms, "
        f"p99 {_number((results.get('closed_loop_ms') or {}).get('p99'), 2)} ms.",
        "",
        "| offered/s | achieved/s | p50 ms | p99 ms | max ms | client->broker | client->worker | in worker | "
        "worker->broker | broker->client |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_fixed_rows(results),
        "",
        "## Where the cores went (cores used on average over each run)",
        "",
        "| run | under test | load generator | Kafka | Cassandra | Redis | harness | rest of the machine | idle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_cpu_rows(results),
        "",
        "## Targets (ratios from this run)",
        "",
        "| target | value | goal | met |",
        "|---|---:|---:|---|",
        *[f"| {target['description']} | {_number(target['value'], 2)} | {target['op']} {target['target']:g} | "
          f"{'yes' if target['met'] else '**no**'} |" for target in results.get("targets", {}).values()],
        "",
    ]
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------------------------

def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(variant: str) -> list[dict[str, Any]]:
        return sorted((entry for entry in results.get("latency", [])
                       if entry["variant"] == variant and entry["batch_size"] == 1), key=lambda e: e["offered_eps"])

    entries, floor = series("streamscore"), series("raw_aiokafka")
    offered = [entry["offered_eps"] for entry in entries]
    figure, (left, right, hops_axes) = plt.subplots(1, 3, figsize=(18, 4.8))
    title = "streamscore end-to-end" + (" (smoke run: numbers meaningless)" if results.get("smoke") else "")
    figure.suptitle(f"{title}: {results.get('machine', {}).get('cpu_count')} cores, {results.get('date', '')}")

    achieved = [entry["achieved_eps"] for entry in entries]
    left.plot(offered, achieved, "o-", label="c achieved")
    if offered:
        left.plot([0, max(offered)], [0, max(offered)], ":", color="grey", label="achieved = offered")
    top = 1.15 * max([*offered, *achieved, results.get("streamscore_eps") or 0,
                      results.get("streamscore_eps_2_workers") or 0, 1.0])
    for key, label, style, color in (("streamscore_eps", "c. streamscore max", "-.", "C0"),
                                     ("streamscore_eps_2_workers", "c. 2 processes max", ":", "C2"),
                                     ("faust_per_event_eps", "b. per-event Faust max", "--", "C3"),
                                     ("raw_aiokafka_eps", "a. raw aiokafka max", "--", "C1")):
        value = results.get(key)
        if not value:
            continue
        if value <= top:
            left.axhline(value, linestyle=style, color=color, linewidth=1, label=f"{label} ({value:,.0f}/s)")
        else:  # a's ceiling can be many times c's: named, not drawn, so c's curve stays readable
            left.plot([], [], " ", label=f"{label} ({value:,.0f}/s, off the chart)")
    left.set(xlabel="offered requests/s", ylabel="requests/s", title="throughput", xlim=(0, None), ylim=(0, top))
    left.legend(fontsize=8)

    for name in ("p50", "p95", "p99"):
        points = [(entry["offered_eps"], entry[name]) for entry in entries if entry[name] is not None]
        right.plot([x for x, _ in points], [y for _, y in points], "o-", label=name)
    for name, marker in (("p50", "v"), ("p99", "^")):
        points = [(entry["offered_eps"], entry[name]) for entry in floor if entry[name] is not None]
        right.plot([x for x, _ in points], [y for _, y in points], marker, color="grey",
                   label=f"{name} floor (a: no features, no model)")
    right.axhline(20.0, color="red", linestyle="--", linewidth=1, label="p99 target (20 ms at 70%)")
    # log scale: the floor (tens of ms) and an overloaded worker (seconds) must both stay readable
    right.set(xlabel="offered requests/s", ylabel="ms (log scale)", title="c latency (sent to prediction received)",
              xlim=(0, None), yscale="log")
    right.legend(fontsize=8)

    from .harness import HOPS

    fixed = sorted((e for e in results.get("latency", []) if e.get("fixed") and e.get("hops_ms")),
                   key=lambda e: e["offered_eps"])
    labels = [f"{entry['offered_eps']:,.0f}/s" for entry in fixed]
    bottom = [0.0] * len(fixed)
    for hop in [h for h in HOPS if h != "client->worker"]:  # client->worker holds client->broker: not stacked
        heights = [entry["hops_ms"].get(hop, {}).get("p50", 0.0) for entry in fixed]
        if hop == "client->broker":  # then broker->worker: the rest of client->worker
            hop_heights = heights
        hops_axes.bar(labels, heights, bottom=bottom, label=f"{hop} p50")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        if hop == "client->broker":
            rest = [max(0.0, entry["hops_ms"].get("client->worker", {}).get("p50", 0.0) - first)
                    for entry, first in zip(fixed, hop_heights, strict=True)]
            hops_axes.bar(labels, rest, bottom=bottom, label="broker->worker p50")
            bottom = [b + h for b, h in zip(bottom, rest, strict=True)]
    hops_axes.set(xlabel="offered requests/s (fixed rates)", ylabel="ms", title="c: p50 by hop")
    if fixed:
        hops_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
