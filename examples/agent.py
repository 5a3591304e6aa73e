"""An OpenAI Agents SDK agent with a function tool, running its model calls through aigw.

It uses OpenAIChatCompletionsModel, i.e. /v1/chat/completions: the gateway does not serve the
Responses API (/v1/responses), the Agents SDK's default. Tracing is disabled: by default the SDK
uploads traces to OpenAI using the client's key, which here is a gateway subscription key.

    AIGW_KEY=<subscription key> python examples/agent.py ["your question"]
"""

import json
import sys

from agents import (
    Agent,
    AsyncOpenAI,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from _common import KEY, MODEL, URL

set_tracing_disabled(True)


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    result = json.dumps({"city": city, "sky": "sunny", "temperature_c": 21})
    # Printed so a test (tests/python/test_examples.py) can check the answer quotes it.
    print(f"[tool] get_weather({city!r}) -> {result}", flush=True)
    return result


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "What's the weather in Paris?"
    client = AsyncOpenAI(base_url=f"{URL}/v1", api_key=KEY)
    agent = Agent(
        name="Weather agent",
        instructions="Answer weather questions; always use the get_weather tool.",
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        tools=[get_weather],
    )
    result = Runner.run_sync(agent, question, max_turns=5)
    print(f"[final] {result.final_output}", flush=True)


if __name__ == "__main__":
    main()
