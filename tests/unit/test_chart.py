"""The Helm chart, rendered by helm (scripts/install-helm builds it into .tools/bin; skipped, saying so, where
it is not built) and held to the project: the consumer group KEDA reads is the workers' own, replicas never pass
the partitions, the probes are the worker's endpoints, every variable is a setting, secrets arrive as files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamscore.settings import Settings
from streamscore.streams import topics

ROOT = Path(__file__).parents[2]
HELM = Path(os.environ.get("HELM", ROOT / ".tools" / "bin" / "helm"))
CHART = ROOT / "deploy" / "helm" / "streamscore"

pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"no helm at {HELM}: scripts/install-helm builds it")


def _render(*sets: str, expect_failure: bool = False) -> Any:
    arguments = [str(HELM), "template", "streamscore", str(CHART)]
    for value in sets:
        arguments += ["--set-json" if value.startswith("secretFiles=") else "--set", value]
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=60)
    if expect_failure:
        assert done.returncode != 0
        return done.stderr
    assert done.returncode == 0, done.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(done.stdout) if doc}


def test_keda_reads_the_workers_group_and_never_scales_past_the_partitions() -> None:
    rendered = _render("topicPrefix=acme", "partitions=6", "autoscaling.maxReplicas=50")
    scaled = rendered[("ScaledObject", "streamscore-streamscore-worker")]["spec"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka" and trigger["metadata"]["consumerGroup"] == topics.worker_group("acme")
    assert scaled["maxReplicaCount"] == 6 and scaled["scaleTargetRef"]["name"] == "streamscore-streamscore-worker"
    worker = rendered[("Deployment", "streamscore-streamscore-worker")]["spec"]
    assert "replicas" not in worker  # KEDA owns the count
    env = {item["name"]: item["value"] for item in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["STREAMSCORE_TOPIC_PREFIX"] == "acme" and env["STREAMSCORE_WORKER__PARTITIONS"] == "6"
    assert "exceeds partitions" in _render("autoscaling.enabled=false", "worker.replicas=9", "partitions=4",
                                           expect_failure=True)


def test_the_worker_pod_probes_its_endpoints_runs_read_only_and_takes_only_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    secret = {"secretName": "kafka-credentials", "key": "password", "setting": "STREAMSCORE_KAFKA__SASL_PASSWORD_FILE"}
    rendered = _render("secretFiles=" + json.dumps([secret]))
    pod = rendered[("Deployment", "streamscore-streamscore-worker")]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["spec"]["securityContext"][
        "runAsNonRoot"] is True
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert "/data" in mounts and "/tmp" in mounts  # the only writable places
    env = {item["name"]: item["value"] for item in container["env"]}
    secret_path = env["STREAMSCORE_KAFKA__SASL_PASSWORD_FILE"]
    assert Path(secret_path).parent.as_posix() in mounts and mounts[Path(secret_path).parent.as_posix()]["readOnly"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("STREAMSCORE_KAFKA__SASL_PASSWORD_FILE")  # a file only the pod has
    settings = Settings()  # an unknown STREAMSCORE_ variable is refused
    assert int(container["ports"][0]["containerPort"]) == settings.worker.web_port
    assert container["args"] == ["worker", "--model", "fraud"]
    assert ("PodDisruptionBudget", "streamscore-streamscore-worker") in rendered


def test_the_monitor_and_the_batch_scoring_cronjob_run_their_commands() -> None:
    rendered = _render("models={fraud,churn}", "batchScoring.enabled=true", "batchScoring.model=churn")
    monitors = [doc for (kind, name), doc in rendered.items() if kind == "Deployment" and "-monitor-" in name]
    assert sorted(doc["spec"]["template"]["spec"]["containers"][0]["args"][2] for doc in monitors) == ["churn", "fraud"]
    for monitor in monitors:  # Prometheus scrapes its /metrics on the port it listens on
        pod = monitor["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["STREAMSCORE_MONITORING__WEB_PORT"] == \
            str(container["ports"][0]["containerPort"]) == "6067"
    cron = rendered[("CronJob", "streamscore-streamscore-score")]["spec"]
    args = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["score", "--model", "churn"] and "--input" in args and "--output" in args
    assert cron["concurrencyPolicy"] == "Forbid"
