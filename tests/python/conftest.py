"""Session fixtures: a real llm-sim and two real aigw gateways on free loopback ports.

Layout (all on 127.0.0.1, ports picked by the OS):

    llm-sim --api-key $SIM_BACKEND_KEY --embedding-model none
      ^                               ^
      | bearer auth, kind "openai"    | api-key auth, kind "azure-openai"
    gateway "openai"               gateway "azure"

The simulator requires a backend credential, so a gateway that forwarded the wrong one (or the
client's own key) would fail every test. Binaries come from $AIGW_BIN_DIR, default
<repo>/target/debug (run `cargo build --workspace` first).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("AIGW_BIN_DIR") or REPO / "target" / "debug")

# Test credentials: made up per run, never real secrets.
SIM_BACKEND_KEY = "sim-backend-" + os.urandom(8).hex()
CLIENT_KEY = "aigw-test-" + os.urandom(8).hex()
# A second subscription configured by hash only (key-sha256), the production form.
HASHED_KEY = "aigw-hashed-" + os.urandom(8).hex()

STARTUP_DEADLINE_S = 30.0


def sha8(text: str) -> str:
    """First 8 hex digits of SHA-256: llm-sim's prompt hash and credential fingerprint."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.exit(
            f"{path} not found or not executable. Build with `cargo build --workspace` "
            f"or point AIGW_BIN_DIR at the directory holding aigw and llm-sim.",
            returncode=2,
        )
    return path


class Process:
    """A child process whose stdout is drained by a thread (so it never blocks on a full pipe)."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        cwd: Path | None = None,
        user: int | None = None,
    ):
        """`cwd` defaults to `log_dir`; `user` (a uid, its group too) runs the child as that user."""
        self.name = name
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.output: list[str] = []
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
            # Each process in a directory of its own: the embedded ledger is a file under it.
            cwd=cwd or log_dir,
            user=user,
            group=None if user is None else user,
            extra_groups=None if user is None else [],
        )
        self._reader = threading.Thread(target=self._drain, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)  # EOF

    def wait_for_line(self, predicate, deadline_s: float = STARTUP_DEADLINE_S) -> str:
        """Returns the first stdout line that satisfies `predicate`, or fails with the output so far."""
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not announce itself within {deadline_s:.0f} s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._fail(f"exited with code {self.proc.wait()} before it was ready")
            if predicate(line):
                return line

    def _fail(self, why: str) -> None:
        stderr = self.stderr_path.read_text(errors="replace")[-4000:]
        stdout = "\n".join(self.output[-40:])
        pytest.fail(f"{self.name} {why}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._stderr.close()


def _wait_healthy(url: str, deadline_s: float = STARTUP_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last_error = e
        time.sleep(0.05)  # readiness polling with a deadline, not synchronisation by sleep
    pytest.fail(f"{url} not healthy within {deadline_s:.0f} s: {last_error}", pytrace=False)


@dataclass
class Sim:
    url: str  # http://127.0.0.1:PORT
    process: Process


@dataclass
class Gateway:
    name: str
    url: str  # http://127.0.0.1:PORT, no trailing slash
    key: str
    backend_kind: str
    # What llm-sim reports in x-sim-auth for the credential this gateway should send.
    expected_backend_auth: str
    process: Process
    config_path: Path
    extra: dict = field(default_factory=dict)

    def request_log(self) -> list[dict]:
        """The JSON lines the gateway wrote so far."""
        out = []
        for line in list(self.process.output):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def log_line_for(self, request_id: str, deadline_s: float = 10.0) -> dict:
        """The request-log line of one request. The log is written by a background thread after
        the response, so this polls (with a deadline) rather than reading once."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            for entry in self.request_log():
                if entry.get("message") == "request" and entry.get("request_id") == request_id:
                    return entry
            time.sleep(0.02)
        pytest.fail(f"no request-log line for {request_id} within {deadline_s} s")


@pytest.fixture(scope="session")
def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGW_", "SIM_"))}
    env["RUST_LOG"] = env.get("RUST_LOG", "info")
    return env


@pytest.fixture(scope="session")
def sim(tmp_path_factory, base_env) -> Sim:
    log_dir = tmp_path_factory.mktemp("llm-sim")
    process = Process(
        "llm-sim",
        # Hash vectors: these tests check what the SDKs and the gateway do with embeddings (sizes, base64), which
        # must not depend on whether the real embeddings model is installed.
        [
            str(_binary("llm-sim")),
            *("--listen", "127.0.0.1:0", "--api-key", SIM_BACKEND_KEY, "--embedding-model", "none"),
        ],
        base_env,
        log_dir,
    )
    try:
        line = process.wait_for_line(lambda l: l.startswith("llm-sim listening on "))
        url = line.removeprefix("llm-sim listening on ").strip().rstrip("/")
        _wait_healthy(url + "/health")
        yield Sim(url=url, process=process)
    finally:
        process.stop()


GATEWAY_PREAMBLE = """\
# Written by tests/python/conftest.py
[server]
listen = "127.0.0.1:0"
shutdown-grace-secs = 2

[backends.sim]
url = "{backend_url}"
kind = "{backend_kind}"
auth = {backend_auth}

[[subscriptions]]
id = "team-a-app"
name = "Team A app"
team = "team-a"
apis = ["aoai"]
key-env = "AIGW_TEST_KEY"

[[subscriptions]]
id = "team-b-app"
name = "Team B app"
team = "team-b"
apis = ["*"]
key-sha256 = "{hashed_key_sha256}"

"""

GATEWAY_CONFIG = GATEWAY_PREAMBLE + """\
[apis.aoai]
kind = "openai"
backend = "sim"
outbound = [
  {{ policy = "set-header", name = "x-aigw-subscription", value = "{{subscription.id}}" }},
]

# The semantic cache (local all-MiniLM-L6-v2, entries per subscription, in memory), for the SDK's
# view of hits: JSON as stored, streams replayed.
[apis.cached]
kind = "openai"
path = "/cached"
backend = "sim"
inbound = [
  {{ policy = "semantic-cache-lookup", ignore-system-messages = true }},
]
outbound = [
  {{ policy = "semantic-cache-store", duration = 600 }},
]

# A small token limit, for the SDK's view of a 429 (team B's subscription may call every API).
[apis.limited]
kind = "openai"
path = "/limited"
backend = "sim"
inbound = [
  {{ policy = "token-limit", tokens-per-minute = 150, default-completion-tokens = 30, remaining-tokens-header = "x-ratelimit-remaining-tokens" }},
]
"""


# A gateway of its own for the metrics tests (its counters see only their calls): `aoai`, which
# both teams may call, emits token metrics per team, subscription and model.
METRICS_GATEWAY_CONFIG = GATEWAY_PREAMBLE + """\
[apis.aoai]
kind = "openai"
backend = "sim"
outbound = [
  {{ policy = "emit-token-metric", namespace = "aigw", dimensions = [{{ name = "team" }}, {{ name = "subscription" }}, {{ name = "model" }}] }},
]
"""


def gateway_url(process: Process) -> str:
    """The http://addr an aigw process announces in its "aigw listening" log line."""
    line = process.wait_for_line(lambda l: '"aigw listening"' in l)
    try:
        addr = json.loads(line)["addr"]
    except (ValueError, KeyError):
        match = re.search(r'"addr":"([^"]+)"', line)
        assert match, f"no addr in the listening line: {line}"
        addr = match.group(1)
    return f"http://{addr}"


def _start_gateway(
    name, backend_kind, backend_url, backend_auth, expected_auth, sim, tmp_path_factory, base_env, config=GATEWAY_CONFIG
):
    work = tmp_path_factory.mktemp(f"aigw-{name}")
    config_path = work / "aigw.toml"
    config_path.write_text(
        config.format(
            backend_url=backend_url,
            backend_kind=backend_kind,
            backend_auth=backend_auth,
            hashed_key_sha256=hashlib.sha256(HASHED_KEY.encode()).hexdigest(),
        )
    )
    env = dict(base_env, AIGW_TEST_KEY=CLIENT_KEY, SIM_BACKEND_KEY=SIM_BACKEND_KEY)
    process = Process(
        f"aigw-{name}",
        [str(_binary("aigw")), "serve", "--config", str(config_path), "--listen", "127.0.0.1:0"],
        env,
        work,
    )
    url = gateway_url(process)
    _wait_healthy(url + "/health")
    return Gateway(
        name=name,
        url=url,
        key=CLIENT_KEY,
        backend_kind=backend_kind,
        expected_backend_auth=expected_auth,
        process=process,
        config_path=config_path,
    )


def _bearer_gateway(name, sim, tmp_path_factory, base_env, config=GATEWAY_CONFIG):
    """A gateway whose backend is kind "openai" with bearer auth, stopped when the fixture ends."""
    gw = _start_gateway(
        name,
        "openai",
        sim.url + "/v1",
        '{ type = "bearer", env = "SIM_BACKEND_KEY" }',
        "bearer:" + sha8(SIM_BACKEND_KEY),
        sim,
        tmp_path_factory,
        base_env,
        config=config,
    )
    try:
        yield gw
    finally:
        gw.process.stop()


@pytest.fixture(scope="session")
def openai_gateway(sim, tmp_path_factory, base_env) -> Gateway:
    """A gateway whose backend is kind "openai" with bearer auth."""
    yield from _bearer_gateway("openai", sim, tmp_path_factory, base_env)


@pytest.fixture(scope="session")
def azure_gateway(sim, tmp_path_factory, base_env) -> Gateway:
    """A gateway whose backend is kind "azure-openai" (resource endpoint) with api-key auth."""
    gw = _start_gateway(
        "azure",
        "azure-openai",
        sim.url,
        '{ type = "api-key", env = "SIM_BACKEND_KEY" }',
        "api-key:" + sha8(SIM_BACKEND_KEY),
        sim,
        tmp_path_factory,
        base_env,
    )
    try:
        yield gw
    finally:
        gw.process.stop()


@pytest.fixture(scope="module")
def metrics_gateway(sim, tmp_path_factory, base_env) -> Gateway:
    """A gateway of its own (kind "openai" backend) whose `aoai` API emits token metrics."""
    yield from _bearer_gateway("metrics", sim, tmp_path_factory, base_env, config=METRICS_GATEWAY_CONFIG)


@pytest.fixture(scope="session", params=["openai", "azure"])
def gateway(request) -> Gateway:
    """Each test using this runs against both gateways (both backend kinds)."""
    return request.getfixturevalue(f"{request.param}_gateway")


@pytest.fixture(scope="session")
def hashed_key() -> str:
    return HASHED_KEY
