"""The semantic cache as the official OpenAI SDK sees it: a hit is a normal completion, and a
streamed hit is a stream the SDK parses like a live one (chunks, usage when asked, end).

Runs against both gateways (backend kinds "openai" and "azure-openai"), on the `/cached` API,
with team B's subscription (the one allowed on every API).
"""

from __future__ import annotations

import time
import uuid

from openai import AzureOpenAI, OpenAI

from conftest import HASHED_KEY, sha8

CHAT_MODEL = "gpt-4o-mini"
HIT_DEADLINE_S = 10.0


def cached_client(gw) -> OpenAI:
    return OpenAI(base_url=gw.url + "/cached/v1", api_key=HASHED_KEY, max_retries=0, timeout=30)


def ask(client, prompt: str, **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}], **kwargs
    )
    return raw.headers.get("x-llm-cache-status"), raw


def until_hit(client, prompt: str):
    """The store runs after the response, so the first repeat may still miss: poll with a deadline."""
    deadline = time.monotonic() + HIT_DEADLINE_S
    while True:
        status, raw = ask(client, prompt)
        if status == "hit":
            return raw
        assert time.monotonic() < deadline, f"{prompt!r} never hit (last status {status})"
        time.sleep(0.02)


def test_a_paraphrase_hits_and_reads_as_a_normal_completion(gateway):
    client = cached_client(gateway)
    tag = uuid.uuid4().hex[:6]
    original = f"How do I rotate the logs of service {tag} every day?"
    status, raw = ask(client, original)
    assert status == "miss"
    first = raw.parse()
    assert f"[p:{sha8(original)}]" in first.choices[0].message.content

    hit = until_hit(client, f"How can I rotate the logs of service {tag} every day?")
    assert float(hit.headers["x-llm-cache-score"]) >= 0.85
    completion = hit.parse()
    assert completion.choices[0].message.content == first.choices[0].message.content
    assert completion.usage.total_tokens == first.usage.total_tokens


def test_a_streamed_hit_is_a_well_formed_stream(gateway):
    client = cached_client(gateway)
    prompt = f"Give me a packing list for a weekend hike ({uuid.uuid4().hex[:6]})."
    _, raw = ask(client, prompt)
    answer = raw.parse().choices[0].message.content
    until_hit(client, prompt)

    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert len(chunks) > 3, "the answer arrives in several chunks, like a live stream"


def test_azure_client_hits_on_the_deployment_route(gateway):
    client = AzureOpenAI(
        azure_endpoint=gateway.url + "/cached", api_key=HASHED_KEY, api_version="2024-10-21", max_retries=0, timeout=30
    )
    prompt = f"What does HTTP status 418 mean? ({uuid.uuid4().hex[:6]})"
    status, _ = ask(client, prompt)
    assert status == "miss"
    assert until_hit(client, prompt).parse().choices[0].finish_reason == "stop"
