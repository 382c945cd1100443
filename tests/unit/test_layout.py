"""The package layout: a small root package, no defaults inside the checkout, and the parts outside the core
(the local-stack tooling, the demo, the benchmarks) refused in one line where they are not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

import streamscore_stack.stack
from streamscore.cli import main
from streamscore.settings import Settings, StackSettings

REPO = Path(__file__).resolve().parents[2]


def test_the_root_package_holds_only_settings_and_the_cli() -> None:
    entries = {path.name for path in (REPO / "streamscore").iterdir() if path.name != "__pycache__"}

    assert entries == {"__init__.py", "__main__.py", "cli.py", "settings.py"}


def _path_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            found |= _path_defaults(type(default), f"{prefix}{name}.")
        elif isinstance(default, Path) or name.endswith(("_dir", "_file")) or name == "dir":
            found[prefix + name] = default
    return found


def test_no_settings_default_points_into_the_checkout() -> None:
    defaults = _path_defaults(Settings)

    assert {"models_dir", "views_file", "data_dir", "stack.dir", "stack.cache_dir"} <= set(defaults)
    for name, default in defaults.items():
        assert default is None or (isinstance(default, Path) and not default.is_absolute()), (name, default)
    assert StackSettings().dir is None and StackSettings().cache_dir is None


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize(("args", "module", "extra"), [
    (["demo"], "sklearn", "demo"),
    (["demo"], "hdrh", "demo"),
    (["bench", "--smoke"], "matplotlib", "bench"),
    (["bench", "--smoke"], "skl2onnx", "bench"),
    (["produce", "--model", "fraud", "--generate", "3"], "streamscore_examples", "demo"),
])
def test_a_missing_extra_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch, args: list[str], module: str,
                                               extra: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec None, import fails

    line = _one_line_error(args)

    assert f"[{extra}] extra" in line and module in line and f"pip install 'streamscore[{extra}]'" in line


def test_stack_commands_without_the_stack_tooling_say_where_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "streamscore_stack", None)

    line = _one_line_error(["stack", "status"])

    assert "checkout" in line and "scripts/bootstrap" in line


def test_the_stack_outside_its_checkout_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Installed from a wheel, the package has no deploy/local/ beside it: no stack dir in site-packages."""
    monkeypatch.setattr(streamscore_stack.stack, "DEPLOY_DIR", tmp_path / "deploy" / "local")

    with pytest.raises(streamscore_stack.StackError, match="clone the repository"):
        streamscore_stack.Stack(StackSettings())
    line = _one_line_error(["stack", "status"])
    assert "runs from a streamscore checkout" in line


def test_the_stack_defaults_to_its_checkout_whatever_the_current_directory(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)

    stack = streamscore_stack.Stack(StackSettings(), echo=lambda line: None)

    assert stack.dir == REPO / ".stack"
    assert stack.jars.cache_dir == REPO / ".cache"
    assert streamscore_stack.DEPLOY_DIR == REPO / "deploy" / "local"
