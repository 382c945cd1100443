"""Retraining's pieces without servers: the schedule's durations, the next version's name, what counts as a label."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from streamscore.workers.retrain import _label_of, next_version, parse_every


def test_durations_of_every() -> None:
    assert [parse_every(text) for text in ("90s", "15m", "6h", "1d", "45", "1.5h")] == [
        90, 900, 21600, 86400, 45, 5400]
    for bad in ("0m", "soon", "-5s", "5w"):
        with pytest.raises(ValueError, match="positive duration"):
            parse_every(bad)


def test_the_next_version_follows_the_highest_number_of_the_library(tmp_path: Path) -> None:
    assert next_version(tmp_path, "fraud") == "1"
    for version in ("1", "2", "2-int8", "10-distill"):
        (tmp_path / "fraud" / version).mkdir(parents=True)
        (tmp_path / "fraud" / version / "manifest.json").write_text("{}")
    assert next_version(tmp_path, "fraud") == "11"


def test_only_a_map_with_an_id_and_a_0_or_1_label_is_a_label() -> None:
    pack = msgpack.packb
    assert _label_of(pack({"id": "a", "label": 1, "event_ms": 5})) == ("a", 1)
    assert _label_of(pack({"id": "b", "label": False})) == ("b", 0)
    for bad in (pack({"id": "c", "label": 2}), pack({"id": "c", "label": 0.0}), pack({"label": 1}),
                pack({"id": "", "label": 1}), pack([1, 2]), b"\xc1", None, pack({"id": "c", "label": "1"})):
        assert _label_of(bad) is None
