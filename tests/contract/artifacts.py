"""Tiny model artifacts, built in the test (no training, no files in the repository), and the model library
versions that serve them: one builder per runtime of ``workers.runtime.RUNTIMES``.

The model: three input columns (the request's ``amount``, the view feature ``card.spend``, the request's
``hour``), ``logits = x @ W + B`` (n x 2) and ``p = sigmoid(logits)``; the manifest serves ``logits`` whole and
the second column of ``p``. ``expected`` computes the same in numpy.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamscore.featurestore.views import parse_views
from streamscore.workers.library import register

W = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=np.float32)
B = np.array([0.1, -0.2], dtype=np.float32)
OPSET = 17
"""An opset every onnxruntime of the last years runs (the installed onnx would write a newer one)."""

VIEWS = parse_views({"views": [
    {"name": "card", "entity": "card_id",
     "features": [{"name": "count", "type": "int", "default": 0},
                  {"name": "spend", "type": "float", "default": -1.0}]},
]})

MANIFEST: dict[str, Any] = {
    "name": "tiny",
    "version": "1",
    "runtime": "onnxruntime",
    "onnx_input": "x",
    "inputs": [{"name": "amount", "source": "request"},
               {"name": "card.spend", "source": "view"},
               {"name": "hour", "source": "request", "default": 12.0}],
    "outputs": [{"name": "logits", "onnx_output": "logits"},
                {"name": "p", "onnx_output": "p", "column": 1}],
    "description": {"domain": "tests", "input_modality": "tabular: three numbers",
                    "result_kind": "two logits and a probability"},
}


def expected(inputs: np.ndarray) -> dict[str, np.ndarray]:
    logits = inputs @ W + B
    return {"logits": logits, "p": (1.0 / (1.0 + np.exp(-logits)))[:, 1]}


def onnx_model(path: Path, input_name: str = "x", *, one_row: bool = False, second_input: bool = False) -> Path:
    """Write the model as ONNX. ``one_row``: ``logits`` has one row whatever the batch (a broken model);
    ``second_input``: the graph takes a second, unused input."""
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, 3])]
    if second_input:
        inputs.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [None, 1]))
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["xw"]),
             helper.make_node("Add", ["xw", "B"], ["full" if one_row else "logits"])]
    if one_row:
        nodes.append(helper.make_node("ReduceMean", ["full"], ["logits"], axes=[0], keepdims=1))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["p"]))
    graph = helper.make_graph(
        nodes, "tiny", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2]),
         helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 2])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def register_onnx(models_dir: Path, version: str = "1", *, model: dict[str, Any] | None = None,
                  **manifest: Any) -> Path:
    """Register the tiny ONNX model as ``tiny`` ``version`` (manifest fields overridden by ``manifest``,
    ``onnx_model`` options by ``model``); returns the version folder."""
    with tempfile.TemporaryDirectory() as build:
        artifact = onnx_model(Path(build) / "tiny.onnx", **(model or {}))
        return register(models_dir, artifact, {**MANIFEST, "version": version, **manifest})


REGISTER: dict[str, Callable[..., Path]] = {"onnxruntime": register_onnx}
"""Runtime name -> how to register the tiny model for it (``register(models_dir, version, **manifest)``)."""
