"""Optimized variants of a model version: cheaper to run, measured against their parent.

Two ways to make one, each registered as a new version of the same model (``library.register``) whose manifest
names its ``parent`` and how it was made (``made_by``: method, parameters, time), keeps the parent's inputs,
outputs (names, columns, ONNX names, shapes and types) and ``stages``, so it is served exactly as the parent is:

- ``quantize_int8``: ONNX Runtime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): int8
  weights, activations quantized per batch at run time, as ``<V>-int8``. Dynamic rather than static: on the
  demo MLP static (QDQ or QOperator, calibrated on 4k training rows) quantizes the sigmoid and the output too,
  is slower than the float model (13.2 against 10.2 µs at batch 1, 0.14 against 0.11 at 2048) and moves scores
  by up to 0.10; dynamic quantizes only the MatMuls and stays within 0.04.
- ``distill``: a smaller student trained on the parent's scores over a model-input matrix (the parent scored
  through its runtime): scikit-learn's StandardScaler + ``MLPRegressor`` (one hidden layer of 8) fitted to
  logit(parent score), exported with skl2onnx, with a short ONNX tail (sigmoid, the two-column probabilities,
  the 0.5 label) that gives it the parent's outputs, as ``<V>-distilled``. A linear student (ridge on the same
  logit) was tried first and lost 0.03 of held-out AUC on the demo model; the (8,) MLP keeps it within 0.001.

``compare`` scores every version on one matrix and reports what each costs and changes: ONNX Runtime µs per
request at several batch sizes (CPU, one intra-op thread, as a worker runs), artifact size, |score - parent
score|, held-out AUC (given labels), agreement of the label and of the manifest's threshold decision.

The quantization and the export need the ``onnx`` package, the student scikit-learn and skl2onnx (the
``[demo]`` extra); they are imported only when a variant is made, and their absence is a one-line ``ModelError``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from streamscore.featurestore.views import Feature, FeatureView
from streamscore.settings import WorkerSettings
from streamscore.streams.clock import now_ms

from .library import Manifest, ModelError, read_manifest, register, verified_artifact, version_dir, versions
from .runtime import ModelRuntime, load_model

log = logging.getLogger(__name__)

INT8 = "int8"
DISTILL = "distill"
SUFFIX = {INT8: "int8", DISTILL: "distilled"}
"""Version suffix per method: ``<parent>-<suffix>`` (then ``-2``, ``-3``, ... when taken)."""

MEASURE_SETTINGS = WorkerSettings(device="cpu", intra_op_threads=1)
"""How variants are scored and timed: the CPU provider, one intra-op thread (a worker's default)."""

BATCHES = (1, 256, 2048)
_EPS = 1e-6


# --- the parent -----------------------------------------------------------------------------------------------

def _needs(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"optimized variants need {', '.join(missing)} (the [demo] extra): pip install "
                         "'streamscore[demo]' (in a checkout: .venv/bin/pip install -e '.[demo]')")


def parent_of(models_dir: Path, model: str, version: str) -> tuple[Manifest, Path]:
    """The parent's manifest and verified artifact: ModelError for an unknown model or version, an artifact
    failing its sha256, or a runtime other than ONNX Runtime."""
    folder = version_dir(models_dir, model, version)
    manifest = read_manifest(folder)
    if manifest.runtime != "onnxruntime":
        raise ModelError(f"model {model} v{version} runs on {manifest.runtime!r}: optimized variants are made "
                         "from ONNX graphs (runtime 'onnxruntime')")
    return manifest, verified_artifact(folder, manifest)


def free_version(models_dir: Path, model: str, base: str) -> str:
    """``base`` if the model has no such version, else the first free ``base-2``, ``base-3``, ..."""
    taken = set(versions(models_dir, model))
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def stand_in_views(manifest: Manifest) -> dict[str, FeatureView]:
    """Views that only name the manifest's view columns: enough to load a model that scores a whole
    model-input matrix (no feature store behind it)."""
    features: dict[str, list[str]] = {}
    for spec in manifest.inputs:
        if spec.source == "view":
            features.setdefault(spec.view, []).append(spec.feature)
    return {view: FeatureView(name=view, entity=f"{view}_entity",
                              features=tuple(Feature(name=name) for name in dict.fromkeys(names)))
            for view, names in features.items()}


def load_version(models_dir: Path, model: str, version: str) -> ModelRuntime:
    """A version loaded through the library and its runtime (sha256 checked, warmed up) on the CPU with one
    intra-op thread, ready to ``run`` a model-input matrix."""
    manifest = read_manifest(version_dir(models_dir, model, version))
    return load_model(models_dir, model, stand_in_views(manifest), MEASURE_SETTINGS, version)


def _register_variant(models_dir: Path, parent: Manifest, artifact: Path, method: str, params: dict[str, Any],
                      how: str) -> Manifest:
    version = free_version(models_dir, parent.name, f"{parent.version}-{SUFFIX[method]}")
    fields = parent.model_dump(exclude={"sha256"})
    description = {**fields["description"],
                   "summary": f"{how}, made from v{parent.version}. Parent: {parent.description.summary}".strip()}
    fields.update(version=version, artifact="model.onnx", description=description, parent=parent.version,
                  made_by={"method": method, "params": params, "created_at_ms": now_ms()})
    folder = register(models_dir, artifact, fields)
    log.info("registered %s v%s (%s of v%s) in %s", parent.name, version, method, parent.version, folder)
    return read_manifest(folder)


# --- int8 -----------------------------------------------------------------------------------------------------

@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger for every call."""

    def drop(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize_int8(models_dir: Path, model: str, version: str, *, per_channel: bool = False) -> Manifest:
    """Register ``<version>-int8``: the parent with its MatMul/Gemm weights in int8 (ONNX Runtime's dynamic
    quantization; activations are quantized per batch at run time). ModelError when there is nothing to
    quantize."""
    _needs("onnx")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    parent, artifact = parent_of(models_dir, model, version)
    op_types = ["MatMul", "Gemm"]
    with tempfile.TemporaryDirectory() as scratch:
        quantized = Path(scratch) / "model.onnx"
        with _quiet_quantizer():
            quantize_dynamic(artifact, quantized, op_types_to_quantize=op_types, per_channel=per_channel,
                             weight_type=QuantType.QInt8)
        integer_ops = sum(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger")
                          for node in onnx.load(str(quantized)).graph.node)
        if not integer_ops:
            raise ModelError(f"model {model} v{version} has no MatMul or Gemm to quantize: an int8 variant would "
                             "be the same graph")
        params = {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                  "per_channel": per_channel, "op_types_to_quantize": op_types, "quantized_nodes": integer_ops}
        return _register_variant(models_dir, parent, quantized, INT8, params,
                                 f"int8 weights (ONNX Runtime dynamic quantization of {integer_ops} MatMul)")


# --- distillation ---------------------------------------------------------------------------------------------

def _binary_outputs(parent: Manifest, runtime: ModelRuntime) -> tuple[str, str, list[str]]:
    """The parent's ONNX outputs as a binary classifier: the (n, 2) float probabilities read at column 1 and
    any int label outputs; ModelError for any other layout."""
    graph_outputs = {output.name: output for output in runtime.session.get_outputs()}  # type: ignore[attr-defined]
    probabilities, labels = [], []
    for spec in parent.outputs:
        output = graph_outputs[spec.onnx_output]
        if output.type == "tensor(float)" and spec.column == 1 and len(output.shape) == 2:
            probabilities.append(spec)
        elif output.type.startswith("tensor(int") and len(output.shape) == 1 and spec.column is None:
            labels.append(spec.onnx_output)
        else:
            probabilities, labels = [], [spec.onnx_output, "?"]
            break
    if len({spec.onnx_output for spec in probabilities}) != 1 or len(set(labels)) != len(labels):
        raise ModelError(f"model {parent.name} v{parent.version}: distill makes binary classifiers, whose outputs "
                         "are one (n, 2) float probabilities output read at column 1 and optionally (n,) integer "
                         f"labels; this manifest has {[spec.model_dump() for spec in parent.outputs]}")
    return probabilities[0].onnx_output, probabilities[0].name, labels


def _graph_input(runtime: ModelRuntime) -> str:
    return str(runtime.input_name)  # type: ignore[attr-defined]


def _student_onnx(student: Any, n_columns: int, input_name: str, probabilities: str, labels: list[str],
                  label_type: int, opset: int, order: list[str], path: Path) -> None:
    """The fitted student (predicting logit(score), output (n, 1)) with a tail that gives it the parent's outputs,
    in the parent graph's ``order``: ``probabilities`` = [1 - p, p] (float32, n x 2) and each label = p > 0.5 as
    ``label_type`` (n,)."""
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    exported = convert_sklearn(student, initial_types=[(input_name, FloatTensorType([None, n_columns]))],
                               target_opset={"": opset, "ai.onnx.ml": 3})
    graph = exported.graph
    logit = graph.output[0].name
    prefix = "distill_tail_"
    graph.initializer.extend([
        helper.make_tensor(f"{prefix}one", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor(f"{prefix}half", TensorProto.FLOAT, [1], [0.5]),
        helper.make_tensor(f"{prefix}flat", TensorProto.INT64, [1], [-1]),
    ])
    graph.node.extend([
        helper.make_node("Sigmoid", [logit], [f"{prefix}p"]),
        helper.make_node("Sub", [f"{prefix}one", f"{prefix}p"], [f"{prefix}q"]),
        helper.make_node("Concat", [f"{prefix}q", f"{prefix}p"], [probabilities], axis=1),
        helper.make_node("Greater", [f"{prefix}p", f"{prefix}half"], [f"{prefix}positive"]),
        helper.make_node("Cast", [f"{prefix}positive"], [f"{prefix}label"], to=label_type),
        helper.make_node("Reshape", [f"{prefix}label", f"{prefix}flat"], [f"{prefix}label_flat"]),
    ])
    graph.node.extend(helper.make_node("Identity", [f"{prefix}label_flat"], [label]) for label in labels)
    made = {probabilities: helper.make_tensor_value_info(probabilities, TensorProto.FLOAT, [None, 2]),
            **{label: helper.make_tensor_value_info(label, label_type, [None]) for label in labels}}
    del graph.output[:]
    graph.output.extend(made[name] for name in order)
    onnx.checker.check_model(exported)
    path.write_bytes(exported.SerializeToString())


def distill(models_dir: Path, model: str, version: str, inputs: np.ndarray, *, hidden: Sequence[int] = (8,),
            alpha: float = 1e-3, max_iter: int = 300, seed: int = 0) -> Manifest:
    """Register ``<version>-distilled``: StandardScaler + MLPRegressor(``hidden``) fitted to logit(parent score)
    on ``inputs`` (the float32 model-input matrix, e.g. the parent's training inputs), with the parent's
    outputs. The parent is scored through its runtime."""
    _needs("onnx", "sklearn", "skl2onnx")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parent, artifact = parent_of(models_dir, model, version)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if inputs.ndim != 2 or inputs.shape[1] != len(stand_in_columns(parent)) or inputs.shape[0] < 100:
        raise ModelError(f"distill needs a float (rows >= 100, {len(stand_in_columns(parent))}) model-input matrix "
                         f"for {model} v{version}, got shape {inputs.shape}")
    teacher = load_version(models_dir, model, version)
    probabilities, score_name, labels = _binary_outputs(parent, teacher)
    scores = np.asarray(teacher.run(inputs)[score_name], dtype=np.float64)
    target = np.log(np.clip(scores, _EPS, 1 - _EPS) / np.clip(1 - scores, _EPS, 1))
    student = make_pipeline(StandardScaler(), MLPRegressor(
        hidden_layer_sizes=tuple(hidden), alpha=alpha, max_iter=max_iter, early_stopping=True, random_state=seed))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # capped by max_iter: still a student to measure
        student.fit(inputs, target)
    fit_s = time.perf_counter() - started
    fitted = 1.0 / (1.0 + np.exp(-student.predict(inputs)))
    opset = next(entry.version for entry in _onnx_opsets(artifact) if entry.domain in ("", "ai.onnx"))
    params = {"student": f"StandardScaler + MLPRegressor{tuple(hidden)} on logit(parent {score_name})",
              "hidden": list(hidden), "alpha": alpha, "max_iter": max_iter, "seed": seed,
              "epochs": int(student[-1].n_iter_), "fit_s": round(fit_s, 2), "inputs_rows": int(inputs.shape[0]),
              "inputs_sha256": hashlib.sha256(inputs.tobytes()).hexdigest(),
              "train_mean_abs_diff": round(float(np.mean(np.abs(fitted - scores))), 6),
              "tool": "scikit-learn + skl2onnx", "opset": int(opset)}
    order = [output.name for output in teacher.session.get_outputs()  # type: ignore[attr-defined]
             if output.name in (probabilities, *labels)]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        _student_onnx(student, inputs.shape[1], _graph_input(teacher), probabilities, labels,
                      _label_dtype(teacher, labels[0] if labels else ""), int(opset), order, path)
        return _register_variant(models_dir, parent, path, DISTILL, params,
                                 f"distilled student: StandardScaler + MLP {tuple(hidden)} trained on the parent's "
                                 f"scores over {inputs.shape[0]} rows")


def stand_in_columns(manifest: Manifest) -> list[str]:
    """One name per model-input column, in order (a request input of size k gives k columns)."""
    return [spec.name if spec.size == 1 else f"{spec.name}[{i}]" for spec in manifest.inputs for i in range(spec.size)]


def _label_dtype(runtime: ModelRuntime, name: str) -> int:
    from onnx import TensorProto

    kind = next((out.type for out in runtime.session.get_outputs() if out.name == name),  # type: ignore[attr-defined]
                "tensor(int64)")
    return int({"tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32}.get(kind, TensorProto.INT64))


def _onnx_opsets(artifact: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(artifact), load_external_data=False).opset_import)


# --- comparison -----------------------------------------------------------------------------------------------

def us_per_request(runtime: ModelRuntime, inputs: np.ndarray, batch: int, *, repeats: int = 5,
                   min_seconds: float = 0.1) -> float:
    """ONNX Runtime alone (the runtime's ``infer`` of the manifest's outputs, no pipeline), microseconds per
    request at ``batch`` rows per call: the best of ``repeats`` loops of at least ``min_seconds``."""
    rows = np.ascontiguousarray(np.resize(inputs, (batch, inputs.shape[1])), dtype=np.float32)
    wanted = list(dict.fromkeys(output.onnx_output for output in runtime.manifest.outputs))
    runtime.infer(rows, wanted)
    return measure(lambda: runtime.infer(rows, wanted), batch, repeats, min_seconds)["best"]


def measure(call: Any, requests: int, repeats: int, min_seconds: float) -> dict[str, float]:
    """Microseconds per request of ``call`` (which handles ``requests`` requests): loops of ``number`` calls, at
    least ``min_seconds`` long, ``repeats`` times; the best and the median loop, and the loop's length."""
    number = 1
    while True:
        started = time.perf_counter()
        for _ in range(number):
            call()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            break
        number = max(number * 2, int(number * min_seconds / max(elapsed, 1e-9) * 1.2))
    runs = [elapsed]
    for _ in range(repeats - 1):
        started = time.perf_counter()
        for _ in range(number):
            call()
        runs.append(time.perf_counter() - started)
    per_request = sorted(run / number / requests * 1e6 for run in runs)
    return {"best": per_request[0], "median": float(np.median(per_request)), "calls_per_repeat": number}


def score_output(manifest: Manifest) -> str:
    """The output that is the model's score: the one its threshold_decision stage reads, else the first."""
    for stage in manifest.stages:
        if stage.stage == "threshold_decision" and "score" in stage.params:
            return str(stage.params["score"])
    return manifest.outputs[0].name


def decisions(manifest: Manifest, scores: np.ndarray) -> np.ndarray | None:
    """The manifest's threshold_decision of each score, as the stage makes it; None without such a stage."""
    for stage in manifest.stages:
        if stage.stage == "threshold_decision":
            thresholds = np.asarray(stage.params["thresholds"], dtype=np.float64).astype(scores.dtype)
            labels = np.asarray(stage.params["labels"])
            return labels[np.searchsorted(thresholds, scores, side="right")]
    return None


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def compare(models_dir: Path, model: str, compared: Sequence[str], inputs: np.ndarray,
            labels: np.ndarray | None = None, *, batches: Sequence[int] = BATCHES, repeats: int = 5,
            min_seconds: float = 0.1) -> list[dict[str, Any]]:
    """One row per version of ``compared`` (the first is the reference, normally the parent): µs per request
    per batch size, artifact bytes, max and mean |score - reference score| over ``inputs``, AUC against
    ``labels`` (0/1, one per row; None leaves it out), and the share of rows whose label outputs and threshold
    decision agree with the reference's."""
    if labels is not None:
        _needs("sklearn")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    rows: list[dict[str, Any]] = []
    reference: dict[str, np.ndarray] = {}
    reference_decisions: np.ndarray | None = None
    for index, version in enumerate(compared):
        runtime = load_version(models_dir, model, version)
        manifest = runtime.manifest
        outputs = runtime.run(inputs)
        score = np.asarray(outputs[score_output(manifest)])
        decided = decisions(manifest, score)
        if index == 0:
            reference, reference_decisions = outputs, decided
        reference_score = np.asarray(reference[score_output(manifest)])
        difference = np.abs(score.astype(np.float64) - reference_score.astype(np.float64))
        label_names = [name for name, values in outputs.items()
                       if np.asarray(values).dtype.kind in "iu" and name in reference]
        rows.append({
            "version": version,
            "parent": manifest.parent,
            "method": manifest.made_by.method if manifest.made_by else None,
            "artifact_bytes": runtime.path.stat().st_size,
            "us_per_request": {str(batch): us_per_request(runtime, inputs, batch, repeats=repeats,
                                                          min_seconds=min_seconds) for batch in batches},
            "max_abs_diff": float(difference.max()),
            "mean_abs_diff": float(difference.mean()),
            "auc": _auc(labels, score) if labels is not None else None,
            "label_agreement": {name: float(np.mean(outputs[name] == reference[name])) for name in label_names},
            "decision_agreement": (float(np.mean(decided == reference_decisions))
                                   if decided is not None and reference_decisions is not None else None),
            "rows": int(inputs.shape[0]),
        })
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as one markdown table."""
    batches = list(rows[0]["us_per_request"]) if rows else []
    head = (["version", "made by"] + [f"µs/req @{batch}" for batch in batches]
            + ["KiB", "max \\|Δscore\\|", "mean \\|Δscore\\|", "AUC", "label agree", "decision agree"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    for row in rows:
        made = f"{row['method']} of v{row['parent']}" if row["method"] else "(parent)"
        agreements = list(row["label_agreement"].values())
        cells = ([row["version"], made] + [f"{row['us_per_request'][batch]:.3f}" for batch in batches]
                 + [f"{row['artifact_bytes'] / 1024:.1f}", f"{row['max_abs_diff']:.4f}", f"{row['mean_abs_diff']:.5f}",
                    "-" if row["auc"] is None else f"{row['auc']:.4f}",
                    share(min(agreements)) if agreements else "-", share(row["decision_agreement"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
