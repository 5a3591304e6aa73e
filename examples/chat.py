"""Chat completions through aigw with the official OpenAI SDK: one plain call, one streamed.

    AIGW_KEY=<subscription key> python examples/chat.py
"""

from openai import OpenAI

from _common import KEY, MODEL, URL

# The gateway serves the OpenAI routes under /v1; the subscription key goes where the OpenAI key
# would (the SDK sends it as `Authorization: Bearer`, which aigw accepts).
client = OpenAI(base_url=f"{URL}/v1", api_key=KEY)

completion = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Say hello to the gateway."}],
)
print("plain:   ", completion.choices[0].message.content)
print("usage:   ", completion.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}))

print("streamed: ", end="", flush=True)
stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Now stream an answer."}],
    stream=True,
    stream_options={"include_usage": True},  # omit it and the gateway strips the usage chunk
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\nusage:    {chunk.usage.total_tokens} tokens")
