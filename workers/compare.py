"""Two versions of a model compared on the requests they both scored: the shadow records of ``<prefix>.<model>.shadow``.

A worker that scores a request in shadow publishes one msgpack record per request per shadow version (key: the
request id): ``{"id", "model", "version" (the shadow version), "answered_version" (the one that answered),
"outputs", "answered_outputs", "shadow_us", "batch_id", "sent_ms"}``. ``compare V1 V2`` takes the records whose
{answered_version, version} is {V1, V2}, in either direction, and sets each request's V1 outputs against its V2
outputs (Δ = V2 - V1).

Per output present in both maps of a record:

- numeric scalars (int or float, not a label): count, mean and max |Δ|, mean Δ, p50/p90/p99 of |Δ| (linear
  interpolation, numpy's default), Pearson correlation (None when either side is constant);
- labels (a str, an int 0/1, or an output named ``label`` or ``decision``): agreement share and the confusion
  counts ``confusion[v1 label][v2 label]``;
- anything else (lists, mixed types, non-finite numbers) is counted under ``skipped``.

And the mean ``shadow_us`` per shadow version. The statistics (``summarize``, ``paired``, ``table``) are pure;
``read_shadow`` reads the topic (every partition, from the beginning to the end offsets taken at the start)
and ``plot`` draws the scatter and the histogram (matplotlib, the Agg backend).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamscore.settings import Settings
from streamscore.streams import topics
from streamscore.streams.client import partitions_of
from streamscore.streams.kafka import client_kwargs

LABEL_OUTPUTS = frozenset({"label", "decision"})
"""Outputs that are labels whatever their type."""
QUANTILES = (0.5, 0.9, 0.99)
DEFAULT_MAX = 100_000
STALL_TIMEOUT_S = 15.0
"""Reading the topic: how long no message may arrive while a partition is short of its end offset."""


class CompareError(Exception):
    """A comparison that cannot be made (no shadow topic, no records of the pair): one line saying why."""


# --------------------------------------------------------------------------------------------- pure parts

def pair_of(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """(answered_version, version) of a record; None when it is not a shadow record."""
    answered, shadow = record.get("answered_version"), record.get("version")
    if not isinstance(answered, str) or not isinstance(shadow, str):
        return None
    return answered, shadow


def matches(record: Mapping[str, Any], v1: str, v2: str) -> bool:
    pair = pair_of(record)
    return pair is not None and set(pair) == {v1, v2} and v1 != v2


def _sides(record: Mapping[str, Any], v1: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(V1's outputs, V2's outputs) of a matching record."""
    outputs, answered = record.get("outputs") or {}, record.get("answered_outputs") or {}
    return (answered, outputs) if record.get("answered_version") == v1 else (outputs, answered)


def _is_label_value(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, bool | int) and value in (0, 1))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def kind_of(name: str, pairs: list[tuple[Any, Any]]) -> str:
    """'label', 'numeric' or 'skipped' for an output, from its name and every (v1, v2) value pair."""
    values = [value for pair in pairs for value in pair]
    if name in LABEL_OUTPUTS and all(isinstance(value, str | int) for value in values):
        return "label"
    if values and all(_is_label_value(value) for value in values):
        return "label"
    if values and all(_is_number(value) for value in values):
        return "numeric"
    return "skipped"


def _deduplicated(records: Iterable[Mapping[str, Any]], v1: str, v2: str) -> tuple[list[Mapping[str, Any]], int]:
    """The matching records, the first of each (id, version, answered_version) only; and the duplicates dropped
    (a worker's producer retry, or a batch scored again after a rebalance, writes a record twice)."""
    seen: set[tuple[Any, ...]] = set()
    kept: list[Mapping[str, Any]] = []
    duplicates = 0
    for record in records:
        if not matches(record, v1, v2):
            continue
        key = (record.get("id"), record.get("version"), record.get("answered_version"))
        if record.get("id") is not None and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(record)
    return kept, duplicates


def _output_pairs(records: list[Mapping[str, Any]], v1: str) -> dict[str, list[tuple[Any, Any]]]:
    """Every output present in both maps of a record: its (v1, v2) value pairs, outputs in first-seen order."""
    pairs: dict[str, list[tuple[Any, Any]]] = {}
    for record in records:
        first, second = _sides(record, v1)
        for name, value in first.items():
            if name in second:
                pairs.setdefault(name, []).append((value, second[name]))
    return pairs


def _numeric(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    x = np.array([float(a) for a, _ in pairs])
    y = np.array([float(b) for _, b in pairs])
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    diff = y - x
    absolute = np.abs(diff)
    summary: dict[str, Any] = {"kind": "numeric", "count": len(x), "non_finite": int((~finite).sum())}
    if not len(x):
        return {**summary, "mean_abs_diff": None, "max_abs_diff": None, "mean_diff": None,
                **{f"p{round(q * 100)}_abs_diff": None for q in QUANTILES}, "correlation": None}
    quantiles = np.quantile(absolute, QUANTILES)
    correlation = None
    if len(x) > 1 and np.std(x) > 0 and np.std(y) > 0:
        correlation = float(np.corrcoef(x, y)[0, 1])
    return {**summary, "mean_abs_diff": float(absolute.mean()), "max_abs_diff": float(absolute.max()),
            "mean_diff": float(diff.mean()),
            **{f"p{round(q * 100)}_abs_diff": float(value) for q, value in zip(QUANTILES, quantiles, strict=True)},
            "correlation": correlation}


def _label(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    confusion: dict[str, dict[str, int]] = {}
    agree = 0
    for a, b in pairs:
        row = confusion.setdefault(str(a), {})
        row[str(b)] = row.get(str(b), 0) + 1
        agree += str(a) == str(b)
    ordered = {a: dict(sorted(row.items())) for a, row in sorted(confusion.items())}
    return {"kind": "label", "count": len(pairs), "agreement": agree / len(pairs) if pairs else None,
            "disagree": len(pairs) - agree, "confusion": ordered}


def summarize(records: Iterable[Mapping[str, Any]], v1: str, v2: str) -> dict[str, Any]:
    """The comparison of ``v1`` and ``v2`` over the records of that pair (either direction; the others are
    ignored): per output its statistics (``outputs``, in first-seen order), the records per direction, the mean
    shadow_us per shadow version. Numbers only: JSON-ready."""
    kept, duplicates = _deduplicated(records, v1, v2)
    directions = Counter(f"answered v{record['answered_version']}, shadow v{record['version']}" for record in kept)
    outputs: dict[str, Any] = {}
    for name, pairs in _output_pairs(kept, v1).items():
        kind = kind_of(name, pairs)
        if kind == "numeric":
            outputs[name] = _numeric(pairs)
        elif kind == "label":
            outputs[name] = _label(pairs)
        else:
            outputs[name] = {"kind": "skipped", "count": len(pairs),
                             "why": "not a numeric scalar or a label (a list, or mixed types)"}
    shadow_us: dict[str, list[float]] = {}
    for record in kept:
        value: Any = record.get("shadow_us")
        if _is_number(value) and math.isfinite(value):
            shadow_us.setdefault(str(record["version"]), []).append(float(value))
    every = [value for values in shadow_us.values() for value in values]
    return {"v1": v1, "v2": v2, "records": len(kept), "duplicates": duplicates,
            "directions": dict(sorted(directions.items())),
            "mean_shadow_us": float(np.mean(every)) if every else None,
            "mean_shadow_us_by_version": {version: float(np.mean(values))
                                          for version, values in sorted(shadow_us.items())},
            "outputs": outputs}


def first_numeric(summary: Mapping[str, Any]) -> str | None:
    return next((name for name, stats in summary["outputs"].items() if stats["kind"] == "numeric"), None)


def paired(records: Iterable[Mapping[str, Any]], v1: str, v2: str, output: str) -> tuple[np.ndarray, np.ndarray]:
    """The finite (v1, v2) values of a numeric output, as two arrays (what the scatter draws)."""
    kept, _ = _deduplicated(records, v1, v2)
    pairs = [(a, b) for a, b in _output_pairs(kept, v1).get(output, []) if _is_number(a) and _is_number(b)]
    x = np.array([float(a) for a, _ in pairs], dtype=float)
    y = np.array([float(b) for _, b in pairs], dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    return x[finite], y[finite]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def table(summary: Mapping[str, Any]) -> str:
    """The comparison as aligned text: numeric outputs, then labels (with their confusion), then the rest."""
    v1, v2 = summary["v1"], summary["v2"]
    lines = []
    numeric = [(name, s) for name, s in summary["outputs"].items() if s["kind"] == "numeric"]
    labels = [(name, s) for name, s in summary["outputs"].items() if s["kind"] == "label"]
    skipped = [(name, s) for name, s in summary["outputs"].items() if s["kind"] == "skipped"]
    if numeric:
        header: tuple[str, ...] = ("output", "count", "mean|Δ|", "max|Δ|", "p50|Δ|", "p90|Δ|", "p99|Δ|", "corr")
        rows: list[tuple[str, ...]] = [(name, str(s["count"]), _fmt(s["mean_abs_diff"]), _fmt(s["max_abs_diff"]),
                 _fmt(s["p50_abs_diff"]), _fmt(s["p90_abs_diff"]), _fmt(s["p99_abs_diff"]), _fmt(s["correlation"]))
                for name, s in numeric]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines.append(f"numeric outputs (Δ = v{v2} - v{v1}):")
        for row in (header, *rows):
            lines.append("  " + "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                          for i, cell in enumerate(row)).rstrip())
    if labels:
        header = ("output", "count", "agreement", "disagree")
        rows = [(name, str(s["count"]), _fmt(s["agreement"]), str(s["disagree"])) for name, s in labels]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines.append("label outputs:")
        for row in (header, *rows):
            lines.append("  " + "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                          for i, cell in enumerate(row)).rstrip())
        for name, s in labels:
            columns = sorted({b for row in s["confusion"].values() for b in row})
            corner = f"v{v1} \\ v{v2}"
            width = max(len(corner), *(len(a) for a in s["confusion"]))
            cells = [max(len(c), *(len(str(row.get(c, 0))) for row in s["confusion"].values())) for c in columns]
            lines.append(f"confusion of {name} (rows v{v1}, columns v{v2}):")
            lines.append("  " + corner.ljust(width) + "".join("  " + c.rjust(w) for c, w in zip(columns, cells,
                                                                                                 strict=True)))
            for a, row in s["confusion"].items():
                lines.append("  " + a.ljust(width) + "".join("  " + str(row.get(c, 0)).rjust(w)
                                                            for c, w in zip(columns, cells, strict=True)))
    for name, s in skipped:
        lines.append(f"skipped {name}: {s['count']} pair(s), {s['why']}")
    by_version = summary["mean_shadow_us_by_version"]
    shadow = ", ".join(f"v{version} {_fmt(us, 1)}" for version, us in by_version.items()) or "-"
    lines.append(f"mean shadow_us: {_fmt(summary['mean_shadow_us'], 1)} (by shadow version: {shadow})")
    return "\n".join(lines) + "\n"


def plot(records: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], path: Path, model: str) -> str | None:
    """Scatter of v2 against v1 of the first numeric output and a histogram of its differences, to ``path``.
    Returns the output drawn (None: no numeric output; the figure then says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v1, v2 = summary["v1"], summary["v2"]
    output = first_numeric(summary)
    figure, (scatter, histogram) = plt.subplots(1, 2, figsize=(12, 5))
    if output is None:
        for axes in (scatter, histogram):
            axes.text(0.5, 0.5, "no numeric output in both versions", ha="center", va="center")
            axes.set_axis_off()
    else:
        x, y = paired(records, v1, v2, output)
        scatter.scatter(x, y, s=4, alpha=0.4, color="tab:blue")
        low = float(min(x.min(), y.min())) if len(x) else 0.0
        high = float(max(x.max(), y.max())) if len(x) else 1.0
        scatter.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        stats = summary["outputs"][output]
        scatter.set(xlabel=f"v{v1} {output}", ylabel=f"v{v2} {output}",
                    title=f"{model} shadow records ({len(x)} requests), corr {_fmt(stats['correlation'])}")
        histogram.hist(y - x, bins=50, color="tab:orange")
        histogram.set(xlabel=f"v{v2} - v{v1} {output}", ylabel="requests",
                      title=f"differences: mean |Δ| {_fmt(stats['mean_abs_diff'])}, "
                            f"p99 |Δ| {_fmt(stats['p99_abs_diff'])}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return output


# --------------------------------------------------------------------------------------------- the topic

@dataclass
class ShadowRead:
    """What ``read_shadow`` read: the records of the pair, and every pair seen with its count."""

    topic: str
    records: list[dict[str, Any]] = field(default_factory=list)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    scanned: int = 0
    unreadable: int = 0
    truncated: bool = False
    """True when --max stopped the read before the end offsets."""


def describe_pairs(pairs: Mapping[tuple[str, str], int]) -> str:
    """'answered 1, shadow 2: 300; answered 1, shadow 3: 12' (most first)."""
    return "; ".join(f"answered v{answered}, shadow v{shadow}: {count}"
                     for (answered, shadow), count in sorted(pairs.items(), key=lambda item: (-item[1], item[0])))


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        record = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several types (ExtraData, FormatError, ValueError...) for a bad value
        return None
    return record if isinstance(record, dict) else None


async def read_shadow(settings: Settings, model: str, v1: str, v2: str, max_records: int = DEFAULT_MAX,
                      ) -> ShadowRead:
    """The records of the pair {v1, v2} in ``<prefix>.<model>.shadow``, from the beginning of every partition to
    its end offset taken at the start, at most ``max_records`` of them. Raises ``CompareError`` when the topic
    does not exist, and ``TimeoutError`` when Kafka stops delivering short of the end."""
    topic = topics.shadow(settings.topic_prefix, model)
    numbers = await partitions_of(settings, topic)  # never creates the topic by asking about it
    if not numbers:
        raise CompareError(f"no shadow records for {model} (no topic {topic}): deploy a shadow with "
                           f"`streamscore models shadow {model} V` first")
    read = ShadowRead(topic=topic)
    partitions = [TopicPartition(topic, number) for number in numbers]
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > starts[tp]}
        for tp in partitions:
            consumer.seek(tp, starts[tp])
        loop = asyncio.get_running_loop()
        progress = loop.time()
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500)
            if batch:
                progress = loop.time()
            elif loop.time() - progress > STALL_TIMEOUT_S:
                raise TimeoutError(f"no message of {topic} for {STALL_TIMEOUT_S:g} s short of its end offsets")
            for tp, messages in batch.items():
                for message in messages:
                    if message.offset >= ends[tp]:
                        break
                    read.scanned += 1
                    record = _decode(message.value)
                    pair = pair_of(record) if record is not None else None
                    if record is None or pair is None:
                        read.unreadable += 1
                        continue
                    read.pairs[pair] += 1
                    if matches(record, v1, v2):
                        read.records.append(record)
                        if len(read.records) >= max_records:
                            read.truncated = True
                            return read
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return read
