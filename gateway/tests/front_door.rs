//! The front door on real sockets: both route families against both backend kinds, every way of
//! presenting a key, the 401s, bad input, and what reaches the backend.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn chat_and_embeddings_on_every_route_and_backend_kind() {
    let (_sim, gw) = start_pair(&[], "").await;
    let http = client();
    let prompt = "What is the capital of France?";
    // (path, body has a model, backend kind the API uses)
    let routes = [
        ("/v1/chat/completions", true, "openai"),
        ("/openai/v1/chat/completions", true, "openai"),
        ("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21", false, "openai"),
        ("/azure/v1/chat/completions", true, "azure"),
        ("/azure/openai/v1/chat/completions", true, "azure"),
        ("/azure/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21", false, "azure"),
    ];
    for (path, with_model, kind) in routes {
        let mut body = chat_body(prompt, false);
        if !with_model {
            body.as_object_mut().expect("object").remove("model");
        }
        let response =
            http.post(format!("{}{path}", gw.url)).header("api-key", KEY).json(&body).send().await.expect("send");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        let expected_model = if with_model { "gpt-4o-mini" } else { "gpt-4o-prod" };
        assert_eq!(headers["x-sim-model"], expected_model, "{path}: the backend got the model or deployment");
        // api-version is passed through to Azure deployment URLs only.
        let azure_deployment = kind == "azure" && path.contains("/deployments/");
        assert_eq!(
            headers.get("x-sim-api-version").map(|v| v.to_str().expect("ascii")),
            azure_deployment.then_some("2024-10-21"),
            "{path}"
        );
        // The backend sees its own credential, in the form of its kind, never the client's key.
        let credential =
            format!("{}:{}", if kind == "azure" { "api-key" } else { "bearer" }, &sha256_hex(BACKEND_KEY)[..8]);
        assert_eq!(headers["x-sim-auth"], credential.as_str(), "{path}");
        // Only the `aoai` API (on the OpenAI-kind backend) has the outbound set-header.
        assert_eq!(
            headers.get("x-team").is_some(),
            kind == "openai",
            "{path}: outbound set-header ran where configured"
        );
        assert_eq!(
            headers["x-sim-request-id"], headers["x-request-id"],
            "{path}: the backend got the gateway's request id"
        );
        let answer: Value = response.json().await.expect("json");
        assert!(
            answer["choices"][0]["message"]["content"].as_str().expect("content").contains(&prompt_marker(prompt)),
            "{path}"
        );
        let usage = &answer["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["prompt_tokens"].as_u64().expect("p") + usage["completion_tokens"].as_u64().expect("c"))
        );
    }

    for path in [
        "/v1/embeddings",
        "/azure/openai/deployments/embed/embeddings?api-version=2024-10-21",
        "/azure/openai/v1/embeddings",
    ] {
        let response = http
            .post(format!("{}{path}", gw.url))
            .header("api-key", KEY)
            .json(&json!({"model": "text-embedding-3-small", "input": ["hello", "world"], "encoding_format": "base64"}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{path}");
        assert!(body["data"][0]["embedding"].is_string(), "{path}: base64 passed through");
    }

    for path in ["/v1/models", "/openai/v1/models", "/azure/openai/v1/models"] {
        let response = http.get(format!("{}{path}", gw.url)).header("api-key", KEY).send().await.expect("send");
        assert_eq!(response.status(), 200, "{path}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["object"], "list", "{path}");
    }
}

#[tokio::test]
async fn every_key_location_works_and_the_key_never_leaks() {
    let (sim, gw) = start_pair(&[], "").await;
    let http = client();
    let url = format!("{}/v1/chat/completions", gw.url);
    let body = chat_body("hello", false);
    let forms = [
        http.post(&url).header("Ocp-Apim-Subscription-Key", KEY),
        http.post(&url).header("api-key", KEY),
        http.post(&url).header("Authorization", format!("Bearer {KEY}")),
        http.post(format!("{url}?subscription-key={KEY}")),
    ];
    let mut request_ids = Vec::new();
    for (i, request) in forms.into_iter().enumerate() {
        let response = request.json(&body).send().await.expect("send");
        assert_eq!(response.status(), 200, "form {i}");
        // The backend got its own key, not the caller's, whichever header the caller used.
        assert_eq!(response.headers()["x-sim-auth"], format!("bearer:{}", &sha256_hex(BACKEND_KEY)[..8]).as_str());
        request_ids.push(response.headers()["x-request-id"].to_str().expect("ascii").to_owned());
        let text = response.text().await.expect("body");
        assert!(!text.contains(KEY));
    }
    for id in &request_ids {
        let log = gw.proc.request_log(id).await;
        assert_eq!(log["subscription_id"], "sub-a");
        assert_eq!(log["team"], "team-a");
        assert_eq!(log["status"], 200);
        assert!(log["total_tokens"].as_u64().is_some_and(|t| t > 0), "{log}");
    }
    // Neither the gateway's nor the simulator's output ever contains a key.
    for line in gw.proc.lines().iter().chain(sim.proc.lines().iter()) {
        assert!(!line.contains(KEY) && !line.contains(BACKEND_KEY), "secret in output: {line}");
    }
}

#[tokio::test]
async fn missing_invalid_and_unauthorised_keys_get_api_management_401s() {
    let (_sim, gw) = start_pair(&[], "").await;
    let http = client();
    let url = format!("{}/v1/chat/completions", gw.url);

    let missing = openai_error(http.post(&url).json(&chat_body("x", false)).send().await.expect("send"), 401).await;
    assert!(
        missing["error"]["message"]
            .as_str()
            .expect("message")
            .starts_with("Access denied due to missing subscription key.")
    );
    assert_eq!(missing["error"]["code"], "missing_subscription_key");

    let wrong_key = format!("{KEY}x");
    let invalid = openai_error(
        http.post(&url).header("api-key", &wrong_key).json(&chat_body("x", false)).send().await.expect("send"),
        401,
    )
    .await;
    assert!(
        invalid["error"]["message"]
            .as_str()
            .expect("message")
            .starts_with("Access denied due to invalid subscription key.")
    );
    assert!(!invalid.to_string().contains(&wrong_key), "the presented key is not echoed");

    // An empty header counts as missing; a Basic credential is not a subscription key.
    let empty = openai_error(
        http.post(&url).header("api-key", "").json(&chat_body("x", false)).send().await.expect("send"),
        401,
    )
    .await;
    assert_eq!(empty["error"]["code"], "missing_subscription_key");
    let basic = openai_error(
        http.post(&url).header("authorization", "Basic abc").json(&chat_body("x", false)).send().await.expect("send"),
        401,
    )
    .await;
    assert_eq!(basic["error"]["code"], "missing_subscription_key");

    // Team B's subscription does not include the `azure` API.
    let azure = format!("{}/azure/v1/chat/completions", gw.url);
    let response =
        http.post(&azure).header("api-key", OTHER_KEY).json(&chat_body("x", false)).send().await.expect("send");
    let forbidden = openai_error(response, 401).await;
    assert_eq!(forbidden["error"]["code"], "invalid_subscription_key");
    let allowed = http.post(&url).header("api-key", OTHER_KEY).json(&chat_body("x", false)).send().await.expect("send");
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.headers()["x-team"], "team-b");

    // A 401 is checked before the body is read: garbage with no key is still a 401, not a 400.
    let garbage = http.post(&url).body("{not json").send().await.expect("send");
    openai_error(garbage, 401).await;
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_never_a_5xx() {
    let (_sim, gw) = start_pair(&[], "").await;
    let http = client();
    let url = format!("{}/v1/chat/completions", gw.url);
    let post = |body: String| {
        http.post(&url).header("api-key", KEY).header("content-type", "application/json").body(body).send()
    };

    let cases = [
        ("{\"model\": ", None),
        ("[1,2]", None),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, Some("model")),
        (r#"{"model":"m","messages":"hello"}"#, Some("messages")),
        (r#"{"model":"m","messages":[]}"#, Some("messages")),
        (r#"{"model":"m","messages":[{"content":"no role"}]}"#, Some("messages")),
        (r#"{"model":"m","messages":[{"role":"user","content":5}]}"#, Some("messages")),
        (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, Some("stream")),
        (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#, Some("max_tokens")),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":1}}"#,
            Some("stream_options"),
        ),
    ];
    for (body, param) in cases {
        let error = openai_error(post(body.to_owned()).await.expect("send"), 400).await;
        assert_eq!(error["error"]["param"].as_str(), param, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    let embeddings = http
        .post(format!("{}/v1/embeddings", gw.url))
        .header("api-key", KEY)
        .json(&json!({"model": "e", "input": [1, "mixed"]}))
        .send()
        .await
        .expect("send");
    assert_eq!(openai_error(embeddings, 400).await["error"]["param"], "input");

    let too_big = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(70_000));
    let too_big = post(too_big).await.expect("send");
    assert_eq!(too_big.headers()["connection"], "close", "the client must not reuse this connection");
    let error = openai_error(too_big, 413).await;
    assert!(error["error"]["message"].as_str().expect("message").contains("65536"));

    let no_version = http
        .post(format!("{}/openai/deployments/d/chat/completions", gw.url))
        .header("api-key", KEY)
        .json(&chat_body("x", false))
        .send()
        .await
        .expect("send");
    assert_eq!(openai_error(no_version, 400).await["error"]["param"], "api-version");

    // Routes the gateway does not serve (what agent frameworks call by default) and wrong methods.
    let responses = http
        .post(format!("{}/v1/responses", gw.url))
        .header("api-key", KEY)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    let not_found = openai_error(responses, 404).await;
    assert_eq!(not_found["error"]["message"], "Invalid URL (POST /v1/responses)");
    let wrong_method = http.get(&url).header("api-key", KEY).send().await.expect("send");
    openai_error(wrong_method, 405).await;

    // on-error policies edit error responses.
    let error_response = post("{".to_owned()).await.expect("send");
    assert_eq!(error_response.headers()["x-error-api"], "aoai");

    // Nothing above was a server error.
    for log in gw.proc.json_lines().iter().filter(|l| l["target"] == "aigw::request") {
        assert!(log["status"].as_u64().is_some_and(|s| s < 500), "{log}");
    }
}

#[tokio::test]
async fn backend_failures_are_reported_and_backend_errors_pass_through() {
    let (sim, gw) = start_pair(&[], "").await;
    let http = client();
    let url = format!("{}/v1/chat/completions", gw.url);
    let limited = http
        .post(&url)
        .header("api-key", KEY)
        .header("x-sim-fault", "429")
        .json(&chat_body("x", false))
        .send()
        .await
        .expect("send");
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"), "the backend's Retry-After reaches the client");
    let failed = http
        .post(&url)
        .header("api-key", KEY)
        .header("x-sim-fault", "500")
        .json(&chat_body("x", false))
        .send()
        .await
        .expect("send");
    assert_eq!(failed.status(), 500);

    drop(sim);
    let unreachable = http.post(&url).header("api-key", KEY).json(&chat_body("x", false)).send().await.expect("send");
    let error = openai_error(unreachable, 502).await;
    assert_eq!(error["error"]["code"], "backend_unavailable");
    assert!(!error.to_string().contains("127.0.0.1"), "internal addresses stay in the log: {error}");
}

#[tokio::test]
async fn health_needs_no_key_and_every_response_is_labelled() {
    let (_sim, gw) = start_pair(&[], "").await;
    let http = client();
    for path in ["/health", "/ready"] {
        let response = http.get(format!("{}{path}", gw.url)).send().await.expect("send");
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers()["x-gateway-instance"].to_str().expect("ascii").starts_with("aigw-"));
        assert_eq!(response.headers()["x-request-id"].len(), 36);
    }
    // Request ids are the gateway's own, fresh each time, whatever the client sent.
    let a = http.get(format!("{}/health", gw.url)).header("x-request-id", "mine").send().await.expect("send");
    let b = http.get(format!("{}/health", gw.url)).send().await.expect("send");
    assert_ne!(a.headers()["x-request-id"], "mine");
    assert_ne!(a.headers()["x-request-id"], b.headers()["x-request-id"]);
    assert_eq!(a.headers()["x-gateway-instance"], b.headers()["x-gateway-instance"]);
}

#[tokio::test]
async fn http_apis_pass_any_route_through_and_inbound_headers_reach_the_backend() {
    let sim = Sim::start(&[]).await;
    let extra = r#"
[backends.agents]
url = "URL"
kind = "openai"

[apis.agents]
kind = "http"
path = "/agents"
backend = "agents"

[apis.faulty]
kind = "http"
path = "/faulty"
backend = "agents"
subscription-required = false
inbound = [{ policy = "set-header", name = "x-sim-fault", value = "500" }]
"#
    .replace("URL", &sim.url);
    let gw = Gateway::start(&config(&sim, &extra), &[("SIM_BACKEND_KEY", BACKEND_KEY), ("OTHER_KEY", OTHER_KEY)]).await;
    let http = client();

    let response = http.get(format!("{}/agents/v1/models", gw.url)).header("api-key", KEY).send().await.expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.expect("json")["object"], "list");
    let streamed = http
        .post(format!("{}/agents/v1/chat/completions?subscription-key={KEY}", gw.url))
        .json(&chat_body("agent hello", true))
        .send()
        .await
        .expect("send");
    assert_eq!(streamed.status(), 200);
    let data = sse_data(&streamed.text().await.expect("body"));
    assert!(stream_text(&data).contains(&prompt_marker("agent hello")));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));

    // Team B may not call the agents API; no key at all is a 401 too.
    openai_error(
        http.get(format!("{}/agents/v1/models", gw.url)).header("api-key", OTHER_KEY).send().await.expect("send"),
        401,
    )
    .await;
    openai_error(http.get(format!("{}/agents/v1/models", gw.url)).send().await.expect("send"), 401).await;

    // The inbound set-header on /faulty reached the backend: it forced a backend 500.
    let faulty = http
        .post(format!("{}/faulty/v1/chat/completions", gw.url))
        .json(&chat_body("x", false))
        .send()
        .await
        .expect("send");
    assert_eq!(faulty.status(), 500);
}
