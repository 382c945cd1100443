"""The deployment transitions without servers: each computes the next state or refuses with one line that says
what was wrong and what to do; the library snapshot refuses unknown versions and those that fail their sha256
check; the state's JSON round-trips and rejects what it does not know."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from streamscore.streams import topics
from streamscore.workers.deployments import (
    HISTORY_MAX,
    Canary,
    Change,
    Deployment,
    DeploymentError,
    Library,
    canary,
    check_serving,
    describe_change,
    implicit,
    promote,
    retire,
    rollback,
    scan_library,
    shadow,
)
from streamscore.workers.library import MANIFEST
from tests.contract.artifacts import register_onnx

LIB = Library(model="fraud", versions=("1", "2", "3", "4"), where="/models")


def state(**fields: object) -> Deployment:
    base: dict[str, object] = {"model": "fraud", "production": "1", "seq": 4,
                               "changed": Change(by="a@b", at_ms=1, what="x")}
    return Deployment.model_validate({**base, **fields})


def refused(match: str) -> Any:
    return pytest.raises(DeploymentError, match=match)


def test_the_topic_name() -> None:
    assert topics.deployments("p", "fraud") == "p.fraud.deployments"


def test_implicit_state_is_the_newest_library_version() -> None:
    first = implicit("fraud", LIB)
    assert (first.production, first.canary, first.shadow, first.history, first.seq) == ("4", None, (), (), 0)
    with refused(r"no model 'fraud' in /models: register it first"):
        implicit("fraud", Library(model="fraud", versions=(), where="/models"))


def test_promote_pushes_the_old_production_onto_the_history_and_counts_seq() -> None:
    new = promote(state(), "2", LIB)
    assert (new.production, new.history, new.seq) == ("2", ("1",), 5)
    assert new.changed.what == "promote fraud v2 to production (was 1)"
    again = promote(new, "3", LIB)
    assert (again.production, again.history) == ("3", ("1", "2"))


def test_promote_of_the_canary_clears_it_and_of_a_shadow_removes_it() -> None:
    new = promote(state(canary=Canary(version="2", weight=0.05), shadow=("3",)), "2", LIB)
    assert (new.production, new.canary, new.shadow) == ("2", None, ("3",))
    assert "canary at weight 0.05 until now" in new.changed.what
    other = promote(state(canary=Canary(version="2", weight=0.05), shadow=("3",)), "3", LIB)
    assert (other.production, other.canary, other.shadow) == ("3", Canary(version="2", weight=0.05), ())


def test_promote_of_a_version_in_the_history_moves_it_out_of_the_history() -> None:
    new = promote(state(production="2", history=("1",)), "1", LIB)
    assert (new.production, new.history) == ("1", ("2",))


def test_the_history_is_bounded() -> None:
    current = state(production="1")
    for step in range(HISTORY_MAX + 5):
        current = promote(current, "2" if step % 2 == 0 else "1", LIB)
    assert len(current.history) <= HISTORY_MAX


def test_promote_refusals() -> None:
    with refused(r"model 'fraud' has no version '9' in /models \(the library has: 1, 2, 3, 4\): register it"):
        promote(state(), "9", LIB)
    with refused(r"fraud v1 is already production: nothing to promote"):
        promote(state(), "1", LIB)
    broken = Library(model="fraud", versions=LIB.versions, broken={"2": "its sha256 is aa but the manifest says bb"})
    with refused(r"version '2' of 'fraud' cannot be deployed, it fails its check: its sha256 is aa"):
        promote(state(), "2", broken)


def test_canary_sets_replaces_and_reweights() -> None:
    new = canary(state(), "2", 0.05, LIB)
    assert (new.canary, new.production) == (Canary(version="2", weight=0.05), "1")
    assert new.changed.what == "canary fraud v2 at weight 0.05"
    reweighted = canary(new, "2", 0.2, LIB)
    assert reweighted.canary == Canary(version="2", weight=0.2) and "(was 0.05)" in reweighted.changed.what
    replaced = canary(new, "3", 0.1, LIB)
    assert replaced.canary == Canary(version="3", weight=0.1)
    assert "replaces canary v2 at 0.05" in replaced.changed.what
    from_shadow = canary(state(shadow=("2",)), "2", 1.0, LIB)
    assert (from_shadow.canary, from_shadow.shadow) == (Canary(version="2", weight=1.0), ())
    assert canary(state(), "2", 0.0, LIB).canary == Canary(version="2", weight=0.0)


@pytest.mark.parametrize("weight", [-0.01, 1.5, float("nan"), float("inf")])
def test_canary_weight_outside_0_1_is_refused(weight: float) -> None:
    with refused(r"canary weight .* is outside 0\.\.1: give the share of requests"):
        canary(state(), "2", weight, LIB)


def test_canary_refusals() -> None:
    with refused(r"fraud v1 is production: a canary must be another version"):
        canary(state(), "1", 0.1, LIB)
    with refused(r"has no version '7'"):
        canary(state(), "7", 0.1, LIB)
    with refused(r"already the canary at weight 0.1: nothing to change"):
        canary(state(canary=Canary(version="2", weight=0.1)), "2", 0.1, LIB)
    with refused(r"no production version to canary against: promote one first"):
        canary(state(production=None), "2", 0.1, LIB)


def test_shadow_adds_and_takes_a_version_from_canary() -> None:
    new = shadow(state(), "2", LIB)
    assert new.shadow == ("2",) and new.changed.what == "shadow fraud v2"
    assert shadow(new, "3", LIB).shadow == ("2", "3")
    moved = shadow(state(canary=Canary(version="2", weight=0.3)), "2", LIB)
    assert (moved.canary, moved.shadow) == (None, ("2",))
    with refused(r"fraud v1 is production: shadow another version"):
        shadow(state(), "1", LIB)
    with refused(r"fraud v2 is already in shadow"):
        shadow(new, "2", LIB)


def test_rollback_pops_the_history_and_drops_the_bad_version() -> None:
    current = promote(promote(state(), "2", LIB), "3", LIB)
    back = rollback(current, LIB)
    assert (back.production, back.history) == ("2", ("1",))
    assert back.changed.what == "rollback fraud from v3 to v2"
    assert "3" not in back.serving and "3" not in back.history
    further = rollback(back, LIB)
    assert (further.production, further.history) == ("1", ())
    with refused(r"no previous production version to roll back to \(the history is empty; production is 1\)"):
        rollback(further, LIB)


def test_rollback_keeps_a_canary_of_another_version_and_clears_one_of_the_target() -> None:
    keeps = rollback(state(production="2", history=("1",), canary=Canary(version="3", weight=0.1)), LIB)
    assert keeps.canary == Canary(version="3", weight=0.1)
    clears = rollback(state(production="2", history=("1",), canary=Canary(version="1", weight=0.1),
                            shadow=("3",)), LIB)
    assert (clears.production, clears.canary, clears.shadow) == ("1", None, ("3",))


def test_rollback_to_a_version_gone_from_the_library_is_refused() -> None:
    with refused(r"has no version '0'"):
        rollback(state(production="1", history=("0",)), LIB)


def test_retire_takes_a_version_out_of_canary_shadow_and_history() -> None:
    assert retire(state(canary=Canary(version="2", weight=0.1)), "2", LIB).canary is None
    assert retire(state(shadow=("2", "3")), "3", LIB).shadow == ("2",)
    gone = retire(state(history=("2", "3")), "2", LIB)
    assert gone.history == ("3",) and gone.changed.what == "retire fraud v2 (from history)"
    gone_from_library = Library(model="fraud", versions=("1",))
    assert retire(state(shadow=("2",)), "2", gone_from_library).shadow == ()
    with refused(r"fraud v1 is production and cannot be retired: promote another version first"):
        retire(state(), "1", LIB)
    with refused(r"fraud v4 is not deployed \(production 1, canary -, shadow -, history \[\]\): nothing to retire"):
        retire(state(), "4", LIB)


def test_check_serving_names_each_served_version() -> None:
    check_serving(state(canary=Canary(version="2", weight=0.1), shadow=("3",)), LIB)
    with refused(r"has no version '9'"):
        check_serving(state(shadow=("9",)), LIB)
    check_serving(state(history=("9",)), LIB)  # history is not served


def test_the_state_refuses_what_breaks_its_rules() -> None:
    for fields in ({"canary": {"version": "1", "weight": 0.1}}, {"shadow": ["2", "2"]}, {"shadow": ["1"]},
                   {"canary": {"version": "2", "weight": 2}}, {"history": ["1"] * (HISTORY_MAX + 1)},
                   {"surprise": 1}, {"model": "Fraud!"}):
        with pytest.raises(ValueError):
            state(**fields)
    with pytest.raises(ValueError):
        state().model_copy().__setattr__("production", "2")


def test_the_json_round_trips() -> None:
    current = state(canary=Canary(version="2", weight=0.05), shadow=("3",), history=("0",))
    document = json.loads(current.model_dump_json())
    assert document == {"model": "fraud", "production": "1", "canary": {"version": "2", "weight": 0.05},
                        "shadow": ["3"], "history": ["0"], "seq": 4,
                        "changed": {"by": "a@b", "at_ms": 1, "what": "x"}}
    assert Deployment.model_validate_json(current.model_dump_json()) == current


def test_describe_change_says_old_to_new() -> None:
    old = state(canary=Canary(version="2", weight=0.05))
    assert describe_change(old, promote(old, "2", LIB)) == \
        "production 1 -> 2, canary 2 (0.05) -> -, history [] -> ['1']"


def test_scan_library_checks_the_sha256_with_the_library(tmp_path: Path) -> None:
    register_onnx(tmp_path, "1")
    shutil.copytree(tmp_path / "tiny" / "1", tmp_path / "tiny" / "2")
    manifest = json.loads((tmp_path / "tiny" / "2" / MANIFEST).read_text())
    (tmp_path / "tiny" / "2" / MANIFEST).write_text(json.dumps({**manifest, "version": "2"}))
    shutil.copytree(tmp_path / "tiny" / "1", tmp_path / "tiny" / "3")
    (tmp_path / "tiny" / "3" / MANIFEST).write_text(json.dumps({**manifest, "version": "3"}))
    (tmp_path / "tiny" / "3" / "model.onnx").write_bytes(b"corrupted")
    library = scan_library(tmp_path, "tiny")
    assert library.versions == ("1", "2", "3") and set(library.broken) == {"3"}
    assert "its sha256 is" in library.broken["3"]
    with refused(r"version '3' of 'tiny' cannot be deployed, it fails its check: refusing .*its sha256 is"):
        promote(implicit("tiny", library).model_copy(update={"production": "1"}), "3", library)
    assert scan_library(tmp_path, "tiny", verify=("1",)).broken == {}
