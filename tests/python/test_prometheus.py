"""The Debian `prometheus` server scrapes a real aigw's /metrics every second; a PromQL query for
tokens per team must equal the usage the official OpenAI SDK reported for the calls it made
(plain and streamed, two teams)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from openai import OpenAI

from conftest import HASHED_KEY, Process, _wait_healthy

PROMETHEUS = Path("/usr/bin/prometheus")
QUERY = "sum by (team) (aigw_llm_total_tokens_total)"
DEADLINE_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(metrics_gateway, tmp_path, base_env) -> str:
    """A Prometheus server of the test's own scraping the metrics gateway; yields its base URL."""
    if not PROMETHEUS.is_file():
        pytest.fail(
            f"{PROMETHEUS} is missing: install the Debian package "
            "(`apt-get install -y --no-install-recommends prometheus`); this test needs the real server",
            pytrace=False,
        )
    target = metrics_gateway.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: aigw\n"
        "    scrape_interval: 1s\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    url = f"http://127.0.0.1:{_free_port()}"
    process = Process(
        "prometheus",
        [
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        base_env,
        tmp_path,
    )
    try:
        _wait_healthy(url + "/-/ready")
        yield url
    finally:
        process.stop()


def _query(prometheus: str, promql: str) -> dict[str, int]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return {r["metric"].get("team", ""): int(float(r["value"][1])) for r in body["data"]["result"]}


def test_promql_tokens_per_team_equal_the_sdk_usage(metrics_gateway, prometheus):
    keys = {"team-a": metrics_gateway.key, "team-b": HASHED_KEY}
    expected = {}
    for team, key in keys.items():
        client = OpenAI(base_url=metrics_gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)
        total = 0
        for i in range(3):
            prompt = f"{team} asks question {i} ({uuid.uuid4().hex[:8]})"
            completion = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
            total += completion.usage.total_tokens
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"{team} streams an answer ({uuid.uuid4().hex[:8]})"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1, "one usage chunk at the end of the stream"
        total += usage[0].total_tokens
        expected[team] = total
    assert all(expected.values()), expected

    deadline = time.monotonic() + DEADLINE_S
    seen: dict[str, int] | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            seen = _query(prometheus, QUERY)
        except (urllib.error.URLError, OSError) as e:
            seen = f"query failed: {e}"
        if seen == expected:
            return
        time.sleep(0.2)  # polling the scrape result with a deadline, not synchronisation by sleep
    pytest.fail(f"{QUERY} returned {seen} within {DEADLINE_S:.0f} s; expected {expected}", pytrace=False)
