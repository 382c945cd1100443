"""The training profile: quantile bins and shares, flags kept in their own bins, the data's hash, the profile in
the manifest (optional, and checked against the model's columns), and the demo recipe's profile."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from streamscore.workers.library import MANIFEST, Manifest, ModelError, read_manifest
from streamscore.workers.profile import (
    bin_counts,
    bin_index,
    build_profile,
    column_profile,
    data_sha256,
    profile_table,
)
from tests.contract.artifacts import MANIFEST as TINY

SHA = "ab" * 32


def tiny_profile(**columns: np.ndarray) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    named = columns or {"amount": rng.lognormal(3, 1, 5000), "card.spend": rng.normal(0, 1, 5000),
                        "hour": rng.integers(0, 24, 5000).astype(float)}
    return build_profile(named, {"p": rng.random(5000)}, data_sha256="cd" * 32, params={"seed": 1},
                         code_version="test").model_dump()


def test_continuous_column_gets_deciles_of_equal_share():
    values = np.random.default_rng(0).normal(10.0, 2.0, 20_000)
    profile = column_profile(values)
    assert len(profile.edges) == 9 and len(profile.shares) == 10
    np.testing.assert_allclose(profile.shares, 0.1, atol=1e-3)
    assert profile.mean == pytest.approx(values.mean()) and profile.std == pytest.approx(values.std())
    assert profile.min == values.min() and profile.max == values.max()
    np.testing.assert_allclose(profile.edges[4], np.median(values), rtol=1e-9)


def test_flag_and_small_counts_keep_one_bin_per_value():
    flag = (np.random.default_rng(0).random(10_000) < 0.07).astype(np.float32)
    profile = column_profile(flag, defaulted=flag == 0)
    assert profile.edges == (1.0,) and profile.shares[1] == pytest.approx(flag.mean())
    assert profile.default_share == pytest.approx(1 - flag.mean())
    counts = column_profile(np.array([0, 0, 0, 1, 2, 2, 5], dtype=float))
    assert counts.edges == (1.0, 2.0, 5.0) and counts.shares == pytest.approx((3 / 7, 1 / 7, 2 / 7, 1 / 7))


def test_bins_are_the_same_for_training_and_live_values():
    values = np.random.default_rng(2).normal(size=1000)
    profile = column_profile(values)
    bins = bin_index(np.asarray(profile.edges), values)
    shares = np.bincount(bins, minlength=len(profile.shares)) / len(values)
    np.testing.assert_allclose(shares, profile.shares)


def test_build_profile_refuses_what_it_cannot_profile():
    with pytest.raises(ValueError, match="one value per training row"):
        build_profile({"a": np.zeros(3)}, {"p": np.zeros(4)}, data_sha256="cd" * 32, code_version="t")
    with pytest.raises(ValueError, match="NaN"):
        build_profile({"a": np.array([1.0, np.nan])}, data_sha256="cd" * 32, code_version="t")
    with pytest.raises(ValidationError):
        build_profile({"a": np.zeros(3)}, data_sha256="not a hash", code_version="t")


def test_data_hash_follows_the_data():
    features, labels = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 0, 1])
    assert data_sha256(features, labels) == data_sha256(features.copy(), labels.copy())
    assert data_sha256(features, labels) != data_sha256(features, labels[::-1].copy())
    assert data_sha256(features) != data_sha256(features.astype(np.float64))


def test_manifest_with_a_profile_round_trips_and_one_without_still_loads(tmp_path):
    document = {**TINY, "sha256": SHA, "profile": tiny_profile()}
    manifest = Manifest.model_validate(document)
    assert manifest.profile is not None and set(manifest.profile.columns) == set(manifest.column_names)
    assert Manifest.model_validate(json.loads(json.dumps(manifest.model_dump()))) == manifest
    folder = tmp_path / "tiny" / "1"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({**TINY, "sha256": SHA}))  # written before profiles existed
    assert read_manifest(folder).profile is None
    assert any("amount" in line for line in profile_table(manifest.profile))


def test_profile_naming_columns_the_model_lacks_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    profile = tiny_profile(amount=rng.random(5000), **{"card.count": rng.random(5000)})
    folder = tmp_path / "tiny" / "1"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({**TINY, "sha256": SHA, "profile": profile}))
    with pytest.raises(ModelError, match=r"profile names columns \['card.count'\]"):
        read_manifest(folder)


def test_column_names_spell_out_wide_request_inputs():
    manifest = Manifest.model_validate({**TINY, "sha256": SHA, "inputs": [
        {"name": "embedding", "source": "request", "size": 3}, {"name": "card.spend", "source": "view"}]})
    assert manifest.column_names == ["embedding[0]", "embedding[1]", "embedding[2]", "card.spend"]


def test_bin_counts_of_many_columns_at_once_match_the_bins_of_each():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(3, 500))
    values[2] = np.round(values[2])
    profiles = [column_profile(row) for row in values[:, :300]]
    width = max(len(profile.edges) for profile in profiles)
    edges = np.full((3, width), np.inf)
    for j, profile in enumerate(profiles):
        edges[j, :len(profile.edges)] = profile.edges
    counts = bin_counts(values, edges)
    for j, profile in enumerate(profiles):
        expected = np.bincount(bin_index(np.asarray(profile.edges), values[j]), minlength=len(profile.shares))
        assert counts[j, :len(profile.shares)].tolist() == expected.tolist()
        assert counts[j, len(profile.shares):].sum() == 0
