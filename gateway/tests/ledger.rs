//! The usage ledger end to end: real calls through llm-sim (JSON and streamed) are counted to the
//! token, `/admin/chargeback` is guarded by the admin key and validates its options, the embedded
//! journal survives a restart, and `aigw chargeback` prints what the HTTP query returns.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{Gateway, KEY, OTHER_KEY, Sim, WAIT, aigw_bin, chat_body, client, config, fresh_dir, openai_error};
use serde_json::{Value, json};

const ADMIN_KEY: &str = "admin-key-for-tests";
/// gpt-4o-mini's price in the test config, in pico-USD per token (USD 0.15 / 0.60 per million).
const INPUT_PICO: u64 = 150_000;
const OUTPUT_PICO: u64 = 600_000;

/// The shared test config plus an unauthenticated API, the admin key, and a price.
fn ledger_config(sim: &Sim) -> String {
    config(
        sim,
        r#"
[apis.open]
kind = "openai"
path = "/open"
backend = "openai"
subscription-required = false

[admin]
key-env = "AIGW_ADMIN_KEY"

[prices."gpt-4o-mini"]
input = 0.15
output = 0.60
"#,
    )
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("SIM_BACKEND_KEY", "unused"), ("OTHER_KEY", OTHER_KEY), ("AIGW_ADMIN_KEY", ADMIN_KEY)]
}

/// A range that surely holds the calls of this test: yesterday to tomorrow.
fn range() -> (String, String) {
    let now = jiff::Timestamp::now();
    let day = jiff::SignedDuration::from_hours(24);
    ((now - day).to_string(), (now + day).to_string())
}

async fn admin_get(gateway: &Gateway, query: &str) -> reqwest::Response {
    client()
        .get(format!("{}/admin/chargeback?{query}", gateway.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("chargeback")
}

/// Polls the chargeback query until its totals count `requests` calls (completions are appended
/// after the response), and returns it.
async fn chargeback_with(gateway: &Gateway, query: &str, requests: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = admin_get(gateway, query).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        if body["totals"]["requests"] == requests {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "the ledger never counted {requests} calls: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Usage (prompt, completion, total) of one call, as llm-sim reported it to the client.
async fn call(gateway: &Gateway, path: &str, key: Option<&str>, prompt: &str, stream: bool) -> (u64, u64, u64) {
    let mut body = chat_body(prompt, stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let mut request = client().post(format!("{}{path}/v1/chat/completions", gateway.url)).json(&body);
    if let Some(key) = key {
        request = request.header("api-key", key);
    }
    let response = request.send().await.expect("call");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    let usage = if stream {
        common::sse_data(&text)
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
            .expect("a usage chunk")
    } else {
        serde_json::from_str::<Value>(&text).expect("json")["usage"].clone()
    };
    let field = |name: &str| usage[name].as_u64().expect("usage field");
    (field("prompt_tokens"), field("completion_tokens"), field("total_tokens"))
}

fn usd(pico: u64) -> String {
    let micro = (pico + 500_000) / 1_000_000;
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

#[tokio::test]
async fn admin_api_takes_only_the_admin_key() {
    let sim = Sim::start(&[]).await;
    let gateway = Gateway::start(&ledger_config(&sim), &env()).await;
    let url = format!("{}/admin/chargeback", gateway.url);
    let missing = openai_error(client().get(&url).send().await.expect("get"), 401).await;
    assert_eq!(missing["error"]["code"], "missing_admin_key");
    for (header, value) in [
        ("authorization", "Bearer wrong"),
        ("api-key", KEY),
        ("authorization", &format!("Bearer {OTHER_KEY}")),
        ("ocp-apim-subscription-key", ADMIN_KEY),
    ] {
        let response = client().get(&url).header(header, value).send().await.expect("get");
        let status = if header == "ocp-apim-subscription-key" { "missing_admin_key" } else { "invalid_admin_key" };
        assert_eq!(openai_error(response, 401).await["error"]["code"], status, "{header}");
    }
    for request in [client().get(&url).bearer_auth(ADMIN_KEY), client().get(&url).header("api-key", ADMIN_KEY)] {
        assert_eq!(request.send().await.expect("get").status(), 200);
    }

    let plain = Gateway::start(&config(&sim, ""), &[("SIM_BACKEND_KEY", "unused"), ("OTHER_KEY", OTHER_KEY)]).await;
    for response in [
        client().get(format!("{}/admin/chargeback", plain.url)).bearer_auth(ADMIN_KEY).send().await.expect("get"),
        client().post(format!("{}/admin/other", plain.url)).send().await.expect("post"),
    ] {
        let body = openai_error(response, 403).await;
        assert_eq!(body["error"]["code"], "admin_api_disabled");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("[admin] key-env"), "{message}");
    }
}

#[tokio::test]
async fn an_admin_key_equal_to_a_subscription_key_is_refused_at_start_up() {
    let sim = Sim::start(&[]).await;
    let path = common::write_config(&ledger_config(&sim));
    let output = Command::new(aigw_bin())
        .args(["check-config"])
        .arg(&path)
        .envs([("SIM_BACKEND_KEY", "unused"), ("OTHER_KEY", OTHER_KEY), ("AIGW_ADMIN_KEY", OTHER_KEY)])
        .output()
        .expect("check-config");
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("admin: the admin key is subscription \"sub-b\"'s key"), "{stderr}");
    assert!(!stderr.contains(OTHER_KEY), "the key itself must not be printed: {stderr}");
}

#[tokio::test]
async fn bad_queries_are_400_naming_the_parameter() {
    let sim = Sim::start(&[]).await;
    let gateway = Gateway::start(&ledger_config(&sim), &env()).await;
    let cases = [
        ("group-by=org", "group-by", "allowed: team, subscription, model, day, api"),
        ("from=last-week", "from", "use YYYY-MM-DD (UTC midnight) or an RFC 3339 timestamp"),
        ("to=2026-02-30", "to", "is not a date"),
        ("from=2026-05-02&to=2026-05-01", "from", "must be before to"),
        ("format=xml", "format", "allowed: json, csv"),
        ("team=a", "team", "unknown query parameter \"team\"; allowed: from, to, group-by, format"),
    ];
    for (query, param, message) in cases {
        let body = openai_error(admin_get(&gateway, query).await, 400).await;
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
        let got = body["error"]["message"].as_str().expect("message");
        assert!(got.contains(message), "{query}: {got}");
    }
}

#[tokio::test]
async fn chargeback_counts_every_call_to_the_token_and_prices_it() {
    let sim = Sim::start(&[]).await;
    let gateway = Gateway::start(&ledger_config(&sim), &env()).await;
    let mut expected: BTreeMap<&str, (u64, u64, u64, u64)> = BTreeMap::new();
    let calls = [
        ("team-a", "", Some(KEY), "What is a ledger?", false),
        ("team-a", "", Some(KEY), "Explain double-entry bookkeeping in two sentences.", true),
        ("team-a", "/azure", Some(KEY), "Name three prime numbers.", false),
        ("team-b", "", Some(OTHER_KEY), "Say hello.", true),
        ("-", "/open", None, "Who am I?", false),
    ];
    for (team, path, key, prompt, stream) in calls {
        let (prompt_tokens, completion, total) = call(&gateway, path, key, prompt, stream).await;
        let row = expected.entry(team).or_default();
        *row = (row.0 + 1, row.1 + prompt_tokens, row.2 + completion, row.3 + total);
    }
    let (from, to) = range();
    let query = format!("from={from}&to={to}");
    let report = chargeback_with(&gateway, &query, 5).await;
    assert_eq!(report["group_by"], "team");
    assert_eq!(report["currency"], "USD");
    assert_eq!(report["unpriced_models"], json!([]));
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.iter().map(|r| r["team"].as_str().expect("team")).collect::<Vec<_>>(), ["-", "team-a", "team-b"]);
    let mut totals = (0, 0, 0, 0, 0);
    for row in rows {
        let (requests, prompt, completion, total) = expected[row["team"].as_str().expect("team")];
        assert_eq!(row["requests"], requests, "{row}");
        assert_eq!(row["prompt_tokens"], prompt, "{row}");
        assert_eq!(row["completion_tokens"], completion, "{row}");
        assert_eq!(row["total_tokens"], total, "{row}");
        assert_eq!((row["cached_tokens"].clone(), row["saved_tokens"].clone()), (json!(0), json!(0)));
        let pico = prompt * INPUT_PICO + completion * OUTPUT_PICO;
        assert_eq!(row["cost_usd"], usd(pico), "{row}");
        assert_eq!(row["saved_cost_usd"], "0.000000", "{row}");
        totals = (totals.0 + requests, totals.1 + prompt, totals.2 + completion, totals.3 + total, totals.4 + pico);
    }
    let t = &report["totals"];
    assert_eq!((t["requests"].clone(), t["prompt_tokens"].clone()), (json!(totals.0), json!(totals.1)));
    assert_eq!((t["completion_tokens"].clone(), t["total_tokens"].clone()), (json!(totals.2), json!(totals.3)));
    assert_eq!(t["cost_usd"], usd(totals.4));
    assert!(t.get("team").is_none(), "{t}");

    // Other groupings split the same totals.
    let by_api = chargeback_with(&gateway, &format!("{query}&group-by=api"), 5).await;
    let apis: Vec<(&str, u64)> = by_api["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["api"].as_str().expect("api"), r["requests"].as_u64().expect("requests")))
        .collect();
    assert_eq!(apis, [("aoai", 3), ("azure", 1), ("open", 1)]);
    let by_model = chargeback_with(&gateway, &format!("{query}&group-by=model"), 5).await;
    assert_eq!(by_model["rows"][0]["model"], "gpt-4o-mini");
    assert_eq!(by_model["rows"][0]["cost_usd"], usd(totals.4));

    let csv_response = admin_get(&gateway, &format!("{query}&format=csv")).await;
    assert_eq!(csv_response.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv_response.text().await.expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "team,requests,prompt_tokens,completion_tokens,total_tokens,cached_tokens,saved_tokens,cost_usd,saved_cost_usd"
    );
    assert_eq!(lines.len(), 5, "{csv}");
    let total_line =
        format!("TOTAL,{},{},{},{},0,0,{},0.000000", totals.0, totals.1, totals.2, totals.3, usd(totals.4));
    assert_eq!(lines[4], total_line);

    // The CLI reads the same store (the journal, while the gateway runs) and prints the same.
    let cli = |args: &[&str]| {
        Command::new(aigw_bin())
            .current_dir(&gateway.workdir)
            .args(["chargeback", "--config"])
            .arg(&gateway.config_path)
            .args(args)
            .envs(env())
            .output()
            .expect("aigw chargeback")
    };
    // The journal is flushed every second: wait until it holds all five calls.
    let deadline = tokio::time::Instant::now() + WAIT;
    let cli_report = loop {
        let output = cli(&["--from", &from, "--to", &to, "--format", "json"]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let body: Value = serde_json::from_slice(&output.stdout).expect("json");
        if body["totals"]["requests"] == 5 || tokio::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cli_report["totals"], report["totals"]);
    assert_eq!(cli_report["rows"], report["rows"]);
    let table = cli(&["--from", &from, "--to", &to]);
    let table = String::from_utf8_lossy(&table.stdout);
    let last = table.lines().last().expect("a totals line");
    assert!(last.starts_with("TOTAL") && last.contains(&usd(totals.4)), "{table}");
    assert!(table.lines().any(|l| l.starts_with("team-b ")), "{table}");
    let csv_cli = cli(&["--from", &from, "--to", &to, "--format", "csv"]);
    assert_eq!(String::from_utf8_lossy(&csv_cli.stdout), csv);

    let bad = cli(&["--group-by", "org"]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("--group-by: unknown group-by \"org\"; allowed: team"), "{stderr}");
    assert!(bad.stdout.is_empty());
}

#[tokio::test]
async fn embedded_ledger_keeps_its_totals_across_a_restart() {
    let sim = Sim::start(&[]).await;
    let dir = fresh_dir("ledger-restart");
    let toml = ledger_config(&sim);
    let (from, to) = range();
    let query = format!("from={from}&to={to}");
    let mut first = Gateway::start_in(&dir, &toml, &env()).await;
    call(&first, "", Some(KEY), "First call.", false).await;
    call(&first, "", Some(OTHER_KEY), "Second call.", true).await;
    let before = chargeback_with(&first, &query, 2).await;

    // A second gateway on the same journal fails at start-up, saying why.
    let config_path = common::write_config(&toml);
    let second = Command::new(aigw_bin())
        .current_dir(&dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .envs(env())
        .output()
        .expect("second gateway");
    let _ = std::fs::remove_file(&config_path);
    assert_eq!(second.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("ledger.path") && stdout.contains("in use by another aigw process"), "{stdout}");

    first.proc.signal("TERM");
    assert!(first.proc.wait_exit(WAIT).await.success());
    drop(first);
    assert!(dir.join("aigw-data/ledger.jsonl").exists());

    let restarted = Gateway::start_in(&dir, &toml, &env()).await;
    let after = chargeback_with(&restarted, &query, 2).await;
    assert_eq!(after["totals"], before["totals"]);
    assert_eq!(after["rows"], before["rows"]);
    call(&restarted, "", Some(KEY), "Third call.", false).await;
    chargeback_with(&restarted, &query, 3).await;
    drop(restarted);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_cache_hit_counts_as_saved_tokens_not_backend_usage() {
    // Hash embeddings from llm-sim: the same prompt is the same vector, so a sure hit.
    let sim = Sim::start(&["--embedding-model", "none"]).await;
    let toml = ledger_config(&sim).replace(
        "[apis.open]",
        r#"[apis.cached]
kind = "openai"
path = "/cached"
backend = "openai"
inbound = [{ policy = "semantic-cache-lookup", embeddings = { source = "backend", backend-id = "openai", model = "e" } }]
outbound = [{ policy = "semantic-cache-store", duration = 600 }]

[apis.open]"#,
    );
    let gateway = Gateway::start(&toml, &env()).await;
    let (prompt, completion, total) = call(&gateway, "/cached", Some(KEY), "What does a ledger record?", false).await;
    let (from, to) = range();
    let query = format!("from={from}&to={to}");
    // The ledger appends after the completion's policies, so the answer is stored by now.
    chargeback_with(&gateway, &query, 1).await;
    let response = client()
        .post(format!("{}/cached/v1/chat/completions", gateway.url))
        .header("api-key", KEY)
        .json(&chat_body("What does a ledger record?", false))
        .send()
        .await
        .expect("call");
    assert_eq!(response.headers()["x-llm-cache-status"], "hit");
    let report = chargeback_with(&gateway, &query, 2).await;
    let t = &report["totals"];
    assert_eq!((t["prompt_tokens"].clone(), t["completion_tokens"].clone()), (json!(prompt), json!(completion)));
    assert_eq!(t["total_tokens"], total);
    assert_eq!(t["saved_tokens"], prompt + completion);
    let pico = prompt * INPUT_PICO + completion * OUTPUT_PICO;
    assert_eq!((t["cost_usd"].clone(), t["saved_cost_usd"].clone()), (json!(usd(pico)), json!(usd(pico))));
}

#[tokio::test]
async fn instances_sharing_redis_share_one_ledger_that_the_cli_reads() {
    let redis = common::RedisServer::start().await;
    let sim = Sim::start(&[]).await;
    let toml = format!("{}\n[redis]\nurl = \"{}\"\ntimeout-ms = 2000\n", ledger_config(&sim), redis.url());
    let one = Gateway::start(&toml, &env()).await;
    let two = Gateway::start(&toml, &env()).await;
    let mut prompt_tokens = 0;
    for (gateway, prompt, stream) in
        [(&one, "Through one.", false), (&two, "Through two.", true), (&one, "Again.", true)]
    {
        prompt_tokens += call(gateway, "", Some(KEY), prompt, stream).await.0;
    }
    let (from, to) = range();
    let query = format!("from={from}&to={to}");
    let through_one = chargeback_with(&one, &query, 3).await;
    let through_two = chargeback_with(&two, &query, 3).await;
    assert_eq!(through_one, through_two);
    assert_eq!(through_one["totals"]["prompt_tokens"], prompt_tokens);
    // Neither instance wrote a journal.
    assert!(!one.workdir.join("aigw-data").exists());

    let output = Command::new(aigw_bin())
        .current_dir(fresh_dir("cli"))
        .args(["chargeback", "--format", "json", "--from", &from, "--to", &to, "--config"])
        .arg(&one.config_path)
        .envs(env())
        .output()
        .expect("aigw chargeback");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let cli: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(cli["rows"], through_one["rows"]);
    assert_eq!(cli["totals"], through_one["totals"]);
}
