"""The deployment files in infra/ (and azure.yaml): schema checks where a validator installs from the
registries (Kubernetes: kubernetes-validate; compose: check-jsonschema's compose-spec schema), a
structural check of the Bicep (no Bicep compiler installs from them), every config they carry
validated by `aigw check-config`, and the release binary started as the containers start it: a
non-root user, a working directory it cannot write, the compose and Kubernetes configs' settings."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import BIN_DIR, REPO, SIM_BACKEND_KEY, Process, _wait_healthy, gateway_url

INFRA = REPO / "infra"
AZURE = INFRA / "azure"
RELEASE_AIGW = REPO / "target" / "release" / "aigw"
# The image's user (infra/Dockerfile: useradd --uid 10001).
IMAGE_UID = 10001


PLACEHOLDER_URLS = {
    "AIGW_REDIS_URL": "redis://127.0.0.1:6399/0",
    # What App Service sets in an app with a managed identity.
    "IDENTITY_ENDPOINT": "http://127.0.0.1:41741/msi/token",
}


def check_config(path, env_vars: list[str]) -> subprocess.CompletedProcess:
    """`aigw check-config` with each named variable set: a placeholder, or a URL where one is parsed
    (never connected to)."""
    env = dict(os.environ)
    for name in env_vars:
        env[name] = PLACEHOLDER_URLS.get(name, f"placeholder-{name.lower()}")
    return subprocess.run(
        [str(BIN_DIR / "aigw"), "check-config", str(path)], env=env, capture_output=True, text=True, timeout=30
    )


def k8s_docs() -> dict[str, dict]:
    """The Kustomization's resources, keyed "Kind/name"."""
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((INFRA / "k8s" / resource).read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def k8s_config() -> str:
    return k8s_docs()["ConfigMap/aigw-config"]["data"]["config.toml"]


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def gateway_services(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name.startswith("aigw-")}


# ---- configs ---------------------------------------------------------------------------------------


def test_compose_config_is_valid():
    done = check_config(INFRA / "compose-config.toml", ["SIM_BACKEND_KEY", "AIGW_DEMO_KEY", "AIGW_REDIS_URL"])
    assert done.returncode == 0, done.stderr


def test_k8s_configmap_config_is_valid(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(k8s_config())
    done = check_config(path, ["AOAI_API_KEY", "AIGW_PLATFORM_KEY", "AIGW_ADMIN_KEY", "AIGW_REDIS_URL"])
    assert done.returncode == 0, done.stderr


# ---- Kubernetes ------------------------------------------------------------------------------------


def test_k8s_manifests_match_the_kubernetes_schema():
    """kubernetes-validate ships the API schemas: strict mode refuses unknown fields too."""
    docs = k8s_docs()
    assert len(docs) >= 7
    for key, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{key}: {e.message} at {'.'.join(map(str, e.path))}")


def test_k8s_gateways_share_redis_three_replicas_no_affinity():
    docs = k8s_docs()
    deployment = docs["Deployment/aigw"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 3
    assert docs["HorizontalPodAutoscaler/aigw"]["spec"]["minReplicas"] == 3
    assert docs["HorizontalPodAutoscaler/aigw"]["spec"]["scaleTargetRef"]["name"] == "aigw"
    assert docs["Service/aigw"]["spec"]["sessionAffinity"] == "None"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID and pod["securityContext"]["runAsNonRoot"]

    # [redis] names a variable the pod sets, to the Redis Service of redis.yaml.
    config = tomllib.loads(k8s_config())
    env = {e["name"]: e for e in container["env"]}
    redis_url = env[config["redis"]["url-env"]]["value"]
    redis_service = docs["Service/aigw-redis"]
    assert redis_url.startswith(f"redis://{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}")

    # Every secret the config names is provided by the Secret the pod references.
    secret = yaml.safe_load((INFRA / "k8s" / "secret.example.yaml").read_text())
    assert {name for name, e in env.items() if "valueFrom" in e} == set(secret["stringData"])

    # The pre-stop drain: sleep, then SIGTERM, and the kubelet outlives both plus the gateway's grace.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + config["server"]["shutdown-grace-secs"]


def test_k8s_redis_keeps_the_ledger_on_disk():
    docs = k8s_docs()
    redis = docs["StatefulSet/aigw-redis"]["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in redis["template"]["spec"]["containers"][0]["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in redis["volumeClaimTemplates"]}
    assert mounts[data_dir] in claims, "the AOF directory must be on the PersistentVolumeClaim"


# ---- compose ---------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec():
    """check-jsonschema's vendored compose-spec schema (no network)."""
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(INFRA / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_gateways_share_redis_three_replicas_no_affinity():
    services = compose()["services"]
    gateways = gateway_services(services)
    assert len(gateways) == 3
    config = tomllib.loads((INFRA / "compose-config.toml").read_text())
    nginx = (INFRA / "nginx.conf").read_text()
    for name, gateway in gateways.items():
        assert gateway["volumes"] == ["./compose-config.toml:/etc/aigw/config.toml:ro"]
        assert gateway["environment"][config["redis"]["url-env"]].startswith("redis://redis:6379")
        assert gateway["read_only"] is True and gateway["user"] == f"{IMAGE_UID}:{IMAGE_UID}"
        assert f"server {name}:8080" in nginx
        assert "/ready" in " ".join(gateway["healthcheck"]["test"])
        # compose sends SIGTERM at once; its kill comes after the gateway's own drain.
        assert int(gateway["stop_grace_period"].removesuffix("s")) > config["server"]["shutdown-grace-secs"]
    assert not re.search(r"^\s*(ip_hash|hash|sticky)\b", nginx, re.M), "no session affinity"


def test_compose_redis_keeps_the_ledger_on_disk():
    spec = compose()
    redis = spec["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, path = redis["volumes"][0].split(":")[:2]
    assert path == "/data" and volume in spec["volumes"], "the AOF must live in a named volume"


# ---- the image -------------------------------------------------------------------------------------


def test_dockerfile_workdir_exists_and_belongs_to_the_user():
    runtime = (INFRA / "Dockerfile").read_text().split("FROM debian:bookworm-slim", 1)[1]
    workdir = re.search(r"^WORKDIR (\S+)$", runtime, re.M).group(1)
    assert re.search(rf"install -d -o {IMAGE_UID} -g {IMAGE_UID} -m 0750 {re.escape(workdir)}$", runtime, re.M)
    assert f'VOLUME ["{workdir}"]' in runtime
    assert re.search(rf"^USER {IMAGE_UID}:{IMAGE_UID}$", runtime, re.M)
    # The image's WORKDIR comes after USER so it is not created by Docker as root.
    assert runtime.index("USER ") < runtime.index("WORKDIR ")


# ---- Azure (Bicep) ---------------------------------------------------------------------------------


def bicep(name: str) -> str:
    return (AZURE / name).read_text()


def bicep_resources(text: str) -> dict[str, tuple[str, str]]:
    """symbolic name -> (type@version, body) for each top-level `resource` declaration."""
    out = {}
    starts = list(re.finditer(r"^resource (\w+) '([^']+)'", text, re.M))
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        out[m.group(1)] = (m.group(2), text[m.start() : end])
    return out


def bicep_params(text: str) -> dict[str, bool]:
    """param name -> whether it has a default."""
    return {m.group(1): m.group(2) is not None for m in re.finditer(r"^param (\w+) \w+( = .*)?$", text, re.M)}


def strip_bicep_strings(text: str) -> str:
    text = re.sub(r"'''.*?'''", "''", text, flags=re.S)
    text = re.sub(r"'(?:[^'\\\n]|\\.)*'", "''", text)
    return re.sub(r"//[^\n]*", "", text)


@pytest.mark.parametrize("name", ["main.bicep", "appservice.bicep", "openai-role.bicep", "containerapps.bicep"])
def test_bicep_brackets_balance(name):
    """The nearest thing to a parse without a Bicep compiler: every bracket outside strings closes."""
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in strip_bicep_strings(bicep(name)):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch} in {name}"
    assert not stack, f"unclosed {stack} in {name}"


def test_bicep_modules_get_the_params_they_declare():
    for caller in ["main.bicep"]:
        text = bicep(caller)
        for m in re.finditer(r"^module \w+ '([^']+)' = \{(.*?)^\}", text, re.M | re.S):
            module = bicep(m.group(1))
            declared = bicep_params(module)
            given = set(re.findall(r"^    (\w+):", m.group(2).split("params: {", 1)[1], re.M))
            assert given <= set(declared), f"{m.group(1)}: unknown params {given - set(declared)}"
            required = {p for p, has_default in declared.items() if not has_default}
            assert required <= given, f"{m.group(1)}: missing params {required - given}"


def test_azd_files_point_at_the_template_and_the_dockerfile():
    azd = yaml.safe_load((REPO / "azure.yaml").read_text())
    assert (REPO / azd["infra"]["path"] / f"{azd['infra']['module']}.bicep").is_file()
    service = azd["services"]["gateway"]
    assert service["host"] == "appservice"
    assert (REPO / service["project"] / service["docker"]["path"]).resolve() == INFRA / "Dockerfile"
    # azd finds the web app by this tag, and the registry through this output.
    assert "'azd-service-name': 'gateway'" in bicep("appservice.bicep")
    assert re.search(r"^output AZURE_CONTAINER_REGISTRY_ENDPOINT string", bicep("main.bicep"), re.M)
    parameters = json.loads((AZURE / "main.parameters.json").read_text())["parameters"]
    declared = bicep_params(bicep("main.bicep"))
    assert set(parameters) <= set(declared)
    assert {p for p, has_default in declared.items() if not has_default} <= set(parameters)


def test_app_service_matches_the_reference_deployment():
    resources = bicep_resources(bicep("appservice.bicep"))
    plan_type, plan = resources["plan"]
    assert plan_type.startswith("Microsoft.Web/serverfarms@")
    assert "kind: 'linux'" in plan and "reserved: true" in plan
    assert "name: 'P0v3'" in plan and "capacity: 3" in plan

    text = bicep("appservice.bicep")
    site_config = re.search(r"^var siteConfig = \{(.*?)^\}", text, re.M | re.S).group(1)
    assert "alwaysOn: true" in site_config
    assert "healthCheckPath: '/ready'" in site_config
    assert "mountPath: '/etc/aigw'" in site_config

    for name, type_prefix in [("app", "Microsoft.Web/sites@"), ("staging", "Microsoft.Web/sites/slots@")]:
        kind, body = resources[name]
        assert kind.startswith(type_prefix)
        assert "serverFarmId: plan.id" in body, f"{name} is on the plan"
        assert "clientAffinityEnabled: false" in body
        assert "siteConfig: siteConfig" in body
        assert "type: 'SystemAssigned, UserAssigned'" in body
    assert "parent: app" in resources["staging"][1]

    # The model is called with the identity: the role on the account for both identities...
    role = bicep("openai-role.bicep")
    assert "var openAiUserRole = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'" in role  # Cognitive Services OpenAI User
    assert "scope: openAi" in role
    assert "principalIds: [gateway.outputs.appPrincipalId, gateway.outputs.stagingPrincipalId]" in bicep("main.bicep")
    # ...and no key anywhere in the config.
    config = tomllib.loads(rendered_app_service_config(with_redis=False))
    assert config["backends"]["aoai"]["auth"] == {"type": "managed-identity", "provider": "app-service"}


def test_app_service_redis_is_entra_only_with_aof():
    resources = bicep_resources(bicep("appservice.bicep"))
    _, database = resources["redisDb"]
    assert "aofEnabled: true" in database
    assert "accessKeysAuthentication: 'Disabled'" in database
    assert "evictionPolicy: 'NoEviction'" in database
    assert "clusteringPolicy: 'OSSCluster'" in database
    for name in ["redisAccessApp", "redisAccessStaging"]:
        kind, body = resources[name]
        assert kind.startswith("Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@")
        assert "parent: redisDb" in body
    assert "objectId: app.identity.principalId" in resources["redisAccessApp"][1]
    assert "objectId: staging.identity.principalId" in resources["redisAccessStaging"][1]


def test_app_service_exports_token_metrics_and_logs():
    text = bicep("appservice.bicep")
    resources = bicep_resources(text)
    assert resources["logs"][0].startswith("Microsoft.OperationalInsights/workspaces@")
    assert "WorkspaceResourceId: logs.id" in resources["insights"][1]
    settings = set(re.findall(r"\{ name: '([A-Z_]+)'", re.search(r"^var appSettings = \[(.*?)^\]", text, re.M | re.S).group(1)))
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_METRICS_EXPORTER", "APPLICATIONINSIGHTS_CONNECTION_STRING", "AIGW_REDIS_URL"} <= settings
    assert "category: 'AppServiceConsoleLogs'" in resources["appLogs"][1]


def rendered_app_service_config(with_redis: bool) -> str:
    """The Bicep's config document as `format()` renders it (.NET composite format: {n}, {{, }})."""
    text = bicep("appservice.bicep")
    template = re.search(r"^var aigwConfig = '''(.*?)'''", text, re.M | re.S).group(1)
    redis_section = re.search(r"^var redisSection = '''(.*?)'''", text, re.M | re.S).group(1)
    args = [
        "https://example-resource.openai.azure.com/",
        "20",
        hashlib.sha256(b"platform").hexdigest(),
        hashlib.sha256(b"admin").hexdigest(),
        redis_section if with_redis else "",
    ]
    return re.sub(r"\{\{|\}\}|\{(\d)\}", lambda m: {"{{": "{", "}}": "}"}.get(m.group(0)) or args[int(m.group(1))], template)


@pytest.mark.parametrize("with_redis", [False, True])
def test_app_service_config_is_valid(tmp_path, with_redis):
    path = tmp_path / "config.toml"
    path.write_text(rendered_app_service_config(with_redis))
    # A redis:// URL: today's gateway refuses the rediss:// the app setting holds (issue 17).
    done = check_config(path, ["IDENTITY_ENDPOINT", "IDENTITY_HEADER"] + (["AIGW_REDIS_URL"] if with_redis else []))
    assert done.returncode == 0, done.stderr


# ---- start-up as the containers start ------------------------------------------------------------


def image_user() -> int:
    """A non-root uid to run the gateway as: the image's 10001 (created here when the tests run as
    root, as CI does), or the current user when it is not root."""
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        pwd.getpwuid(IMAGE_UID)
    except KeyError:
        subprocess.run(["groupadd", "--system", "--gid", str(IMAGE_UID), "aigw"], check=False, capture_output=True)
        subprocess.run(
            ["useradd", "--system", "--uid", str(IMAGE_UID), "--gid", str(IMAGE_UID), "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "aigw"],
            check=True,
            capture_output=True,
        )
    return IMAGE_UID


@pytest.fixture(scope="module")
def image_root():
    """A directory laid out like the image (usr/local/bin/aigw, etc/aigw, var/lib/aigw as WORKDIR),
    owned by the test's user and not writable by the gateway's: a read-only root filesystem."""
    if not RELEASE_AIGW.is_file():
        pytest.fail(f"{RELEASE_AIGW} is missing: cargo build --release -p aigw", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="aigw-image-"))
    for sub in ["usr/local/bin", "etc/aigw", "var/lib/aigw"]:
        (root / sub).mkdir(parents=True)
    shutil.copy2(RELEASE_AIGW, root / "usr/local/bin/aigw")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path.name == "aigw" else 0o644)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory, base_env):
    """A redis-server on a free loopback port, with the deployments' persistence (appendonly yes)."""
    work = tmp_path_factory.mktemp("redis")
    for _attempt in range(3):  # the free port may be taken between the probe and redis's bind
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = Process(
            "redis-server",
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(work)],
            base_env,
            work,
        )
        try:
            process.wait_for_line(lambda l: "Ready to accept connections" in l or "Address already in use" in l)
            if process.proc.poll() is None and redis_cli(port, "PING") == "PONG":
                break
        except pytest.fail.Exception:
            pass
        process.stop()
    else:
        pytest.fail("redis-server did not start on a free port", pytrace=False)
    try:
        yield port
    finally:
        process.stop()


def redis_cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def start_as_image(image_root: Path, config_text: str, env: dict[str, str], log_dir: Path) -> Process:
    """`aigw serve --config /etc/aigw/config.toml` as the image's CMD runs it: as the non-root user,
    in the WORKDIR it cannot write, AIGW_LISTEN from the environment."""
    config = image_root / "etc/aigw/config.toml"
    config.write_text(config_text)
    config.chmod(0o644)
    return Process(
        "aigw-as-image",
        [str(image_root / "usr/local/bin/aigw"), "serve", "--config", str(config)],
        dict(env, AIGW_LISTEN="127.0.0.1:0", HOME="/nonexistent", RUST_LOG="info"),
        log_dir,
        cwd=image_root / "var/lib/aigw",
        user=image_user(),
    )


def point_backend_at(config_text: str, url_line: str, sim_url: str) -> str:
    assert config_text.count(url_line) == 1, f"{url_line!r} not found once"
    return config_text.replace(url_line, f'url = "{sim_url}"')


def chat(url: str, key: str) -> tuple[int, dict]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"api-key": key, "content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def process_uid(pid: int) -> int:
    """The real uid of a running process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))


COMPOSE_KEYS = {"AIGW_DEMO_KEY": "demo-" + os.urandom(6).hex(), "SIM_BACKEND_KEY": SIM_BACKEND_KEY}
K8S_KEYS = {
    "AIGW_PLATFORM_KEY": "platform-" + os.urandom(6).hex(),
    "AIGW_ADMIN_KEY": "admin-" + os.urandom(6).hex(),
    "AOAI_API_KEY": SIM_BACKEND_KEY,
}


def compose_setup(sim_url: str) -> tuple[str, dict[str, str], str]:
    text = point_backend_at((INFRA / "compose-config.toml").read_text(), 'url = "http://llm-sim:8081"', sim_url)
    return text, COMPOSE_KEYS, COMPOSE_KEYS["AIGW_DEMO_KEY"]


def k8s_setup(sim_url: str) -> tuple[str, dict[str, str], str]:
    text = point_backend_at(k8s_config(), 'url = "https://YOUR-RESOURCE.openai.azure.com"', sim_url)
    return text, K8S_KEYS, K8S_KEYS["AIGW_PLATFORM_KEY"]


@pytest.mark.parametrize("setup", [compose_setup, k8s_setup], ids=["compose", "k8s"])
def test_release_binary_starts_read_only_as_non_root(setup, image_root, redis_port, sim, base_env, tmp_path):
    config_text, keys, client_key = setup(sim.url)
    # The deployments' [redis] url-env, pointed at the test's Redis.
    url_env = tomllib.loads(config_text)["redis"]["url-env"]
    env = dict(base_env, **keys, **{url_env: f"redis://127.0.0.1:{redis_port}/0"})
    redis_cli(redis_port, "FLUSHALL")
    process = start_as_image(image_root, config_text, env, tmp_path)
    try:
        url = gateway_url(process)
        assert process_uid(process.proc.pid) == image_user() != 0
        _wait_healthy(url + "/ready")  # the readiness probe's path
        status, body = chat(url, client_key)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
    finally:
        process.stop()
    assert process.proc.returncode == 0, "SIGTERM drains and exits cleanly"
    # Nothing written where it ran: the ledger (and the counters) went to Redis.
    assert list((image_root / "var/lib/aigw").iterdir()) == []
    assert redis_cli(redis_port, "--scan").split(), "the gateway wrote its ledger to Redis"


def test_without_redis_the_embedded_ledger_cannot_start_read_only(image_root, sim, base_env, tmp_path):
    """Without [redis] the ledger is aigw-data/ledger.jsonl under the working directory, which a
    read-only container cannot create: start-up fails, naming the field and the path."""
    config_text, keys, _ = compose_setup(sim.url)
    without_redis = re.sub(r"^\[redis\]\nurl-env = .*\n", "", config_text, flags=re.M)
    assert "redis" not in tomllib.loads(without_redis)
    process = start_as_image(image_root, without_redis, dict(base_env, **keys), tmp_path)
    try:
        code = process.proc.wait(timeout=30)
    finally:
        process.stop()
    output = "\n".join(process.output) + process.stderr_path.read_text(errors="replace")
    assert code == 2, output  # the exit code of configuration errors
    # Today's message names the config field and the relative directory, not the absolute path:
    # "ledger.path: usage ledger journal: cannot create the directory aigw-data: Permission denied".
    assert re.search(r"ledger\.path: .*aigw-data.*Permission denied", output), output
    assert list((image_root / "var/lib/aigw").iterdir()) == []
