"""The training profile of a model version: how every input column and every output was distributed on the
training data, kept in the version's manifest (``Manifest.profile``) as the baseline the worker's drift stage
(``workers/drift.py``) compares live traffic with.

Per column: quantile bin edges (deciles by default; a column with at most ``bins`` distinct values gets one bin
per value, so a 0/1 flag keeps its two bins; a constant gets three: below it, it, above it), the training share
of each bin, the mean, the standard deviation, the range and the share of defaulted values. Beside them: the
sha256 of the training data, the training parameters and the code version, so a version can be traced back to
what made it.

Bins: with ``edges`` ``e0 < e1 < ... < ek``, bin 0 holds ``x < e0``, bin i holds ``e(i-1) <= x < ei`` and bin
k+1 holds ``x >= ek`` (``np.searchsorted(edges, x, side="right")``); one function (``bin_counts``) counts
training and live values into them, so they always meet the same bins.

``build_profile`` is the one function that makes a profile; a training recipe calls it on its training matrix
(named columns) and its model's scores on that matrix.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BINS = 10
"""Quantile bins per column (deciles)."""


class ColumnProfile(BaseModel):
    """One input column's or output's distribution on the training data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: tuple[float, ...]
    """Ascending cut points between bins (``len(shares) - 1`` of them); see the module's note on bins."""
    shares: tuple[float, ...] = Field(min_length=1)
    """Share of the training rows in each bin (sums to 1)."""
    mean: float
    std: float
    min: float
    max: float
    default_share: float | None = None
    """Share of the training rows whose value was a default (entity unknown, feature absent); None: not known."""

    @model_validator(mode="after")
    def _bins(self) -> ColumnProfile:
        if len(self.shares) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} shares, not {len(self.shares)}")
        if any(later <= earlier for earlier, later in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly ascending")
        if abs(sum(self.shares) - 1.0) > 1e-6 or min(self.shares) < 0:
            raise ValueError("shares must be non-negative and sum to 1")
        return self


class TrainingProfile(BaseModel):
    """The profile of one model version's training data (``Manifest.profile``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=1)
    """Training rows profiled."""
    data_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the training data (``data_sha256`` of the arrays the model was fitted on)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The training parameters (JSON values): enough to train the version again from the same data."""
    code_version: str
    """Package version and commit of the code that trained it."""
    created_at_ms: int = Field(ge=0)
    """When the profile was made, Unix epoch milliseconds."""
    columns: dict[str, ColumnProfile]
    """Input columns by name (``Manifest.column_names``)."""
    outputs: dict[str, ColumnProfile] = Field(default_factory=dict)
    """Outputs by name (``Manifest.outputs``)."""


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bin of each value (0 .. len(edges)), by the binning rule of the module's note."""
    return np.searchsorted(edges, values, side="right")


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per row of ``values`` (columns x values), the count of its values in each bin of the same row of
    ``edges`` (columns x edges, ascending, padded with +inf): columns x (edges + 1), the counts ``bin_index``
    would give (for finite values). One comparison of every value with every edge and one count, for all the
    columns at once: at the widths of a profile (at most 9 edges) this beats a binary search per value."""
    above = values[:, None, :] >= edges[:, :, None]
    at_or_above = above.view(np.uint8).sum(axis=2, dtype=np.int64)  # a bool sum in bytes: faster than count_nonzero
    total = np.full((len(values), 1), values.shape[1], dtype=np.int64)
    return -np.diff(np.concatenate([total, at_or_above, np.zeros_like(total)], axis=1), axis=1)


def _edges(values: np.ndarray, bins: int) -> np.ndarray:
    distinct = np.unique(values)
    if len(distinct) == 1:  # a constant: below it, it, above it (so that any other value shows)
        return np.array([distinct[0], np.nextafter(distinct[0], np.inf)])
    if len(distinct) <= bins:  # a flag, a category, a small count: one bin per value
        return distinct[1:]
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.unique(quantiles)


def column_profile(values: np.ndarray, defaulted: np.ndarray | None = None, bins: int = DEFAULT_BINS) -> ColumnProfile:
    """The profile of one column of training values (1-d, finite)."""
    column = np.asarray(values, dtype=np.float64).ravel()
    if not len(column):
        raise ValueError("cannot profile an empty column")
    if not np.isfinite(column).all():
        raise ValueError("cannot profile a column with NaN or infinite values")
    edges = _edges(column, bins)
    counts = bin_counts(column[None, :], edges[None, :])[0]
    shares = counts / counts.sum()
    default_share = None if defaulted is None else float(np.asarray(defaulted, dtype=bool).mean())
    return ColumnProfile(edges=tuple(edges.tolist()), shares=tuple(shares.tolist()), mean=float(column.mean()),
                         std=float(column.std()), min=float(column.min()), max=float(column.max()),
                         default_share=default_share)


def data_sha256(*arrays: np.ndarray) -> str:
    """sha256 of training arrays (each's dtype, shape and C-order bytes, in order): the same data hashes the same."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def build_profile(columns: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None, *,
                  data_sha256: str, params: Mapping[str, Any] | None = None,
                  defaulted: Mapping[str, np.ndarray] | None = None, bins: int = DEFAULT_BINS,
                  code_version: str | None = None) -> TrainingProfile:
    """The training profile of a version: every input column (by name, one value per training row) and every
    output (the model's scores on those rows), the data's sha256, the training ``params`` and the code version
    (the running code's when None). ``defaulted``: per column, a mask of the rows whose value was a default."""
    if bins < 2:
        raise ValueError(f"bins must be at least 2, not {bins}")
    lengths = {len(np.asarray(values)) for values in [*columns.values(), *(outputs or {}).values()]}
    if len(lengths) != 1:
        raise ValueError(f"every column and output needs one value per training row; lengths seen: {sorted(lengths)}")
    if code_version is None:
        from .pipeline import code_version as running_code_version

        code_version = running_code_version()
    defaulted = defaulted or {}
    return TrainingProfile(
        rows=lengths.pop(), data_sha256=data_sha256, params=dict(params or {}), code_version=code_version,
        created_at_ms=int(time.time() * 1000),
        columns={name: column_profile(values, defaulted.get(name), bins) for name, values in columns.items()},
        outputs={name: column_profile(values, None, bins) for name, values in (outputs or {}).items()},
    )


def profile_table(profile: TrainingProfile) -> list[str]:
    """A compact table of a profile, one line per column and output (``streamscore models show M V``)."""
    lines = [f"training profile: {profile.rows} rows, data sha256 {profile.data_sha256[:12]}…, code "
             f"{profile.code_version}, params {profile.params}",
             f"{'column':<32} {'mean':>11} {'std':>11} {'min':>11} {'max':>11} {'default':>8} {'bins':>4}  "
             "bin shares (%)"]
    for kind, columns in (("", profile.columns), ("output ", profile.outputs)):
        for name, column in columns.items():
            default = "-" if column.default_share is None else f"{100 * column.default_share:.1f}%"
            shares = " ".join(f"{100 * share:.0f}" for share in column.shares)
            lines.append(f"{kind + name:<32} {column.mean:>11.4g} {column.std:>11.4g} {column.min:>11.4g} "
                         f"{column.max:>11.4g} {default:>8} {len(column.shares):>4}  {shares}")
    return lines
