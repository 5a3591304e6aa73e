"""The deployment files in infra/ stay in step with the gateway's configuration schema."""

from __future__ import annotations

import os
import subprocess
import tomllib

import pytest

from conftest import BIN_DIR, REPO

INFRA = REPO / "infra"


def check_config(path, env_vars: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{name: f"placeholder-{name.lower()}" for name in env_vars})
    return subprocess.run(
        [str(BIN_DIR / "aigw"), "check-config", str(path)], env=env, capture_output=True, text=True, timeout=30
    )


def test_compose_config_is_valid():
    done = check_config(INFRA / "compose-config.toml", ["SIM_BACKEND_KEY", "AIGW_DEMO_KEY"])
    assert done.returncode == 0, done.stderr


def test_k8s_configmap_config_is_valid(tmp_path):
    yaml = pytest.importorskip("yaml")
    configmap = yaml.safe_load((INFRA / "k8s" / "configmap.yaml").read_text())
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    done = check_config(path, ["AOAI_API_KEY", "AIGW_PLATFORM_KEY", "AIGW_ADMIN_KEY"])
    assert done.returncode == 0, done.stderr


def test_k8s_manifests_are_consistent():
    yaml = pytest.importorskip("yaml")
    docs = {}
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    deployment = docs["Deployment"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Every secret the config names is provided by the Secret the pod references.
    secret_env = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert secret_env == set(docs["Secret"]["stringData"])
    # The kubelet must outlive preStop + the gateway's own drain.
    server = tomllib.loads(docs["ConfigMap"]["data"]["config.toml"])["server"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert deployment["terminationGracePeriodSeconds"] > pre_stop + server["shutdown-grace-secs"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


def test_compose_file_parses():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "llm-sim", "aigw-1", "aigw-2", "nginx"} <= set(services)
    assert services["aigw-1"]["volumes"] == ["./compose-config.toml:/etc/aigw/config.toml:ro"]
    nginx = (INFRA / "nginx.conf").read_text()
    assert "server aigw-1:8080" in nginx and "server aigw-2:8080" in nginx
