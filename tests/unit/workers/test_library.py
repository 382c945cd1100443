"""The model library without servers: manifests parsed (old ones included) and refused with the reason, the
artifact's sha256 checked before a load, a runtime the worker does not have refused, versions in order."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from streamscore import fastpath
from streamscore.settings import WorkerSettings
from streamscore.workers.library import (
    MANIFEST,
    Manifest,
    ModelError,
    file_sha256,
    read_manifest,
    verified_artifact,
    version_dir,
    versions,
)
from streamscore.workers.runtime import load_model
from tests.contract.artifacts import MANIFEST as TINY
from tests.contract.artifacts import VIEWS, register_onnx

SHA = "ab" * 32


def manifest(**changes: Any) -> dict[str, Any]:
    return {**TINY, "sha256": SHA, **changes}


def write_version(models_dir: Path, version: str, document: dict[str, Any] | str) -> Path:
    folder = models_dir / "tiny" / version
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(document if isinstance(document, str) else json.dumps(document))
    return folder


def test_a_manifest_of_before_runtimes_loads_with_the_defaults() -> None:
    old = {key: value for key, value in manifest().items() if key not in ("runtime", "artifact")}
    parsed = Manifest.model_validate(old)
    assert (parsed.runtime, parsed.artifact, parsed.onnx_input, parsed.runtime_options) == \
        ("onnxruntime", "model.onnx", "x", {})


def test_the_manifest_maps_inputs_onto_request_and_view_columns() -> None:
    parsed = Manifest.model_validate(manifest())
    assert parsed.view_names == ["card"]
    assert parsed.request_features == (fastpath.RequestFeature("amount"), fastpath.RequestFeature("hour", 1, 12.0))
    assert parsed.input_columns(VIEWS) == [fastpath.InputColumn(True, -1, 0), fastpath.InputColumn(False, 0, 1),
                                           fastpath.InputColumn(True, -1, 1)]
    missing_feature = Manifest.model_validate(manifest(inputs=[{"name": "card.nope", "source": "view"}]))
    with pytest.raises(ModelError, match="view 'card' has no feature 'nope'"):
        missing_feature.input_columns(VIEWS)
    with pytest.raises(ModelError, match="reads view 'shop', which is not declared"):
        Manifest.model_validate(manifest(inputs=[{"name": "shop.risk", "source": "view"}])).input_columns(VIEWS)


@pytest.mark.parametrize(("changes", "words"), [
    ({"sha256": "AB" * 32}, "sha256 must be 64 lower-case hex digits"),
    ({"name": "Tiny Model"}, "model name 'Tiny Model'"),
    ({"version": "1/2"}, "version '1/2'"),
    ({"artifact": "../../etc/passwd"}, "a file name in the version folder"),
    ({"inputs": [{"name": "spend", "source": "view"}]}, "must be '<view>.<feature>'"),
    ({"onnx_inputs": "x"}, "Extra inputs are not permitted"),
    ({"inputs": []}, "at least 1 item"),
])
def test_an_invalid_manifest_is_refused_naming_the_file_and_the_field(tmp_path: Path, changes: dict[str, Any],
                                                                      words: str) -> None:
    folder = write_version(tmp_path, "1", manifest(**changes))
    with pytest.raises(ModelError, match="is not a valid manifest") as refusal:
        read_manifest(folder)
    assert str(folder / MANIFEST) in str(refusal.value) and words in str(refusal.value)


def test_a_missing_or_unreadable_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist: every model version folder needs a manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ModelError, match="is not a valid manifest"):
        read_manifest(write_version(tmp_path, "1", "{not json"))


def test_register_writes_the_artifact_its_sha256_and_every_field(tmp_path: Path) -> None:
    folder = register_onnx(tmp_path / "models")
    written = json.loads((folder / MANIFEST).read_text())
    assert written["sha256"] == file_sha256(folder / "model.onnx")
    assert written["runtime"] == "onnxruntime" and written["artifact"] == "model.onnx"
    assert verified_artifact(folder, read_manifest(folder)) == folder / "model.onnx"


def test_a_changed_artifact_is_refused_with_both_digests(tmp_path: Path) -> None:
    folder = register_onnx(tmp_path / "models")
    artifact = folder / "model.onnx"
    expected = file_sha256(artifact)
    artifact.write_bytes(artifact.read_bytes()[:-1])
    with pytest.raises(ModelError, match=re.escape(f"refusing {artifact}: its sha256 is {file_sha256(artifact)} but "
                                                   f"the manifest says {expected}")):
        verified_artifact(folder, read_manifest(folder))
    artifact.unlink()
    with pytest.raises(ModelError, match=r"model\.onnx does not exist"):
        verified_artifact(folder, read_manifest(folder))


def test_a_runtime_the_worker_does_not_have_is_refused_at_load_in_one_line(tmp_path: Path) -> None:
    register_onnx(tmp_path / "models", runtime="tensorrt-llm")
    assert read_manifest(tmp_path / "models" / "tiny" / "1").runtime == "tensorrt-llm", "any name parses"
    with pytest.raises(ModelError) as refusal:
        load_model(tmp_path / "models", "tiny", VIEWS, WorkerSettings(device="cpu"))
    message = str(refusal.value)
    assert "\n" not in message
    assert "field 'runtime' is 'tensorrt-llm'" in message and "known runtimes: ['onnxruntime']" in message
    assert str(tmp_path / "models" / "tiny" / "1" / MANIFEST) in message


def test_versions_are_ordered_by_number_not_by_text(tmp_path: Path) -> None:
    for version in ["10", "9", "2", "1.10", "1.9", "b", "a"]:
        write_version(tmp_path, version, manifest(version=version))
    (tmp_path / "tiny" / "not-a-version").mkdir()  # no manifest: not a version
    assert versions(tmp_path, "tiny") == ["1.9", "1.10", "2", "9", "10", "a", "b"]
    assert version_dir(tmp_path, "tiny") == tmp_path / "tiny" / "b"
    assert version_dir(tmp_path, "tiny", "9") == tmp_path / "tiny" / "9"
    assert versions(tmp_path, "nope") == []


def test_an_absent_model_or_version_is_refused_saying_what_there_is(tmp_path: Path) -> None:
    write_version(tmp_path, "1", manifest())
    with pytest.raises(ModelError, match="no model 'fraud' in"):
        version_dir(tmp_path, "fraud")
    with pytest.raises(ModelError, match=r"model 'tiny' has no version '3'; available: \['1'\]"):
        version_dir(tmp_path, "tiny", "3")
