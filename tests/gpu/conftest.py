"""Tests that need a usable CUDA GPU (``streamscore.workers.devices.cuda_check`` finds nothing missing): marked
``gpu`` and skipped, with what is missing as the reason, on a machine without one. ``bench/gpu_bench.sh`` runs
them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamscore.workers import devices

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = devices.cuda_check()
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)
            if missing:
                item.add_marker(pytest.mark.skip(reason="no usable CUDA, lacking " + devices.describe(missing)))
