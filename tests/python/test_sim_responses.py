"""The official OpenAI SDK's Responses API (`client.responses`) directly against llm-sim.

llm-sim stands in for the model provider in the gateway's Responses tests, so the SDK must parse
everything it sends: the response object, the typed event stream (and the SDK's own stream
accumulator), function calls continued with `previous_response_id`, stored responses, errors.
The simulator is conftest's `sim` (a real process on a free port, requiring a credential).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from openai import AzureOpenAI, OpenAI

import rawhttp
from conftest import SIM_BACKEND_KEY, sha8

MODEL = "gpt-4o-mini"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    # response.output_text.delta, one or more
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def unique_prompt(topic: str) -> str:
    # A fresh prompt per test, so a passing assertion cannot come from another test's answer.
    return f"{topic} ({uuid.uuid4().hex[:12]})"


def client(sim, **kwargs) -> OpenAI:
    return OpenAI(base_url=sim.url + "/v1", api_key=SIM_BACKEND_KEY, max_retries=0, timeout=30, **kwargs)


def tally(sim, tag: str) -> dict:
    with urllib.request.urlopen(sim.url + "/sim/usage", timeout=10) as response:
        return json.load(response).get(tag, {})


def assert_usage(usage) -> None:
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_create_json(sim):
    prompt = unique_prompt("What is the capital of France?")
    raw = client(sim).responses.with_raw_response.create(model=MODEL, input=prompt, instructions="Answer briefly.")
    response = raw.parse()
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.model == MODEL
    assert response.instructions == "Answer briefly."
    assert f"[p:{sha8(prompt)}]" in response.output_text, response.output_text
    [message] = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    assert_usage(response.usage)
    assert raw.headers["x-sim-prompt-hash"] == sha8(prompt)
    assert raw.headers["x-sim-model"] == MODEL
    assert raw.headers["x-sim-auth"] == "bearer:" + sha8(SIM_BACKEND_KEY)


def test_item_list_input_counts_like_chat(sim):
    """Message items cost what the same chat messages cost: the two APIs bill alike."""
    prompt = unique_prompt("Count me")
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
    ]
    response = client(sim).responses.create(
        model=MODEL,
        instructions="Be terse.",
        input=[*history, {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}],
    )
    chat = client(sim).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be terse."}, *history, {"role": "user", "content": prompt}],
    )
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    # The answer is the chat answer: both are made for the last user message.
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.output_tokens == chat.usage.completion_tokens
    counted = client(sim).responses.input_tokens.count(
        model=MODEL,
        instructions="Be terse.",
        input=[*history, {"role": "user", "content": prompt}],
    )
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == response.usage.input_tokens


def test_stream_events(sim):
    prompt = unique_prompt("Tell me a story")
    tag = "stream-" + uuid.uuid4().hex
    stream = client(sim).responses.create(
        model=MODEL, input=prompt, stream=True, extra_headers={"x-sim-tally": tag}
    )
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas, kinds
    assert [k for k in kinds if k != "response.output_text.delta"] == TEXT_EVENTS
    first, last = kinds.index("response.output_text.delta"), len(kinds) - 1 - kinds[::-1].index("response.output_text.delta")
    assert kinds[first : last + 1] == ["response.output_text.delta"] * len(deltas), "deltas are contiguous"

    created, completed = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.usage is None
    assert completed.id == created.id
    assert completed.status == "completed"
    text = "".join(d.delta for d in deltas)
    assert f"[p:{sha8(prompt)}]" in text
    assert completed.output_text == text
    item_id = completed.output[0].id
    assert all(d.item_id == item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    assert_usage(completed.usage)
    # The stream's usage was billed once it was sent, and only it.
    totals = tally(sim, tag)
    assert totals["requests"] == 1 and totals["in_flight"] == 0
    assert totals["prompt_tokens"] == completed.usage.input_tokens
    assert totals["completion_tokens"] == completed.usage.output_tokens
    assert totals["total_tokens"] == completed.usage.total_tokens


def test_stream_helper_final_response(sim):
    """The SDK's own accumulator (`responses.stream`) rebuilds the response from the events."""
    prompt = unique_prompt("Summarise the news")
    with client(sim).responses.stream(model=MODEL, input=prompt) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == text
    assert f"[p:{sha8(prompt)}]" in text
    assert_usage(final.usage)


def test_max_output_tokens_cuts(sim):
    prompt = unique_prompt("Write at length")
    response = client(sim).responses.create(model=MODEL, input=prompt, max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage.output_tokens == 16
    events = list(client(sim).responses.create(model=MODEL, input=prompt, max_output_tokens=16, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == response.output_text
    assert events[-1].response.usage.output_tokens == 16


def test_function_tool_round_trip_with_previous_response_id(sim):
    """The Agent Framework's way: the second turn sends only the tool's output and points at the
    first response, which the simulator kept."""
    prompt = unique_prompt("What is the weather in Paris? Use get_weather")
    sdk = client(sim)
    first = sdk.responses.create(model=MODEL, input=prompt, tools=[WEATHER_TOOL])
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] == "celsius"
    assert first.output_text == ""
    assert_usage(first.usage)

    result = json.dumps({"city": arguments["city"], "temperature": 21})
    second = sdk.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
        tools=[WEATHER_TOOL],
    )
    assert second.previous_response_id == first.id
    assert second.output_text == f"Based on the tool result: {result} [p:{sha8(prompt)}]"
    # The stored turns count: the prompt, the call and its output.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens

    # Without the stored response the output refers to no call.
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(
            model=MODEL, input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}]
        )
    assert err.value.status_code == 400
    assert err.value.param == "input"


def test_function_tool_round_trip_with_full_input(sim):
    """The Agents SDK's way (`store` off): the second turn resends every item."""
    prompt = unique_prompt("Weather in Oslo?")
    sdk = client(sim)
    events = list(sdk.responses.create(model=MODEL, input=prompt, tools=[WEATHER_TOOL], store=False, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[2].item.type == "function_call" and events[2].item.arguments == ""
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    call = events[-1].response.output[0]
    assert "".join(fragments) == call.arguments == events[-3].arguments
    assert events[-2].item.status == "completed"

    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(events[-1].response.id)  # store=False: not kept
    second = sdk.responses.create(
        model=MODEL,
        store=False,
        tools=[WEATHER_TOOL],
        input=[
            {"role": "user", "content": prompt},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert second.output_text == f"Based on the tool result: sunny [p:{sha8(prompt)}]"


def test_retrieve_input_items_delete(sim):
    prompt = unique_prompt("Remember me")
    sdk = client(sim)
    created = sdk.responses.create(model=MODEL, input=prompt)
    got = sdk.responses.retrieve(created.id)
    assert got.id == created.id
    assert got.output_text == created.output_text
    assert got.usage.total_tokens == created.usage.total_tokens

    items = sdk.responses.input_items.list(created.id)
    [item] = items.data
    assert (item.type, item.role) == ("message", "user")
    assert item.content[0].text == prompt

    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as err:
        sdk.responses.retrieve(created.id)
    assert err.value.status_code == 404
    assert created.id in err.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(created.id)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model=MODEL, input="again", previous_response_id=created.id)
    assert err.value.code == "previous_response_not_found"
    assert err.value.param == "previous_response_id"


def test_cancel_only_background(sim):
    sdk = client(sim)
    foreground = sdk.responses.create(model=MODEL, input=unique_prompt("now"))
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(foreground.id)
    background = sdk.responses.create(model=MODEL, input=unique_prompt("later"), background=True)
    assert background.background is True
    assert sdk.responses.cancel(background.id).id == background.id


def test_azure_api_version_form(sim):
    prompt = unique_prompt("Hello from Azure")
    azure = AzureOpenAI(
        azure_endpoint=sim.url, api_key=SIM_BACKEND_KEY, api_version="2025-04-01-preview", max_retries=0, timeout=30
    )
    raw = azure.responses.with_raw_response.create(model="my-gpt-4o-mini", input=prompt)
    response = raw.parse()
    assert f"[p:{sha8(prompt)}]" in response.output_text
    assert response.model == "my-gpt-4o-mini"
    assert raw.http_request.url.path == "/openai/responses"
    assert raw.headers["x-sim-api-version"] == "2025-04-01-preview"
    assert raw.headers["x-sim-auth"] == "api-key:" + sha8(SIM_BACKEND_KEY)
    assert azure.responses.retrieve(response.id).id == response.id

    # Azure's v1 form takes the model from the body too, without api-version.
    v1 = OpenAI(base_url=sim.url + "/openai/v1", api_key=SIM_BACKEND_KEY, max_retries=0)
    assert v1.responses.retrieve(response.id).output_text == response.output_text
    # The api-version form refuses requests without it.
    bare = rawhttp.request(
        "POST", sim.url + "/openai/responses", {"model": MODEL, "input": "hi"}, {"api-key": SIM_BACKEND_KEY}
    )
    assert bare.status == 400
    assert bare.json()["error"]["param"] == "api-version"


def test_bad_input_is_an_openai_400(sim):
    sdk = client(sim)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model=MODEL, input=42)
    assert err.value.param == "input" and err.value.code == "invalid_type"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model=MODEL, input=[{"type": "function_call", "name": "f", "arguments": "{}"}])
    assert err.value.param == "input[0].call_id"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model=MODEL, input="hi", max_output_tokens=5)
    assert err.value.param == "max_output_tokens"
    request = urllib.request.Request(
        sim.url + "/v1/responses",
        data=b"{not json",
        method="POST",
        headers={"authorization": "Bearer " + SIM_BACKEND_KEY, "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    assert json.load(err.value)["error"]["type"] == "invalid_request_error"
    unknown = rawhttp.request(
        "GET", sim.url + "/v1/responses/resp_unknown", headers={"authorization": "Bearer " + SIM_BACKEND_KEY}
    )
    assert unknown.status == 404
    assert unknown.json()["error"] == {
        "message": "Response with id 'resp_unknown' not found.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_faults(sim):
    sdk = client(sim)
    with pytest.raises(openai.RateLimitError):
        sdk.responses.create(model=MODEL, input="hi", extra_headers={"x-sim-fault": "429"})
    with pytest.raises(openai.InternalServerError):
        sdk.responses.create(model=MODEL, input="hi", extra_headers={"x-sim-fault": "500"})

    # A cut stream ends without response.completed, and bills nothing.
    tag = "drop-" + uuid.uuid4().hex
    seen = []
    with pytest.raises(openai.APIConnectionError):
        for event in sdk.responses.create(
            model=MODEL, input="hi", stream=True, extra_headers={"x-sim-fault": "drop", "x-sim-tally": tag}
        ):
            seen.append(event.type)
    assert "response.output_text.delta" in seen
    assert "response.completed" not in seen
    assert tally(sim, tag) == {
        "requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "cached_tokens": 0,
        "in_flight": 0,
    }
