"""``worker.device``: ``cpu`` never touches CUDA, ``auto`` takes CUDA only when it is usable (and says why not),
``cuda`` refuses in one line naming what is missing, a session ONNX Runtime quietly opened on the CPU is caught;
on a GPU the batch goes through IOBinding in device chunks, with the same outputs as ``session.run``.

The tests that need the GPU itself are in tests/gpu (skipped without one)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from streamscore.settings import WorkerSettings
from streamscore.workers import devices
from streamscore.workers.devices import CPU, CUDA, DeviceChoice, Missing
from streamscore.workers.library import ModelError
from streamscore.workers.metrics import WorkerMetrics
from streamscore.workers.runtime import OnnxRuntime, load_model
from tests.contract.artifacts import VIEWS, expected, register_onnx

NO_DRIVER = (Missing("the NVIDIA driver (libcuda.so.1)", "install the NVIDIA driver on the host"),
             Missing("cuDNN 9 (libcudnn.so.9)", devices.GPU_EXTRA))


def _lacking(monkeypatch: pytest.MonkeyPatch, missing: tuple[Missing, ...]) -> None:
    monkeypatch.setattr(devices, "cuda_check", lambda: missing)


def test_cpu_never_looks_for_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def touched() -> tuple[Missing, ...]:
        raise AssertionError("device=cpu looked for CUDA")

    monkeypatch.setattr(devices, "cuda_check", touched)
    register_onnx(tmp_path)
    model = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="cpu"))
    assert isinstance(model, OnnxRuntime)
    assert model.session.get_providers() == [CPU] and model.device_note == "device=cpu"
    assert not model.bind and model.chunk_rows == 0, "the CPU path runs session.run, unchanged"


def test_auto_without_cuda_runs_on_the_cpu_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    _lacking(monkeypatch, NO_DRIVER)
    register_onnx(tmp_path)
    with caplog.at_level(logging.INFO, logger="streamscore.workers.runtime"):
        model = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="auto"))
    assert model.session.get_providers() == [CPU]
    assert model.device_note == ("device=auto: CUDA not usable here, lacking the NVIDIA driver (libcuda.so.1); "
                                 "cuDNN 9 (libcudnn.so.9); on the CPU")
    assert any("on onnxruntime CPUExecutionProvider (device=auto: CUDA not usable here" in record.getMessage()
               for record in caplog.records)


def test_auto_on_this_machine_agrees_with_the_check(tmp_path: Path) -> None:
    register_onnx(tmp_path)
    model = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="auto"))
    if devices.cuda_check():
        assert model.provider == CPU and "CUDA not usable here" in model.device_note
    else:
        assert model.provider == CUDA and model.bind


def test_cuda_required_refuses_in_one_line_naming_what_is_missing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _lacking(monkeypatch, NO_DRIVER)
    register_onnx(tmp_path)
    with pytest.raises(ModelError) as refused:
        load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="cuda"))
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("worker.device=cuda (STREAMSCORE_WORKER__DEVICE) needs a usable GPU, and this machine lacks "
                       "the NVIDIA driver (libcuda.so.1): install the NVIDIA driver on the host; cuDNN 9 "
                       "(libcudnn.so.9): pip install 'streamscore[gpu]'. Or set STREAMSCORE_WORKER__DEVICE=auto to "
                       "use the CPU when there is no GPU")
    with pytest.raises(ModelError, match="needs a usable GPU"):
        devices.preflight(WorkerSettings(device="tensorrt"))


@pytest.mark.skipif(not devices.cuda_check(), reason="CUDA is usable here (tests/gpu covers it)")
def test_cuda_on_this_machine_names_the_missing_driver_or_provider() -> None:
    with pytest.raises(ModelError) as refused:
        devices.preflight(WorkerSettings(device="cuda"))
    assert any(name in str(refused.value) for name in ("libcuda.so.1", "a GPU", "the CUDA provider"))


def test_an_onnxruntime_without_the_cuda_provider_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    missing = devices.cuda_check.__wrapped__()
    assert [item.what for item in missing] == ["the CUDA provider (this onnxruntime has only "
                                               "['CPUExecutionProvider'])"]
    assert "pip install onnxruntime-gpu" in missing[0].fix


def test_a_silent_fallback_to_the_cpu_is_refused_when_cuda_is_required(tmp_path: Path) -> None:
    choice = DeviceChoice([(CUDA, {}), CPU], CUDA, "device=cuda on GPU 0")
    artifact = tmp_path / "model.onnx"
    with pytest.raises(ModelError, match=r"opened .*model.onnx on \['CPUExecutionProvider'\], not "
                                         "CUDAExecutionProvider"):
        devices.require_provider(WorkerSettings(device="cuda"), choice, [CPU], artifact)
    note = devices.require_provider(WorkerSettings(device="auto"), choice, [CPU], artifact)
    assert note == "device=auto: CUDAExecutionProvider failed to initialise for model.onnx; on CPUExecutionProvider"
    assert devices.require_provider(WorkerSettings(device="cuda"), choice, [CUDA, CPU], artifact) == choice.note


def test_cuda_choice_passes_the_gpu_and_tensorrt_its_engine_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _lacking(monkeypatch, ())
    monkeypatch.setattr(devices, "tensorrt_check", lambda: ())
    choice = devices.choose(WorkerSettings(device="cuda", gpu_id=1))
    assert choice.providers == [(CUDA, {"device_id": 1}), CPU] and choice.wanted == CUDA
    cache = tmp_path / "engines"
    choice = devices.choose(WorkerSettings(device="tensorrt", tensorrt_cache_dir=cache))
    assert choice.wanted == devices.TENSORRT and choice.providers[1:] == [(CUDA, {"device_id": 0}), CPU]
    assert choice.providers[0][1]["trt_engine_cache_path"] == str(cache) and cache.is_dir()


def test_the_bound_path_in_chunks_gives_the_outputs_of_session_run(tmp_path: Path) -> None:
    """IOBinding and the device chunks, run here on the CPU provider: the same outputs, in the same order."""
    register_onnx(tmp_path)
    plain = load_model(tmp_path, "tiny", VIEWS, WorkerSettings(device="cpu"))
    assert isinstance(plain, OnnxRuntime)
    bound = OnnxRuntime(plain.manifest, plain.path, VIEWS, plain.session, bind=True)
    bound.chunk_rows = 4
    inputs = np.random.default_rng(3).normal(size=(11, 3)).astype(np.float32)
    for rows in (inputs, inputs[:4], inputs[:1]):
        got, want = bound.run(rows), plain.run(rows)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_allclose(bound.run(inputs)["p"], expected(inputs)["p"], rtol=1e-5)
    bound.warm_up()


def test_metrics_name_the_provider_of_each_model_and_replace_it_on_a_new_version() -> None:
    metrics = WorkerMetrics()
    metrics.serve_provider("fraud", "1", CPU, "device=auto: CUDA not usable here, lacking a GPU; on the CPU")
    metrics.serve_provider("other", "3", CUDA, "device=cuda on GPU 0")
    metrics.serve_provider("fraud", "2", CPU, "device=cpu")
    text = metrics.render().decode()
    lines = [line for line in text.splitlines() if line.startswith("streamscore_model_provider{")]
    assert sorted(lines) == [
        'streamscore_model_provider{device="device=cpu",model="fraud",provider="CPUExecutionProvider",'
        'version="2"} 1.0',
        'streamscore_model_provider{device="device=cuda on GPU 0",model="other",provider="CUDAExecutionProvider",'
        'version="3"} 1.0',
    ]
