//! Managed identity end to end: the gateway gets its backend tokens from local servers that speak
//! each provider's protocol (IMDS, App Service, Microsoft Entra for workload identity) and check
//! what they receive; llm-sim reports which bearer token reached it (`x-sim-auth`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use common::*;
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Imds,
    AppService,
    Entra,
}

/// One request a token server received.
struct Seen {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    form: HashMap<String, String>,
}

enum Answer {
    Token { lifetime_secs: u64 },
    Error { status: StatusCode, body: Value },
}

struct ServerState {
    protocol: Protocol,
    seen: Mutex<Vec<Seen>>,
    count: watch::Sender<usize>,
    answer: Mutex<Answer>,
    /// Requests from this (0-based) index on wait for a permit of `gate`.
    hold_from: Mutex<usize>,
    gate: Semaphore,
}

struct TokenServer {
    url: String,
    state: Arc<ServerState>,
}

fn pairs(text: &str) -> HashMap<String, String> {
    let url = reqwest::Url::parse(&format!("http://parse.invalid/?{text}")).expect("pairs");
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn epoch_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

impl TokenServer {
    async fn start(protocol: Protocol, answer: Answer) -> Self {
        let state = Arc::new(ServerState {
            protocol,
            seen: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            answer: Mutex::new(answer),
            hold_from: Mutex::new(usize::MAX),
            gate: Semaphore::new(0),
        });
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("token server") });
        Self { url, state }
    }

    fn count(&self) -> usize {
        *self.state.count.borrow()
    }

    fn seen<T>(&self, i: usize, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.state.seen.lock().expect("seen")[i])
    }

    fn answer(&self, answer: Answer) {
        *self.state.answer.lock().expect("answer") = answer;
    }

    fn hold_from(&self, index: usize) {
        *self.state.hold_from.lock().expect("hold") = index;
    }

    fn release(&self) {
        self.state.gate.add_permits(1000);
    }
}

fn token_name(protocol: Protocol, n: usize) -> String {
    let prefix = match protocol {
        Protocol::Imds => "imds",
        Protocol::AppService => "appsvc",
        Protocol::Entra => "entra",
    };
    format!("{prefix}-token-{n}")
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let index = {
        let mut seen = state.seen.lock().expect("seen");
        seen.push(Seen {
            method,
            path: uri.path().to_owned(),
            query: pairs(uri.query().unwrap_or("")),
            headers,
            form: pairs(&String::from_utf8_lossy(&body)),
        });
        seen.len() - 1
    };
    state.count.send_replace(index + 1);
    if index >= *state.hold_from.lock().expect("hold") {
        state.gate.acquire().await.expect("gate").forget();
    }
    let (status, body) = match &*state.answer.lock().expect("answer") {
        Answer::Error { status, body } => (*status, body.clone()),
        Answer::Token { lifetime_secs } => {
            let token = token_name(state.protocol, index + 1);
            let expires_on = epoch_secs() + lifetime_secs;
            // Each provider's own shape: IMDS sends strings, App Service 2019-08-01 only an
            // absolute expires_on, Entra numbers.
            let body = match state.protocol {
                Protocol::Imds => json!({
                    "access_token": token, "refresh_token": "", "expires_in": lifetime_secs.to_string(),
                    "expires_on": expires_on.to_string(), "not_before": epoch_secs().to_string(),
                    "resource": "https://cognitiveservices.azure.com", "token_type": "Bearer",
                }),
                Protocol::AppService => json!({
                    "access_token": token, "expires_on": expires_on.to_string(),
                    "resource": "https://cognitiveservices.azure.com", "token_type": "Bearer", "client_id": "x",
                }),
                Protocol::Entra => json!({
                    "token_type": "Bearer", "expires_in": lifetime_secs, "ext_expires_in": lifetime_secs,
                    "access_token": token,
                }),
            };
            (StatusCode::OK, body)
        }
    };
    (status, axum::Json(body)).into_response()
}

/// What llm-sim reports for a bearer token.
fn fingerprint(token: &str) -> String {
    format!("bearer:{}", &sha256_hex(token)[..8])
}

/// A gateway with one API per backend (`/<id>` prefix, no subscription) on one simulator; `auth`
/// maps each backend id to its `auth` table.
async fn gateway(sim: &Sim, backends: &[(&str, &str)], env: &[(&str, &str)]) -> Gateway {
    let mut toml = String::new();
    for (id, auth) in backends {
        toml.push_str(&format!(
            "[backends.{id}]\nurl = \"{}/v1\"\nkind = \"openai\"\nauth = {auth}\n\n\
             [apis.{id}]\nkind = \"openai\"\npath = \"/{id}\"\nbackend = \"{id}\"\nsubscription-required = false\n\n",
            sim.url
        ));
    }
    Gateway::start(&toml, env).await
}

async fn chat(gw: &Gateway, api: &str) -> reqwest::Response {
    client()
        .post(format!("{}/{api}/v1/chat/completions", gw.url))
        .json(&chat_body("Hello there", false))
        .send()
        .await
        .expect("send")
}

/// Calls `api`, asserts success, and returns the credential the backend saw.
async fn credential_seen(gw: &Gateway, api: &str) -> String {
    let response = chat(gw, api).await;
    let status = response.status();
    let auth = response.headers().get("x-sim-auth").map(|v| v.to_str().expect("ascii").to_owned());
    assert_eq!(status, 200, "{api}: {}", response.text().await.unwrap_or_default());
    auth.expect("x-sim-auth")
}

/// Calls `api` until the backend sees `next`; every call succeeds, and sees `current` until then.
async fn call_until_credential(gw: &Gateway, api: &str, current: &str, next: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = credential_seen(gw, api).await;
        if seen == fingerprint(next) {
            return;
        }
        assert_eq!(seen, fingerprint(current));
        assert!(tokio::time::Instant::now() < deadline, "{next} was not used within {WAIT:?}");
    }
}

#[tokio::test]
async fn imds_token_is_fetched_once_and_shared_by_backends_of_the_same_identity() {
    let server = TokenServer::start(Protocol::Imds, Answer::Token { lifetime_secs: 3600 }).await;
    let sim = Sim::start(&[]).await;
    let same = format!(
        "{{ type = \"managed-identity\", provider = \"imds\", endpoint = \"{}\", client-id = \"uami-1\" }}",
        server.url
    );
    let other_resource = format!(
        "{{ type = \"managed-identity\", provider = \"imds\", endpoint = \"{}/\", client-id = \"uami-1\", resource = \"api://custom\" }}",
        server.url
    );
    let gw = gateway(&sim, &[("a", &same), ("b", &same), ("c", &other_resource)], &[]).await;

    let calls: Vec<_> = (0..16)
        .map(|i| {
            let api = if i % 2 == 0 { "a" } else { "b" };
            let gw_url = gw.url.clone();
            tokio::spawn(async move {
                let response = client()
                    .post(format!("{gw_url}/{api}/v1/chat/completions"))
                    .json(&chat_body("Hello there", false))
                    .send()
                    .await
                    .expect("send");
                assert_eq!(response.status(), 200);
                response.headers()["x-sim-auth"].to_str().expect("ascii").to_owned()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("call"), fingerprint("imds-token-1"));
    }
    for api in ["a", "b", "a"] {
        assert_eq!(credential_seen(&gw, api).await, fingerprint("imds-token-1"));
    }
    assert_eq!(server.count(), 1, "16 concurrent and 3 later calls on two backends: one token request");
    server.seen(0, |seen| {
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.path, "/metadata/identity/oauth2/token");
        assert_eq!(seen.query["api-version"], "2018-02-01");
        assert_eq!(seen.query["resource"], "https://cognitiveservices.azure.com");
        assert_eq!(seen.query["client_id"], "uami-1");
        assert_eq!(seen.headers["metadata"], "true");
    });

    // Another resource is another token.
    assert_eq!(credential_seen(&gw, "c").await, fingerprint("imds-token-2"));
    assert_eq!(server.count(), 2);
    server.seen(1, |seen| {
        assert_eq!(seen.path, "/metadata/identity/oauth2/token", "a trailing slash on the endpoint is tolerated");
        assert_eq!(seen.query["resource"], "api://custom");
    });
    let logs = gw.proc.lines().join("\n");
    assert!(!logs.contains("imds-token-"), "tokens are never logged");
}

#[tokio::test]
async fn app_service_token_is_refreshed_before_expiry_while_calls_go_on() {
    // 10 s tokens: the refresh is due halfway, and the old token is usable until its last second.
    let server = TokenServer::start(Protocol::AppService, Answer::Token { lifetime_secs: 10 }).await;
    let sim = Sim::start(&[]).await;
    let endpoint = format!("{}/msi/token", server.url);
    let auth = r#"{ type = "managed-identity", provider = "app-service", client-id = "uami-app" }"#;
    let env = [("IDENTITY_ENDPOINT", endpoint.as_str()), ("IDENTITY_HEADER", "identity-header-secret")];
    let gw = gateway(&sim, &[("app", auth)], &env).await;

    assert_eq!(credential_seen(&gw, "app").await, fingerprint("appsvc-token-1"));
    server.seen(0, |seen| {
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.path, "/msi/token");
        assert_eq!(seen.query["api-version"], "2019-08-01");
        assert_eq!(seen.query["resource"], "https://cognitiveservices.azure.com");
        assert_eq!(seen.query["client_id"], "uami-app");
        assert_eq!(seen.headers["x-identity-header"], "identity-header-secret");
    });

    // Hold the refresh at the token server once it comes.
    server.hold_from(1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh within {WAIT:?}");
        assert_eq!(credential_seen(&gw, "app").await, fingerprint("appsvc-token-1"));
    }
    // The refresh is in flight and held: calls neither wait for it nor start another one.
    for _ in 0..3 {
        assert_eq!(credential_seen(&gw, "app").await, fingerprint("appsvc-token-1"));
    }
    assert_eq!(server.count(), 2);
    server.release();
    call_until_credential(&gw, "app", "appsvc-token-1", "appsvc-token-2").await;
    assert_eq!(server.count(), 2);
    assert!(!gw.proc.lines().join("\n").contains("identity-header-secret"), "the identity header is never logged");
}

#[tokio::test]
async fn workload_identity_reads_the_rotated_federated_token_file() {
    // 2 s tokens, refreshed after 1 s: each exchange reads the file again.
    let server = TokenServer::start(Protocol::Entra, Answer::Token { lifetime_secs: 2 }).await;
    let sim = Sim::start(&[]).await;
    let token_file = std::env::temp_dir().join(format!("aigw-federated-{}", std::process::id()));
    std::fs::write(&token_file, "assertion-one\n").expect("token file");
    let auth = r#"{ type = "managed-identity", provider = "workload-identity", resource = "api://aigw-backend" }"#;
    let env = [
        // Without the trailing slash the SDKs tolerate too.
        ("AZURE_AUTHORITY_HOST", server.url.as_str()),
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "client-1"),
        ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().expect("utf-8")),
    ];
    let gw = gateway(&sim, &[("wi", auth)], &env).await;

    assert_eq!(credential_seen(&gw, "wi").await, fingerprint("entra-token-1"));
    server.seen(0, |seen| {
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.path, "/tenant-1/oauth2/v2.0/token");
        assert_eq!(seen.headers["content-type"], "application/x-www-form-urlencoded");
        assert_eq!(seen.form["client_id"], "client-1");
        assert_eq!(seen.form["grant_type"], "client_credentials");
        assert_eq!(seen.form["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
        assert_eq!(seen.form["client_assertion"], "assertion-one");
        assert_eq!(seen.form["scope"], "api://aigw-backend/.default");
    });

    std::fs::write(&token_file, "assertion-two\n").expect("rotate");
    call_until_credential(&gw, "wi", "entra-token-1", "entra-token-2").await;
    server.seen(1, |seen| assert_eq!(seen.form["client_assertion"], "assertion-two"));
    let logs = gw.proc.lines().join("\n");
    assert!(!logs.contains("assertion-one") && !logs.contains("assertion-two"), "assertions are never logged");
    let _ = std::fs::remove_file(&token_file);
}

#[tokio::test]
async fn token_errors_are_clear_502s_without_secrets_and_retried_after_a_backoff() {
    let assertion = "assertion-secret-xyz";
    // Entra echoing the assertion in its error must not get it into the client's answer.
    let refusal = Answer::Error {
        status: StatusCode::BAD_REQUEST,
        body: json!({
            "error": "invalid_client",
            "error_description": format!("AADSTS700213: No matching federated identity record found for presented assertion {assertion}.\r\nTrace ID: 42"),
        }),
    };
    let server = TokenServer::start(Protocol::Entra, refusal).await;
    let sim = Sim::start(&[]).await;
    let token_file = std::env::temp_dir().join(format!("aigw-federated-err-{}", std::process::id()));
    std::fs::write(&token_file, assertion).expect("token file");
    let wi = format!(
        "{{ type = \"managed-identity\", provider = \"workload-identity\", endpoint = \"{}\", tenant-id = \"t\", client-id = \"c\", token-file = \"{}\" }}",
        server.url,
        token_file.display()
    );
    let missing_file = format!(
        "{{ type = \"managed-identity\", provider = \"workload-identity\", endpoint = \"{}\", tenant-id = \"t\", client-id = \"c\", token-file = \"/nonexistent/aigw/token\" }}",
        server.url
    );
    let gw = gateway(&sim, &[("wi", &wi), ("nofile", &missing_file)], &[]).await;

    let body = openai_error(chat(&gw, "wi").await, 502).await;
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "Could not get a managed identity token for backend \"wi\": the Microsoft Entra token endpoint"
        ),
        "{message}"
    );
    assert!(message.contains("answered 400: AADSTS700213"), "{message}");
    assert!(message.contains("[redacted]"), "{message}");
    assert_eq!(body["error"]["code"], "backend_token_unavailable");
    assert!(!body.to_string().contains(assertion), "{body}");

    // Back-to-back calls inside the backoff get the error without a request each.
    for _ in 0..5 {
        openai_error(chat(&gw, "wi").await, 502).await;
    }
    assert!(server.count() < 6, "{} token requests for 6 calls", server.count());

    // Once the endpoint recovers, a retry after the backoff gets a token.
    server.answer(Answer::Token { lifetime_secs: 3600 });
    let deadline = tokio::time::Instant::now() + WAIT;
    let recovered = loop {
        let response = chat(&gw, "wi").await;
        if response.status() == 200 {
            break response;
        }
        assert_eq!(response.status(), 502);
        assert!(tokio::time::Instant::now() < deadline, "no recovery within {WAIT:?}");
    };
    let issued = server.count();
    assert_eq!(recovered.headers()["x-sim-auth"], fingerprint(&format!("entra-token-{issued}")).as_str());

    // An unreadable federated token file is the gateway's own problem: 500.
    let body = openai_error(chat(&gw, "nofile").await, 500).await;
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("the federated token file cannot be read"), "{message}");
    assert_eq!(server.count(), issued, "no exchange without an assertion");

    let logs = gw.proc.lines().join("\n");
    assert!(!logs.contains(assertion), "the assertion is never logged");
    let _ = std::fs::remove_file(&token_file);
}

#[tokio::test]
async fn ignore_error_sends_the_request_on_without_a_credential() {
    let refusal = Answer::Error {
        status: StatusCode::BAD_REQUEST,
        body: json!({"error": "invalid_request", "error_description": "Identity not found"}),
    };
    let server = TokenServer::start(Protocol::Imds, refusal).await;
    let sim = Sim::start(&[]).await;
    let strict = format!("{{ type = \"managed-identity\", provider = \"imds\", endpoint = \"{}\" }}", server.url);
    let lenient = format!(
        "{{ type = \"managed-identity\", provider = \"imds\", endpoint = \"{}\", ignore-error = true }}",
        server.url
    );
    let gw = gateway(&sim, &[("strict", &strict), ("lenient", &lenient)], &[]).await;

    let body = openai_error(chat(&gw, "strict").await, 502).await;
    assert_eq!(
        body["error"]["message"],
        "Could not get a managed identity token for backend \"strict\": the IMDS identity endpoint answered 400: Identity not found"
    );
    let response = chat(&gw, "lenient").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sim-auth"], "none", "no credential rather than no request");
    assert!(server.count() >= 1);
}
