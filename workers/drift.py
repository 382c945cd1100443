"""Drift of live traffic against the training profile, per batch and vectorized: the ``drift`` pipeline stage.

Placed after ``shadow`` (which runs after ``infer``) in every model's pipeline
(``STREAMSCORE_MONITORING__DRIFT=false`` leaves it out). For each version that scored rows of the batch (a shadow
version too, with the outputs the ``shadow`` stage left in ``batch.context["shadow_outputs"]``) and whose manifest
has a training profile (``workers/profile.py``), it counts every profiled input column and output into the
profile's bins (``profile.bin_counts``: one numpy comparison of the whole batch with every edge of every column,
and one count; no per-request Python), adds the column sums, the defaulted values (view columns whose entity had
no row or could not be read), the rows with a defaulted entity and the rows that read a stale feature row (event
time older than the view's ``ttl_s``). A version without a profile is not monitored; the worker logs that once,
with the reason.

Every window (``STREAMSCORE_MONITORING__WINDOW_REQUESTS`` scored requests of one version, or
``__WINDOW_S`` seconds, whichever closes it first; checked at each batch) the stage compares each column with
its profile (``drift_statistics``: scipy, one call for all the columns): PSI and Pearson's chi-square
test of the window's binned counts against the training shares; a column is flagged ``drifted`` when its PSI reaches
``__PSI_THRESHOLD`` and its p-value is at most ``__P_VALUE_THRESHOLD``. The window report (a msgpack map, see
docs/wire-format.md#monitoring-window-reports) goes to ``<prefix>.<model>.monitoring`` with the batch's other
messages (the worker's publisher: acknowledged before the batch's commit, never a blocking send), and the figures
to Prometheus gauges (``metrics.DriftGauges``). Each worker reports its own windows: a reader merges the workers'
reports of one version by their ``counts``. A window is a statistic, not a ledger: a batch the pipeline tries
again after a failure is counted again; the open window of a version no longer served is reported once its time
is up (at a later batch); open windows are lost when the worker stops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from scipy.special import rel_entr
from scipy.stats import chisquare

from streamscore.settings import MonitoringSettings, get_settings
from streamscore.streams import topics
from streamscore.streams.clock import now_ms

from .metrics import DriftGauges, drift_gauges
from .profile import ColumnProfile, TrainingProfile, bin_counts
from .stages import OK, ScoringBatch, register_stage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .runtime import ModelRuntime

log = logging.getLogger(__name__)

SHARE_FLOOR = 1e-4
"""Shares below this count as this (an empty bin on either side would make PSI infinite and the test undefined)."""


def drift_statistics(expected_shares: np.ndarray, observed_counts: np.ndarray,
                     bins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PSI and p-value of each row of ``observed_counts`` (columns x bins, one row per column) against the
    training shares in the same row of ``expected_shares``, in one scipy call for every row. ``bins``: how many
    leading entries of each row are bins (a row of a column with fewer bins is padded; all of them when None).

    PSI: the population stability index sum((o - e) * ln(o / e)) over the bins, i.e. the symmetrised
    Kullback-Leibler divergence of the two share vectors (``scipy.special.rel_entr`` both ways), each share
    floored at ``SHARE_FLOOR``. p-value: Pearson's chi-square test of the counts against the training shares
    (``scipy.stats.chisquare``; the training sample, much larger than a window, taken as the reference
    distribution; a padded entry is 1 observed against 1 expected, which adds nothing, and one degree of freedom
    less). A row with no count gets PSI 0 and p-value 1."""
    counts = np.atleast_2d(np.asarray(observed_counts, dtype=np.float64))
    rows, width = counts.shape
    valid = (np.arange(width)[None, :] < (np.full(rows, width) if bins is None else np.asarray(bins))[:, None])
    totals = np.where(valid, counts, 0.0).sum(axis=1)
    psi_values, p_values = np.zeros(rows), np.ones(rows)
    seen = totals > 0
    if not seen.any():
        return psi_values, p_values
    valid, counts, totals = valid[seen], np.where(valid, counts, 0.0)[seen], totals[seen]
    expected = _floored(np.atleast_2d(np.asarray(expected_shares, dtype=np.float64))[seen], valid)
    observed = _floored(counts / totals[:, None], valid)
    psi_values[seen] = (rel_entr(observed, expected) + rel_entr(expected, observed)).sum(axis=1)
    padding = ~valid
    tested = valid.sum(axis=1) >= 2  # one bin has no degree of freedom: nothing to test
    if tested.any():
        p_values[np.flatnonzero(seen)[tested]] = chisquare(
            np.where(padding, 1.0, counts)[tested], np.where(padding, 1.0, expected * totals[:, None])[tested],
            ddof=padding.sum(axis=1)[tested], axis=1).pvalue
    return psi_values, p_values


def _floored(shares: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Shares floored at SHARE_FLOOR and summing to 1 over the valid entries; 0 on the others."""
    floored = np.where(valid, np.maximum(shares, SHARE_FLOOR), 0.0)
    return floored / floored.sum(axis=-1, keepdims=True)


def psi(expected_shares: np.ndarray, observed_counts: np.ndarray) -> float:
    """PSI of one column's bin counts against its training shares (``drift_statistics``)."""
    return float(drift_statistics(expected_shares, observed_counts)[0][0])


def p_value(expected_shares: np.ndarray, observed_counts: np.ndarray) -> float:
    """p-value of one column's bin counts against its training shares (``drift_statistics``)."""
    return float(drift_statistics(expected_shares, observed_counts)[1][0])


@dataclass
class _Columns:
    """A profile's columns (inputs, then outputs) in the matrix form the per-batch counting uses."""

    names: list[str]
    profiles: list[ColumnProfile]
    input_positions: np.ndarray
    """Column of the model input matrix of each profiled input column."""
    outputs: list[str]
    """Profiled outputs, after the inputs in ``names``."""
    view_of_column: list[int]
    """Per profiled input column: index of its view in ``batch.fetched``, -1 for a request column."""
    bins: int
    shares: np.ndarray = field(init=False)
    """The training shares, one row per column, padded with 0 to ``bins``."""
    padded_edges: np.ndarray = field(init=False)
    """The edges, one row per column, padded with +inf to ``bins - 1`` (``profile.bin_counts``)."""
    bins_of_column: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.bins_of_column = np.array([len(column.shares) for column in self.profiles], dtype=np.intp)
        self.shares = np.zeros((len(self.profiles), self.bins), dtype=np.float64)
        self.padded_edges = np.full((len(self.profiles), self.bins - 1), np.inf)
        for j, column in enumerate(self.profiles):
            self.shares[j, :len(column.shares)] = column.shares
            self.padded_edges[j, :len(column.edges)] = column.edges

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


_BUFFER_ROWS = 256
"""Batches smaller than this are binned together, once this many rows are held back (or the window closes)."""


class _Tracker:
    """One version's running window."""

    def __init__(self, runtime: ModelRuntime, profile: TrainingProfile, shadow: bool = False) -> None:
        self.runtime = runtime
        self.profile = profile
        self.shadow = shadow
        self.columns = _Columns.of(profile, runtime)
        self.view_columns = [self.columns.of_view(index) for index in range(len(runtime.views))]
        self.window = self._new_window(now_ms())
        self._pending: list[tuple[np.ndarray, list[np.ndarray | None]]] = []
        """(inputs, outputs) of small batches not binned yet: counted into the window by ``_flush``, at
        ``_BUFFER_ROWS`` rows or when the window closes (a one-request batch costs a copy, not a binning)."""
        self._pending_rows = 0

    def _new_window(self, start_ms: int) -> _Window:
        return _Window(start_ms, len(self.columns.names), self.columns.bins)

    def add(self, batch: ScoringBatch, positions: np.ndarray,
            scored: Mapping[str, np.ndarray] | None = None) -> None:
        """Count the scored rows at ``positions`` (of ``batch.scored_rows``) into the window; the outputs are the
        batch's (one row per decoded row), or ``scored`` (a shadow's: one row per scored row)."""
        assert batch.inputs is not None
        every_row = len(positions) == len(batch.scored_rows)
        inputs = batch.inputs if every_row else batch.inputs[positions]
        rows = batch.scored_rows if every_row else batch.scored_rows[positions]
        outputs: list[np.ndarray | None] = []
        for name in self.columns.outputs:
            output = batch.outputs.get(name) if scored is None else scored.get(name)
            outputs.append(None if output is None or output.ndim != 1
                           else output[rows] if scored is None else output[positions])
        self.window.requests += len(positions)
        if len(positions) < _BUFFER_ROWS and all(output is not None for output in outputs):
            # a small batch: binned with the next ones (a copy of its rows now, one numpy pass for all later)
            self._pending.append((inputs.copy() if every_row else inputs, outputs))
            self._pending_rows += len(positions)
            if self._pending_rows >= _BUFFER_ROWS:
                self._flush()
        else:
            self._count(inputs, outputs)
        self._add_defaulted_and_stale(batch, positions, every_row)

    def _count(self, inputs: np.ndarray, outputs: Sequence[np.ndarray | None]) -> None:
        """Bin rows (the profiled inputs, then the outputs; None: an output this version does not give)."""
        columns, window = self.columns, self.window
        inputs_profiled = len(columns.input_positions)
        block = np.empty((len(columns.names), len(inputs)), dtype=np.float64)  # one row per column
        block[:inputs_profiled] = inputs[:, columns.input_positions].T
        present = np.ones(len(columns.names), dtype=bool)
        for j, output in enumerate(outputs, start=inputs_profiled):
            if output is None:
                present[j], block[j] = False, 0.0
            else:
                block[j] = output
        counts = bin_counts(block, columns.padded_edges)
        window.counts[present] += counts[present]
        window.sums[present] += block.sum(axis=1)[present]

    def _flush(self) -> None:
        """Bin the small batches' rows held back, all at once."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if len(pending) == 1:
            self._count(*pending[0])
            return
        outputs = [np.concatenate([held[index] for _, held in pending])
                   for index in range(len(self.columns.outputs))]
        self._count(np.concatenate([inputs for inputs, _ in pending]), outputs)

    def _add_defaulted_and_stale(self, batch: ScoringBatch, positions: np.ndarray, every_row: bool) -> None:
        window = self.window
        defaulted_rows: np.ndarray | None = None  # None: no row of any view (the usual case: every entity known)
        stale_rows: np.ndarray | None = None
        for view_index, fetched in enumerate(batch.fetched):
            if fetched.missing:
                missing = np.zeros(len(batch.scored_rows), dtype=bool)
                missing[np.asarray(fetched.missing, dtype=np.intp)] = True
                if not every_row:
                    missing = missing[positions]
                defaulted_rows = missing if defaulted_rows is None else defaulted_rows | missing
                window.defaulted[self.view_columns[view_index]] += int(np.count_nonzero(missing))
            if fetched.view.ttl_s is not None:
                stamps = fetched.event_ts_ms if every_row else fetched.event_ts_ms[positions]
                stale = (stamps > 0) & (stamps < batch.received_ms - fetched.view.ttl_s * 1000)
                stale_rows = stale if stale_rows is None else stale_rows | stale
        if defaulted_rows is not None:
            window.defaulted_rows += int(np.count_nonzero(defaulted_rows))
        if stale_rows is not None:
            window.stale_rows += int(np.count_nonzero(stale_rows))

    def due(self, now: int, settings: MonitoringSettings) -> bool:
        window = self.window
        return window.requests > 0 and (window.requests >= settings.window_requests
                                        or now - window.start_ms >= settings.window_s * 1000)

    def close(self, now: int, settings: MonitoringSettings, worker_id: str) -> dict[str, Any]:
        """The window's report; a new window opens."""
        self._flush()
        window, columns = self.window, self.columns
        self.window = self._new_window(now)
        psi_values, p_values = drift_statistics(columns.shares, window.counts, columns.bins_of_column)
        reports: dict[str, dict[str, Any]] = {}
        for j, (name, column) in enumerate(zip(columns.names, columns.profiles, strict=True)):
            counts = window.counts[j, :len(column.shares)]
            seen = int(counts.sum())
            column_psi, column_p = float(psi_values[j]), float(p_values[j])
            reports[name] = {
                "psi": column_psi, "p_value": column_p,
                "drifted": bool(seen > 0 and column_psi >= settings.psi_threshold
                                and column_p <= settings.p_value_threshold),
                "mean": float(window.sums[j] / seen) if seen else None, "training_mean": column.mean,
                "default_share": (float(window.defaulted[j] / window.requests)
                                  if j < len(columns.input_positions) and columns.view_of_column[j] >= 0 else None),
                "training_default_share": column.default_share,
                "counts": counts.tolist(), "training_shares": list(column.shares),
            }
        inputs = len(columns.input_positions)
        return {
            "model": self.runtime.name, "version": self.runtime.version, "shadow": self.shadow, "worker_id": worker_id,
            "window_start_ms": window.start_ms, "window_end_ms": now, "requests": window.requests,
            "columns": {name: reports[name] for name in columns.names[:inputs]},
            "outputs": {name: reports[name] for name in columns.names[inputs:]},
            "drifted_columns": [name for name in columns.names if reports[name]["drifted"]],
            "defaulted_share": window.defaulted_rows / window.requests,
            "stale_share": window.stale_rows / window.requests,
            "psi_threshold": settings.psi_threshold, "p_value_threshold": settings.p_value_threshold,
            "training_rows": self.profile.rows, "sent_ms": now_ms(),
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
        self.trackers: dict[tuple[str, str, bool], _Tracker | None] = {}
        """By (version, artifact sha256, scored in shadow): its tracker, None for a version without a profile."""

    def _tracker(self, runtime: ModelRuntime, shadow: bool = False) -> _Tracker | None:
        key = (runtime.version, runtime.manifest.sha256, shadow)
        if key not in self.trackers:
            profile = runtime.manifest.profile
            if profile is None:
                log.warning("%s v%s: drift monitoring off for this version: its manifest has no training profile "
                            "(register it with one: streamscore.workers.profile.build_profile)",
                            runtime.name, runtime.version)
                self.trackers[key] = None
            else:
                self.trackers[key] = _Tracker(runtime, profile, shadow)
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
            answered = np.flatnonzero(scored)
            for runtime, outputs in batch.context.get("shadow_outputs", ()):  # when placed after ``shadow``
                tracker = self._tracker(runtime, shadow=True)
                if tracker is not None and len(answered):
                    tracker.add(batch, answered, outputs)
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
            log.warning("%s v%s%s: drift in %s over %d requests (PSI %s)", report["model"], report["version"],
                        " (shadow)" if report["shadow"] else "",
                        ", ".join(report["drifted_columns"]), report["requests"],
                        ", ".join(f"{(report['columns'] | report['outputs'])[name]['psi']:.2f}"
                                  for name in report["drifted_columns"]))
