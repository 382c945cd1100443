"""The ONNX Runtime runtime on a tiny model built in the test: on the CPU provider when asked (the devices are
in test_devices.py), its outputs by the manifest's names and columns, the graph input found or refused, an artifact
onnxruntime cannot open refused as a model error, and the base class's row check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from streamscore.settings import WorkerSettings
from streamscore.workers.library import MANIFEST, ModelError, read_manifest
from streamscore.workers.runtime import CPU, RUNTIMES, OnnxRuntime, load_model
from tests.contract.artifacts import VIEWS, expected, register_onnx

ON_CPU = WorkerSettings(device="cpu")


def load(models_dir: Path) -> OnnxRuntime:
    model = load_model(models_dir, "tiny", VIEWS, ON_CPU)
    assert isinstance(model, OnnxRuntime)
    return model


def test_onnxruntime_is_the_default_runtime() -> None:
    assert RUNTIMES["onnxruntime"] is OnnxRuntime


def test_the_cpu_provider_runs_when_asked(tmp_path: Path) -> None:
    register_onnx(tmp_path)
    model = load(tmp_path)
    assert model.provider == CPU and model.session.get_providers() == [CPU]


def test_the_outputs_are_the_manifest_names_and_columns(tmp_path: Path) -> None:
    register_onnx(tmp_path, outputs=[{"name": "first_logit", "onnx_output": "logits", "column": 0},
                                     {"name": "probabilities", "onnx_output": "p"},
                                     {"name": "p_yes", "onnx_output": "p", "column": 1}])
    model = load(tmp_path)
    inputs = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]], dtype=np.float32)
    outputs = model.run(inputs)
    assert list(outputs) == ["first_logit", "probabilities", "p_yes"]
    assert outputs["first_logit"].shape == (2,) and outputs["probabilities"].shape == (2, 2)
    assert outputs["first_logit"].dtype == np.float32
    reference = expected(inputs)
    np.testing.assert_allclose(outputs["first_logit"], (inputs @ np.array([[0.5], [2.0], [-0.75]]))[:, 0] + 0.1,
                               rtol=1e-6)
    np.testing.assert_allclose(outputs["p_yes"], reference["p"], rtol=1e-6)
    np.testing.assert_allclose(outputs["probabilities"][:, 1], reference["p"], rtol=1e-6)


def test_the_graph_input_may_be_left_out_when_there_is_one(tmp_path: Path) -> None:
    register_onnx(tmp_path, onnx_input=None, model={"input_name": "features"})
    model = load(tmp_path)
    assert model.input_name == "features" and read_manifest(tmp_path / "tiny" / "1").onnx_input is None


@pytest.mark.parametrize(("onnx_input", "said"), [
    ("x", "names onnx_input 'x'"),
    (None, "leaves out 'onnx_input'"),
])
def test_an_input_the_graph_does_not_have_or_an_ambiguous_one_is_refused(tmp_path: Path, onnx_input: str | None,
                                                                        said: str) -> None:
    register_onnx(tmp_path, onnx_input=onnx_input, model={"input_name": "features", "second_input": True})
    with pytest.raises(ModelError) as refusal:
        load(tmp_path)
    message = str(refusal.value)
    assert said in message and "has the inputs ['features', 'unused']" in message and "\n" not in message


def test_an_artifact_onnxruntime_cannot_open_is_a_model_error(tmp_path: Path) -> None:
    folder = register_onnx(tmp_path)
    garbage = b"not an onnx graph"
    (folder / "model.onnx").write_bytes(garbage)
    document = json.loads((folder / MANIFEST).read_text())
    document["sha256"] = hashlib.sha256(garbage).hexdigest()  # registered as such: the digest matches
    (folder / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(ModelError, match=f"onnxruntime cannot open {folder / 'model.onnx'}"):
        load(tmp_path)


def test_a_batch_answered_with_too_few_rows_is_a_model_error(tmp_path: Path) -> None:
    register_onnx(tmp_path)
    model = load(tmp_path)
    model.infer = lambda inputs, outputs: [np.zeros((1, 2), np.float32)] * len(outputs)  # type: ignore[method-assign]
    with pytest.raises(ModelError, match=r"model tiny v1 returned 1 rows of 'logits' for 3 inputs"):
        model.run(np.zeros((3, 3), np.float32))


def test_a_model_that_fails_its_warm_up_is_refused_at_load(tmp_path: Path) -> None:
    register_onnx(tmp_path, inputs=[{"name": "amount", "source": "request"}])  # 1 column, the graph takes 3
    with pytest.raises(ModelError, match="failed its warm-up run on onnxruntime"):
        load(tmp_path)
