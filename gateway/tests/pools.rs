//! Backend pools against real simulators: failover that clients never see (429s with
//! Retry-After, then 500s, then a dead process), failback once the primary is back and its trip
//! has passed, weighted spread, and the 503 when every member is tripped.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

const TAG: &str = "pool-test";

/// An API `aoai` (no subscription) sending to pool `llm`; `backends` and `members` are TOML.
fn pool_config(backends: &str, members: &str) -> String {
    format!(
        r#"
{backends}

[pools.llm]
members = [{members}]

[apis.aoai]
kind = "openai"
backend = "llm"
subscription-required = false
"#
    )
}

fn backend(id: &str, url: &str, breaker: &str) -> String {
    format!("[backends.{id}]\nurl = \"{url}/v1\"\nkind = \"openai\"\n{breaker}\n")
}

async fn chat(http: &reqwest::Client, gw: &Gateway, prompt: &str) -> reqwest::Response {
    http.post(format!("{}/v1/chat/completions", gw.url))
        .header("x-sim-tally", TAG)
        .json(&chat_body(prompt, false))
        .send()
        .await
        .expect("send")
}

/// Requests of ours a simulator answered (with usage).
async fn answered(sim_url: &str) -> u64 {
    let usage: Value =
        client().get(format!("{sim_url}/sim/usage")).send().await.expect("usage").json().await.expect("json");
    usage[TAG]["requests"].as_u64().unwrap_or(0)
}

async fn ready(gw: &Gateway) -> Value {
    let response = client().get(format!("{}/ready", gw.url)).send().await.expect("ready");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

async fn backend_health(gw: &Gateway, id: &str) -> Value {
    let ready = ready(gw).await;
    let backends = ready["backends"].as_array().expect("backends").clone();
    backends.into_iter().find(|b| b["id"] == id).unwrap_or_else(|| panic!("{id} in {ready}"))
}

/// Polls `check` until it holds, for at most [`WAIT`].
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn set_faults(sim: &Sim, faults: Value) {
    let response = client().put(format!("{}/sim/faults", sim.url)).json(&faults).send().await.expect("faults");
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
}

/// A client sending one request after another until stopped; what it got besides 200s.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl SteadyLoad {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (stopped, counter) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let client = client();
            let mut errors = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let stream = n % 2 == 0;
                let response = client
                    .post(format!("{url}/v1/chat/completions"))
                    .header("x-sim-tally", TAG)
                    .json(&chat_body(&format!("steady request {n}"), stream))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 200 => {
                        // The whole answer must arrive, streamed or not.
                        let body = r.text().await.unwrap_or_default();
                        let complete = if stream {
                            body.ends_with("data: [DONE]\n\n")
                        } else {
                            serde_json::from_str::<Value>(&body)
                                .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
                        };
                        if !complete {
                            errors.push(format!("request {n}: incomplete answer {body}"));
                        }
                    }
                    Ok(r) => errors.push(format!("request {n}: {} {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => errors.push(format!("request {n}: {e}")),
                }
            }
            errors
        });
        Self { stop, sent, task }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.expect("load task");
        (self.sent.load(Ordering::SeqCst), errors)
    }
}

#[tokio::test]
async fn a_failing_primary_is_invisible_to_clients_and_gets_its_traffic_back_once_it_recovers() {
    let primary = Sim::start(&[]).await;
    let secondary = Sim::start(&[]).await;
    let primary_addr = primary.addr().to_owned();
    let breaker = "circuit-breaker = { failure-count = 1, interval-secs = 10, trip-secs = 2, \
                   accept-retry-after = true, max-trip-secs = 2 }";
    let toml = pool_config(
        &format!("{}{}", backend("primary", &primary.url, breaker), backend("secondary", &secondary.url, "")),
        r#"{ backend = "primary", priority = 1 }, { backend = "secondary", priority = 2 }"#,
    );
    let gw = Gateway::start(&toml, &[]).await;
    let load = SteadyLoad::start(gw.url.clone());

    eventually("traffic on the healthy primary", || async { answered(&primary.url).await >= 5 }).await;
    assert_eq!(answered(&secondary.url).await, 0, "priority 2 gets nothing while priority 1 is healthy");

    // Throttled, with Retry-After: 1 (shorter than trip-secs, so the trips follow the header:
    // every time the breaker is seen open, it reopens within a second).
    set_faults(&primary, json!({"rate_429": 1.0, "retry_after_secs": 1})).await;
    gw.proc.wait_line("a 429 failover", |l| l.contains("pool member failed") && l.contains("429 Too Many")).await;
    let first_trips = backend_health(&gw, "primary").await["trips"].as_u64().expect("trips");
    eventually("the primary tripped twice more by 429s", || async {
        let health = backend_health(&gw, "primary").await;
        if health["state"] == "open" {
            assert!(health["retry_in_secs"].as_u64().is_some_and(|s| s <= 1), "Retry-After ignored: {health}");
        }
        health["trips"].as_u64().is_some_and(|t| t >= first_trips + 2)
    })
    .await;
    let on_secondary = answered(&secondary.url).await;
    eventually("the secondary takes the traffic", || async { answered(&secondary.url).await > on_secondary + 5 }).await;

    // Failing outright.
    set_faults(&primary, json!({"rate_429": 0.0, "rate_500": 1.0})).await;
    gw.proc.wait_line("a 500 failover", |l| l.contains("pool member failed") && l.contains("500 Internal")).await;

    // Gone.
    drop(primary);
    gw.proc
        .wait_line("a connection failure failover", |l| {
            l.contains("pool member failed") && l.contains("backend_unavailable")
        })
        .await;
    let trips = backend_health(&gw, "primary").await["trips"].as_u64().expect("trips");
    assert!(trips >= 3, "tripped by 429s, 500s and the dead process: {trips}");

    // Back on the same address: after the trip duration a probe succeeds and traffic returns.
    let primary = Sim::start_on(&primary_addr, &[]).await;
    eventually("traffic back on the primary", || async { answered(&primary.url).await >= 5 }).await;
    let health = backend_health(&gw, "primary").await;
    assert_eq!(health["state"], "closed", "{health}");
    let on_secondary = answered(&secondary.url).await;
    let on_primary = answered(&primary.url).await;
    eventually("more traffic on the primary", || async { answered(&primary.url).await >= on_primary + 20 }).await;
    assert_eq!(answered(&secondary.url).await, on_secondary, "all of it: failback is complete");

    let (sent, errors) = load.finish().await;
    assert!(errors.is_empty(), "the client saw errors: {errors:#?}");
    assert!(sent >= 50, "steady load: {sent} requests");
    let logged_on_secondary =
        gw.proc.json_lines().iter().any(|l| l["target"] == "aigw::request" && l["backend"] == "secondary");
    assert!(logged_on_secondary, "the request log names the backend that answered");
}

#[tokio::test]
async fn traffic_is_spread_by_weight_within_a_priority_group() {
    let sims = [Sim::start(&[]).await, Sim::start(&[]).await, Sim::start(&[]).await];
    let backends: String = sims.iter().enumerate().map(|(i, sim)| backend(&format!("b{i}"), &sim.url, "")).collect();
    let toml = pool_config(
        &format!("[server]\nrequest-log = false\n\n{backends}"),
        r#"{ backend = "b0", weight = 1 }, { backend = "b1", weight = 2 }, { backend = "b2", weight = 3 }"#,
    );
    let gw = Gateway::start(&toml, &[]).await;
    let http = client();
    let total = 1_000;
    let statuses: Vec<u16> = futures_util::stream::iter(0..total)
        .map(|n| {
            let (http, gw) = (&http, &gw);
            async move { chat(http, gw, &format!("spread {n}")).await.status().as_u16() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for (sim, weight) in sims.iter().zip([1.0, 2.0, 3.0]) {
        let expected = f64::from(total) * weight / 6.0;
        let got = answered(&sim.url).await as f64;
        assert!((got - expected).abs() <= expected * 0.05, "weight {weight}: {got} requests, expected {expected:.0}");
    }
}

/// A loopback port nothing listens on.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", listener.local_addr().expect("addr"))
}

#[tokio::test]
async fn when_every_member_is_tripped_clients_get_a_503_with_retry_after_and_ready_says_so() {
    let breaker = "circuit-breaker = { failure-count = 1, trip-secs = 30 }";
    let backends = format!(
        "{}{}{}",
        backend("d1", &dead_url(), breaker),
        backend("d2", &dead_url(), breaker),
        backend("solo", &dead_url(), breaker)
    );
    let mut toml = pool_config(&backends, r#"{ backend = "d1" }, { backend = "d2" }"#);
    toml.push_str(
        "\n[apis.solo]\nkind = \"openai\"\npath = \"/solo\"\nbackend = \"solo\"\nsubscription-required = false\n",
    );
    let gw = Gateway::start(&toml, &[]).await;
    assert_eq!(ready(&gw).await["status"], "ready");

    // The first request tries both members (each trips), the second finds none available.
    for attempt in 0..2 {
        let response = chat(&client(), &gw, "anyone there?").await;
        let retry_after: u64 = response.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
        assert!((29..=30).contains(&retry_after), "attempt {attempt}: Retry-After {retry_after}");
        let body = openai_error(response, 503).await;
        assert_eq!(body["error"]["code"], "no_backend_available", "{body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.starts_with("No backend of pool \"llm\" is available"), "{message}");
    }
    let ready = ready(&gw).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["pools"], json!([{"id": "llm", "available": false, "members": ["d1", "d2"]}]), "{ready}");
    for id in ["d1", "d2"] {
        let health = backend_health(&gw, id).await;
        assert_eq!((&health["state"], &health["failures"], &health["trips"]), (&json!("open"), &json!(1), &json!(1)));
        assert!(health["retry_in_secs"].as_u64().is_some_and(|s| (29..=30).contains(&s)), "{health}");
    }
    let solo = backend_health(&gw, "solo").await;
    assert_eq!(solo["state"], "closed", "{solo}");
    // The same health on /metrics, for dashboards and alerts.
    let metrics =
        client().get(format!("{}/metrics", gw.url)).send().await.expect("metrics").text().await.expect("text");
    for line in [
        r#"aigw_backend_circuit_state{backend="d1",otel_scope_name="aigw",state="open"} 1"#,
        r#"aigw_backend_circuit_state{backend="d1",otel_scope_name="aigw",state="closed"} 0"#,
        r#"aigw_backend_circuit_state{backend="solo",otel_scope_name="aigw",state="closed"} 1"#,
        r#"aigw_backend_circuit_trips_total{backend="d2",otel_scope_name="aigw"} 1"#,
        r#"aigw_backend_circuit_failures_total{backend="d2",otel_scope_name="aigw"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in /metrics:\n{metrics}");
    }

    // A plain backend: its own error first (it tripped the breaker), then 503s while tripped.
    let solo = |gw: &Gateway| {
        client().post(format!("{}/solo/v1/chat/completions", gw.url)).json(&chat_body("hello", false)).send()
    };
    let first = openai_error(solo(&gw).await.expect("send"), 502).await;
    assert_eq!(first["error"]["code"], "backend_unavailable", "{first}");
    let response = solo(&gw).await.expect("send");
    assert!(response.headers().contains_key("retry-after"));
    let tripped = openai_error(response, 503).await;
    let message = tripped["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("Backend \"solo\" is unavailable: its circuit breaker is open"), "{message}");
    assert_eq!(backend_health(&gw, "solo").await["state"], "open");
}
