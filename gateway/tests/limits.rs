//! Token limits on real processes: a fleet of gateways sharing one limit through Redis, the same
//! fleet counting on its own (documentation of what Redis buys), and a Redis outage: fail-open
//! keeps serving on local counters, fail-closed refuses, and both recover when Redis is back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const LIMIT: u64 = 3000;
/// Sent with every request, so a reservation is the prompt's estimate plus this.
const MAX_TOKENS: u64 = 60;

/// `redis`: the URL and the timeout of one Redis call in milliseconds; `None` counts in memory.
fn fleet_config(sim: &Sim, redis: Option<(&str, u64)>) -> String {
    let redis = redis.map_or(String::new(), |(url, timeout_ms)| {
        format!("[redis]\nurl = \"{url}\"\ntimeout-ms = {timeout_ms}\nbreaker-cooldown-ms = 500\n")
    });
    format!(
        r#"
{redis}
[backends.sim]
url = "{sim}/v1"
kind = "openai"

[[subscriptions]]
id = "team-a-app"
name = "A"
team = "a"
apis = ["*"]
key-sha256 = "{key}"

[apis.aoai]
kind = "openai"
backend = "sim"
inbound = [{{ policy = "token-limit", tokens-per-minute = {LIMIT}, default-completion-tokens = 64, remaining-tokens-header = "x-remaining-tokens", tokens-consumed-header = "x-tokens-consumed", on-store-failure = "fail-open" }}]

[apis.strict]
kind = "openai"
path = "/strict"
backend = "sim"
inbound = [{{ policy = "token-limit", counter-key = "strict-{{subscription.id}}", tokens-per-minute = {LIMIT}, on-store-failure = "fail-closed" }}]
"#,
        sim = sim.url,
        key = sha256_hex(KEY),
    )
}

fn limited_body(n: usize) -> Value {
    let mut body = chat_body(&format!("Question {n}: how do shared token limits work?"), false);
    body["max_tokens"] = json!(MAX_TOKENS);
    body
}

/// What a run of load saw, per gateway.
#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    limited: u64,
    /// `usage.total_tokens` summed over the 200s.
    admitted: u64,
    max_prompt_tokens: u64,
    retry_afters: Vec<u64>,
    /// Anything but 200/429: (status, body).
    other: Vec<(u16, String)>,
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.limited += other.limited;
        self.admitted += other.admitted;
        self.max_prompt_tokens = self.max_prompt_tokens.max(other.max_prompt_tokens);
        self.retry_afters.extend(&other.retry_afters);
        self.other.extend(other.other.iter().cloned());
    }
}

/// Checks a 429 from the token limit (Retry-After, OpenAI and APIM body) and returns its Retry-After.
async fn check_token_limit_429(response: reqwest::Response) -> u64 {
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After on a 429")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("Retry-After in seconds");
    let body = openai_error(response, 429).await;
    assert!((1..=61).contains(&retry_after), "Retry-After {retry_after} outside 1..=61: {body}");
    assert_eq!(body["error"]["code"], "token_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let message = format!("Token limit is exceeded. Try again in {retry_after} seconds.");
    assert_eq!(body["message"], message.as_str(), "{body}");
    assert_eq!(body["error"]["message"], message.as_str(), "{body}");
    retry_after
}

/// Drives `tasks` concurrent clients, client `i` on `urls[i % urls.len()]` + `path`, each looping
/// requests until `deadline`, or until `stop_after_429s` 429s were seen in all. Returns one tally
/// per URL.
async fn drive(
    urls: &[String],
    path: &str,
    tasks: usize,
    deadline: Instant,
    stop_after_429s: Option<u64>,
) -> Vec<Tally> {
    let http = client();
    let limited = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..tasks {
        let (http, url, limited) = (http.clone(), format!("{}{path}", urls[i % urls.len()]), limited.clone());
        let gateway = i % urls.len();
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = i;
            while Instant::now() < deadline
                && stop_after_429s.is_none_or(|stop| limited.load(std::sync::atomic::Ordering::SeqCst) < stop)
            {
                n += tasks;
                let response =
                    http.post(&url).header("api-key", KEY).json(&limited_body(n % 50)).send().await.expect("send");
                match response.status().as_u16() {
                    200 => {
                        let consumed = response.headers().get("x-tokens-consumed").cloned();
                        let body: Value = response.json().await.expect("json");
                        let total = body["usage"]["total_tokens"].as_u64().expect("usage.total_tokens");
                        if let Some(consumed) = consumed {
                            assert_eq!(consumed.to_str().expect("ascii"), total.to_string(), "x-tokens-consumed");
                        }
                        assert!(body["usage"]["completion_tokens"].as_u64().expect("completion") <= MAX_TOKENS);
                        tally.ok += 1;
                        tally.admitted += total;
                        tally.max_prompt_tokens =
                            tally.max_prompt_tokens.max(body["usage"]["prompt_tokens"].as_u64().expect("prompt"));
                    }
                    429 => {
                        tally.retry_afters.push(check_token_limit_429(response).await);
                        tally.limited += 1;
                        limited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    status => tally.other.push((status, response.text().await.unwrap_or_default())),
                }
            }
            (gateway, tally)
        }));
    }
    let mut tallies = vec![Tally::default(); urls.len()];
    for handle in handles {
        let (gw, tally) = handle.await.expect("client task");
        tallies[gw].merge(&tally);
    }
    tallies
}

/// Three gateways on one config, driven together by 24 clients for `secs`; prints what they admitted.
async fn drive_fleet(label: &str, toml: &str, secs: u64) -> ([Gateway; 3], Vec<Tally>, Tally) {
    let fleet = [Gateway::start(toml, &[]).await, Gateway::start(toml, &[]).await, Gateway::start(toml, &[]).await];
    let urls: Vec<String> = fleet.iter().map(|gw| gw.url.clone()).collect();
    let tallies = drive(&urls, "/v1/chat/completions", 24, Instant::now() + Duration::from_secs(secs), None).await;
    let sum = total(&tallies);
    eprintln!(
        "{label}: admitted {} tokens (limit {LIMIT}, ratio {:.2}) in {} 200s, {} 429s; per gateway {:?}",
        sum.admitted,
        sum.admitted as f64 / LIMIT as f64,
        sum.ok,
        sum.limited,
        tallies.iter().map(|t| (t.ok, t.limited, t.admitted)).collect::<Vec<_>>(),
    );
    (fleet, tallies, sum)
}

fn total(tallies: &[Tally]) -> Tally {
    let mut sum = Tally::default();
    for tally in tallies {
        sum.merge(tally);
    }
    sum
}

/// One counter of `/metrics`.
async fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = client().get(format!("{}/metrics", gw.url)).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

async fn post(gw: &Gateway, path: &str, n: usize) -> reqwest::Response {
    client().post(format!("{}{path}", gw.url)).header("api-key", KEY).json(&limited_body(n)).send().await.expect("send")
}

#[tokio::test]
async fn fleet_of_three_shares_one_limit_through_redis() {
    let started = Instant::now();
    let redis = RedisServer::start().await;
    let sim = Sim::start(&[]).await;
    // A generous timeout: 24 clients in a tight loop saturate two cores, and a 50 ms Redis call
    // that times out is decided on local counters (fail-open), which is not what is tested here.
    let toml = fleet_config(&sim, Some((redis.url().as_str(), 1000)));
    let (fleet, _, sum) = drive_fleet("redis fleet", &toml, 8).await;
    // The sim counts the prompt as the gateway's estimate does (tiktoken), so the largest prompt
    // it reported plus max_tokens bounds one reservation.
    let one_reservation = sum.max_prompt_tokens + MAX_TOKENS;
    assert!(sum.other.is_empty(), "only 200s and 429s expected: {:?}", sum.other);
    assert!(sum.ok > 0, "some requests were admitted");
    assert!(sum.limited > 0, "the shared limit refused some requests");
    assert!(sum.max_prompt_tokens <= 40, "prompts are short: {}", sum.max_prompt_tokens);
    assert!(
        sum.admitted <= LIMIT + one_reservation,
        "three instances admitted {} tokens, more than the shared limit {LIMIT} + one reservation {one_reservation}",
        sum.admitted
    );
    for gw in &fleet {
        assert_eq!(metric(gw, "aigw_limit_store_shared").await, 1);
        assert_eq!(metric(gw, "aigw_limit_store_fallback_total").await, 0, "every decision was made in Redis");
    }

    // Once the window has moved past what was used, a request that waited Retry-After gets through.
    let response = post(&fleet[0], "/v1/chat/completions", 7).await;
    if response.status() == 429 {
        let retry_after = check_token_limit_429(response).await;
        eprintln!("redis fleet: waiting Retry-After {retry_after} s");
        tokio::time::sleep(Duration::from_secs(retry_after)).await;
        let retried = post(&fleet[1], "/v1/chat/completions", 7).await;
        assert_eq!(retried.status(), 200, "after Retry-After: {:?}", retried.text().await);
    } else {
        assert_eq!(response.status(), 200);
    }
    eprintln!("redis fleet: test took {:?}", started.elapsed());
}

#[tokio::test]
async fn fleet_of_three_with_memory_stores_admits_more() {
    let sim = Sim::start(&[]).await;
    let toml = fleet_config(&sim, None);
    let (fleet, tallies, sum) = drive_fleet("memory fleet", &toml, 5).await;
    let one_reservation = sum.max_prompt_tokens + MAX_TOKENS;
    assert!(sum.other.is_empty(), "only 200s and 429s expected: {:?}", sum.other);
    for (i, (tally, gw)) in tallies.iter().zip(&fleet).enumerate() {
        assert!(tally.limited > 0, "gateway {i} enforced its own limit: {tally:?}");
        assert!(tally.admitted <= LIMIT + one_reservation, "gateway {i}: {tally:?}");
        assert_eq!(metric(gw, "aigw_limit_store_shared").await, 0);
    }
    assert!(sum.admitted <= 3 * (LIMIT + one_reservation), "admitted {}", sum.admitted);
}

#[tokio::test]
async fn redis_outage_fails_open_or_closed_and_recovers() {
    let redis = RedisServer::start().await;
    let port = redis.port;
    let sim = Sim::start(&[]).await;
    let gw = Gateway::start(&fleet_config(&sim, Some((redis.url().as_str(), 50))), &[]).await;
    let open = "/v1/chat/completions";
    let strict = "/strict/v1/chat/completions";

    // Steady state: both APIs count in Redis.
    for n in 0..3 {
        assert_eq!(post(&gw, open, n).await.status(), 200);
        assert_eq!(post(&gw, strict, n).await.status(), 200);
    }
    assert_eq!(metric(&gw, "aigw_limit_store_fallback_total").await, 0);
    assert_eq!(metric(&gw, "aigw_limit_store_refused_total").await, 0);

    redis.proc.signal("KILL");
    drop(redis);

    // Fail-open: served, on this instance's own counters, without waiting on Redis.
    for n in 0..10 {
        let sent = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(2), post(&gw, open, n))
            .await
            .unwrap_or_else(|_| panic!("fail-open request {n} hung with Redis down"));
        assert_eq!(response.status(), 200, "fail-open request {n}: {:?}", response.text().await);
        assert!(sent.elapsed() < Duration::from_secs(2), "fail-open request {n} took {:?}", sent.elapsed());
    }
    // Fail-closed: refused quickly.
    for n in 0..5 {
        let sent = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(1), post(&gw, strict, n))
            .await
            .unwrap_or_else(|_| panic!("fail-closed request {n} hung with Redis down"));
        let body = openai_error(response, 503).await;
        assert_eq!(body["error"]["code"], "limit_store_unavailable", "{body}");
        assert!(sent.elapsed() < Duration::from_secs(1), "fail-closed request {n} took {:?}", sent.elapsed());
    }
    let fallback = metric(&gw, "aigw_limit_store_fallback_total").await;
    let refused = metric(&gw, "aigw_limit_store_refused_total").await;
    let failures = metric(&gw, "aigw_limit_store_failures_total").await;
    eprintln!("outage: fallback_total {fallback}, refused_total {refused}, failures_total {failures}");
    assert!(fallback >= 10, "fallback_total {fallback}");
    assert!(refused >= 5, "refused_total {refused}");
    assert!(failures > 0, "failures_total {failures}");
    gw.proc.wait_line("the store-unavailable warning", |l| l.contains("counter store (Redis) unavailable")).await;

    // The fail-open API still enforces the limit, on this instance's counters.
    let sent = Instant::now();
    let tallies =
        drive(std::slice::from_ref(&gw.url), open, 4, Instant::now() + Duration::from_secs(15), Some(1)).await;
    let local = total(&tallies);
    eprintln!(
        "outage: local limit refused after {} 200s / {} tokens in {:?}",
        local.ok,
        local.admitted,
        sent.elapsed()
    );
    assert!(local.other.is_empty(), "{:?}", local.other);
    assert!(local.limited > 0, "the fail-open API enforced its local limit: {local:?}");
    // Ten requests went to the local counters before this drive; the limit holds for all of them.
    assert!(local.admitted <= LIMIT, "local counters admitted {} tokens", local.admitted);

    // Redis is back: the breaker's probe finds it and fail-closed requests are served again.
    let redis = RedisServer::start_on(port).await;
    let back = Instant::now();
    let mut n = 100;
    loop {
        let response = post(&gw, strict, n).await;
        if response.status() == 200 {
            break;
        }
        let body = openai_error(response, 503).await;
        assert_eq!(body["error"]["code"], "limit_store_unavailable", "{body}");
        assert!(back.elapsed() < Duration::from_secs(10), "still refused {:?} after Redis came back", back.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("outage: /strict served again {:?} after Redis restarted", back.elapsed());
    gw.proc.wait_line("the reachable-again line", |l| l.contains("reachable again")).await;

    // Limits go through Redis again: fail-closed can only answer 429 from Redis.
    let refused_before = metric(&gw, "aigw_limit_store_refused_total").await;
    let tallies =
        drive(std::slice::from_ref(&gw.url), strict, 4, Instant::now() + Duration::from_secs(15), Some(1)).await;
    let shared = total(&tallies);
    assert!(shared.other.is_empty(), "{:?}", shared.other);
    assert!(shared.limited > 0, "/strict enforced its limit through Redis: {shared:?}");
    assert!(shared.admitted <= LIMIT, "admitted {}", shared.admitted);
    assert_eq!(metric(&gw, "aigw_limit_store_refused_total").await, refused_before);
    let keys = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--scan", "--pattern", "aigw:*"])
        .output()
        .expect("redis-cli");
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert!(keys.lines().any(|k| k == "aigw:{strict-team-a-app}:tokens:minute"), "keys in Redis: {keys}");
    drop(redis);
}
