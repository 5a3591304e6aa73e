//! The ledger is exact: under concurrent plain and streamed load, with clients that leave
//! mid-stream, the chargeback totals per team equal, to the token, the usage the provider
//! (llm-sim) reported for those calls; through three instances sharing Redis, and through the
//! embedded store across a graceful restart in the middle of the traffic.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

const ADMIN_KEY: &str = "admin-key-for-the-ledger-tests";
const TOKEN_FIELDS: [&str; 5] = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"];

/// How one call of the load behaves.
#[derive(Clone, Copy, Debug)]
enum Call {
    Json,
    /// The client gives up before the (slow) answer arrives.
    JsonLeaves,
    Stream,
    /// Streamed, and the client leaves after the first chunk.
    StreamLeaves,
}

/// Team A's and team B's keys, and the tally tag llm-sim files their usage under.
const TEAMS: [(&str, &str); 2] = [(KEY, "team-a"), (OTHER_KEY, "team-b")];

/// A system prompt long enough (over 1024 tokens) for the provider's prompt caching to report
/// cached tokens on repeats.
fn long_system_prompt(team: &str) -> String {
    format!("You answer for {team}. ") + &"Be precise and brief in every answer you give. ".repeat(120)
}

fn body(n: usize, team: &str, call: Call) -> Value {
    let mut messages = Vec::new();
    if n.is_multiple_of(4) {
        messages.push(json!({"role": "system", "content": long_system_prompt(team)}));
    }
    messages.push(json!({"role": "user", "content": format!("question {n} from {team}: what is {n} squared?")}));
    json!({
        "model": "gpt-4o-mini",
        "messages": messages,
        "stream": !matches!(call, Call::Json),
    })
}

/// Sends call `n` to `url` and returns once the client is done with it (read to the end, or left).
async fn send(client: &reqwest::Client, url: &str, n: usize) {
    let (key, team) = TEAMS[n % 2];
    let call = [Call::Json, Call::JsonLeaves, Call::Stream, Call::StreamLeaves][n / 2 % 4];
    let request = client
        .post(format!("{url}/v1/chat/completions"))
        .header("api-key", key)
        .header("x-sim-tally", team)
        .header("x-sim-token-delay-ms", if matches!(call, Call::Stream | Call::StreamLeaves) { "3" } else { "0" })
        .header("x-sim-ttft-ms", if matches!(call, Call::JsonLeaves) { "1000" } else { "0" })
        .json(&body(n, team, call));
    if matches!(call, Call::JsonLeaves) {
        // Whether or not the request got through before the client left, the provider's tally
        // and the ledger must agree about it.
        let gave_up = tokio::time::timeout(Duration::from_millis(300), request.send()).await;
        assert!(gave_up.is_err(), "call {n} answered before its client gave up");
        return;
    }
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), 200, "call {n} ({call:?})");
    let mut chunks = response.bytes_stream();
    match call {
        Call::StreamLeaves => {
            chunks.next().await.expect("a first chunk").expect("bytes");
        }
        Call::Json | Call::JsonLeaves | Call::Stream => {
            while chunks.next().await.transpose().expect("body").is_some() {}
        }
    }
}

/// Calls `range`, 16 at a time, spread round-robin over `urls`.
async fn load(urls: &[String], range: std::ops::Range<usize>) {
    let client = client();
    futures_util::stream::iter(range)
        .for_each_concurrent(16, |n| {
            let client = client.clone();
            let url = urls[n % urls.len()].clone();
            async move { send(&client, &url, n).await }
        })
        .await;
}

/// llm-sim's totals per tally tag (team), and how many of the tags' requests it is still answering.
async fn provider_usage(sim: &Sim) -> (BTreeMap<String, Value>, u64) {
    let totals: Value =
        client().get(format!("{}/sim/usage", sim.url)).send().await.expect("sim").json().await.expect("json");
    let totals = totals.as_object().expect("object");
    let in_flight = totals.values().map(|t| t["in_flight"].as_u64().expect("in_flight")).sum();
    (totals.iter().map(|(team, figures)| (team.clone(), token_fields(figures))).collect(), in_flight)
}

fn token_fields(figures: &Value) -> Value {
    Value::Object(TOKEN_FIELDS.iter().map(|f| (f.to_string(), figures[*f].clone())).collect())
}

async fn chargeback(url: &str) -> Value {
    let response = client()
        .get(format!("{url}/admin/chargeback?group-by=team&format=json&from=2000-01-01&to=2100-01-01"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("chargeback");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// The ledger's per-team figures, in the provider's field names.
fn ledger_usage(report: &Value) -> BTreeMap<String, Value> {
    let rows = report["rows"].as_array().expect("rows");
    rows.iter().map(|row| (row["team"].as_str().expect("team").to_owned(), token_fields(row))).collect()
}

/// Waits until the provider has answered every request it got (clients that left do not wait
/// for that) and the ledger (as `url` reports it) equals its figures: completions finish after
/// the response, and after the client is gone. Fails with both sides shown.
async fn assert_ledger_matches_provider(url: &str, sim: &Sim) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        let (provider, in_flight) = provider_usage(sim).await;
        let report = chargeback(url).await;
        let ledger = ledger_usage(&report);
        if in_flight == 0 && ledger == provider {
            let cached: u64 = provider.values().map(|t| t["cached_tokens"].as_u64().expect("cached")).sum();
            assert!(cached > 0, "the load exercises prompt caching: {provider:?}");
            return report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ledger per team\n  {ledger:?}\nprovider per team ({in_flight} in flight)\n  {provider:?}"
        );
    }
}

fn config_for(sim: &Sim, extra: &str) -> String {
    config(sim, &format!("[admin]\nkey-env = \"AIGW_ADMIN_KEY\"\n{extra}"))
}

const ENV: [(&str, &str); 3] = [("SIM_BACKEND_KEY", "unused"), ("OTHER_KEY", OTHER_KEY), ("AIGW_ADMIN_KEY", ADMIN_KEY)];

#[tokio::test]
async fn three_instances_sharing_redis_bill_exactly_what_the_provider_reported() {
    let redis = RedisServer::start().await;
    let sim = Sim::start(&[]).await;
    let toml = config_for(&sim, &format!("[redis]\nurl = \"{}\"\ntimeout-ms = 500\n", redis.url()));
    let gateways = futures_util::future::join_all((0..3).map(|_| Gateway::start(&toml, &ENV))).await;
    let urls: Vec<String> = gateways.iter().map(|g| g.url.clone()).collect();

    load(&urls, 0..240).await;

    let report = assert_ledger_matches_provider(&urls[0], &sim).await;
    // Every instance reads the same shared ledger.
    for url in &urls[1..] {
        assert_eq!(chargeback(url).await["totals"], report["totals"]);
    }
    let billed = report["totals"]["requests"].as_u64().expect("requests");
    assert!(billed > 200, "most of the 240 calls reached the provider: {billed}");
}

#[tokio::test]
async fn the_embedded_ledger_stays_exact_across_a_graceful_restart_mid_traffic() {
    let sim = Sim::start(&[]).await;
    let toml = config_for(&sim, "");
    let dir = fresh_dir("embedded-ledger");
    let mut first = Gateway::start_in(&dir, &toml, &ENV).await;
    let urls = [first.url.clone()];
    load(&urls, 0..60).await;

    // Streams in flight when SIGTERM arrives finish (and are billed) before the process exits.
    let client = client();
    let mut in_flight = Vec::new();
    for n in 60..72 {
        let (key, team) = TEAMS[n % 2];
        let response = client
            .post(format!("{}/v1/chat/completions", first.url))
            .header("api-key", key)
            .header("x-sim-tally", team)
            .header("x-sim-token-delay-ms", "20")
            .json(&body(n, team, Call::Stream))
            .send()
            .await
            .expect("send");
        let mut chunks = response.bytes_stream();
        chunks.next().await.expect("first chunk").expect("bytes");
        in_flight.push((n, chunks));
    }
    first.proc.signal("TERM");
    for (n, mut chunks) in in_flight {
        // Half of these clients leave; the others read to the end.
        if n % 4 < 2 {
            while chunks.next().await.transpose().expect("body").is_some() {}
        }
    }
    assert_eq!(first.proc.wait_exit(WAIT).await.code(), Some(0));

    let second = Gateway::start_in(&dir, &toml, &ENV).await;
    load(std::slice::from_ref(&second.url), 72..132).await;
    let report = assert_ledger_matches_provider(&second.url, &sim).await;
    let billed = report["totals"]["requests"].as_u64().expect("requests");
    assert!(billed > 110, "most of the 132 calls reached the provider: {billed}");

    // The CLI reads the same file while the gateway runs, and agrees once the last second's
    // appends are flushed to it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let output = std::process::Command::new(aigw_bin())
            .args(["chargeback", "--config"])
            .arg(&second.config_path)
            .args(["--group-by", "team", "--format", "json", "--from", "2000-01-01", "--to", "2100-01-01"])
            .current_dir(&dir)
            .envs(ENV)
            .output()
            .expect("aigw chargeback");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let cli: Value = serde_json::from_slice(&output.stdout).expect("json");
        if cli["totals"] == report["totals"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "CLI {} vs HTTP {}", cli["totals"], report["totals"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
