"""On a GPU: ``cuda`` and ``auto`` run on the CUDA provider through IOBinding, in device chunks, with the CPU's
outputs; the heavy model scores as on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamscore.settings import WorkerSettings
from streamscore.workers.devices import CPU, CUDA
from streamscore.workers.runtime import OnnxRuntime, load_model
from streamscore_examples.fraud.data import fraud_views
from streamscore_examples.fraud.deep import DEEP_MODEL_NAME, build_and_register_deep
from streamscore_examples.fraud.model import holdout_set
from tests.contract.artifacts import VIEWS, register_onnx


def test_cuda_and_auto_run_on_the_gpu_with_the_cpu_outputs(tmp_path: Path) -> None:
    register_onnx(tmp_path)
    inputs = np.random.default_rng(5).normal(size=(1000, 3)).astype(np.float32)
    on_cpu = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="cpu")).run(inputs)
    for device in ("cuda", "auto"):
        model = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device=device, device_batch_rows=256))
        assert isinstance(model, OnnxRuntime)
        assert model.provider == CUDA and model.session.get_providers()[:2] == [CUDA, CPU]
        assert model.bind and model.chunk_rows == 256
        assert model.device_note == f"device={device} on GPU 0"
        on_gpu = model.run(inputs)
        for name in on_cpu:
            np.testing.assert_allclose(on_gpu[name], on_cpu[name], rtol=1e-5, atol=1e-6)


def test_device_chunks_give_the_unchunked_outputs(tmp_path: Path) -> None:
    register_onnx(tmp_path)
    inputs = np.random.default_rng(6).normal(size=(1001, 3)).astype(np.float32)
    whole = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="cuda")).run(inputs)
    chunked = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="cuda", device_batch_rows=100)).run(inputs)
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name])


def test_the_heavy_model_scores_on_the_gpu_as_on_the_cpu(tmp_path: Path) -> None:
    build_and_register_deep(tmp_path, n_train=2_000, hidden=(256, 256), epochs=1)
    views = {view.name: view for view in fraud_views()}
    inputs, _ = holdout_set(7, 4_096)
    on_cpu = load_model(tmp_path, DEEP_MODEL_NAME, views, WorkerSettings(device="cpu")).run(inputs)
    on_gpu = load_model(tmp_path, DEEP_MODEL_NAME, views, WorkerSettings(device="cuda",
                                                                       device_batch_rows=1024)).run(inputs)
    np.testing.assert_allclose(on_gpu["fraud_probability"], on_cpu["fraud_probability"], atol=1e-4)
    assert (on_gpu["label"] == on_cpu["label"]).mean() > 0.999
