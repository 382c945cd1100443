"""Marks the tests whose outcome depends on which twin of the fast path runs (``twin``): those decode or encode
through it, in this process or in a worker they start. `make test` runs the whole suite with the compiled fast
path, then only these with the pure-Python twins forced (STREAMSCORE_PUREPYTHON=1): the other tests (feature
store, delivery, crash and outage scenarios, lint-like checks) would run the same code twice."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
TWIN_DEPENDENT = (
    "unit/test_fastpath_parity.py",
    "unit/test_fastpath_selection.py",
    "unit/workers/test_pipeline.py",
    "e2e/test_worker_e2e.py",
    "reliability/test_hostile.py",
    "reliability/test_fuzz_decoders.py",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    dependent = {HERE / path for path in TWIN_DEPENDENT}
    for item in items:
        if item.path in dependent:
            item.add_marker(pytest.mark.twin)
