"""Plain HTTP for the cases the SDK cannot express (no key at all, keys in other headers).

Standard library only: openai 3.x ships httpx2, not httpx, and these tests should not depend on
which HTTP client the SDK happens to bundle.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    text: str

    def json(self):
        return json.loads(self.text)


def request(method: str, url: str, body: dict | None = None, headers: dict[str, str] | None = None) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"content-type": "application/json"} if data is not None else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


def chat_body(prompt: str = "Hello", model: str = "gpt-4o-mini") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}]}
