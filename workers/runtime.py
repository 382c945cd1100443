"""Model runtimes: what turns a model version of the library into ``run(float32 matrix) -> outputs``.

``ModelRuntime`` is the contract (as MLServer's ``MLModel``: a runtime implements loading and inference, and the
base class keeps the rest): a runtime subclass opens the verified artifact (``load``), scores a float32
(n x inputs) matrix (``infer``), names the device it runs on (``provider``) and may replace the warm-up; the base
class maps the manifest onto request columns and feature views, picks the manifest's outputs and checks that
exactly one output row came back per input row. The manifest names its runtime (``"runtime": "onnxruntime"``,
the default), looked up in ``RUNTIMES``: a runtime of your own is a subclass plus an entry there, and the
pipeline does not change. ``tests/contract/test_model_runtime.py`` checks every registered runtime.

ONNX Runtime: the providers follow ``worker.device`` (``devices.py``: ``auto`` CUDA when usable else the CPU,
``cuda``/``tensorrt`` required, ``cpu`` only the CPU). On the CPU a batch is one ``session.run``, as before. On a
GPU the batch is bound once per call with IOBinding (the input copied to the device once, the outputs bound to
host memory, so ONNX Runtime copies each back once, straight into the arrays returned), in chunks of at most
``worker.device_batch_rows`` rows. Threads are set for one worker process per core. A warm-up run at load (on
the device the session runs on, at the device chunk size when one is set) makes the first real batch as fast
as the rest and fails a broken model before it takes traffic.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from streamscore.fastpath import DecodeSpec
from streamscore.featurestore.views import FeatureView
from streamscore.settings import WorkerSettings

from . import devices
from .library import MANIFEST, Manifest, ModelError, read_manifest, verified_artifact, version_dir

log = logging.getLogger(__name__)

CUDA = devices.CUDA
CPU = devices.CPU

WARM_UP_ROWS = 8


class ModelRuntime(ABC):
    """A model version loaded on one runtime, ready to score batches. What the pipeline reads: ``run``,
    ``columns``, ``views``, ``decode_spec``, ``manifest``, ``provider``, ``name``, ``version``."""

    runtime: ClassVar[str]
    """Its name in ``RUNTIMES`` and in a manifest's ``runtime`` field."""
    options: ClassVar[frozenset[str]] = frozenset()
    """The keys of a manifest's ``runtime_options`` this runtime takes; any other is refused at load."""
    device_note: str = ""
    """Which device it runs on and why (e.g. ``device=auto: CUDA not usable here, lacking ...; on the CPU``):
    in the log and at /status."""

    def __init__(self, manifest: Manifest, artifact: Path, views: Mapping[str, FeatureView]) -> None:
        self.manifest = manifest
        self.path = artifact
        self.columns = manifest.input_columns(dict(views))
        """Where each model input column comes from, in the manifest's order."""
        self.views = [views[view] for view in manifest.view_names]
        """Views this model reads, in the order of the ViewBlocks handed to assemble."""
        self.decode_spec = DecodeSpec(entity_keys=tuple(view.entity for view in self.views),
                                      request_features=manifest.request_features)
        self._wanted = list(dict.fromkeys(output.onnx_output for output in manifest.outputs))

    @classmethod
    @abstractmethod
    def load(cls, manifest: Manifest, artifact: Path, views: Mapping[str, FeatureView],
             settings: WorkerSettings) -> ModelRuntime:
        """Open the artifact (its sha256 already checked against the manifest); ``ModelError`` when it cannot
        be served, naming the file and what to do."""

    @property
    @abstractmethod
    def provider(self) -> str:
        """The device it runs on, as the runtime names it (e.g. ``CPUExecutionProvider``)."""

    @abstractmethod
    def infer(self, inputs: np.ndarray, outputs: Sequence[str]) -> Sequence[np.ndarray]:
        """The model's raw ``outputs`` (the manifests' ``onnx_output`` names), in that order, for a float32
        (n x len(columns)) matrix."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Score a float32 (n x inputs) matrix: the manifest's outputs by name, one row per input row, or
        ModelError."""
        raw = dict(zip(self._wanted, self.infer(inputs, self._wanted), strict=True))
        outputs = {}
        for output in self.manifest.outputs:
            values = np.asarray(raw[output.onnx_output])
            if values.ndim == 0 or values.shape[0] != inputs.shape[0]:
                rows = values.shape[0] if values.ndim else "a scalar instead"
                raise ModelError(f"model {self.name} v{self.version} returned {rows} rows of "
                                 f"{output.onnx_output!r} for {inputs.shape[0]} inputs")
            outputs[output.name] = values[:, output.column] if output.column is not None else values
        return outputs

    def warm_up(self) -> None:
        """One run on zeros before the model takes traffic: the first real batch is then as fast as the rest,
        and a model that cannot score (or returns the wrong number of rows) fails here, with ModelError."""
        try:
            self.run(np.zeros((WARM_UP_ROWS, len(self.columns)), dtype=np.float32))
        except ModelError:
            raise
        except Exception as exc:  # the runtime's own error types: the model cannot be served
            raise ModelError(f"model {self.name} v{self.version} failed its warm-up run on {self.runtime} "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())})") from exc


def _session_options(settings: WorkerSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxRuntime(ModelRuntime):
    """ONNX Runtime (``"runtime": "onnxruntime"``): the artifact is an ONNX graph with one float32 input of shape
    (batch, len(columns)), named by the manifest's ``onnx_input`` (which may be left out when the graph has
    only one input); outputs are read by their graph names (``onnx_output``)."""

    runtime = "onnxruntime"

    def __init__(self, manifest: Manifest, artifact: Path, views: Mapping[str, FeatureView],
                 session: ort.InferenceSession, *, device_note: str = "device=cpu", device_batch_rows: int = 0,
                 bind: bool | None = None) -> None:
        super().__init__(manifest, artifact, views)
        self.session = session
        self.input_name = _input_name(manifest, artifact, session)
        self.device_note = device_note
        on_gpu = self.provider != CPU
        self.bind = on_gpu if bind is None else bind
        """IOBinding per call (on a GPU); the CPU provider runs ``session.run`` as it always did."""
        self.chunk_rows = device_batch_rows if on_gpu else 0
        """Most rows per runtime call (0: the whole batch)."""

    @classmethod
    def load(cls, manifest: Manifest, artifact: Path, views: Mapping[str, FeatureView],
             settings: WorkerSettings) -> OnnxRuntime:
        choice = devices.choose(settings)
        try:
            session = ort.InferenceSession(str(artifact), sess_options=_session_options(settings),
                                           providers=choice.providers)
        except Exception as exc:  # onnxruntime raises its own types for a file it cannot read as a graph
            raise ModelError(f"onnxruntime cannot open {artifact}: {' '.join(str(exc).split())}") from exc
        note = devices.require_provider(settings, choice, list(session.get_providers()), artifact)
        return cls(manifest, artifact, views, session, device_note=note,
                   device_batch_rows=settings.device_batch_rows)

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    def infer(self, inputs: np.ndarray, outputs: Sequence[str]) -> Sequence[np.ndarray]:
        if not self.bind:
            return self.session.run(list(outputs), {self.input_name: inputs})
        if not self.chunk_rows or inputs.shape[0] <= self.chunk_rows:
            return self._bound(inputs, outputs)
        chunks = [self._bound(inputs[start:start + self.chunk_rows], outputs)
                  for start in range(0, inputs.shape[0], self.chunk_rows)]
        return [np.concatenate([chunk[index] for chunk in chunks]) for index in range(len(outputs))]

    def _bound(self, inputs: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """One run through IOBinding: the input copied to the device once, each output bound to host memory."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(inputs, dtype=np.float32))
        for name in outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def warm_up(self) -> None:
        """The base class's warm-up, then (on a GPU, with a chunk size) one run of a full chunk: the device's
        kernels and memory arena are then ready for the batch size it will see."""
        super().warm_up()
        if self.chunk_rows:
            try:
                self.run(np.zeros((self.chunk_rows, len(self.columns)), dtype=np.float32))
            except ModelError:
                raise
            except Exception as exc:  # the runtime's own error types: the model cannot be served
                raise ModelError(f"model {self.name} v{self.version} failed its warm-up run of {self.chunk_rows} "
                                 f"rows on {self.provider} ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())})") from exc


def _input_name(manifest: Manifest, artifact: Path, session: ort.InferenceSession) -> str:
    names = [graph_input.name for graph_input in session.get_inputs()]
    if manifest.onnx_input is None and len(names) == 1:
        return names[0]
    if manifest.onnx_input is not None and manifest.onnx_input in names:
        return manifest.onnx_input
    said = "leaves out 'onnx_input'" if manifest.onnx_input is None else f"names onnx_input {manifest.onnx_input!r}"
    raise ModelError(f"{artifact.parent / MANIFEST} {said}, but {artifact.name} has the inputs {names}: set "
                     "'onnx_input' to the one that takes the float32 (batch, columns) matrix")


RUNTIMES: dict[str, type[ModelRuntime]] = {
    "onnxruntime": OnnxRuntime,
}
"""Runtimes a manifest may name in its ``runtime`` field."""


def runtime_for(manifest: Manifest, folder: Path) -> type[ModelRuntime]:
    """The runtime class a manifest names; ModelError (one line: the field and the known runtimes) otherwise."""
    runtime = RUNTIMES.get(manifest.runtime)
    if runtime is None:
        raise ModelError(f"{folder / MANIFEST}: field 'runtime' is {manifest.runtime!r}, which is not a runtime "
                         f"of this worker; known runtimes: {sorted(RUNTIMES)}")
    unknown = sorted(set(manifest.runtime_options) - runtime.options)
    if unknown:
        raise ModelError(f"{folder / MANIFEST}: field 'runtime_options' has {unknown}, which runtime "
                         f"{manifest.runtime!r} does not take; it takes {sorted(runtime.options)}")
    return runtime


def load_model(models_dir: Path, name: str, views: Mapping[str, FeatureView], settings: WorkerSettings,
               version: str | None = None) -> ModelRuntime:
    """Load a model version (the newest by default) on the runtime its manifest names: verify its sha256, open it,
    warm it up."""
    folder = version_dir(models_dir, name, version)
    manifest = read_manifest(folder)
    runtime_class = runtime_for(manifest, folder)
    artifact = verified_artifact(folder, manifest)
    runtime = runtime_class.load(manifest, artifact, views, settings)
    runtime.warm_up()
    log.info("loaded model %s v%s (%s, sha256 %s…) on %s %s (%s)", name, manifest.version, artifact,
             manifest.sha256[:12], manifest.runtime, runtime.provider, runtime.device_note or runtime.runtime)
    return runtime
