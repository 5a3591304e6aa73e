//! The in-process test harness: a whole gateway (config, pipelines, policies, proxy engine) called
//! through its router without a listener (`tower::ServiceExt::oneshot`), in front of a stub
//! backend that runs in the test process on a loopback port of its own and records what it got.
//! A policy or protocol test runs in milliseconds; the real-process tests in `gateway/tests` keep
//! what crosses processes (the fleet, Redis, the SDKs).
//!
//! ```ignore
//! let gw = Harness::start(r#"
//!     [apis.chat]
//!     kind = "openai"
//!     backend = "stub"
//!     subscription-required = false
//!     inbound = [{ policy = "set-header", name = "x-seen", value = "{api.id}" }]
//! "#).await;
//! let answer = gw.chat(&[]).await;
//! assert_eq!(gw.backend.last().headers["x-seen"], "chat");
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::extract::connect_info::MockConnectInfo;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::server::Gateway;

/// The subscription key the harness's `sub-a` subscription has.
pub const KEY: &str = "test-key-a";

/// A gateway in this process, in front of a [`StubBackend`].
pub struct Harness {
    pub gateway: Gateway,
    router: Router,
    pub backend: StubBackend,
    /// Holds the ledger's journal for as long as the gateway lives.
    _dir: TempDir,
}

impl Harness {
    /// A gateway whose config is `apis` (TOML for `[apis.*]`, and anything else but backends,
    /// subscriptions and the ledger) with backend `stub` (kind openai) and `stub-azure` (kind
    /// azure-openai) pointing at a fresh stub, and subscription `sub-a` (team `team-a`) with [`KEY`].
    pub async fn start(apis: &str) -> Self {
        Self::start_with_server("", apis).await
    }

    /// [`Harness::start`] with `server` added to the `[server]` table.
    pub async fn start_with_server(server: &str, apis: &str) -> Self {
        let backend = StubBackend::start().await;
        let dir = TempDir::new();
        let toml = format!(
            r#"
[server]
request-log = false
{server}

[ledger]
path = "{ledger}"

[backends.stub]
url = "{url}/v1"
kind = "openai"

[backends.stub-azure]
url = "{url}"
kind = "azure-openai"

[[subscriptions]]
id = "sub-a"
name = "Team A app"
team = "team-a"
apis = ["*"]
key-sha256 = "{key}"

{apis}
"#,
            ledger = dir.0.join("ledger.jsonl").display(),
            url = backend.url(),
            key = crate::subscription::key_sha256_hex(KEY),
        );
        let env = |_: &str| None;
        let config = Config::parse(&toml, &env).unwrap_or_else(|e| panic!("harness config: {e}"));
        let metrics = Metrics::start(&env, "harness").expect("metrics");
        let gateway = Gateway::build(config, &env, metrics).unwrap_or_else(|e| panic!("harness gateway: {e}"));
        let router = gateway.router("harness").layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        Self { gateway, router, backend, _dir: dir }
    }

    /// Sends one request through the whole gateway.
    pub async fn send(&self, request: Request) -> Response {
        self.router.clone().oneshot(request).await.expect("the router is infallible")
    }

    /// A request with the subscription key, a JSON body, and `headers`.
    pub async fn call(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Option<Value>) -> Answer {
        let mut request = http::Request::builder().method(method).uri(path).header("api-key", KEY);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        let response = self.send(request.body(body).expect("request")).await;
        let answer = Answer::read(response).await;
        // Completions (accounting, ledger, log) run in tasks of their own; wait for them so the
        // next request sees their effects.
        self.settle().await;
        answer
    }

    /// `POST /v1/chat/completions` with a one-message chat and `headers`.
    pub async fn chat(&self, headers: &[(&str, &str)]) -> Answer {
        let body =
            json!({ "model": "gpt-4o-mini", "max_tokens": 20, "messages": [{ "role": "user", "content": "Hi" }] });
        self.call(Method::POST, "/v1/chat/completions", headers, Some(body)).await
    }

    /// Waits until every request's completion phase has run.
    pub async fn settle(&self) {
        let tasks = &self.gateway.shared.tasks;
        tasks.close();
        tasks.wait().await;
        tasks.reopen();
    }
}

/// A response read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    async fn read(response: Response) -> Self {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Self { status: parts.status, headers: parts.headers, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the stub backend received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Value,
}

/// A backend in this process: records each request and answers a chat completion that used
/// [`StubBackend::PROMPT_TOKENS`] and [`StubBackend::COMPLETION_TOKENS`].
pub struct StubBackend {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl StubBackend {
    pub const PROMPT_TOKENS: u64 = 7;
    pub const COMPLETION_TOKENS: u64 = 5;

    async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let app = Router::new().fallback(move |request: Request| {
            let log = log.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let uri = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
                log.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Received { method: parts.method, uri, headers: parts.headers, body });
                axum::Json(json!({
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "model": "gpt-4o-mini",
                    "choices": [{ "index": 0, "message": { "role": "assistant", "content": "Hello." }, "finish_reason": "stop" }],
                    "usage": {
                        "prompt_tokens": Self::PROMPT_TOKENS,
                        "completion_tokens": Self::COMPLETION_TOKENS,
                        "total_tokens": Self::PROMPT_TOKENS + Self::COMPLETION_TOKENS,
                    },
                }))
                .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("stub backend port");
        let addr = listener.local_addr().expect("stub backend address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, received }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The latest request; panics if there was none.
    pub fn last(&self) -> Received {
        self.received().pop().expect("the backend got no request")
    }
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("aigw-harness-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
