"""The fast path's one selection point: the compiled module unless STREAMSCORE_PUREPYTHON asks for the twin.

A compiled module that silently failed to load would make every other test exercise the twin only; these
tests are the ones that fail then.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import streamscore.fastpath as fastpath
from streamscore.fastpath import parse_flag

PURE_REQUESTED = parse_flag("STREAMSCORE_PUREPYTHON", os.environ.get("STREAMSCORE_PUREPYTHON"))


@pytest.mark.skipif(PURE_REQUESTED, reason="STREAMSCORE_PUREPYTHON forces the twin in this run")
def test_compiled_module_is_loaded() -> None:
    from streamscore.fastpath import _fast

    assert fastpath.IMPLEMENTATION == "compiled"
    assert fastpath.impl is _fast
    assert fastpath.decode_batch is _fast.decode_batch
    assert fastpath.assemble is _fast.assemble
    assert fastpath.encode_predictions is _fast.encode_predictions
    assert _fast.__file__ is not None and not _fast.__file__.endswith((".py", ".pyc"))


@pytest.mark.skipif(not PURE_REQUESTED, reason="only when STREAMSCORE_PUREPYTHON forces the twin")
def test_twin_is_loaded_when_forced() -> None:
    from streamscore.fastpath import _pure

    assert fastpath.IMPLEMENTATION == "pure"
    assert fastpath.impl is _pure
    assert fastpath.decode_batch is _pure.decode_batch


@pytest.mark.parametrize("raw", [None, "", "0", "false", "False", " no ", "off", "OFF"])
def test_parse_flag_false(raw: str | None) -> None:
    assert parse_flag("FLAG", raw) is False


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes", "on"])
def test_parse_flag_true(raw: str) -> None:
    assert parse_flag("FLAG", raw) is True


@pytest.mark.parametrize("raw", ["2", "treu", "enabled", "-1", "0.0"])
def test_parse_flag_rejects_garbage(raw: str) -> None:
    with pytest.raises(ValueError, match="FLAG"):
        parse_flag("FLAG", raw)


def _import_in_subprocess(flag: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STREAMSCORE_PUREPYTHON": flag}
    code = "import streamscore.fastpath as f; print(f.IMPLEMENTATION, f.impl.__name__)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize(("flag", "expected"), [
    ("1", "pure streamscore.fastpath._pure"),
    ("true", "pure streamscore.fastpath._pure"),
    ("0", "compiled streamscore.fastpath._fast"),
    ("false", "compiled streamscore.fastpath._fast"),
    ("", "compiled streamscore.fastpath._fast"),
])
def test_flag_selects_at_import(flag: str, expected: str) -> None:
    result = _import_in_subprocess(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_garbage_flag_fails_the_import() -> None:
    result = _import_in_subprocess("maybe")
    assert result.returncode != 0
    assert "STREAMSCORE_PUREPYTHON='maybe' is not a boolean" in result.stderr
