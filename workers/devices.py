"""Which ONNX Runtime execution providers a worker gets for ``worker.device``, and why.

- ``cpu``: ``CPUExecutionProvider`` only; nothing here touches CUDA (no library is looked for or loaded).
- ``auto``: CUDA when it is usable here (``cuda_check`` finds nothing missing), else the CPU; the log, ``/status``
  and ``/metrics`` say which, and why CUDA was not used.
- ``cuda`` and ``tensorrt``: required. When something is missing the worker refuses to start with one line
  naming it (the NVIDIA driver, a GPU, the CUDA runtime, cuDNN, TensorRT, the provider in onnxruntime) and
  what to install; and a session that ONNX Runtime created on the CPU anyway (it falls back silently when a
  provider fails to initialise) is refused too (``require_provider``).

``cuda_check`` is cheap and runs once per process: ``onnxruntime.preload_dlls()`` first (it loads the CUDA and
cuDNN libraries of the ``nvidia-*`` wheels of ``pip install 'streamscore[gpu]'`` from site-packages, which the
dynamic loader would not find by itself), then ``dlopen`` of each library the CUDA provider needs by its
soname, then ``cuInit`` and ``cuDeviceGetCount`` through the driver to see a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

from streamscore.settings import WorkerSettings

from .library import ModelError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

GPU_EXTRA = "pip install 'streamscore[gpu]'"
"""What brings the CUDA runtime and cuDNN libraries onnxruntime-gpu needs (its ``cuda`` and ``cudnn`` extras)."""

CUDA_MAJOR_DEFAULT = 13
"""CUDA major version assumed when onnxruntime does not say what it was built with."""


@dataclass(frozen=True)
class Missing:
    """One thing the CUDA provider needs that this machine lacks."""

    what: str
    """What it is, e.g. ``cuDNN 9 (libcudnn.so.9)``."""
    fix: str
    """What to do about it."""



@dataclass(frozen=True)
class DeviceChoice:
    """The providers a session is created with, and a note for the log and /status."""

    providers: list[Any]
    """Provider names, or (name, options) pairs, in ONNX Runtime's order of preference."""
    wanted: str
    """The provider the session must end up on (``require_provider``), or CPU."""
    note: str
    """Why: e.g. ``device=auto: CUDA not usable (no NVIDIA driver ...); on the CPU``."""


def cuda_major() -> int:
    """The CUDA major version this onnxruntime was built with (13 for onnxruntime-gpu 1.2x on CUDA 13)."""
    try:
        from onnxruntime.capi import build_and_package_info

        return int(str(getattr(build_and_package_info, "cuda_version", "")).split(".")[0])
    except (ImportError, ValueError):
        return CUDA_MAJOR_DEFAULT


def _libraries(major: int) -> list[tuple[str, list[str], str]]:
    """(what, sonames, fix) for each group of libraries the CUDA provider loads."""
    return [
        ("the CUDA runtime", [f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}",
                              "libcurand.so.10"], GPU_EXTRA),
        ("cuDNN 9", ["libcudnn.so.9"], GPU_EXTRA),
    ]


def _loads(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def _preload() -> None:
    """onnxruntime's own loader of the pip-installed NVIDIA libraries (onnxruntime-gpu >= 1.21); it prints what
    it could not load, which ``cuda_check`` says better, in one line."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload()


def _gpu_count(driver: ctypes.CDLL) -> int:
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@lru_cache(maxsize=1)
def cuda_check() -> tuple[Missing, ...]:
    """What the CUDA provider of this onnxruntime lacks on this machine (empty: CUDA is usable)."""
    missing: list[Missing] = []
    if CUDA not in ort.get_available_providers():
        missing.append(Missing(f"the CUDA provider (this onnxruntime has only {ort.get_available_providers()})",
                               "pip install onnxruntime-gpu, then " + GPU_EXTRA))
        return tuple(missing)
    _preload()
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        missing.append(Missing("the NVIDIA driver (libcuda.so.1)", "install the NVIDIA driver on the host (in a "
                               "container: pass the GPU in, e.g. docker run --gpus all)"))
    else:
        if _gpu_count(driver) == 0:
            missing.append(Missing("a GPU (the NVIDIA driver sees none)", "check nvidia-smi and "
                                   "CUDA_VISIBLE_DEVICES"))
    major = cuda_major()
    for what, sonames, fix in _libraries(major):
        absent = [soname for soname in sonames if not _loads(soname)]
        if absent:
            missing.append(Missing(f"{what} ({', '.join(absent)})", fix))
    return tuple(missing)


def tensorrt_check() -> tuple[Missing, ...]:
    """What the TensorRT provider lacks beyond CUDA (empty: usable)."""
    if TENSORRT not in ort.get_available_providers():
        return (Missing("the TensorRT provider in this onnxruntime", "pip install onnxruntime-gpu"),)
    if not _loads("libnvinfer.so.10"):
        return (Missing("TensorRT 10 (libnvinfer.so.10)", "install TensorRT 10 for CUDA "
                        f"{cuda_major()} and put its lib folder on LD_LIBRARY_PATH"),)
    return ()


def _gpu_options(settings: WorkerSettings) -> dict[str, Any]:
    return {"device_id": settings.gpu_id}


def _tensorrt_options(settings: WorkerSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"device_id": settings.gpu_id}
    if settings.tensorrt_cache_dir is not None:
        cache = Path(settings.tensorrt_cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    return options


def describe(missing: tuple[Missing, ...]) -> str:
    """What is missing, the items that one fix brings grouped: ``A: fix a; B and C: fix b``."""
    by_fix: dict[str, list[str]] = {}
    for item in missing:
        by_fix.setdefault(item.fix, []).append(item.what)
    return "; ".join(f"{' and '.join(whats)}: {fix}" for fix, whats in by_fix.items())


def refusal(device: str, missing: tuple[Missing, ...]) -> str:
    """The one line a worker that cannot have ``device`` stops with."""
    return (f"worker.device={device} (STREAMSCORE_WORKER__DEVICE) needs a usable GPU, and this machine lacks "
            f"{describe(missing)}. Or set STREAMSCORE_WORKER__DEVICE=auto to use the CPU when there is no GPU")


def choose(settings: WorkerSettings) -> DeviceChoice:
    """The providers for ``settings.device``; ModelError (one line, see ``refusal``) when a required device is
    not usable here."""
    device = settings.device
    if device == "cpu":
        return DeviceChoice([CPU], CPU, "device=cpu")
    missing = cuda_check()
    if device == "tensorrt":
        missing = (*missing, *tensorrt_check())
    if missing and device in ("cuda", "tensorrt"):
        raise ModelError(refusal(device, missing))
    if missing:
        return DeviceChoice([CPU], CPU, "device=auto: CUDA not usable here, lacking "
                            + "; ".join(item.what for item in missing) + "; on the CPU")
    cuda = (CUDA, _gpu_options(settings))
    if device == "tensorrt":
        return DeviceChoice([(TENSORRT, _tensorrt_options(settings)), cuda, CPU], TENSORRT,
                            f"device=tensorrt on GPU {settings.gpu_id}")
    return DeviceChoice([cuda, CPU], CUDA, f"device={device} on GPU {settings.gpu_id}")


def require_provider(settings: WorkerSettings, choice: DeviceChoice, got: list[str], artifact: Path) -> str:
    """The note for a session created with ``choice`` that runs on ``got``: ModelError when a required device
    fell back (ONNX Runtime creates the session on the CPU when a provider fails to initialise)."""
    if choice.wanted in got:
        return choice.note
    if settings.device in ("cuda", "tensorrt"):
        raise ModelError(f"worker.device={settings.device}: onnxruntime opened {artifact} on {got}, not "
                         f"{choice.wanted} (the provider failed to initialise: see its error above); "
                         f"check the GPU with nvidia-smi and the libraries with {GPU_EXTRA}")
    note = f"device=auto: {choice.wanted} failed to initialise for {artifact.name}; on {got[0]}"
    log.warning("%s", note)
    return note


def preflight(settings: WorkerSettings) -> str:
    """Checked once at start, before anything connects: ModelError when the device asked for is not usable.
    Returns the note (``choose``)."""
    note = choose(settings).note
    log.info("inference device: %s", note)
    return note

