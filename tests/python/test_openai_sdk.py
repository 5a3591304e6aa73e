"""The official OpenAI Python SDK (OpenAI and AzureOpenAI) against real aigw gateways.

Every test that takes the `gateway` fixture runs twice: through a gateway whose backend is kind
"openai" (bearer credential) and one whose backend is kind "azure-openai" (api-key credential).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from openai import AzureOpenAI, OpenAI

import rawhttp
from conftest import HASHED_KEY, sha8

CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
AZURE_API_VERSION = "2024-10-21"
DEPLOYMENT = "my-gpt-4o-mini"
EMBEDDING_DEPLOYMENT = "my-embeddings"


def unique_prompt(topic: str) -> str:
    # A fresh prompt per test, so a passing assertion cannot come from another test's answer.
    return f"{topic} ({uuid.uuid4().hex[:12]})"


def openai_client(gw, **kwargs) -> OpenAI:
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 30)
    return OpenAI(base_url=gw.url + "/v1", api_key=gw.key, **kwargs)


def azure_client(gw, **kwargs) -> AzureOpenAI:
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 30)
    return AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version=AZURE_API_VERSION, **kwargs)


def assert_usage_consistent(usage) -> None:
    assert usage is not None, "no usage"
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def collect_stream(stream):
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, finish


# --- OpenAI client, /v1 routes ---------------------------------------------------------------


def test_chat_completion(gateway):
    prompt = unique_prompt("What is the capital of France?")
    raw = openai_client(gateway).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}]
    )
    completion = raw.parse()
    content = completion.choices[0].message.content
    assert f"[p:{sha8(prompt)}]" in content, content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == CHAT_MODEL
    assert_usage_consistent(completion.usage)
    # The backend got the gateway's own credential, never the client's subscription key.
    assert raw.headers["x-sim-auth"] == gateway.expected_backend_auth
    assert raw.headers["x-sim-auth"] != "api-key:" + sha8(gateway.key)
    assert raw.headers["x-sim-prompt-hash"] == sha8(prompt)
    assert raw.headers["x-sim-model"] == CHAT_MODEL
    # Outbound policy and the transport layers.
    assert raw.headers["x-aigw-subscription"] == "team-a-app"
    assert raw.headers.get("x-request-id")
    assert raw.headers.get("x-gateway-instance")


def test_stream_without_stream_options_has_no_usage_chunk(gateway):
    prompt = unique_prompt("Tell me about streams")
    client = openai_client(gateway)
    chunks, text, finish = collect_stream(
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}], stream=True)
    )
    assert len(chunks) > 2, "expected a real stream of several chunks"
    assert f"[p:{sha8(prompt)}]" in text, text
    assert finish == ["stop"]
    # The gateway asked the backend for usage (for accounting) and must hide it from this client.
    with_usage = [c for c in chunks if getattr(c, "usage", None) is not None]
    assert with_usage == [], f"usage leaked to a client that did not ask: {with_usage[-1]}"
    assert all(c.choices for c in chunks), "a chunk with empty choices (the usage chunk) reached the client"

    # Same prompt, not streamed: the simulator is deterministic, so the texts must match.
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}])
    assert text == plain.choices[0].message.content


def test_stream_with_include_usage(gateway):
    prompt = unique_prompt("Count the tokens")
    client = openai_client(gateway)
    chunks, text, finish = collect_stream(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert f"[p:{sha8(prompt)}]" in text
    assert finish == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert_usage_consistent(last.usage)
    assert [c for c in chunks[:-1] if c.usage is not None] == [], "usage only on the last chunk"

    plain = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}])
    assert plain.usage.total_tokens == last.usage.total_tokens
    assert plain.usage.completion_tokens == last.usage.completion_tokens


def test_embeddings_default_base64_and_float_agree(gateway):
    client = openai_client(gateway)
    inputs = [unique_prompt("first"), unique_prompt("second")]
    # The SDK asks for base64 by default and decodes it to floats.
    decoded = client.embeddings.create(model=EMBEDDING_MODEL, input=inputs, dimensions=256)
    assert [d.index for d in decoded.data] == [0, 1]
    for item in decoded.data:
        assert len(item.embedding) == 256
        assert all(isinstance(x, float) for x in item.embedding)
        assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-3)
    assert decoded.data[0].embedding != decoded.data[1].embedding
    assert decoded.usage.prompt_tokens > 0
    assert decoded.usage.total_tokens == decoded.usage.prompt_tokens

    floats = client.embeddings.create(model=EMBEDDING_MODEL, input=inputs, dimensions=256, encoding_format="float")
    for a, b in zip(decoded.data, floats.data):
        assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(a.embedding, b.embedding))

    default_size = client.embeddings.create(model=EMBEDDING_MODEL, input="hello")
    assert len(default_size.data[0].embedding) == 1536


def test_models_list(gateway):
    ids = [m.id for m in openai_client(gateway).models.list()]
    assert CHAT_MODEL in ids
    assert EMBEDDING_MODEL in ids


def test_key_configured_by_hash_is_accepted(gateway, hashed_key):
    client = OpenAI(base_url=gateway.url + "/v1", api_key=hashed_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-aigw-subscription"] == "team-b-app"


# --- AzureOpenAI client ------------------------------------------------------------------------


def test_azure_chat(gateway):
    prompt = unique_prompt("Azure says hello")
    raw = azure_client(gateway).chat.completions.with_raw_response.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": prompt}]
    )
    completion = raw.parse()
    assert f"[p:{sha8(prompt)}]" in completion.choices[0].message.content
    assert_usage_consistent(completion.usage)
    assert raw.headers["x-sim-auth"] == gateway.expected_backend_auth
    # The deployment name reaches the backend as its model.
    assert raw.headers["x-sim-model"] == DEPLOYMENT
    if gateway.backend_kind == "azure-openai":
        # Deployment route to an Azure backend: api-version passes through.
        assert raw.headers["x-sim-api-version"] == AZURE_API_VERSION


def test_azure_stream(gateway):
    prompt = unique_prompt("Azure streams")
    client = azure_client(gateway)
    chunks, text, finish = collect_stream(
        client.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": prompt}], stream=True)
    )
    assert f"[p:{sha8(prompt)}]" in text
    assert finish == ["stop"]
    assert all(c.usage is None for c in chunks)

    chunks, _, _ = collect_stream(
        client.chat.completions.create(
            model=DEPLOYMENT,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert_usage_consistent(chunks[-1].usage)


def test_azure_embeddings(gateway):
    response = azure_client(gateway).embeddings.create(model=EMBEDDING_DEPLOYMENT, input=["a", "b", "c"], dimensions=64)
    assert len(response.data) == 3
    assert all(len(d.embedding) == 64 for d in response.data)
    assert response.usage.prompt_tokens > 0


# --- Subscription keys -------------------------------------------------------------------------


def test_wrong_key_is_authentication_error(gateway):
    client = OpenAI(base_url=gateway.url + "/v1", api_key="not-a-valid-key", max_retries=2)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert "invalid subscription key" in info.value.message.lower()
    assert info.value.code == "invalid_subscription_key"


def test_wrong_key_azure_client(gateway):
    client = AzureOpenAI(azure_endpoint=gateway.url, api_key="nope", api_version=AZURE_API_VERSION, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}])


def test_missing_key_gets_apim_message(gateway):
    reply = rawhttp.request("POST", gateway.url + "/v1/chat/completions", rawhttp.chat_body())
    assert reply.status == 401
    body = reply.json()
    assert body["error"]["code"] == "missing_subscription_key"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"].startswith("Access denied due to missing subscription key.")
    # API Management's own fields ride along.
    assert body["statusCode"] == 401
    assert body["message"] == body["error"]["message"]


@pytest.mark.parametrize(
    "how",
    ["api-key", "ocp-apim-subscription-key", "authorization", "query"],
)
def test_each_key_form_is_accepted(gateway, how):
    prompt = unique_prompt(f"key via {how}")
    url = gateway.url + "/v1/chat/completions"
    headers = {}
    if how == "query":
        url += "?subscription-key=" + gateway.key
    elif how == "authorization":
        headers["Authorization"] = "Bearer " + gateway.key
    else:
        headers[how] = gateway.key
    reply = rawhttp.request("POST", url, rawhttp.chat_body(prompt), headers)
    assert reply.status == 200, reply.text
    assert f"[p:{sha8(prompt)}]" in reply.json()["choices"][0]["message"]["content"]
    assert reply.headers["x-aigw-subscription"] == "team-a-app"
    # Whatever the form, the key is the gateway's and the backend sees its own credential.
    assert reply.headers["x-sim-auth"] == gateway.expected_backend_auth


@pytest.mark.parametrize("how", ["api-key", "ocp-apim-subscription-key", "query"])
def test_each_key_form_rejects_a_wrong_key(gateway, how):
    url = gateway.url + f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={AZURE_API_VERSION}"
    headers = {}
    if how == "query":
        url += "&subscription-key=wrong"
    else:
        headers[how] = "wrong"
    reply = rawhttp.request("POST", url, rawhttp.chat_body(), headers)
    assert reply.status == 401
    assert reply.json()["error"]["code"] == "invalid_subscription_key"
    assert "invalid subscription key" in reply.json()["error"]["message"].lower()


# --- Bad input and unknown routes --------------------------------------------------------------


class RequestCounter:
    """Counts the HTTP requests an SDK client really sends (retries included)."""

    def __init__(self):
        self.count = 0

    def __call__(self, request):
        self.count += 1

    def client(self):
        return openai.DefaultHttpxClient(event_hooks={"request": [self]})


def test_bad_messages_type_is_400_without_retries(gateway):
    counter = RequestCounter()
    # Default retries (2): a 5xx would be retried and the counter would read 3.
    client = OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, http_client=counter.client())
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages="hello")  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert info.value.type == "invalid_request_error"
    assert counter.count == 1


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": CHAT_MODEL}, "messages"),
        ({"model": CHAT_MODEL, "messages": []}, "messages"),
        ({"model": CHAT_MODEL, "messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ],
)
def test_invalid_chat_bodies_are_400(gateway, body, param):
    reply = rawhttp.request("POST", gateway.url + "/v1/chat/completions", body, {"api-key": gateway.key})
    assert reply.status == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_malformed_json_is_400(gateway):
    req_headers = {"api-key": gateway.key, "content-type": "application/json"}
    request = urllib.request.Request(
        gateway.url + "/v1/chat/completions", data=b"{not json", method="POST", headers=req_headers
    )
    try:
        urllib.request.urlopen(request, timeout=10)
        pytest.fail("malformed JSON was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
        assert json.loads(e.read())["error"]["type"] == "invalid_request_error"


def test_bad_embeddings_input_is_400(gateway):
    client = openai_client(gateway)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBEDDING_MODEL, input=[])
    assert info.value.param == "input"


def test_responses_api_is_404_without_retries(gateway):
    counter = RequestCounter()
    client = OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, http_client=counter.client())
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=CHAT_MODEL, input="hello")
    assert info.value.status_code == 404
    assert "/v1/responses" in info.value.message
    assert counter.count == 1


# --- Tool calling ------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("client_kind", ["openai", "azure"])
def test_tool_call_round_trip(gateway, client_kind):
    if client_kind == "openai":
        client, model = openai_client(gateway), CHAT_MODEL
    else:
        client, model = azure_client(gateway), DEPLOYMENT
    messages = [{"role": "user", "content": unique_prompt("What's the weather in Paris?")}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) >= 1
    call = calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args.get("city"), str) and args["city"]

    tool_result = json.dumps({"city": args["city"], "temperature_c": 21, "sky": f"clear-{uuid.uuid4().hex[:6]}"})
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": tool_result},
    ]
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop"
    answer = final.choices[0].message.content
    assert tool_result in answer, answer
    assert not final.choices[0].message.tool_calls


def test_streamed_tool_call(gateway):
    stream = openai_client(gateway).chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        assert chunk.usage is None
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name += (delta.function.name or "") if delta.function else ""
                arguments += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    assert name == "get_weather"
    assert "city" in json.loads(arguments)
    assert finish == "tool_calls"


# --- Azure OpenAI v1 routes (/openai/v1/...) ---------------------------------------------------


def test_azure_v1_routes(gateway):
    client = OpenAI(base_url=gateway.url + "/openai/v1", api_key=gateway.key, max_retries=0)
    prompt = unique_prompt("v1 route")
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}])
    assert f"[p:{sha8(prompt)}]" in completion.choices[0].message.content
    assert len(client.embeddings.create(model=EMBEDDING_MODEL, input="x", dimensions=32).data[0].embedding) == 32
    assert CHAT_MODEL in [m.id for m in client.models.list()]


# --- Accounting and backend failures ---------------------------------------------------------


def test_stream_is_accounted_even_when_client_did_not_ask_for_usage(gateway):
    prompt = unique_prompt("account for me")
    client = openai_client(gateway)
    with client.chat.completions.with_streaming_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}], stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    assert all(c.usage is None for c in chunks)
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}])
    line = gateway.log_line_for(request_id)
    assert line["status"] == 200
    assert line["subscription_id"] == "team-a-app"
    assert line["team"] == "team-a"
    assert line["total_tokens"] == plain.usage.total_tokens
    assert line["prompt_tokens"] == plain.usage.prompt_tokens
    assert not line.get("stream_incomplete")
    # The log names the subscription, never its key.
    assert gateway.key not in json.dumps(line)


def test_backend_429_and_500_reach_the_sdk_as_such(gateway):
    client = openai_client(gateway)
    messages = [{"role": "user", "content": "fault"}]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=messages, extra_headers={"x-sim-fault": "429"})
    assert info.value.response.headers.get("retry-after") == "1"
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=messages, extra_headers={"x-sim-fault": "500"})
    assert info.value.status_code == 500


def test_dropped_backend_stream_is_not_a_clean_end(gateway):
    client = openai_client(gateway)
    received = []
    # The gateway ends the stream with an OpenAI `error` event (no [DONE]); the SDK raises on it.
    with pytest.raises(openai.APIError) as info:
        with client.chat.completions.with_streaming_response.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "drop me"}],
            stream=True,
            extra_headers={"x-sim-fault": "drop"},
        ) as response:
            request_id = response.headers["x-request-id"]
            for chunk in response.parse():
                received.append(chunk)
    assert "unavailable" in str(info.value), info.value
    # The client must not see a finished answer.
    assert not any(c.choices and c.choices[0].finish_reason for c in received)
    line = gateway.log_line_for(request_id)
    assert line["stream_incomplete"] is True


def test_body_over_the_limit_is_413(gateway):
    big = "x" * (5 * 1024 * 1024)  # the default server.max-body-bytes is 4 MiB
    counter = RequestCounter()
    client = OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, http_client=counter.client())
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": big}])
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"
    assert counter.count == 1


def test_health_and_ready(gateway):
    assert rawhttp.request("GET", gateway.url + "/health").json() == {"status": "ok"}
    ready = rawhttp.request("GET", gateway.url + "/ready")
    assert ready.status == 200
    assert ready.json()["status"] == "ready"


def test_token_limit_429_reads_as_the_sdks_rate_limit_error(gateway):
    """Over a token limit the SDK raises RateLimitError, with Retry-After and API Management's message."""
    client = OpenAI(base_url=gateway.url + "/limited/v1", api_key=HASHED_KEY, max_retries=0, timeout=30)
    remaining = []
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):
            raw = client.chat.completions.with_raw_response.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": unique_prompt("spend tokens")}]
            )
            remaining.append(int(raw.headers["x-ratelimit-remaining-tokens"]))
            raw.parse()
    assert remaining and remaining == sorted(remaining, reverse=True), remaining
    error = info.value
    assert error.status_code == 429
    retry_after = int(error.response.headers["retry-after"])
    assert 1 <= retry_after <= 61
    assert error.body["code"] == "token_limit_exceeded"
    assert error.response.json()["message"] == f"Token limit is exceeded. Try again in {retry_after} seconds."
