"""The Azure OpenAI client through aigw: the gateway serves the Azure routes
(/openai/deployments/{deployment}/...?api-version=...) like API Management does.

    AIGW_KEY=<subscription key> python examples/azure_chat.py
"""

from openai import AzureOpenAI

from _common import DEPLOYMENT, KEY, URL

# azure_endpoint is the gateway's root (where the resource endpoint would be); the subscription
# key travels in the `api-key` header, as it would to Azure OpenAI.
client = AzureOpenAI(azure_endpoint=URL, api_key=KEY, api_version="2024-10-21")

completion = client.chat.completions.create(
    model=DEPLOYMENT,  # the deployment name
    messages=[{"role": "user", "content": "Hello from the Azure SDK."}],
)
print("plain:   ", completion.choices[0].message.content)

print("streamed: ", end="", flush=True)
for chunk in client.chat.completions.create(
    model=DEPLOYMENT,
    messages=[{"role": "user", "content": "Stream something."}],
    stream=True,
):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

embedding = client.embeddings.create(model="text-embedding-3-small", input="gateway", dimensions=8)
print("embedding:", [round(x, 3) for x in embedding.data[0].embedding])
