"""The model library: one folder per model version, holding the artifact and its manifest.

Layout::

    <models_dir>/<model>/<version>/manifest.json
    <models_dir>/<model>/<version>/model.onnx        (the manifest's ``artifact``)

The manifest names the model, its version, the runtime that serves it (``runtime``, ``onnxruntime`` by default;
see ``runtime.RUNTIMES``), the artifact and its sha256 (checked before every load), the inputs in column order
(each a request feature or a feature-view feature), the outputs, what the model knows and does, and (optional)
the training profile (``profile.py``). A version folder that fails its checks is refused with an error that says
why.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamscore.fastpath import InputColumn, RequestFeature
from streamscore.featurestore.views import FeatureView

from .alerts import parse_rules
from .profile import TrainingProfile
from .stages import StageSpec

MANIFEST = "manifest.json"


class ModelError(RuntimeError):
    """A model that cannot be served; the message says which file and what to do."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Request inputs: the key in the request's ``features`` map. View inputs: ``<view>.<feature>``."""
    source: Literal["request", "view"]
    size: int = Field(default=1, ge=1, le=4096)
    """Request inputs only: number of columns (a list of that many numbers when > 1)."""
    default: float | None = None
    """Request inputs only: used when absent; None makes the feature required."""

    @model_validator(mode="after")
    def _view_inputs_are_dotted(self) -> InputSpec:
        if self.source == "view" and (self.name.count(".") != 1 or self.size != 1):
            raise ValueError(f"view input {self.name!r} must be '<view>.<feature>' with size 1")
        return self

    @property
    def view(self) -> str:
        return self.name.split(".")[0]

    @property
    def feature(self) -> str:
        return self.name.split(".")[1]


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Name in the prediction's ``outputs`` map."""
    onnx_output: str
    """Name of the ONNX graph output it is read from."""
    column: int | None = None
    """Pick one column of a 2-d output (e.g. the positive-class probability); None keeps the whole row."""


class Description(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    """What the model is about, e.g. 'card-payment fraud'."""
    input_modality: str
    """What it reads, e.g. 'tabular: card and merchant aggregates plus the transaction amount'."""
    result_kind: str
    """What it answers, e.g. 'probability that the transaction is fraudulent (0..1)'."""
    summary: str = ""
    """Training data, metrics, caveats."""


class MadeBy(BaseModel):
    """How a variant version was made from its parent (``streamscore models optimize``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    """``int8`` (ONNX Runtime's dynamic quantization) or ``distill`` (a smaller student trained on the parent's
    scores); see ``workers/variants.py``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's settings (JSON values), enough to make the variant again from the same parent and inputs."""
    created_at_ms: int = Field(ge=0)
    """When it was made, Unix epoch milliseconds."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    runtime: str = "onnxruntime"
    """The runtime that serves the artifact, by its name in ``runtime.RUNTIMES``; an unknown one is refused at
    load."""
    runtime_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Options of that runtime (each runtime says which keys it takes; others are refused at load)."""
    artifact: str = "model.onnx"
    """File name of the artifact in the version folder."""
    sha256: str
    onnx_input: str | None = None
    """ONNX Runtime: name of the graph's float32 input of shape (batch, len(columns)); may be left out when the
    graph has only one input."""
    inputs: tuple[InputSpec, ...] = Field(min_length=1)
    outputs: tuple[OutputSpec, ...] = Field(min_length=1)
    description: Description
    stages: tuple[StageSpec, ...] = ()
    """Pipeline stages of the model's own, by registered name (workers/stages.py), e.g. a decision rule."""
    parent: str | None = None
    """A variant's parent: the version of the same model it was made from (None: trained, not derived)."""
    made_by: MadeBy | None = None
    """A variant's making: method, its parameters and when (None for a version that is not a variant)."""
    profile: TrainingProfile | None = None
    """Every input column's and output's distribution on the training data, the data's sha256, the training
    parameters and the code version (``workers/profile.py``); the worker's drift stage compares live traffic with
    it. None (older manifests): no drift monitoring for this version."""
    alert_rules: tuple[str | dict[str, Any], ...] = ()
    """Alert rules of this version (``workers/alerts.py``), beside ``STREAMSCORE_MONITORING__ALERT_RULES``: each
    ``"live_auc < 0.75"`` or ``{"metric", "op", "threshold", "column", "name", "min_count"}``."""

    @model_validator(mode="after")
    def _names(self) -> Manifest:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", self.name):
            raise ValueError(f"model name {self.name!r}: lower-case letters, digits, '_' and '-' only")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.version):
            raise ValueError(f"version {self.version!r}: letters, digits, '.', '_' and '-' only")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", self.artifact) or self.artifact in (".", ".."):
            raise ValueError(f"artifact {self.artifact!r}: a file name in the version folder (letters, digits, "
                             "'.', '_', '-')")
        if self.parent == self.version:
            raise ValueError(f"version {self.version!r} names itself as its parent")
        if self.profile is not None:
            unknown = sorted(set(self.profile.columns) - set(self.column_names))
            unknown_outputs = sorted(set(self.profile.outputs) - {output.name for output in self.outputs})
            if unknown or unknown_outputs:
                raise ValueError(f"the profile names columns {unknown} and outputs {unknown_outputs} that the "
                                 f"model does not have (columns: {self.column_names})")
        parse_rules(self.alert_rules)  # a bad rule is refused with the manifest, naming it
        return self

    @property
    def column_names(self) -> list[str]:
        """The name of every model input column, in order: the input's name, ``<name>[i]`` for each column of a
        request input of size > 1."""
        return [spec.name if spec.size == 1 else f"{spec.name}[{i}]" for spec in self.inputs for i in range(spec.size)]

    @property
    def request_features(self) -> tuple[RequestFeature, ...]:
        return tuple(RequestFeature(spec.name, spec.size, spec.default)
                     for spec in self.inputs if spec.source == "request")

    @property
    def view_names(self) -> list[str]:
        """Views read by this model, in first-use order."""
        return list(dict.fromkeys(spec.view for spec in self.inputs if spec.source == "view"))

    def input_columns(self, views: dict[str, FeatureView]) -> list[InputColumn]:
        """Map every model input column onto a request-feature column or a view block column."""
        view_order = self.view_names
        columns: list[InputColumn] = []
        request_column = 0
        for spec in self.inputs:
            if spec.source == "request":
                columns.extend(InputColumn(True, -1, request_column + i) for i in range(spec.size))
                request_column += spec.size
                continue
            view = views.get(spec.view)
            if view is None:
                raise ModelError(f"model {self.name} v{self.version} reads view {spec.view!r}, which is not declared")
            if spec.feature not in view.feature_names:
                raise ModelError(f"model {self.name} v{self.version} reads {spec.name!r}, but view "
                                 f"{spec.view!r} has no feature {spec.feature!r}")
            columns.append(InputColumn(False, view_order.index(spec.view), view.feature_names.index(spec.feature)))
        return columns


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as artifact:
        for chunk in iter(lambda: artifact.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist: every model version folder needs a manifest") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelError(f"{path} is not a valid manifest: {exc}") from exc


def verified_artifact(version_dir: Path, manifest: Manifest) -> Path:
    """The artifact's path, once its sha256 matches the manifest; refuses otherwise."""
    artifact = version_dir / manifest.artifact
    if not artifact.is_file():
        raise ModelError(f"{artifact} does not exist (named by {version_dir / MANIFEST})")
    actual = file_sha256(artifact)
    if actual != manifest.sha256:
        raise ModelError(
            f"refusing {artifact}: its sha256 is {actual} but the manifest says {manifest.sha256}; "
            "the artifact was changed or corrupted: re-register the model"
        )
    return artifact


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[._-]", version)]


def versions(models_dir: Path, model: str) -> list[str]:
    """Versions of a model present in the library, oldest first."""
    model_dir = Path(models_dir) / model
    if not model_dir.is_dir():
        return []
    found = [entry.name for entry in model_dir.iterdir() if (entry / MANIFEST).is_file()]
    return sorted(found, key=_version_key)


def newest_primary(models_dir: Path, model: str) -> str | None:
    """The newest version that is not a variant of another (no ``parent``): what a worker serves when no
    deployment names a production version. Variants (``models optimize``) are served only when deployed."""
    for version in reversed(versions(models_dir, model)):
        try:
            manifest = json.loads((Path(models_dir) / model / version / MANIFEST).read_text())
        except (OSError, ValueError):
            return version  # unreadable: loading it says why
        if not isinstance(manifest, dict) or not manifest.get("parent"):
            return version
    return None


def version_dir(models_dir: Path, model: str, version: str | None = None) -> Path:
    """Folder of one version (the newest that is not a variant when version is None)."""
    available = versions(models_dir, model)
    if not available:
        raise ModelError(f"no model {model!r} in {models_dir}: register it first (streamscore demo does for 'fraud')")
    chosen = (newest_primary(models_dir, model) or available[-1]) if version is None else version
    if chosen not in available:
        raise ModelError(f"model {model!r} has no version {chosen!r}; available: {available}")
    return Path(models_dir) / model / chosen


def register(models_dir: Path, artifact_path: Path, manifest: dict) -> Path:
    """Copy an artifact into the library with its manifest (written in full: defaults such as ``runtime``
    spelled out), computing the sha256."""
    manifest = {**manifest, "sha256": file_sha256(artifact_path)}
    parsed = Manifest.model_validate(manifest)
    target = Path(models_dir) / parsed.name / parsed.version
    target.mkdir(parents=True, exist_ok=True)
    (target / parsed.artifact).write_bytes(Path(artifact_path).read_bytes())
    (target / MANIFEST).write_text(json.dumps(parsed.model_dump(), indent=2) + "\n")
    return target
