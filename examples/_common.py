"""Where the examples find the gateway: AIGW_URL and AIGW_KEY (or the quickstart's AIGW_DEMO_KEY)."""

import os
import sys

URL = os.environ.get("AIGW_URL", "http://127.0.0.1:8080").rstrip("/")
KEY = os.environ.get("AIGW_KEY") or os.environ.get("AIGW_DEMO_KEY")
MODEL = os.environ.get("AIGW_MODEL", "gpt-4o-mini")
# On the Azure routes the model is a deployment name; llm-sim accepts any.
DEPLOYMENT = os.environ.get("AIGW_DEPLOYMENT", MODEL)

if not KEY:
    sys.exit(
        "Set AIGW_KEY to a subscription key (for `aigw quickstart`: the demo key from its banner, "
        "or start the quickstart with AIGW_DEMO_KEY=... and export the same value)."
    )
