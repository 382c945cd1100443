"""`streamscore monitor` refuses in one line what it cannot do: a bad alert rule, `--retrain-on` without the
retraining module or naming a rule that is not configured. Nothing is connected before the refusal."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from streamscore.cli import main
from streamscore.settings import get_settings


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_retrain_on_without_the_retraining_module_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "streamscore.workers.retrain", None)  # as if not installed

    line = _one_line_error(["monitor", "--model", "fraud", "--retrain-on", "live_auc < 0.75"])

    assert "--retrain-on needs streamscore.workers.retrain" in line


def test_retrain_on_a_rule_that_is_not_configured_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    retrain = types.ModuleType("streamscore.workers.retrain")
    retrain.retrain = lambda settings, model: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "streamscore.workers.retrain", retrain)
    monkeypatch.setenv("STREAMSCORE_MONITORING__ALERT_RULES", '["live_auc < 0.7"]')

    line = _one_line_error(["monitor", "--model", "fraud", "--retrain-on", "live_auc < 0.75"])

    assert "'live_auc < 0.75' is not an alert rule" in line and "live_auc < 0.7" in line


def test_a_bad_alert_rule_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSCORE_MONITORING__ALERT_RULES", '["live_auc << 0.7"]')

    line = _one_line_error(["monitor", "--model", "fraud"])

    assert "alert rule 'live_auc << 0.7'" in line and "STREAMSCORE_MONITORING__ALERT_RULES" in line


def test_the_retrain_hook_runs_on_its_rule_raised_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from streamscore import cli
    from streamscore.settings import Settings

    calls: list[str] = []
    done = threading.Event()
    retrain = types.ModuleType("streamscore.workers.retrain")

    def run(settings: Settings, model: str) -> None:
        calls.append(model)
        done.set()

    retrain.retrain = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "streamscore.workers.retrain", retrain)
    settings = Settings(monitoring={"alert_rules": ["live_auc < 0.75", "recall < 0.5"]})
    hook = cli._retrain_hook(settings, "fraud", ("live_auc < 0.75",), None)

    hook({"state": "raised", "rule": "recall < 0.5", "version": "1"})
    hook({"state": "cleared", "rule": "live_auc < 0.75", "version": "1"})
    assert calls == []
    hook({"state": "raised", "rule": "live_auc < 0.75", "version": "1"})
    assert done.wait(5) and calls == ["fraud"]


def test_without_scikit_learn_the_monitor_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed

    line = _one_line_error(["monitor", "--model", "fraud"])

    assert "[monitor] extra" in line and "sklearn" in line and "pip install 'streamscore[monitor]'" in line
