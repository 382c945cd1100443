"""ONNX Runtime sessions for models of the library.

The CUDA provider is used when a GPU is present (and the installed onnxruntime has it); the CPU provider
otherwise. Threads are set for one worker process per core. A warm-up run at load makes the first real
batch as fast as the rest and fails a broken model before it takes traffic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streamscore.fastpath import DecodeSpec, InputColumn
from streamscore.featurestore.views import FeatureView
from streamscore.settings import WorkerSettings

from .library import Manifest, ModelError, read_manifest, verified_artifact, version_dir

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def choose_providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise ModelError(f"device=cuda asked for, but this onnxruntime has only {available}: "
                             "install onnxruntime-gpu with a matching CUDA")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available and gpu_present() else [CPU]


@dataclass
class ModelRuntime:
    manifest: Manifest
    session: ort.InferenceSession
    columns: list[InputColumn]
    views: list[FeatureView]
    """Views this model reads, in the order of the ViewBlocks handed to assemble."""
    decode_spec: DecodeSpec
    provider: str
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Score a float32 (n x inputs) matrix; one output row per input row, or ModelError."""
        wanted = list(dict.fromkeys(output.onnx_output for output in self.manifest.outputs))
        raw = dict(zip(wanted, self.session.run(wanted, {self.manifest.onnx_input: inputs}), strict=True))
        outputs = {}
        for output in self.manifest.outputs:
            values = np.asarray(raw[output.onnx_output])
            if values.shape[0] != inputs.shape[0]:
                raise ModelError(f"model {self.name} v{self.version} returned {values.shape[0]} rows of "
                                 f"{output.onnx_output!r} for {inputs.shape[0]} inputs")
            outputs[output.name] = values[:, output.column] if output.column is not None else values
        return outputs


def _session_options(settings: WorkerSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def load_model(models_dir: Path, name: str, views: dict[str, FeatureView], settings: WorkerSettings,
               version: str | None = None) -> ModelRuntime:
    """Load a model version (the newest by default): verify its sha256, open a session, warm it up."""
    folder = version_dir(models_dir, name, version)
    manifest = read_manifest(folder)
    artifact = verified_artifact(folder, manifest)
    columns = manifest.input_columns(views)
    providers = choose_providers(settings.device)
    session = ort.InferenceSession(str(artifact), sess_options=_session_options(settings), providers=providers)
    entity_keys = tuple(views[view].entity for view in manifest.view_names)
    runtime = ModelRuntime(
        manifest=manifest,
        session=session,
        columns=columns,
        views=[views[view] for view in manifest.view_names],
        decode_spec=DecodeSpec(entity_keys=entity_keys, request_features=manifest.request_features),
        provider=session.get_providers()[0],
        path=artifact,
    )
    runtime.run(np.zeros((8, len(columns)), dtype=np.float32))
    log.info("loaded model %s v%s (%s, sha256 %s…) on %s", name, manifest.version, artifact,
             manifest.sha256[:12], runtime.provider)
    return runtime
