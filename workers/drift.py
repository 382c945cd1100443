"""Drift of live traffic against the training profile, per batch and vectorized: the ``drift`` pipeline stage.

Placed after ``infer`` in every model's pipeline (``STREAMSCORE_MONITORING__DRIFT=false`` leaves it out). For
each version that scored rows of the batch and whose manifest has a training profile (``workers/profile.py``),
it counts every profiled input column and output into the profile's bins (one ``np.searchsorted`` and one
``np.bincount`` per column over the whole batch: no per-request Python), adds the column sums, the defaulted
values (view columns whose entity had no row or could not be read), the rows with a defaulted entity and the
rows that read a stale feature row (event time older than the view's ``ttl_s``). A version without a profile is
not monitored; the worker logs that once, with the reason.

Every window (``STREAMSCORE_MONITORING__WINDOW_REQUESTS`` scored requests of one version, or
``__WINDOW_S`` seconds, whichever closes it first; checked at each batch) the stage compares each column with
its profile: PSI (``psi``) and a two-sample chi-square test of the window's binned counts against the training
counts (``two_sample_pvalue``), both with scipy; a column is flagged ``drifted`` when its PSI reaches
``__PSI_THRESHOLD`` and its p-value is at most ``__P_VALUE_THRESHOLD``. The window report (a msgpack map, see
docs/wire-format.md#monitoring-window-reports) goes to ``<prefix>.<model>.monitoring`` with the batch's other
messages (the worker's publisher: acknowledged before the batch's commit, never a blocking send), and the figures
to Prometheus gauges (``metrics.DriftGauges``). Each worker reports its own windows: a reader merges the workers'
reports of one version by their ``counts``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from scipy.stats import chi2_contingency, entropy

from streamscore.settings import MonitoringSettings, get_settings
from streamscore.streams import topics
from streamscore.streams.clock import now_ms

from .metrics import DriftGauges, drift_gauges
from .profile import ColumnProfile, TrainingProfile
from .stages import OK, ScoringBatch, register_stage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .runtime import ModelRuntime

log = logging.getLogger(__name__)

SHARE_FLOOR = 1e-4
"""Shares below this count as this in PSI (an empty bin on either side would make it infinite)."""


def psi(expected_shares: np.ndarray, observed_counts: np.ndarray) -> float:
    """Population stability index of observed bin counts against expected bin shares: the symmetrised
    Kullback-Leibler divergence sum((o - e) * ln(o / e)) of the two distributions (scipy's ``entropy``), each
    share floored at ``SHARE_FLOOR``."""
    observed = np.asarray(observed_counts, dtype=np.float64)
    if observed.sum() <= 0:
        return 0.0
    expected = np.maximum(np.asarray(expected_shares, dtype=np.float64), SHARE_FLOOR)
    observed = np.maximum(observed / observed.sum(), SHARE_FLOOR)
    expected, observed = expected / expected.sum(), observed / observed.sum()
    return float(entropy(observed, expected) + entropy(expected, observed))


def two_sample_pvalue(expected_shares: np.ndarray, training_rows: int, observed_counts: np.ndarray) -> float:
    """p-value of the chi-square test that the window's binned values and the training values come from one
    distribution (scipy's ``chi2_contingency`` on the 2 x bins table of their counts; bins empty on both sides
    left out). 1.0 when fewer than two bins hold values."""
    training = np.rint(np.asarray(expected_shares, dtype=np.float64) * training_rows)
    table = np.vstack([training, np.asarray(observed_counts, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or table[1].sum() <= 0 or table[0].sum() <= 0:
        return 1.0
    return float(chi2_contingency(table).pvalue)


@dataclass
class _Columns:
    """A profile's columns (inputs, then outputs) in the matrix form the per-batch counting uses."""

    names: list[str]
    profiles: list[ColumnProfile]
    edges: list[np.ndarray]
    input_positions: np.ndarray
    """Column of the model input matrix of each profiled input column."""
    outputs: list[str]
    """Profiled outputs, after the inputs in ``names``."""
    view_of_column: list[int]
    """Per profiled input column: index of its view in ``batch.fetched``, -1 for a request column."""
    bins: int

    def of_view(self, view_index: int) -> np.ndarray:
        """The profiled input columns read from that view."""
        return np.flatnonzero(np.asarray(self.view_of_column, dtype=np.intp) == view_index)

    @classmethod
    def of(cls, profile: TrainingProfile, runtime: ModelRuntime) -> _Columns:
        column_names = runtime.manifest.column_names
        inputs = [name for name in column_names if name in profile.columns]
        positions = np.array([column_names.index(name) for name in inputs], dtype=np.intp)
        views = [-1 if runtime.columns[position].from_request else runtime.columns[position].block
                 for position in positions.tolist()]
        outputs = [output.name for output in runtime.manifest.outputs if output.name in profile.outputs]
        profiles = [profile.columns[name] for name in inputs] + [profile.outputs[name] for name in outputs]
        return cls(names=inputs + outputs, profiles=profiles,
                   edges=[np.asarray(column.edges, dtype=np.float64) for column in profiles],
                   input_positions=positions, outputs=outputs, view_of_column=views,
                   bins=max(len(column.shares) for column in profiles))


@dataclass
class _Window:
    """What one version's traffic added up to since the window opened."""

    start_ms: int
    columns: int
    bins: int
    requests: int = 0
    defaulted_rows: int = 0
    stale_rows: int = 0
    counts: np.ndarray = field(init=False)
    sums: np.ndarray = field(init=False)
    defaulted: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.columns, self.bins), dtype=np.int64)
        self.sums = np.zeros(self.columns, dtype=np.float64)
        self.defaulted = np.zeros(self.columns, dtype=np.int64)


class _Tracker:
    """One version's running window."""

    def __init__(self, runtime: ModelRuntime, profile: TrainingProfile) -> None:
        self.runtime = runtime
        self.profile = profile
        self.columns = _Columns.of(profile, runtime)
        self.view_columns = [self.columns.of_view(index) for index in range(len(runtime.views))]
        self.window = self._new_window(now_ms())

    def _new_window(self, start_ms: int) -> _Window:
        return _Window(start_ms, len(self.columns.names), self.columns.bins)

    def add(self, batch: ScoringBatch, positions: np.ndarray) -> None:
        """Count the scored rows at ``positions`` (of ``batch.scored_rows``) into the window."""
        columns, window = self.columns, self.window
        assert batch.inputs is not None
        inputs = batch.inputs[positions][:, columns.input_positions]
        rows = batch.scored_rows[positions]
        values = [inputs[:, j] for j in range(inputs.shape[1])]
        values += [batch.outputs[name][rows] if name in batch.outputs else None for name in columns.outputs]
        for j, column in enumerate(values):
            if column is None or column.ndim != 1:
                continue
            window.counts[j] += np.bincount(np.searchsorted(columns.edges[j], column, side="right"),
                                            minlength=columns.bins)
            window.sums[j] += float(column.sum(dtype=np.float64))
        window.requests += len(positions)
        defaulted_rows = np.zeros(len(positions), dtype=bool)
        stale_rows = np.zeros(len(positions), dtype=bool)
        for view_index, fetched in enumerate(batch.fetched):
            missing = np.zeros(len(batch.scored_rows), dtype=bool)
            missing[fetched.missing] = True
            missing = missing[positions]
            defaulted_rows |= missing
            window.defaulted[self.view_columns[view_index]] += int(missing.sum())
            if fetched.view.ttl_s is not None:
                stamps = fetched.event_ts_ms[positions]
                stale_rows |= (stamps > 0) & (stamps < batch.received_ms - fetched.view.ttl_s * 1000)
        window.defaulted_rows += int(defaulted_rows.sum())
        window.stale_rows += int(stale_rows.sum())

    def due(self, now: int, settings: MonitoringSettings) -> bool:
        window = self.window
        return window.requests > 0 and (window.requests >= settings.window_requests
                                        or now - window.start_ms >= settings.window_s * 1000)

    def close(self, now: int, settings: MonitoringSettings, worker_id: str) -> dict[str, Any]:
        """The window's report; a new window opens."""
        window, columns, training_rows = self.window, self.columns, self.profile.rows
        self.window = self._new_window(now)
        reports: dict[str, dict[str, Any]] = {}
        for j, (name, column) in enumerate(zip(columns.names, columns.profiles, strict=True)):
            counts = window.counts[j, :len(column.shares)]
            seen = int(counts.sum())
            column_psi = psi(np.asarray(column.shares), counts)
            p_value = two_sample_pvalue(np.asarray(column.shares), training_rows, counts)
            reports[name] = {
                "psi": column_psi, "p_value": p_value,
                "drifted": bool(seen > 0 and column_psi >= settings.psi_threshold
                                and p_value <= settings.p_value_threshold),
                "mean": float(window.sums[j] / seen) if seen else None, "training_mean": column.mean,
                "default_share": (float(window.defaulted[j] / window.requests)
                                  if j < len(columns.input_positions) and columns.view_of_column[j] >= 0 else None),
                "training_default_share": column.default_share,
                "counts": counts.tolist(), "training_shares": list(column.shares),
            }
        inputs = len(columns.input_positions)
        return {
            "model": self.runtime.name, "version": self.runtime.version, "worker_id": worker_id,
            "window_start_ms": window.start_ms, "window_end_ms": now, "requests": window.requests,
            "columns": {name: reports[name] for name in columns.names[:inputs]},
            "outputs": {name: reports[name] for name in columns.names[inputs:]},
            "drifted_columns": [name for name in columns.names if reports[name]["drifted"]],
            "defaulted_share": window.defaulted_rows / window.requests,
            "stale_share": window.stale_rows / window.requests,
            "psi_threshold": settings.psi_threshold, "p_value_threshold": settings.p_value_threshold,
            "training_rows": training_rows, "sent_ms": now_ms(),
        }


@register_stage("drift")
class Drift:
    """The drift stage (see the module's note). ``topic``: where window reports go (``<prefix>.<model>.monitoring``
    of the settings' prefix when None); ``settings``: the window and thresholds (the ``monitoring`` section's when
    None; a manifest naming the stage may give its fields as params)."""

    name = "drift"

    def __init__(self, topic: str | None = None, settings: MonitoringSettings | None = None,
                 registry: CollectorRegistry | None = None, model: str = "", worker_id: str = "",
                 **monitoring: Any) -> None:
        if topic is None or settings is None:
            configured = get_settings()
            topic = topic or topics.monitoring(configured.topic_prefix, model)
            settings = settings or configured.monitoring
        if monitoring:  # a manifest's params, checked as the settings are
            settings = MonitoringSettings.model_validate({**settings.model_dump(), **monitoring})
        self.topic, self.settings = topic, settings
        self.gauges: DriftGauges | None = drift_gauges(registry) if registry is not None else None
        self.worker_id = worker_id
        self.trackers: dict[tuple[str, str], _Tracker | None] = {}
        """By (version, artifact sha256): its tracker, None for a version without a profile."""

    def _tracker(self, runtime: ModelRuntime) -> _Tracker | None:
        key = (runtime.version, runtime.manifest.sha256)
        if key not in self.trackers:
            profile = runtime.manifest.profile
            if profile is None:
                log.warning("%s v%s: drift monitoring off for this version: its manifest has no training profile "
                            "(register it with one: streamscore.workers.profile.build_profile)",
                            runtime.name, runtime.version)
                self.trackers[key] = None
            else:
                self.trackers[key] = _Tracker(runtime, profile)
        return self.trackers[key]

    async def __call__(self, batch: ScoringBatch) -> None:
        if batch.inputs is not None and len(batch.scored_rows):
            scored = batch.status[batch.scored_rows] == OK
            if batch.route is None:
                groups = [(batch.model, np.flatnonzero(scored))]
            else:
                routes = batch.route[batch.scored_rows]
                groups = [(runtime, np.flatnonzero(scored & (routes == position)))
                          for position, runtime in enumerate(batch.routed)]
            for runtime, positions in groups:
                tracker = self._tracker(runtime)
                if tracker is not None and len(positions):
                    tracker.add(batch, positions)
        now = now_ms()
        for tracker in self.trackers.values():
            if tracker is not None and tracker.due(now, self.settings):
                self._publish(batch, tracker.close(now, self.settings, self.worker_id))

    def _publish(self, batch: ScoringBatch, report: Mapping[str, Any]) -> None:
        key = f"{report['model']}/{report['version']}".encode()
        batch.context.setdefault("extra", []).append((self.topic, key, msgpack.packb(report, use_bin_type=True),
                                                       None))
        if self.gauges is not None:
            self.gauges.observe(report)
        if report["drifted_columns"]:
            log.warning("%s v%s: drift in %s over %d requests (PSI %s)", report["model"], report["version"],
                        ", ".join(report["drifted_columns"]), report["requests"],
                        ", ".join(f"{(report['columns'] | report['outputs'])[name]['psi']:.2f}"
                                  for name in report["drifted_columns"]))
