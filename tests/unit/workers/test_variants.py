"""Optimized variants on a small demo model: int8 and distilled versions register, load through the library and
the runtime, name their parent and method, keep the parent's outputs and stages, and stay close to it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from streamscore.cli import main
from streamscore.settings import WorkerSettings, get_settings
from streamscore.workers import variants
from streamscore.workers.library import MANIFEST, Manifest, ModelError, read_manifest, version_dir
from streamscore.workers.runtime import OnnxRuntime, load_model
from streamscore_examples.fraud.data import fraud_views
from streamscore_examples.fraud.model import build_and_register, holdout_set, training_set

SEED = 5
N_TRAIN = 6_000
ON_CPU = WorkerSettings(device="cpu")
VIEWS = {view.name: view for view in fraud_views()}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    build_and_register(models_dir, SEED, n_train=N_TRAIN, max_iter=40)
    return models_dir


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    return holdout_set(SEED, 5_000)


@pytest.fixture(scope="module")
def int8(library: Path) -> Manifest:
    return variants.quantize_int8(library, "fraud", "1")


@pytest.fixture(scope="module")
def distilled(library: Path) -> Manifest:
    inputs, _ = training_set(SEED, N_TRAIN)
    return variants.distill(library, "fraud", "1", inputs)


def _served(models_dir: Path, version: str) -> OnnxRuntime:
    model = load_model(models_dir, "fraud", VIEWS, ON_CPU, version)
    assert isinstance(model, OnnxRuntime)
    return model


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


@pytest.mark.parametrize(("variant", "method"), [("int8", "int8"), ("distilled", "distill")])
def test_a_variant_is_a_new_version_naming_its_parent_and_method(request: pytest.FixtureRequest, library: Path,
                                                                 variant: str, method: str) -> None:
    made: Manifest = request.getfixturevalue(variant)
    parent = read_manifest(version_dir(library, "fraud", "1"))

    assert made.version == f"1-{variant}" and made.parent == "1"
    assert made.made_by is not None and made.made_by.method == method and made.made_by.created_at_ms > 1.6e12
    assert read_manifest(version_dir(library, "fraud", made.version)) == made
    assert made.sha256 != parent.sha256
    assert (made.inputs, made.outputs, made.stages, made.onnx_input) == (
        parent.inputs, parent.outputs, parent.stages, parent.onnx_input)
    assert made.stages[0].stage == "threshold_decision"
    assert parent.parent is None and parent.made_by is None
    json.dumps(made.model_dump())  # the params are JSON


@pytest.mark.parametrize("variant", ["int8", "distilled"])
def test_a_variant_serves_the_parents_outputs(request: pytest.FixtureRequest, library: Path, variant: str,
                                              heldout: tuple[np.ndarray, np.ndarray]) -> None:
    made: Manifest = request.getfixturevalue(variant)
    parent, child = _served(library, "1"), _served(library, made.version)
    inputs = heldout[0][:300]

    expected, got = parent.run(inputs), child.run(inputs)

    assert list(got) == list(expected) == ["fraud_probability", "label"]
    for name in expected:
        assert got[name].shape == expected[name].shape and got[name].dtype == expected[name].dtype
    assert [(o.name, o.type, len(o.shape)) for o in child.session.get_outputs()] == [
        (o.name, o.type, len(o.shape)) for o in parent.session.get_outputs()]
    assert np.array_equal(got["label"], (got["fraud_probability"] > 0.5).astype(np.int64))


def test_int8_scores_within_005_of_the_parent(library: Path, int8: Manifest,
                                              heldout: tuple[np.ndarray, np.ndarray]) -> None:
    inputs, labels = heldout
    parent = _served(library, "1").run(inputs)["fraud_probability"]
    quantized = _served(library, int8.version).run(inputs)["fraud_probability"]

    difference = np.abs(quantized - parent)

    assert 0.0 < difference.max() < 0.05 and difference.mean() < 0.005
    assert abs(_auc(labels, quantized) - _auc(labels, parent)) < 0.01
    assert int8.made_by is not None and int8.made_by.params["quantized_nodes"] == 3  # the MLP's three MatMuls


def test_the_distilled_student_keeps_the_auc(library: Path, distilled: Manifest,
                                             heldout: tuple[np.ndarray, np.ndarray]) -> None:
    inputs, labels = heldout
    parent = _served(library, "1").run(inputs)["fraud_probability"]
    student = _served(library, distilled.version).run(inputs)["fraud_probability"]
    parent_auc, student_auc = _auc(labels, parent), _auc(labels, student)

    assert parent_auc > 0.8
    assert abs(student_auc - parent_auc) < 0.05
    assert np.mean(np.abs(student - parent)) < 0.02
    artifacts = {version: (library / "fraud" / version / "model.onnx").stat().st_size
                 for version in ("1", distilled.version)}
    assert artifacts[distilled.version] < artifacts["1"] / 2
    assert distilled.made_by is not None and distilled.made_by.params["inputs_rows"] == N_TRAIN


def test_compare_reports_cost_and_agreement(library: Path, int8: Manifest,
                                            heldout: tuple[np.ndarray, np.ndarray]) -> None:
    inputs, labels = heldout

    rows = variants.compare(library, "fraud", ["1", int8.version], inputs[:2_000], labels[:2_000],
                            batches=(1, 256), repeats=2, min_seconds=0.01)

    reference, variant = rows
    assert reference["max_abs_diff"] == 0.0 and reference["decision_agreement"] == 1.0
    assert reference["label_agreement"] == {"label": 1.0}
    assert variant["method"] == "int8" and variant["parent"] == "1"
    assert 0.0 < variant["max_abs_diff"] < 0.05 and variant["decision_agreement"] > 0.98
    assert all(value > 0 for row in rows for value in row["us_per_request"].values())
    assert 0.8 < variant["auc"] < 1.0
    table = variants.markdown_table(rows)
    assert "| 1-int8 | int8 of v1 |" in table and "µs/req @256" in table


def test_a_taken_name_gets_the_next_free_one(library: Path, int8: Manifest) -> None:
    again = variants.quantize_int8(library, "fraud", "1")

    assert again.version == f"{int8.version}-2" and again.parent == "1"
    shutil.rmtree(library / "fraud" / again.version)


def test_an_old_manifest_without_the_new_fields_still_loads(tmp_path: Path, library: Path) -> None:
    folder = tmp_path / "fraud" / "1"
    shutil.copytree(library / "fraud" / "1", folder)
    fields = json.loads((folder / MANIFEST).read_text())
    del fields["parent"], fields["made_by"]
    (folder / MANIFEST).write_text(json.dumps(fields))

    manifest = read_manifest(folder)

    assert manifest.parent is None and manifest.made_by is None
    assert _served(tmp_path, "1").version == "1"


def test_a_parent_failing_its_sha256_or_unknown_is_refused(tmp_path: Path, library: Path) -> None:
    shutil.copytree(library / "fraud" / "1", tmp_path / "fraud" / "1")
    with open(tmp_path / "fraud" / "1" / "model.onnx", "ab") as artifact:
        artifact.write(b"\0")

    with pytest.raises(ModelError, match="sha256"):
        variants.quantize_int8(tmp_path, "fraud", "1")
    with pytest.raises(ModelError, match="no version '7'"):
        variants.quantize_int8(library, "fraud", "7")
    with pytest.raises(ModelError, match="model-input matrix"):
        variants.distill(library, "fraud", "1", np.zeros((500, 3), np.float32))
    assert not (tmp_path / "fraud" / "1-int8").exists()


# --- the command ----------------------------------------------------------------------------------------------

def _cli(monkeypatch: pytest.MonkeyPatch, models_dir: Path, args: list[str]) -> tuple[int, str]:
    monkeypatch.setenv("STREAMSCORE_MODELS_DIR", str(models_dir))
    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["models", "optimize", *args])
    get_settings.cache_clear()
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_the_command_registers_and_prints_the_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    library: Path, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    shutil.copytree(library / "fraud" / "1", tmp_path / "models" / "fraud" / "1")
    matrix = tmp_path / "inputs.npy"
    np.save(matrix, heldout[0][:1_000])

    code, output = _cli(monkeypatch, tmp_path / "models", ["fraud", "1", "--distill", "--inputs", str(matrix),
                                                           "--report", str(tmp_path / "report")])

    assert code == 0, output
    assert "registered fraud v1-distilled: distill of v1" in output
    assert "| 1 | (parent) |" in output and "| 1-distilled | distill of v1 |" in output
    report = json.loads((tmp_path / "report" / "fraud-1-distilled.json").read_text())
    assert [row["version"] for row in report["rows"]] == ["1", "1-distilled"]
    assert report["variant"]["parent"] == "1"


@pytest.mark.parametrize(("args", "says"), [
    (["fraud", "9", "--int8"], "has no version '9'"),
    (["nope", "1", "--int8"], "no model 'nope'"),
])
def test_the_command_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch, library: Path, args: list[str],
                                         says: str) -> None:
    code, output = _cli(monkeypatch, library, args)

    assert code == 1 and len(output.strip().splitlines()) == 1 and says in output


def test_the_command_names_a_missing_extra(monkeypatch: pytest.MonkeyPatch, library: Path) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)

    code, output = _cli(monkeypatch, library, ["fraud", "1", "--distill"])

    assert code == 1 and len(output.strip().splitlines()) == 1
    assert "[demo] extra" in output and "skl2onnx" in output
