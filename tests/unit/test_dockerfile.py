"""The image definition kept honest without a container engine (none runs here or in CI): the Dockerfile's
steps are read and held to pyproject.toml and the settings model. What this cannot show is that the image
builds; README's "Deploying" says so."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from streamscore.settings import Settings

ROOT = Path(__file__).parents[2]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                                              if not line.lstrip().startswith("#")))
    steps = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            steps.append((keyword.upper(), " ".join(rest.split())))
    return steps


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            current = stages.setdefault(rest.split(" AS ")[-1].strip(), [])
        current.append((keyword, rest))
    return stages


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_build_stage_copies_every_package_folder_pyproject_maps_and_installs_the_project() -> None:
    build = _stages()["build"]
    copied = {rest.split()[0].rstrip("/") for keyword, rest in build if keyword == "COPY"} | {
        name for keyword, rest in build if keyword == "COPY" for name in rest.split()[:-1]}
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied, f"not copied into the image: {sorted(folders - copied)}"
    assert {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]} <= copied
    runs = " && ".join(rest for keyword, rest in build if keyword == "RUN")
    assert '/opt/streamscore/bin/pip install --no-cache-dir ".[batch]"' in runs  # the dependencies are pyproject's own
    extension = re.search(r'Extension\(\s*"([\w.]+)"', (ROOT / "setup.py").read_text())
    assert extension is not None and f"import {extension.group(1)}" in runs  # the compiled fast path, or no image


def test_the_base_has_the_python_pyproject_requires_and_onnxruntime_gpu_is_the_dependency() -> None:
    (base,) = [rest for keyword, rest in _instructions() if keyword == "ARG" and rest.startswith("BASE=")]
    version = re.search(r"python:(\d+)\.(\d+)", base)
    assert version is not None, base
    minimum = re.search(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum is not None
    assert (int(version[1]), int(version[2])) >= (int(minimum[1]), int(minimum[2]))
    assert any("python3.11" in rest for keyword, rest in _stages()["python"] if keyword == "RUN")  # CUDA bases
    assert any(dependency.startswith("onnxruntime-gpu") for dependency in PYPROJECT["project"]["dependencies"])


def test_the_runtime_runs_as_a_user_and_writes_only_to_the_data_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = _stages()["runtime"]
    (user,) = [rest for keyword, rest in runtime if keyword == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    env = dict(re.findall(r"(\S+?)=(\S+)", " ".join(rest for keyword, rest in runtime if keyword == "ENV")))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no __pycache__ writes on a read-only root
    assert f'VOLUME ["{env["STREAMSCORE_DATA_DIR"]}"]' in {f"{k} {r}" for k, r in runtime}
    assert any(f"chown {user} {env['STREAMSCORE_DATA_DIR']}" in rest for keyword, rest in runtime if keyword == "RUN")
    for name, value in env.items():  # every STREAMSCORE_ variable is a setting (unknown ones are refused)
        if name.startswith("STREAMSCORE_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert str(settings.data_dir) == env["STREAMSCORE_DATA_DIR"] and settings.worker.web_bind == "0.0.0.0"
    assert settings.monitoring.web_bind == "0.0.0.0"  # scraped from outside its container too
    assert ("COPY", "--from=build /opt/streamscore /opt/streamscore") in runtime  # no compiler in the image
    assert not any("gcc" in rest for keyword, rest in runtime if keyword == "RUN")
