"""Runs the examples in examples/ as a user would, against the test gateways."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

EXAMPLES = REPO / "examples"


def run_example(name: str, gateway, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGW_", "OPENAI_"))}
    env.update(AIGW_URL=gateway.url, AIGW_KEY=gateway.key, PYTHONUNBUFFERED="1")
    # No OPENAI_API_KEY: nothing may fall back to api.openai.com (there is no internet here anyway).
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{name} failed ({done.returncode})\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_agent_completes_its_tool_loop(gateway):
    out = run_example("agent.py", gateway, "What's the weather in Paris?")
    tool_lines = re.findall(r"^\[tool\] get_weather\((.+)\) -> (.+)$", out, re.M)
    assert tool_lines, f"the agent never called its tool:\n{out}"
    final = re.findall(r"^\[final\] (.+)$", out, re.M)
    assert len(final) == 1, out
    # The model's final answer (second model call) quotes what the tool returned.
    _, tool_result = tool_lines[-1]
    assert tool_result in final[0], out
    assert '"temperature_c": 21' in final[0]


def test_agent_without_key_explains(gateway):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGW_", "OPENAI_"))}
    env["AIGW_URL"] = gateway.url
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "agent.py")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "AIGW_KEY" in done.stderr


@pytest.mark.parametrize("name", ["chat.py", "azure_chat.py"])
def test_chat_examples_run(gateway, name):
    out = run_example(name, gateway)
    assert re.search(r"^plain: +Simulated answer \[p:[0-9a-f]{8}\]", out, re.M), out
    assert re.search(r"^streamed: +Simulated answer \[p:[0-9a-f]{8}\]", out, re.M), out
