"""The laptop compose file, checked without a container engine: against the compose-spec schema (the one
check-jsonschema vendors), and against the project: settings that exist, the worker's port scraped by Prometheus.
The dashboard it provisions is checked by tests/unit/test_dashboard.py."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from streamscore.settings import Settings

COMPOSE = Path(__file__).parents[2] / "deploy" / "compose"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((COMPOSE / "docker-compose.yml").read_text()))


def test_the_compose_file_follows_the_compose_spec() -> None:
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # its $schema names draft-07 without the trailing '#'
    validator.validate(_compose())
    broken = _compose()
    broken["services"]["worker"]["ports"] = {"web": 6066}
    broken["services"]["worker"]["depend_on"] = ["kafka"]
    assert len(list(validator.iter_errors(broken))) == 2  # the schema does catch a wrong type and a typo


def test_services_depend_on_services_that_exist_and_mount_files_of_the_checkout() -> None:
    services = _compose()["services"]
    assert {"kafka", "cassandra", "redis", "worker", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on {needed}, which is no service"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):  # the demo's data is made by `make demo`; the configs are files here
                assert (COMPOSE / source).exists(), f"{name} mounts {source}, which is not there"


def test_the_worker_settings_are_settings_and_prometheus_scrapes_its_web_port(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _compose()["services"]["worker"]
    for name, value in worker["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()  # unknown STREAMSCORE_ variables are refused
    assert worker["read_only"] is True and str(settings.data_dir) in worker["tmpfs"]
    assert f"{settings.worker.web_port}:{settings.worker.web_port}" in worker["ports"]
    scrape = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"worker:{settings.worker.web_port}"]



def test_the_monitor_listens_beyond_loopback_and_prometheus_scrapes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = _compose()["services"]["monitor"]
    for name, value in monitor["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert monitor["command"][0] == "monitor" and settings.monitoring.web_bind == "0.0.0.0"
    assert monitor["read_only"] is True and "/data" in monitor["tmpfs"]  # the image's working directory
    scrape = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    targets = [target for job in scrape["scrape_configs"] for config in job["static_configs"]
               for target in config["targets"]]
    assert f"monitor:{settings.monitoring.web_port}" in targets
