#!/usr/bin/env bash
# The gateway's routes with curl, one per key form. Against `aigw quickstart`:
#   AIGW_KEY=<demo key from the banner> ./examples/curl.sh
set -euo pipefail

URL="${AIGW_URL:-http://127.0.0.1:8080}"
KEY="${AIGW_KEY:-${AIGW_DEMO_KEY:-}}"
if [ -z "$KEY" ]; then
  echo "Set AIGW_KEY to a subscription key (the quickstart prints its demo key)." >&2
  exit 2
fi
MODEL="${AIGW_MODEL:-gpt-4o-mini}"
DEPLOYMENT="${AIGW_DEPLOYMENT:-$MODEL}"
API_VERSION="2024-10-21"
BODY='{"messages":[{"role":"user","content":"Hello through the gateway!"}]}'
WITH_MODEL="{\"model\":\"$MODEL\",${BODY#\{}"

step() { printf '\n### %s\n' "$*"; }

step "OpenAI route, key in Authorization: Bearer (what the OpenAI SDKs send)"
curl -sS "$URL/v1/chat/completions" \
  -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d "$WITH_MODEL"

step "OpenAI route, key in api-key"
curl -sS "$URL/v1/chat/completions" \
  -H "api-key: $KEY" -H 'content-type: application/json' -d "$WITH_MODEL"

step "Azure deployment route, key in Ocp-Apim-Subscription-Key (API Management's header)"
curl -sS "$URL/openai/deployments/$DEPLOYMENT/chat/completions?api-version=$API_VERSION" \
  -H "Ocp-Apim-Subscription-Key: $KEY" -H 'content-type: application/json' -d "$BODY"

step "Azure deployment route, key in the subscription-key query parameter"
curl -sS "$URL/openai/deployments/$DEPLOYMENT/chat/completions?api-version=$API_VERSION&subscription-key=$KEY" \
  -H 'content-type: application/json' -d "$BODY"

step "Azure v1 route (model in the body, no api-version needed)"
curl -sS "$URL/openai/v1/chat/completions" \
  -H "api-key: $KEY" -H 'content-type: application/json' -d "$WITH_MODEL"

step "Streaming (server-sent events; -N turns off curl's buffering)"
curl -sS -N "$URL/v1/chat/completions" \
  -H "api-key: $KEY" -H 'content-type: application/json' \
  -d "{\"model\":\"$MODEL\",\"stream\":true,\"stream_options\":{\"include_usage\":true},${BODY#\{}"

step "Embeddings"
curl -sS "$URL/v1/embeddings" \
  -H "api-key: $KEY" -H 'content-type: application/json' \
  -d '{"model":"text-embedding-3-small","input":"hello","dimensions":4,"encoding_format":"float"}'

step "Models"
curl -sS "$URL/v1/models" -H "api-key: $KEY"

step "No key: 401 with API Management's message"
curl -sS -w '\nHTTP %{http_code}\n' "$URL/v1/models"
