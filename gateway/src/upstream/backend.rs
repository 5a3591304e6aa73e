//! Named backends: where a request goes, with which credentials, over which pooled client.
//!
//! The client's credentials never reach a backend: they are removed with the hop-by-hop headers
//! and replaced by the backend's own (from an environment variable, or a managed identity token;
//! marked sensitive so they are never printed).

use std::sync::Arc;
use std::time::Duration;

use backend_url::{BaseUrl, Url, encode_segment};
use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::{BackendAuthConfig, BackendConfig, BackendKind, EnvLookup};
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::infra::clock::SystemClock;
use crate::protocol::{Operation, Route};
use crate::subscription::KEY_QUERY_PARAM;
use crate::upstream::circuit::{CircuitBreaker, Health};
use crate::upstream::identity::{TokenCache, TokenCaches};

pub struct Backend {
    pub id: String,
    pub kind: BackendKind,
    /// The configured URL, which every request URL stays under.
    base: BaseUrl,
    credential: Credential,
    timeout: Duration,
    stream_idle_timeout: Duration,
    client: reqwest::Client,
    /// Takes the backend out of traffic after repeated failures (see `circuit`).
    pub circuit: CircuitBreaker,
}

enum Credential {
    None,
    /// A header with a value from the environment.
    Static(HeaderName, HeaderValue),
    /// `Authorization: Bearer` with a token from the identity's cache, fetched as needed.
    ManagedIdentity {
        tokens: Arc<TokenCache>,
        ignore_error: bool,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("id", &self.id).field("base", &self.base).finish_non_exhaustive()
    }
}

/// The Azure OpenAI API version of the gateway's own embeddings requests (the current GA version).
const EMBEDDINGS_API_VERSION_QUERY: &str = "api-version=2024-10-21";

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones the client
/// used to authenticate to the gateway.
const NOT_FORWARDED: [HeaderName; 13] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("ocp-apim-subscription-key"),
];

impl Backend {
    /// Builds a backend from validated config (so the URL parses and the secret is present), with
    /// token caches of its own.
    pub fn from_config(id: &str, config: &BackendConfig, env: EnvLookup<'_>) -> Result<Self, String> {
        Self::from_config_sharing(id, config, env, &mut TokenCaches::default())
    }

    /// Like [`Backend::from_config`], sharing a managed identity's token cache with the other
    /// backends built with the same `tokens`.
    pub fn from_config_sharing(
        id: &str,
        config: &BackendConfig,
        env: EnvLookup<'_>,
        tokens: &mut TokenCaches,
    ) -> Result<Self, String> {
        let secret = |var: &str| env(var).ok_or_else(|| format!("environment variable {var} is not set"));
        let credential = match &config.auth {
            BackendAuthConfig::None => Credential::None,
            BackendAuthConfig::ApiKey { env: var, header } => {
                let name = HeaderName::try_from(header.as_str()).map_err(|e| e.to_string())?;
                Credential::Static(name, sensitive(&secret(var)?, var)?)
            }
            BackendAuthConfig::Bearer { env: var } => {
                Credential::Static(header::AUTHORIZATION, sensitive(&format!("Bearer {}", secret(var)?), var)?)
            }
            BackendAuthConfig::ManagedIdentity(identity) => Credential::ManagedIdentity {
                tokens: tokens.for_config(identity, env)?,
                ignore_error: identity.ignore_error,
            },
        };
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            // Redirects would re-send the backend's credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            id: id.to_owned(),
            kind: config.kind,
            base: BaseUrl::parse(&config.url)?,
            credential,
            timeout: config.timeout(),
            stream_idle_timeout: config.stream_idle_timeout(),
            client,
            circuit: CircuitBreaker::new(id, config.circuit_breaker.as_ref(), Arc::new(SystemClock)),
        })
    }

    /// The configured base URL (never holds a secret: config validation forbids a query string).
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long an `http` API's stream may go without a byte.
    pub fn stream_idle_timeout(&self) -> Duration {
        self.stream_idle_timeout
    }

    /// The circuit breaker's state and counters (lock-free reads), for `/ready` and metrics.
    pub fn health(&self) -> Health {
        self.circuit.health()
    }

    /// The backend URL for this request: the base URL, the path the route and operation make, and
    /// the client's query string less the subscription key (and less `api-version` where the
    /// backend's route has none). Client text in the path was checked by [`Route::check`] before
    /// any policy ran; the built URL is checked again here, after the parser normalised it.
    pub fn url_for(&self, ctx: &RequestContext) -> Result<Url, GatewayError> {
        let op = match ctx.operation {
            Operation::ChatCompletions => "chat/completions",
            Operation::Embeddings => "embeddings",
            Operation::ListModels => "models",
            Operation::Passthrough => "",
        };
        let (path, keep_api_version) = match (&ctx.request.route, self.kind) {
            (Route::Passthrough { rest }, _) => (rest.clone(), true),
            (Route::AzureDeployment { deployment, .. }, BackendKind::AzureOpenai) => {
                (format!("/openai/deployments/{}/{op}", encode_segment(deployment)), true)
            }
            (_, BackendKind::AzureOpenai) => (format!("/openai/v1/{op}"), false),
            (_, BackendKind::Openai) => (format!("/{op}"), false),
        };
        let mut query = String::new();
        for pair in ctx.request.query.as_deref().into_iter().flat_map(|q| q.split('&')) {
            let name = pair.split('=').next().unwrap_or("");
            // The subscription key is the gateway's credential and never reaches a backend.
            if pair.is_empty() || name == KEY_QUERY_PARAM || (!keep_api_version && name == "api-version") {
                continue;
            }
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(pair);
        }
        self.base.join(&path, Some(query.as_str()).filter(|q| !q.is_empty())).map_err(|refusal| {
            // Unreachable while Route::check holds; if it ever is not, say so loudly. The path is
            // client text: only its length goes to the log.
            tracing::error!(
                request_id = %ctx.request_id, backend = %self.id, path_len = path.len(),
                "refused a backend URL outside the backend's base path"
            );
            GatewayError::invalid(refusal.to_string(), None)
        })
    }

    /// The header that authenticates the gateway to this backend, if any. A managed identity's token
    /// comes from its cache; when none can be had the request fails, unless `ignore-error` lets it
    /// go on without one.
    async fn credential(&self) -> Result<Option<(HeaderName, HeaderValue)>, GatewayError> {
        match &self.credential {
            Credential::None => Ok(None),
            Credential::Static(name, value) => Ok(Some((name.clone(), value.clone()))),
            Credential::ManagedIdentity { tokens, ignore_error } => match tokens.authorization().await {
                Ok(value) => Ok(Some((header::AUTHORIZATION, value))),
                // The cache logged the failure; ignore-error is the configured way to live with it.
                Err(_) if *ignore_error => Ok(None),
                Err(error) => Err(GatewayError::BackendToken {
                    backend: self.id.clone(),
                    reason: error.to_string(),
                    local: error.is_local(),
                }),
            },
        }
    }

    /// Sends the request; the timeout bounds the whole exchange, body included.
    pub async fn send(&self, ctx: &RequestContext, body: bytes::Bytes) -> Result<reqwest::Response, GatewayError> {
        let credential = self.credential().await?;
        let mut headers = HeaderMap::with_capacity(ctx.request.headers.len() + 2);
        for (name, value) in &ctx.request.headers {
            // The gateway reads response bodies (usage), so they must arrive uncompressed.
            if !NOT_FORWARDED.contains(name) && name != header::ACCEPT_ENCODING {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some((name, value)) = credential {
            headers.insert(name, value);
        }
        if let Ok(id) = HeaderValue::try_from(ctx.request_id.as_str()) {
            headers.insert(HeaderName::from_static("x-request-id"), id);
        }
        let url = self.url_for(ctx)?;
        let request = self.client.request(ctx.request.method.clone(), url).headers(headers);
        let request = if body.is_empty() { request } else { request.body(body) };
        if ctx.operation != Operation::Passthrough {
            return request.timeout(self.timeout).send().await.map_err(|e| self.error(&e));
        }
        // An `http` API's stream may outlive the total timeout while it keeps sending (an agent's
        // SSE, an MCP stream): here it bounds only the wait for the answer's head. The relay
        // bounds a stream by `stream-idle-timeout-secs`, and the pipeline a buffered answer by
        // the total timeout.
        match tokio::time::timeout(self.timeout, request.send()).await {
            Ok(sent) => sent.map_err(|e| self.error(&e)),
            Err(_) => Err(GatewayError::BackendTimeout { backend: self.id.clone() }),
        }
    }

    /// A JSON embeddings POST made on the gateway's own behalf (no client request to forward), with the
    /// backend's credential and timeout, ready to send. `model` is an Azure deployment for the azure-openai kind.
    pub async fn embeddings_request(
        &self,
        model: Option<&str>,
        body: Vec<u8>,
    ) -> Result<reqwest::RequestBuilder, GatewayError> {
        let (path, query) = match (self.kind, model) {
            (BackendKind::AzureOpenai, Some(deployment)) => (
                format!("/openai/deployments/{}/embeddings", encode_segment(deployment)),
                Some(EMBEDDINGS_API_VERSION_QUERY),
            ),
            (BackendKind::AzureOpenai, None) => ("/openai/v1/embeddings".to_owned(), None),
            (BackendKind::Openai, _) => ("/embeddings".to_owned(), None),
        };
        let url = self.base.join(&path, query).map_err(|refusal| GatewayError::invalid(refusal.to_string(), None))?;
        let mut request = self
            .client
            .post(url)
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .timeout(self.timeout)
            .body(body);
        if let Some((name, value)) = self.credential().await? {
            request = request.header(name, value);
        }
        Ok(request)
    }

    /// Maps a transport error to what the client sees; the details (which may name internal
    /// hosts) go to the log only.
    pub fn error(&self, error: &reqwest::Error) -> GatewayError {
        tracing::warn!(backend = %self.id, error = %error, source = ?std::error::Error::source(error), "backend request failed");
        if error.is_timeout() {
            GatewayError::BackendTimeout { backend: self.id.clone() }
        } else if unparsable_answer(error) {
            GatewayError::BackendInvalidResponse {
                backend: self.id.clone(),
                detail: "its response could not be parsed as HTTP",
            }
        } else {
            let detail = if error.is_connect() { "could not connect" } else { "the connection failed" };
            GatewayError::BackendUnavailable { backend: self.id.clone(), detail: detail.to_owned() }
        }
    }
}

/// Whether the backend answered, but with a response head HTTP cannot parse (a malformed status
/// line or header, or a head over hyper's size limit).
fn unparsable_answer(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            return hyper.is_parse() || hyper.is_parse_too_large() || hyper.is_parse_status();
        }
        source = cause.source();
    }
    false
}

fn sensitive(value: &str, var: &str) -> Result<HeaderValue, String> {
    let mut value =
        HeaderValue::try_from(value).map_err(|_| format!("the value of {var} is not valid in an HTTP header"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Response headers not passed back to the client: hop-by-hop ones, and the length, which the
/// gateway sets itself.
pub fn forwardable_response_header(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::CONNECTION | header::TRANSFER_ENCODING | header::CONTENT_LENGTH | header::TRAILER | header::UPGRADE
    ) && name.as_str() != "keep-alive"
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use crate::harness::Harness;

    const APIS: &str = r#"
        [apis.openai]
        kind = "openai"
        backend = "stub"

        [apis.azure]
        kind = "openai"
        path = "/azure"
        backend = "stub-azure"

        [apis.azure-to-openai]
        kind = "openai"
        path = "/mixed"
        backend = "stub"

        [apis.agents]
        kind = "http"
        path = "/agents"
        backend = "stub"
    "#;

    /// A chat body; deployment routes name the model in the path instead.
    fn chat() -> Option<serde_json::Value> {
        Some(json!({ "messages": [{ "role": "user", "content": "Hi" }] }))
    }

    fn chat_with_model() -> Option<serde_json::Value> {
        Some(json!({ "model": "m", "messages": [{ "role": "user", "content": "Hi" }] }))
    }

    /// The backend URL for each route family and backend kind; the subscription key never reaches
    /// a backend, and `api-version` only where the backend's route takes one.
    #[tokio::test]
    async fn urls_per_route_and_backend_kind() {
        let gw = Harness::start(APIS).await;
        let cases = [
            ("/v1/chat/completions?subscription-key=k&api-version=1&x=1", "/v1/chat/completions?x=1"),
            ("/v1/embeddings", "/v1/embeddings"),
            ("/azure/openai/v1/chat/completions?api-version=1", "/openai/v1/chat/completions"),
            (
                "/azure/openai/deployments/dep-1/chat/completions?api-version=2024-10-21&subscription-key=k",
                "/openai/deployments/dep-1/chat/completions?api-version=2024-10-21",
            ),
            ("/mixed/openai/deployments/dep-1/chat/completions?api-version=2024-10-21", "/v1/chat/completions"),
        ];
        for (path, expected) in cases {
            let body = if path.contains("embeddings") {
                Some(json!({ "model": "e", "input": "Hi" }))
            } else if path.contains("/deployments/") {
                chat()
            } else {
                chat_with_model()
            };
            let answer = gw.call(Method::POST, path, &[], body).await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.body);
            assert_eq!(gw.backend.last().uri, expected, "{path}");
        }
        // An OpenAI backend behind an Azure deployment route gets the deployment as the model.
        assert_eq!(gw.backend.last().body["model"], "dep-1");

        let answer = gw.call(Method::GET, "/v1/models?subscription-key=k", &[], None).await;
        assert_eq!(answer.status, 200);
        assert_eq!(gw.backend.last().uri, "/v1/models");
    }

    /// Pass-through keeps the method, the rest of the path and the query (but the key).
    #[tokio::test]
    async fn passthrough_keeps_path_and_query() {
        let gw = Harness::start(APIS).await;
        let answer = gw.call(Method::PUT, "/agents/runs/7?subscription-key=k&api-version=3&q=a", &[], None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let sent = gw.backend.last();
        assert_eq!(sent.method, Method::PUT);
        assert_eq!(sent.uri, "/v1/runs/7?api-version=3&q=a");
    }

    /// An Azure deployment route without `api-version` is refused before any backend call.
    #[tokio::test]
    async fn azure_deployment_routes_need_an_api_version() {
        let gw = Harness::start(APIS).await;
        let answer = gw.call(Method::POST, "/azure/openai/deployments/dep-1/chat/completions", &[], chat()).await;
        assert_eq!(answer.status, 400);
        assert_eq!(answer.body["error"]["param"], "api-version");
        assert!(gw.backend.received().is_empty());
    }
}
