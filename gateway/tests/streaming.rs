//! Streaming through the gateway: usage asked for and hidden, no buffering, accounting that
//! survives a client that leaves, and a backend that breaks off or breaks the relay's bounds (a
//! hostile backend of the test's own, writing raw HTTP/1.1).

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads a streamed chat through the gateway and returns (request id, data payloads).
async fn stream(gw: &Gateway, path: &str, body: &Value) -> (String, Vec<String>) {
    let response =
        client().post(format!("{}{path}", gw.url)).header("api-key", KEY).json(body).send().await.expect("send");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().expect("ascii").starts_with("text/event-stream"));
    let id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    (id, sse_data(&response.text().await.expect("body")))
}

fn usage_chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|chunk| chunk["usage"].is_object())
        .collect()
}

#[tokio::test]
async fn usage_is_always_accounted_but_only_shown_when_asked_for() {
    let (_sim, gw) = start_pair(&[], "").await;
    let prompt = "Tell me about streaming.";
    for path in ["/v1/chat/completions", "/azure/openai/deployments/d1/chat/completions?api-version=2024-10-21"] {
        let (plain_id, plain) = stream(&gw, path, &chat_body(prompt, true)).await;
        assert!(usage_chunks(&plain).is_empty(), "{path}: the client did not ask for usage, so it sees none");
        assert_eq!(plain.last().map(String::as_str), Some("[DONE]"));
        assert!(stream_text(&plain).contains(&prompt_marker(prompt)));

        let mut asked = chat_body(prompt, true);
        asked["stream_options"] = json!({"include_usage": true});
        let (asked_id, with_usage) = stream(&gw, path, &asked).await;
        let usage = usage_chunks(&with_usage);
        assert_eq!(usage.len(), 1, "{path}: exactly the one usage chunk");
        assert_eq!(usage[0]["choices"], json!([]));
        assert_eq!(stream_text(&plain), stream_text(&with_usage), "{path}: same answer either way");

        // The gateway knew the usage in both cases, and it is the backend's own count.
        let expected = &usage[0]["usage"];
        for id in [&plain_id, &asked_id] {
            let log = gw.proc.request_log(id).await;
            assert_eq!(log["prompt_tokens"], expected["prompt_tokens"], "{path}: {log}");
            assert_eq!(log["completion_tokens"], expected["completion_tokens"], "{path}: {log}");
            assert_eq!(log["total_tokens"], expected["total_tokens"], "{path}: {log}");
            assert!(log.get("stream_incomplete").is_none() && log.get("client_disconnected").is_none(), "{log}");
        }
    }
}

#[tokio::test]
async fn tool_call_deltas_pass_through_unchanged() {
    let (_sim, gw) = start_pair(&[], "").await;
    let mut body = chat_body("What is the weather in Paris?", true);
    body["tools"] = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }
    }]);
    let (_, data) = stream(&gw, "/v1/chat/completions", &body).await;
    let chunks: Vec<Value> = data.iter().filter_map(|d| serde_json::from_str(d).ok()).collect();
    let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).collect();
    assert!(calls.len() >= 2, "the call arrives as deltas: {calls:?}");
    assert_eq!(calls[0][0]["index"], 0);
    assert_eq!(calls[0][0]["function"]["name"], "get_weather");
    assert!(calls[0][0]["id"].is_string());
    let arguments: String = calls.iter().filter_map(|c| c[0]["function"]["arguments"].as_str()).collect();
    let arguments: Value = serde_json::from_str(&arguments).expect("arguments assemble into JSON");
    assert!(arguments["city"].is_string());
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
}

#[tokio::test]
async fn chunks_reach_the_client_as_the_backend_sends_them() {
    let (_sim, gw) = start_pair(&[], "").await;
    let response = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("api-key", KEY)
        .header("x-sim-token-delay-ms", "100")
        .json(&chat_body("a slow answer please", true))
        .send()
        .await
        .expect("send");
    let started = Instant::now();
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("bytes"));
    }
    let total = started.elapsed();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    // The answer has 10+ pieces 100 ms apart; a buffering proxy would deliver the first with the last.
    assert!(total >= Duration::from_millis(800), "stream took {total:?}");
    assert!(first_at * 4 < total, "first chunk after {first_at:?} of {total:?}");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_is_still_accounted_for() {
    let (_sim, gw) = start_pair(&[], "").await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let body = chat_body("I will hang up early", true).to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\napi-key: {KEY}\r\nx-sim-token-delay-ms: 60\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("data: ") {
        let n = socket.read(&mut buffer).await.expect("read");
        assert!(n > 0, "stream ended before the first chunk");
        received.extend_from_slice(&buffer[..n]);
    }
    let head = String::from_utf8_lossy(&received).to_string();
    let request_id =
        head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).expect("x-request-id header").trim().to_owned();
    drop(socket);

    // The gateway read the backend's stream to its end and logged the full usage.
    let log = gw.proc.request_log(&request_id).await;
    assert_eq!(log["client_disconnected"], true, "{log}");
    assert!(log.get("stream_incomplete").is_none(), "the backend's stream was complete: {log}");
    let completion = log["completion_tokens"].as_u64().expect("completion tokens");
    // The same prompt again, read to the end, costs the same.
    let mut reference = chat_body("I will hang up early", true);
    reference["stream_options"] = json!({"include_usage": true});
    let (_, data) = stream(&gw, "/v1/chat/completions", &reference).await;
    assert_eq!(usage_chunks(&data)[0]["usage"]["completion_tokens"].as_u64(), Some(completion));
}

#[tokio::test]
async fn a_client_that_hangs_up_before_a_json_answer_is_still_accounted_for() {
    let (_sim, gw) = start_pair(&[], "").await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let body = chat_body("I will not wait for this", false).to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    // `Expect: 100-continue` makes the gateway say when its handler is running (it reads the body),
    // so the client leaves while the request is in the gateway's hands, not before it arrived.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\napi-key: {KEY}\r\nx-sim-ttft-ms: 400\r\n\
         expect: 100-continue\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.expect("write head");
    let mut buffer = [0u8; 256];
    let n = socket.read(&mut buffer).await.expect("read");
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 100 Continue"));
    socket.write_all(body.as_bytes()).await.expect("write body");
    drop(socket);
    let line = gw
        .proc
        .wait_line("the request's log line", |l| l.contains("\"aigw::request\"") && l.contains("\"chat-completions\""))
        .await;
    let log: Value = serde_json::from_str(&line).expect("json");
    assert_eq!(log["status"], 200, "the backend call finished without its client: {log}");
    assert!(log["completion_tokens"].as_u64().is_some_and(|t| t > 0), "{log}");
}

#[tokio::test]
async fn a_backend_that_breaks_off_mid_stream_ends_with_an_error_event() {
    let (_sim, gw) = start_pair(&[], "").await;
    let response = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("api-key", KEY)
        .header("x-sim-fault", "drop")
        .json(&chat_body("this will break", true))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let data = sse_data(&response.text().await.expect("body"));
    assert!(
        !data.is_empty() && !data.contains(&"[DONE]".to_owned()),
        "a truncated stream must not look complete: {data:?}"
    );
    let last: Value = serde_json::from_str(data.last().expect("an event")).expect("json");
    assert_eq!(last["error"]["code"], "backend_unavailable", "the stream ends with an OpenAI error event: {last}");
    let log = gw.proc.request_log(&id).await;
    assert_eq!(log["stream_incomplete"], true, "{log}");
}

/// What a [`RawBackend`] does on a connection, in order, once it has read the request's head.
#[derive(Clone)]
enum Step {
    Send(Vec<u8>),
    /// The same bytes this many times (a body too large to build in one piece).
    SendTimes(Vec<u8>, usize),
    /// Stay silent for a while, the connection open (a slow or idle backend).
    Pause(Duration),
    /// Keep the connection open until the gateway closes it.
    HoldOpen,
}

/// A backend of the test's own on a real socket, writing raw HTTP/1.1: a broken or hostile one.
/// Every connection gets the same script; `closed` hears when the gateway closed one (a write
/// failed, or the script held it open and the gateway hung up).
struct RawBackend {
    url: String,
    closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl RawBackend {
    async fn start(script: Vec<Step>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (script, tx) = (script.clone(), tx.clone());
                tokio::spawn(async move {
                    if !read_request(&mut socket).await {
                        return;
                    }
                    for step in script {
                        let written = match step {
                            Step::Send(bytes) => socket.write_all(&bytes).await,
                            Step::SendTimes(bytes, times) => {
                                let mut result = Ok(());
                                for _ in 0..times {
                                    result = socket.write_all(&bytes).await;
                                    if result.is_err() {
                                        break;
                                    }
                                }
                                result
                            }
                            Step::Pause(duration) => {
                                tokio::time::sleep(duration).await;
                                Ok(())
                            }
                            Step::HoldOpen => {
                                let mut sink = [0u8; 1024];
                                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                                Err(std::io::ErrorKind::ConnectionAborted.into())
                            }
                        };
                        if written.is_err() {
                            let _ = tx.send(());
                            return;
                        }
                    }
                });
            }
        });
        Self { url, closed }
    }

    /// Waits until the gateway has closed a connection to this backend.
    async fn wait_closed(&mut self) {
        tokio::time::timeout(WAIT, self.closed.recv()).await.expect("the gateway never let go of the backend");
    }
}

/// Reads a request's head and its `Content-Length` body; false when the connection closed first.
async fn read_request(socket: &mut tokio::net::TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("content-length"));
    let mut body = seen.len() - head_end;
    while body < length {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => body += n,
        }
    }
    true
}

/// The head of a chunked event stream.
const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";

/// One chunk of a chunked body holding `data`.
fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

/// A gateway in front of `backend` (OpenAI kind, and an `http` API on it at /agents), with the
/// semantic cache on the OpenAI API (so streams are assembled) and embeddings from llm-sim.
async fn gateway_before(backend: &RawBackend, sim: &Sim, backend_extra: &str) -> Gateway {
    let toml = format!(
        r#"
[backends.raw]
url = "{raw}/v1"
kind = "openai"
{backend_extra}

[backends.sim]
url = "{sim}/v1"
kind = "openai"

[[subscriptions]]
id = "sub-a"
name = "Team A app"
team = "team-a"
apis = ["*"]
key-sha256 = "{key}"

[apis.aoai]
kind = "openai"
backend = "raw"
inbound = [
  {{ policy = "semantic-cache-lookup", embeddings = {{ source = "backend", backend-id = "sim", model = "text-embedding-3-small" }} }},
  {{ policy = "token-limit", tokens-per-minute = 100000 }},
]
outbound = [{{ policy = "semantic-cache-store" }}]

[apis.agents]
kind = "http"
path = "/agents"
backend = "raw"
"#,
        raw = backend.url,
        sim = sim.url,
        key = sha256_hex(KEY),
    );
    Gateway::start(&toml, &[]).await
}

/// The OpenAI error event a stream ended with, after asserting it has no `[DONE]`.
fn final_error(data: &[String]) -> Value {
    assert!(!data.contains(&"[DONE]".to_owned()), "a stream cut short must not look complete: {data:?}");
    serde_json::from_str(data.last().expect("an event")).expect("json")
}

#[tokio::test]
async fn a_hostile_choice_index_ends_the_stream_with_an_error_and_keeps_the_usage() {
    let sim = Sim::start(&[]).await;
    let role = r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}"#;
    let usage = r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#;
    let hostile = r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":4000000000,"delta":{"content":"x"}}]}"#;
    let mut backend = RawBackend::start(vec![
        Step::Send(SSE_HEAD.to_vec()),
        Step::Send(chunk(&format!("{role}\n\n{usage}\n\n{hostile}\n\n"))),
        // A hostile backend would go on; the gateway must stop reading it.
        Step::SendTimes(chunk(&format!("{role}\n\n")), 1_000_000),
    ])
    .await;
    let gw = gateway_before(&backend, &sim, "").await;
    let (id, data) = stream(&gw, "/v1/chat/completions", &chat_body("hostile index", true)).await;
    let error = final_error(&data);
    assert_eq!(error["error"]["code"], "backend_invalid_response", "{error}");
    backend.wait_closed().await;
    let log = gw.proc.request_log(&id).await;
    assert_eq!(log["stream_incomplete"], true, "{log}");
    assert_eq!(log["total_tokens"], 12, "the usage the backend reported is booked: {log}");
}

#[tokio::test]
async fn an_event_without_end_is_cut_at_its_bound() {
    let sim = Sim::start(&[]).await;
    let first =
        r#"data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
    let mut backend = RawBackend::start(vec![
        Step::Send(SSE_HEAD.to_vec()),
        Step::Send(chunk(&format!("{first}\n\ndata: \""))),
        // 64 MiB of one event that never gets its blank line.
        Step::SendTimes(chunk(&"x".repeat(64 * 1024)), 1024),
        Step::HoldOpen,
    ])
    .await;
    let gw = gateway_before(&backend, &sim, "").await;
    let (id, data) = stream(&gw, "/v1/chat/completions", &chat_body("endless event", true)).await;
    assert_eq!(data.first().map(String::as_str), Some(&first["data: ".len()..]), "{data:?}");
    assert_eq!(final_error(&data)["error"]["code"], "backend_invalid_response");
    backend.wait_closed().await;
    assert_eq!(gw.proc.request_log(&id).await["stream_incomplete"], true);
}

#[tokio::test]
async fn a_json_answer_beyond_the_bound_is_a_502() {
    let sim = Sim::start(&[]).await;
    let declared = RawBackend::start(vec![
        Step::Send(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n{".to_vec(),
        ),
        Step::HoldOpen,
    ])
    .await;
    let chunked = RawBackend::start(vec![
        Step::Send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()),
        // 1 GiB if the gateway kept reading.
        Step::SendTimes(chunk(&" ".repeat(1024 * 1024)), 1024),
        Step::HoldOpen,
    ])
    .await;
    for mut backend in [declared, chunked] {
        let gw = gateway_before(&backend, &sim, "").await;
        let response = client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("api-key", KEY)
            .json(&chat_body("a huge answer", false))
            .send()
            .await
            .expect("send");
        let body = openai_error(response, 502).await;
        assert_eq!(body["error"]["code"], "backend_invalid_response", "{body}");
        backend.wait_closed().await;
    }
}

/// The end of a chunked body: the backend ends its stream cleanly.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Reads a pass-through stream from the gateway's `http` API: (request id, the body received,
/// whether the body ended cleanly).
async fn passthrough_stream(gw: &Gateway) -> (String, String, bool) {
    let response = client().get(format!("{}/agents/events", gw.url)).header("api-key", KEY).send().await.expect("send");
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    let clean = loop {
        match body.next().await {
            Some(Ok(bytes)) => received.extend_from_slice(&bytes),
            Some(Err(_)) => break false,
            None => break true,
        }
    };
    (id, String::from_utf8(received).expect("utf-8"), clean)
}

/// The samples of `/metrics` counting broken streams.
async fn broken_stream_metrics(gw: &Gateway) -> Vec<String> {
    let text = client().get(format!("{}/metrics", gw.url)).send().await.expect("metrics").text().await.expect("text");
    text.lines().filter(|l| l.contains("kind=\"stream-broken\"")).map(str::to_owned).collect()
}

#[tokio::test]
async fn a_passthrough_stream_that_ends_cleanly_without_done_is_complete() {
    let sim = Sim::start(&[]).await;
    let events = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
    let backend = RawBackend::start(vec![
        Step::Send(SSE_HEAD.to_vec()),
        Step::Send(chunk(events)),
        Step::Send(LAST_CHUNK.to_vec()),
    ])
    .await;
    let gw = gateway_before(&backend, &sim, "").await;
    let (id, body, clean) = passthrough_stream(&gw).await;
    assert!(clean, "the body ended cleanly");
    assert_eq!(body, events, "passed as it came");
    let log = gw.proc.request_log(&id).await;
    assert!(log.get("stream_incomplete").is_none(), "{log}");
    assert_eq!(broken_stream_metrics(&gw).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_passthrough_stream_that_keeps_sending_outlives_the_total_timeout() {
    let sim = Sim::start(&[]).await;
    let mut script = vec![Step::Send(SSE_HEAD.to_vec())];
    for _ in 0..8 {
        script.push(Step::Send(chunk("data: tick\n\n")));
        script.push(Step::Pause(Duration::from_millis(300)));
    }
    script.push(Step::Send(LAST_CHUNK.to_vec()));
    let backend = RawBackend::start(script).await;
    let gw = gateway_before(&backend, &sim, "timeout-secs = 1\nstream-idle-timeout-secs = 2").await;
    let started = Instant::now();
    let (id, body, clean) = passthrough_stream(&gw).await;
    assert!(started.elapsed() > Duration::from_secs(2), "the stream lasted longer than timeout-secs");
    assert!(clean, "not cut");
    assert_eq!(body, "data: tick\n\n".repeat(8));
    assert!(gw.proc.request_log(&id).await.get("stream_incomplete").is_none());
}

#[tokio::test]
async fn a_passthrough_stream_that_goes_idle_is_ended() {
    let sim = Sim::start(&[]).await;
    let mut backend =
        RawBackend::start(vec![Step::Send(SSE_HEAD.to_vec()), Step::Send(chunk("data: hello\n\n")), Step::HoldOpen])
            .await;
    let gw = gateway_before(&backend, &sim, "stream-idle-timeout-secs = 1").await;
    let (id, body, clean) = passthrough_stream(&gw).await;
    assert_eq!(body, "data: hello\n\n");
    assert!(!clean, "a cut stream must not look whole");
    backend.wait_closed().await;
    assert_eq!(gw.proc.request_log(&id).await["stream_incomplete"], true);
    assert_eq!(broken_stream_metrics(&gw).await.len(), 1, "counted as broken by the backend");
}

#[tokio::test]
async fn a_client_that_leaves_a_passthrough_stream_lets_the_backend_go() {
    let sim = Sim::start(&[]).await;
    let mut backend =
        RawBackend::start(vec![Step::Send(SSE_HEAD.to_vec()), Step::Send(chunk("data: hello\n\n")), Step::HoldOpen])
            .await;
    let gw = gateway_before(&backend, &sim, "").await;
    let response = client().get(format!("{}/agents/events", gw.url)).header("api-key", KEY).send().await.expect("send");
    let id = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let mut body = response.bytes_stream();
    assert_eq!(body.next().await.expect("a chunk").expect("bytes"), "data: hello\n\n");
    drop(body);
    // The backend never ends this stream and the idle timeout is 60 s: only the gateway letting go
    // of it closes the connection within the wait.
    backend.wait_closed().await;
    assert_eq!(gw.proc.request_log(&id).await["client_disconnected"], true);
}
