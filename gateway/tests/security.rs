//! The holes a review found, each closed and proven on real sockets: forwarded URLs that escape
//! the backend's base path (raw and encoded, on `http` APIs and Azure deployment routes), huge
//! model names and unparsable backend answers, connections lost after refusals with unread
//! bodies, and subscription-key guessing.
//!
//! Requests are written byte for byte on a TCP socket (as `curl --path-as-is` would), so no client
//! normalises the path first; the backend is a raw listener that records what reached it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "backend-secret-must-stay-home";

/// What the raw backend answers.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 with `{"path": <request target>}`.
    Echo,
    /// A response head no HTTP parser accepts.
    Garbage,
}

/// A request as the raw backend saw it: its target and its `api-key` header.
type Seen = (String, Option<String>);

/// A backend on a raw socket that records every request it gets.
struct RawBackend {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawBackend {
    async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(socket);
                    while let Some((head, _body)) = read_message(&mut reader).await {
                        let target = head.lines().next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_owned();
                        let key = header(&head, "api-key");
                        log.lock().expect("log").push((target.clone(), key));
                        let reply = match answer {
                            Answer::Echo => {
                                let body = serde_json::json!({ "path": target }).to_string();
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                            }
                            Answer::Garbage => "HTTP/1.1 200 OK\r\nthis is: not\u{1}a header\r\n\r\n".to_owned(),
                        };
                        if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// Reads one HTTP/1.1 message (head, and a body of `content-length` bytes) or `None` at EOF.
async fn read_message<R: tokio::io::AsyncRead + Unpin>(reader: &mut BufReader<R>) -> Option<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let length = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
}

/// A client connection that writes requests byte for byte.
struct RawClient {
    reader: BufReader<TcpStream>,
}

struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON body: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an OpenAI-shaped error with this status.
    fn openai_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}{}", self.head, String::from_utf8_lossy(&self.body));
        let body = self.json();
        assert!(body["error"]["message"].is_string() && body["error"]["code"].is_string(), "{body}");
        assert_eq!(body["statusCode"], status);
        body
    }
}

impl RawClient {
    async fn connect(gateway: &Gateway) -> Self {
        let stream = TcpStream::connect(gateway.url.trim_start_matches("http://")).await.expect("connect");
        Self { reader: BufReader::new(stream) }
    }

    /// Sends `method target` with these headers (and body) and reads the answer; `None` when the
    /// gateway closed the connection instead of answering.
    async fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<RawResponse> {
        let mut request = format!("{method} {target} HTTP/1.1\r\nhost: gateway\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            request.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(request.as_bytes()).await.ok()?;
        stream.write_all(body).await.ok()?;
        let (head, body) =
            tokio::time::timeout(WAIT, read_message(&mut self.reader)).await.expect("an answer in time")?;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
        Some(RawResponse { status, head, body })
    }
}

/// One request on a connection of its own.
async fn request(gateway: &Gateway, method: &str, target: &str, headers: &[(&str, &str)]) -> RawResponse {
    RawClient::connect(gateway).await.send(method, target, headers, b"").await.expect("an answer")
}

fn config_for(backend: &RawBackend) -> String {
    format!(
        r#"
[backends.agents]
url = "{url}/base/agents"
kind = "openai"
auth = {{ type = "api-key", env = "BACKEND_SECRET" }}

[backends.tenant]
url = "{url}/tenant"
kind = "azure-openai"
auth = {{ type = "api-key", env = "BACKEND_SECRET" }}

[[subscriptions]]
id = "sub-a"
name = "A"
team = "team-a"
apis = ["*"]
key-sha256 = "{key}"

[apis.agents]
kind = "http"
path = "/agents"
backend = "agents"

[apis.az]
kind = "openai"
path = "/az"
backend = "tenant"
"#,
        url = backend.url,
        key = sha256_hex(KEY),
    )
}

#[tokio::test]
async fn forwarded_urls_stay_under_the_backend_base_path() {
    let backend = RawBackend::start(Answer::Echo).await;
    let gw = Gateway::start(&config_for(&backend), &[("BACKEND_SECRET", SECRET)]).await;
    let key = [("api-key", KEY)];

    let ok = request(&gw, "GET", "/agents/x", &key).await;
    assert_eq!(ok.status, 200);
    assert_eq!(backend.seen(), vec![("/base/agents/x".to_owned(), Some(SECRET.to_owned()))]);

    // Query strings pass through as they came, less the subscription key.
    let query = request(&gw, "GET", &format!("/agents/y?a=1&subscription-key={KEY}&b=%2e%2e&c"), &[]).await;
    assert_eq!(query.status, 200);
    assert_eq!(query.json()["path"], "/base/agents/y?a=1&b=%2e%2e&c");

    let mut client = RawClient::connect(&gw).await;
    let chat = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = client
        .send("POST", "/az/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", &key, chat)
        .await
        .expect("answer");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["path"], "/tenant/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let reached = backend.seen().len();

    let escapes = [
        "/agents/../admin",
        "/agents/%2e%2e/admin",
        "/agents/%2E%2e/%2e%2E/etc",
        "/agents/.%2e/admin",
        "/agents/%2e./admin",
        "/agents/./x",
        "/agents/x/../../admin",
        "/agents/..%2fadmin",
        "/agents/x%2F..%2F..%2Fadmin",
        "/agents/..\\admin",
        "/agents/..%5cadmin",
        "/agents/%5C..%5Cadmin",
        "/agents/%252e%252e/admin",
        "/agents/..;/admin",
        "/agents/%c0%ae%c0%ae/admin",
    ];
    for target in escapes {
        request(&gw, "GET", target, &key).await.openai_error(400);
    }
    let azure_escapes = [
        "/az/openai/deployments/../chat/completions",
        "/az/openai/deployments/..%2f../chat/completions",
        "/az/openai/deployments/..%2F..%2Fadmin/chat/completions",
        "/az/openai/deployments/%2e%2e/chat/completions",
        "/az/openai/deployments/.%2E/chat/completions",
        "/az/openai/deployments/..%5c..%5cadmin/chat/completions",
        "/az/openai/deployments/x%252f..%252f../chat/completions",
    ];
    for target in azure_escapes {
        let mut client = RawClient::connect(&gw).await;
        let target = format!("{target}?api-version=2024-10-21");
        let answer = client.send("POST", &target, &key, chat).await.expect("answer");
        let body = answer.openai_error(400);
        assert_eq!(body["error"]["type"], "invalid_request_error", "{target}: {body}");
    }
    assert_eq!(backend.seen().len(), reached, "no refused request reached the backend: {:?}", backend.seen());
}

#[tokio::test]
async fn huge_model_names_are_refused_and_unparsable_answers_are_invalid_responses() {
    let sim = Sim::start(&[]).await;
    let garbage = RawBackend::start(Answer::Garbage).await;
    let toml = format!(
        r#"
[backends.sim]
url = "{sim}/v1"
kind = "openai"

[backends.garbage]
url = "{garbage}/v1"
kind = "openai"

[[subscriptions]]
id = "sub-a"
name = "A"
team = "team-a"
apis = ["*"]
key-sha256 = "{key}"

[apis.sim]
kind = "openai"
backend = "sim"

[apis.garbage]
kind = "openai"
path = "/garbage"
backend = "garbage"
"#,
        sim = sim.url,
        garbage = garbage.url,
        key = sha256_hex(KEY),
    );
    let gw = Gateway::start(&toml, &[]).await;
    let http = client();
    let huge = serde_json::json!({"model": "m".repeat(1 << 20), "messages": [{"role": "user", "content": "hi"}]});
    let response = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("api-key", KEY)
        .json(&huge)
        .send()
        .await
        .expect("send");
    let body = openai_error(response, 400).await;
    assert_eq!(body["error"]["param"], "model", "{body}");
    let long_deployment = format!("/openai/deployments/{}/chat/completions?api-version=2024-10-21", "d".repeat(300));
    let response = http
        .post(format!("{}{long_deployment}", gw.url))
        .header("api-key", KEY)
        .json(&chat_body("hi", false))
        .send()
        .await
        .expect("send");
    assert_eq!(openai_error(response, 400).await["error"]["param"], "deployment");

    let response = http
        .post(format!("{}/garbage/v1/chat/completions", gw.url))
        .header("api-key", KEY)
        .json(&chat_body("hi", false))
        .send()
        .await
        .expect("send");
    let body = openai_error(response, 502).await;
    assert_eq!(body["error"]["code"], "backend_invalid_response", "{body}");
    assert!(body["error"]["message"].as_str().expect("message").contains("invalid response"), "{body}");
    assert_eq!(garbage.seen().len(), 1);
}

#[tokio::test]
async fn connections_stay_usable_after_refusals_with_unread_bodies() {
    let (_sim, gw) = start_pair(&[], "").await;
    let chat = serde_json::to_vec(&chat_body("keep the line open", false)).expect("json");
    let mut client = RawClient::connect(&gw).await;
    // No key, a bad key, an unknown route, a wrong method: each answered before its body is read.
    let refusals = [
        ("POST", "/v1/chat/completions", vec![], 401),
        ("POST", "/v1/chat/completions", vec![("api-key", "wrong")], 401),
        ("POST", "/v1/nowhere", vec![("api-key", KEY)], 404),
        ("PUT", "/v1/chat/completions", vec![("api-key", KEY)], 405),
    ];
    for (method, target, headers, status) in refusals {
        let answer = client.send(method, target, &headers, &chat).await.expect("answered");
        assert_eq!(answer.status, status, "{method} {target}");
        assert_eq!(header(&answer.head, "connection"), None, "the small body was read, the connection kept");
    }
    let answer = client.send("POST", "/v1/chat/completions", &[("api-key", KEY)], &chat).await;
    assert_eq!(answer.expect("the same connection still carries requests").status, 200);

    // A large unread body is not worth reading: the answer says the connection closes.
    let large = vec![b' '; 60_000];
    let mut client = RawClient::connect(&gw).await;
    let stream = client.reader.get_mut();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-length: {}\r\n\r\n", 200_000);
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(&large).await.expect("write");
    let (head, _) =
        tokio::time::timeout(WAIT, read_message(&mut client.reader)).await.expect("in time").expect("answer");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(header(&head, "connection").as_deref(), Some("close"), "{head}");
}

#[tokio::test]
async fn key_guessing_is_slowed_per_address_while_valid_keys_never_are() {
    let sim = Sim::start(&[]).await;
    let toml = config(&sim, "").replace(
        "shutdown-grace-secs = 10",
        "shutdown-grace-secs = 10\ntrusted-proxies = [\"127.0.0.1/32\"]\n\n[server.invalid-key-limit]\nattempts = 5\nper-secs = 3600",
    );
    let gw = Gateway::start(&toml, &[("SIM_BACKEND_KEY", BACKEND_KEY), ("OTHER_KEY", OTHER_KEY)]).await;
    let http = client();
    let call = |key: &str, from: &str| {
        http.post(format!("{}/v1/chat/completions", gw.url))
            .header("api-key", key)
            .header("x-forwarded-for", from)
            .json(&chat_body("guess", false))
            .send()
    };
    for attempt in 0..5 {
        let response = call(&format!("guess-{attempt}"), "203.0.113.7").await.expect("send");
        openai_error(response, 401).await;
    }
    let refused = call("guess-5", "203.0.113.7").await.expect("send");
    let retry_after: u64 =
        refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("Retry-After in seconds");
    assert!((1..=720).contains(&retry_after), "one attempt comes back every 720 s: {retry_after}");
    let body = openai_error(refused, 429).await;
    assert_eq!(body["error"]["code"], "too_many_invalid_keys");
    // A valid key from the same address is never slowed; another address still gets its 401.
    assert_eq!(call(KEY, "203.0.113.7").await.expect("send").status(), 200);
    openai_error(call("guess-6", "198.51.100.1").await.expect("send"), 401).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http.get(format!("{}/metrics", gw.url)).send().await.expect("send").text().await.expect("text");
        if text.lines().any(|l| l.starts_with("aigw_limit_rejections_total") && l.contains("kind=\"invalid-key\"")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no invalid-key rejection on /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline: completions run off the response path
    }
}
