//! rate-limit-by-key and quota-by-key on an agent-style `http` API, and token-limit reconciling a
//! streamed answer, end to end through real processes.

mod common;

use common::*;
use serde_json::Value;

async fn gateway(sim: &Sim) -> Gateway {
    let extra = format!(
        r#"
[backends.agents]
url = "{url}"
kind = "openai"

[apis.agents]
kind = "http"
path = "/agents"
backend = "agents"
inbound = [
  {{ policy = "rate-limit-by-key", calls = 3, renewal-period = 60, remaining-calls-header = "x-remaining-calls" }},
]

[apis.mcp]
kind = "http"
path = "/mcp"
backend = "agents"
inbound = [{{ policy = "quota-by-key", counter-key = "{{subscription.team}}", calls = 2, renewal-period = 3600 }}]

[apis.per-user]
kind = "http"
path = "/per-user"
backend = "agents"
inbound = [
  {{ policy = "set-variable", name = "user", value = "user-{{request.header.x-user}}" }},
  {{ policy = "rate-limit-by-key", counter-key = "{{variable.user}}", calls = 1, renewal-period = 60 }},
]
outbound = [
  {{ policy = "set-variable", name = "seen", value = "{{variable.user}} via {{backend.id}}" }},
  {{ policy = "set-header", name = "x-seen", value = "{{variable.seen}}" }},
]
"#,
        url = sim.url
    );
    Gateway::start(&config(sim, &extra), &[("SIM_BACKEND_KEY", BACKEND_KEY), ("OTHER_KEY", OTHER_KEY)]).await
}

#[tokio::test]
async fn rate_limit_by_key_answers_429_with_retry_after() {
    let sim = Sim::start(&[]).await;
    let gw = gateway(&sim).await;
    let http = client();
    for remaining in ["2", "1", "0"] {
        let response =
            http.get(format!("{}/agents/v1/models", gw.url)).header("api-key", KEY).send().await.expect("send");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-remaining-calls"], remaining);
    }
    let refused = http.get(format!("{}/agents/v1/models", gw.url)).header("api-key", KEY).send().await.expect("send");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=61).contains(&retry_after), "{retry_after}");
    let body = openai_error(refused, 429).await;
    assert_eq!(body["message"], format!("Rate limit is exceeded. Try again in {retry_after} seconds."));
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // The key is the subscription: another subscription has its own allowance.
    let other =
        http.get(format!("{}/agents/v1/models", gw.url)).header("api-key", OTHER_KEY).send().await.expect("send");
    assert_eq!(other.status(), 401, "team B may not call the agents API at all");
}

#[tokio::test]
async fn set_variable_keys_a_limit_per_value_and_reaches_outbound() {
    let sim = Sim::start(&[]).await;
    let gw = gateway(&sim).await;
    let call = |user: &'static str| {
        client().get(format!("{}/per-user/v1/models", gw.url)).header("api-key", KEY).header("x-user", user).send()
    };
    let first = call("ann").await.expect("send");
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-seen"], "user-ann via agents");
    assert_eq!(call("ann").await.expect("send").status(), 429, "ann's one call is used");
    // Had the variable rendered empty, every caller would share ann's counter.
    let bob = call("bob").await.expect("send");
    assert_eq!(bob.status(), 200, "bob has a counter of his own");
    assert_eq!(bob.headers()["x-seen"], "user-bob via agents");
}

#[tokio::test]
async fn quota_by_key_answers_403_until_the_period_ends() {
    let sim = Sim::start(&[]).await;
    let gw = gateway(&sim).await;
    let http = client();
    for _ in 0..2 {
        let response = http.get(format!("{}/mcp/v1/models", gw.url)).header("api-key", KEY).send().await.expect("send");
        assert_eq!(response.status(), 200);
    }
    let refused = http.get(format!("{}/mcp/v1/models", gw.url)).header("api-key", KEY).send().await.expect("send");
    let retry_after: u64 = refused.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=3600).contains(&retry_after));
    let body = openai_error(refused, 403).await;
    let (h, m, s) = (retry_after / 3600, retry_after / 60 % 60, retry_after % 60);
    assert_eq!(
        body["message"],
        format!("Out of call volume quota. Quota will be replenished in {h:02}:{m:02}:{s:02}.")
    );
    assert_eq!(body["error"]["code"], "call_quota_exceeded");
}

#[tokio::test]
async fn token_limit_reconciles_a_stream_to_its_real_usage() {
    let (_sim, gw) = start_pair(&[], METERED).await;
    let http = client();
    let url = format!("{}/metered/v1/chat/completions", gw.url);

    // A stream reports its reservation up front; its real usage is known only at the end.
    let streamed =
        http.post(&url).header("api-key", KEY).json(&chat_body("count my stream", true)).send().await.expect("send");
    let after_reservation: u64 = streamed.headers()["x-remaining-tokens"].to_str().expect("ascii").parse().expect("n");
    assert!(!streamed.headers().contains_key("x-tokens-consumed"));
    let id = streamed.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let _ = streamed.text().await.expect("body");
    let used = gw.proc.request_log(&id).await["total_tokens"].as_u64().expect("usage was captured");
    assert!(100_000 - after_reservation > used, "the reservation covers the expected completion");

    // The next JSON call sees the stream charged at its real usage, not at its reservation.
    let json = http.post(&url).header("api-key", KEY).json(&chat_body("and now me", false)).send().await.expect("send");
    let remaining: u64 = json.headers()["x-remaining-tokens"].to_str().expect("ascii").parse().expect("n");
    let consumed: u64 = json.headers()["x-tokens-consumed"].to_str().expect("ascii").parse().expect("n");
    let answer: Value = json.json().await.expect("json");
    assert_eq!(consumed, answer["usage"]["total_tokens"].as_u64().expect("usage"));
    assert_eq!(remaining, 100_000 - used - consumed);
}

const METERED: &str = r#"
[apis.metered]
kind = "openai"
path = "/metered"
backend = "openai"
inbound = [{ policy = "token-limit", tokens-per-minute = 100000, remaining-tokens-header = "x-remaining-tokens", tokens-consumed-header = "x-tokens-consumed" }]
"#;

/// Behind a trusted load balancer `{client.ip}` is the caller's address from `X-Forwarded-For`;
/// from anyone else the header is ignored, so a caller cannot choose its own counter.
#[tokio::test]
async fn client_ip_counters_see_through_trusted_proxies_only() {
    let sim = Sim::start(&[]).await;
    let extra = format!(
        r#"
[backends.mcp]
url = "{url}"
kind = "openai"

[apis.mcp]
kind = "http"
path = "/mcp"
backend = "mcp"
subscription-required = false
inbound = [{{ policy = "rate-limit-by-key", counter-key = "{{client.ip}}", calls = 1, renewal-period = 60 }}]
"#,
        url = sim.url
    );
    let env = [("SIM_BACKEND_KEY", BACKEND_KEY), ("OTHER_KEY", OTHER_KEY)];
    let trusting = config(&sim, &extra)
        .replace("shutdown-grace-secs = 10", "shutdown-grace-secs = 10\ntrusted-proxies = [\"127.0.0.1/32\"]");
    let behind_proxy = Gateway::start(&trusting, &env).await;
    let exposed = Gateway::start(&config(&sim, &extra), &env).await;
    let http = client();
    let call = |gw: &Gateway, forwarded: &'static str| {
        http.get(format!("{}/mcp/v1/models", gw.url)).header("x-forwarded-for", forwarded).send()
    };

    let first = call(&behind_proxy, "203.0.113.1").await.expect("send");
    assert_eq!(first.status(), 200);
    let id = first.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    assert_eq!(behind_proxy.proc.request_log(&id).await["client_ip"], "203.0.113.1");
    assert_eq!(call(&behind_proxy, "203.0.113.1").await.expect("send").status(), 429, "same caller, same counter");
    assert_eq!(
        call(&behind_proxy, "203.0.113.2").await.expect("send").status(),
        200,
        "another caller, its own counter"
    );
    // A caller prepending an address of its choice does not get a fresh counter.
    assert_eq!(call(&behind_proxy, "198.51.100.9, 203.0.113.2").await.expect("send").status(), 429);

    // Without trusted proxies the header means nothing: every caller here is 127.0.0.1.
    assert_eq!(call(&exposed, "203.0.113.1").await.expect("send").status(), 200);
    assert_eq!(call(&exposed, "203.0.113.2").await.expect("send").status(), 429);
}
