"""The layer contract (.importlinter, run by `make lint`): kept by the tree as it is, and broken, with the
offending import named, by one import that runs upward."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_tree(target: Path) -> Path:
    for name in ("streamscore", "streams", "fastpath", "featurestore", "workers"):
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    (target / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "lint-imports", target / "scripts")
    shutil.copy(ROOT / ".importlinter", target)
    return target


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(tree / "scripts" / "lint-imports")], capture_output=True, text=True,
                          env={"LINT_IMPORTS": str(LINT_IMPORTS), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_the_tree_keeps_the_layer_contract(tmp_path: Path) -> None:
    result = _lint(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_it_and_is_named(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    topics = tree / "streams" / "topics.py"
    topics.write_text(topics.read_text() + "\nfrom streamscore.workers import pipeline  # upward\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "streamscore.streams.topics -> streamscore.workers.pipeline" in result.stdout
