//! Three gateways sharing one semantic cache through a real `redis-server` (plain Redis 7, no
//! modules): an answer stored through one is a hit through the others within a second, entries
//! expire everywhere, and a Redis outage turns lookups into misses, never into errors.
//!
//! Only the first gateway stores (its API has `semantic-cache-store`); the other two only look
//! up, so a hit through them can only come from an entry another instance stored. Each answer
//! of llm-sim carries a random completion id, which tells whose entry served a hit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn fleet_config(sim: &Sim, redis: &RedisServer, store: bool, duration_secs: u64) -> String {
    let outbound = if store {
        format!("outbound = [{{ policy = \"semantic-cache-store\", duration = {duration_secs} }}]")
    } else {
        String::new()
    };
    format!(
        r#"
[redis]
url = "{redis}"
timeout-ms = 100
breaker-cooldown-ms = 300

[backends.sim]
url = "{sim}/v1"
kind = "openai"

[[subscriptions]]
id = "sub-a"
name = "A"
team = "a"
apis = ["*"]
key-sha256 = "{key}"

[apis.aoai]
kind = "openai"
backend = "sim"
inbound = [{{ policy = "semantic-cache-lookup" }}]
{outbound}
"#,
        redis = redis.url(),
        sim = sim.url,
        key = sha256_hex(KEY),
    )
}

struct Reply {
    status: String,
    id: String,
}

async fn ask(gateway: &Gateway, prompt: &str) -> Reply {
    let response = client()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(KEY)
        .json(&chat_body(prompt, false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "a cache problem must never fail the request");
    let status = response.headers()["x-llm-cache-status"].to_str().expect("ascii").to_owned();
    let body: Value = response.json().await.expect("json");
    Reply { status, id: body["id"].as_str().expect("id").to_owned() }
}

/// Asks until `done` holds, up to `within`; returns the reply and how long it took.
async fn ask_until(
    gateway: &Gateway,
    prompt: &str,
    within: Duration,
    done: impl Fn(&Reply) -> bool,
) -> (Reply, Duration) {
    let started = Instant::now();
    loop {
        let reply = ask(gateway, prompt).await;
        if done(&reply) {
            return (reply, started.elapsed());
        }
        assert!(started.elapsed() < within, "{prompt:?}: still {} after {within:?}", reply.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Fleet {
    _sim: Sim,
    redis: RedisServer,
    gateways: Vec<Gateway>,
}

async fn fleet(duration_secs: u64) -> Fleet {
    let sim = Sim::start(&[]).await;
    let redis = RedisServer::start().await;
    let mut gateways = Vec::new();
    for store in [true, false, false] {
        gateways.push(Gateway::start(&fleet_config(&sim, &redis, store, duration_secs), &[]).await);
    }
    Fleet { _sim: sim, redis, gateways }
}

#[tokio::test]
async fn stored_through_one_is_a_hit_through_the_others_within_a_second() {
    let fleet = fleet(600).await;
    let [writer, readers @ ..] = &fleet.gateways[..] else { unreachable!() };
    for prompt in ["What is the capital of Norway?", "How do I create a virtual environment in Python?"] {
        let stored = ask(writer, prompt).await;
        assert_eq!(stored.status, "miss");
        for reader in readers {
            let (hit, took) = ask_until(reader, prompt, Duration::from_secs(1), |r| r.status == "hit").await;
            assert_eq!(hit.id, stored.id, "served the entry the writer stored");
            println!("propagated to another instance in {took:?}");
        }
        let (own, _) = ask_until(writer, prompt, Duration::from_secs(1), |r| r.status == "hit").await;
        assert_eq!(own.id, stored.id);
    }
}

#[tokio::test]
async fn entries_expire_on_every_instance() {
    let fleet = fleet(2).await;
    let prompt = "Name a good book about distributed systems.";
    let stored = ask(&fleet.gateways[0], prompt).await;
    for reader in &fleet.gateways[1..] {
        let (hit, _) = ask_until(reader, prompt, Duration::from_secs(1), |r| r.status == "hit").await;
        assert_eq!(hit.id, stored.id);
    }
    for reader in &fleet.gateways[1..] {
        let (miss, took) = ask_until(reader, prompt, Duration::from_secs(4), |r| r.status == "miss").await;
        assert_ne!(miss.id, stored.id);
        println!("expired entry stopped hitting after {took:?} more");
    }
}

#[tokio::test]
async fn redis_down_means_misses_not_errors_and_the_cache_comes_back() {
    let mut fleet = fleet(600).await;
    let prompt = "Which HTTP status code means too many requests?";
    ask(&fleet.gateways[0], prompt).await;
    ask_until(&fleet.gateways[1], prompt, Duration::from_secs(1), |r| r.status == "hit").await;

    let port = fleet.redis.port;
    fleet.redis.proc.signal("KILL");
    fleet.redis.proc.wait_exit(WAIT).await;
    for gateway in &fleet.gateways {
        for _ in 0..5 {
            let reply = ask(gateway, prompt).await;
            assert_ne!(reply.status, "hit", "no answer can be read while Redis is down");
        }
    }

    fleet.redis = RedisServer::start_on(port).await;
    let again = "Which HTTP status code means the resource was not found?";
    // The writer's own hit shows its store reached Redis again (after the breaker's cool-down).
    let (stored, _) = ask_until(&fleet.gateways[0], again, WAIT, |r| r.status == "hit").await;
    let (hit, _) = ask_until(&fleet.gateways[2], again, Duration::from_secs(1), |r| r.status == "hit").await;
    assert_eq!(hit.id, stored.id, "stored and shared again once Redis is back");
}
