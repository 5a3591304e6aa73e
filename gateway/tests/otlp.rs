//! Metrics as a collector and as Prometheus see them: an OTLP receiver inside the test (HTTP/protobuf
//! on axum, gRPC on tonic) decodes what a real `aigw` exports with opentelemetry-proto's types, and
//! the totals per team must equal the usage the simulator reported in the responses. `/metrics`
//! must parse as Prometheus text and carry the same totals.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use serde_json::{Value, json};

/// Every export request the receiver got, in arrival order.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

impl Received {
    fn push(&self, request: ExportMetricsServiceRequest) {
        self.0.lock().expect("received").push(request);
    }

    fn all(&self) -> Vec<ExportMetricsServiceRequest> {
        self.0.lock().expect("received").clone()
    }
}

/// OTLP/HTTP: `POST /v1/metrics` with a protobuf body. Returns the base URL.
async fn http_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/v1/metrics",
        axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
            let received = received.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                received.push(ExportMetricsServiceRequest::decode(body).expect("an ExportMetricsServiceRequest"));
                let response = ExportMetricsServiceResponse { partial_success: None }.encode_to_vec();
                ([(http::header::CONTENT_TYPE, "application/x-protobuf")], response)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    format!("http://{addr}")
}

struct Collector(Received);

#[async_trait::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// OTLP/gRPC: the collector's MetricsService. Returns the endpoint URL.
async fn grpc_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(Collector(received)))
            .serve_with_incoming(incoming)
            .await
            .expect("gRPC server");
    });
    format!("http://{addr}")
}

/// Added to [`config`]: `aoai` (both teams may call it) emits token metrics per team, user and
/// API; `plain` does not.
const METRICS_API: &str = r#"
[[apis.aoai.inbound]]
policy = "emit-token-metric"
namespace = "aigw.test"
dimensions = [{ name = "team" }, { name = "user", value = "{request.header.x-user}" }, { name = "API ID" }]

[apis.plain]
kind = "openai"
path = "/plain"
backend = "openai"
"#;

/// Usage the responses reported, per team.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tokens {
    prompt: u64,
    completion: u64,
    total: u64,
}

/// What the test sent and saw.
struct Calls {
    per_team: BTreeMap<String, Tokens>,
    instance: String,
    requests: u64,
}

impl Calls {
    fn per_team_of(&self, count: impl Fn(&Tokens) -> u64) -> BTreeMap<String, u64> {
        self.per_team.iter().map(|(team, tokens)| (team.clone(), count(tokens))).collect()
    }
}

/// Plain and streamed calls for two teams (users alternating), summing the usage each response
/// reported; then a streamed call on `plain` whose client leaves after the first bytes.
async fn make_calls(gw: &Gateway) -> Calls {
    let client = client();
    let mut per_team: BTreeMap<String, Tokens> = BTreeMap::new();
    let mut instance = String::new();
    let mut requests = 0;
    let teams = [("team-a", KEY, 3), ("team-b", OTHER_KEY, 2)];
    for (team, key, calls) in teams {
        for i in 0..calls {
            let stream = i % 2 == 1;
            let mut body = chat_body(&format!("{team} question {i} about metrics"), stream);
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = client
                .post(format!("{}/v1/chat/completions", gw.url))
                .header("api-key", key)
                .header("x-user", format!("user-{}", i % 2))
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 200);
            instance = response.headers()["x-gateway-instance"].to_str().expect("ascii").to_owned();
            let text = response.text().await.expect("body");
            let usage = if stream {
                let data = sse_data(&text);
                let last = data.iter().rev().filter(|d| *d != "[DONE]").find_map(|d| {
                    let chunk: Value = serde_json::from_str(d).ok()?;
                    chunk["usage"].is_object().then(|| chunk["usage"].clone())
                });
                last.expect("a usage chunk")
            } else {
                serde_json::from_str::<Value>(&text).expect("json")["usage"].clone()
            };
            let count = |field: &str| usage[field].as_u64().unwrap_or_else(|| panic!("usage.{field} in {usage}"));
            let tokens = per_team.entry(team.to_owned()).or_default();
            tokens.prompt += count("prompt_tokens");
            tokens.completion += count("completion_tokens");
            tokens.total += count("total_tokens");
            requests += 1;
        }
    }
    // A client that leaves mid-stream: the gateway still reads the backend to the end.
    // Pieces 60 ms apart: the client is gone long before the stream ends.
    let mut response = client
        .post(format!("{}/plain/v1/chat/completions", gw.url))
        .header("api-key", KEY)
        .header("x-sim-token-delay-ms", "60")
        .json(&chat_body("I will hang up early", true))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    response.chunk().await.expect("first chunk").expect("some bytes");
    drop(response);
    Calls { per_team, instance, requests }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

/// The latest cumulative value of each series of a metric (keyed by its sorted attributes).
fn latest_sums(requests: &[ExportMetricsServiceRequest], name: &str) -> HashMap<Vec<(String, String)>, u64> {
    let mut latest = HashMap::new();
    for metric in metrics(requests, name) {
        let Some(metric::Data::Sum(sum)) = &metric.data else { panic!("{name} is not a sum: {metric:?}") };
        assert!(sum.is_monotonic, "{name} is a counter");
        for point in &sum.data_points {
            let Some(number_data_point::Value::AsInt(value)) = point.value else { panic!("integer points") };
            latest.insert(series(&point.attributes), u64::try_from(value).expect("non-negative"));
        }
    }
    latest
}

fn metrics<'a>(
    requests: &'a [ExportMetricsServiceRequest],
    name: &'a str,
) -> impl Iterator<Item = &'a opentelemetry_proto::tonic::metrics::v1::Metric> {
    requests
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .filter(move |m| m.name == name)
}

fn series(attributes: &[KeyValue]) -> Vec<(String, String)> {
    let mut series: Vec<(String, String)> =
        attributes.iter().map(|kv| (kv.key.clone(), attribute(attributes, &kv.key).unwrap_or("").to_owned())).collect();
    series.sort();
    series
}

fn per_team(latest: &HashMap<Vec<(String, String)>, u64>) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for (series, value) in latest {
        let team = series.iter().find(|(k, _)| k == "team").map(|(_, v)| v.clone()).expect("a team attribute");
        *totals.entry(team).or_default() += value;
    }
    totals
}

/// Waits until the exported `aigw.llm.total_tokens` per team equal what the responses reported.
async fn wait_for_totals(received: &Received, expected: &BTreeMap<String, u64>) -> Vec<ExportMetricsServiceRequest> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let requests = received.all();
        let totals = per_team(&latest_sums(&requests, "aigw.llm.total_tokens"));
        if &totals == expected {
            return requests;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "exported totals {totals:?} never reached {expected:?} ({} exports)",
            requests.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline
    }
}

/// Waits for an export after the first `seen` ones: the gateway's own instruments are recorded
/// just after the policy's, so an export that caught the tokens may have missed them.
async fn next_export(received: &Received, seen: usize) -> Vec<ExportMetricsServiceRequest> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let requests = received.all();
        if requests.len() > seen {
            return requests;
        }
        assert!(tokio::time::Instant::now() < deadline, "no export after the first {seen}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline
    }
}

/// What every export must show, whatever the protocol.
fn check_export(requests: &[ExportMetricsServiceRequest], calls: &Calls, service: &str) {
    let resource =
        requests.last().and_then(|r| r.resource_metrics.first()).and_then(|r| r.resource.as_ref()).expect("a resource");
    assert_eq!(attribute(&resource.attributes, "service.name"), Some(service));
    assert_eq!(attribute(&resource.attributes, "service.instance.id"), Some(calls.instance.as_str()));

    let scopes: Vec<&str> = requests
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .filter(|s| s.metrics.iter().any(|m| m.name == "aigw.llm.total_tokens"))
        .filter_map(|s| s.scope.as_ref().map(|scope| scope.name.as_str()))
        .collect();
    assert!(!scopes.is_empty() && scopes.iter().all(|s| *s == "aigw.test"), "namespace is the meter: {scopes:?}");

    let prompt = per_team(&latest_sums(requests, "aigw.llm.prompt_tokens"));
    assert_eq!(prompt, calls.per_team_of(|t| t.prompt), "aigw.llm.prompt_tokens");
    let completion = per_team(&latest_sums(requests, "aigw.llm.completion_tokens"));
    assert_eq!(completion, calls.per_team_of(|t| t.completion), "aigw.llm.completion_tokens");
    let users: Vec<Vec<(String, String)>> = latest_sums(requests, "aigw.llm.total_tokens").into_keys().collect();
    assert!(
        users.iter().all(|s| s.iter().any(|(k, v)| k == "user" && v.starts_with("user-"))
            && s.iter().any(|(k, v)| k == "API ID" && v == "aoai")),
        "every series has the user and API dimensions: {users:?}"
    );

    // The GenAI histogram: input and output sums per team equal prompt and completion tokens.
    let mut split: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut latest_points = HashMap::new();
    for metric in metrics(requests, "gen_ai.client.token.usage") {
        assert_eq!(metric.unit, "{token}");
        let Some(metric::Data::Histogram(histogram)) = &metric.data else { panic!("a histogram: {metric:?}") };
        for point in &histogram.data_points {
            assert_eq!(point.explicit_bounds.first(), Some(&1.0));
            assert_eq!(point.explicit_bounds.last(), Some(&67108864.0));
            latest_points.insert(series(&point.attributes), point.clone());
        }
    }
    for (series, point) in &latest_points {
        let get = |key: &str| series.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(get("gen_ai.operation.name"), "chat");
        assert_eq!(get("gen_ai.request.model"), "gpt-4o-mini");
        *split.entry((get("team"), get("gen_ai.token.type"))).or_default() += point.sum.expect("sum") as u64;
    }
    let mut expected = BTreeMap::new();
    for (team, tokens) in &calls.per_team {
        expected.insert((team.clone(), "input".to_owned()), tokens.prompt);
        expected.insert((team.clone(), "output".to_owned()), tokens.completion);
    }
    assert_eq!(split, expected, "gen_ai.token.type split");

    // The gateway's own instruments, on its own meter.
    let durations: u64 = metrics(requests, "http.server.request.duration")
        .filter_map(|m| match &m.data {
            Some(metric::Data::Histogram(h)) => Some(h),
            _ => None,
        })
        .last()
        .map(|h| {
            h.data_points
                .iter()
                .filter(|p| attribute(&p.attributes, "api") == Some("aoai"))
                .inspect(|p| assert_eq!(attribute(&p.attributes, "operation"), Some("chat-completions")))
                .map(|p| p.count)
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(durations, calls.requests, "one duration per request to aoai");
}

/// Samples of a Prometheus text page: (name, labels, value). Panics on a line that is not a
/// comment, a sample of a family declared by a TYPE line, or blank.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "one TYPE per family: {name}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = &line[..name_end];
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad metric name in {line:?}");
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let mut label = String::new();
            loop {
                let (_, c) = chars.next().unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
                match c {
                    '}' => break,
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                        let mut value = String::new();
                        loop {
                            match chars.next().map(|(_, c)| c) {
                                Some('\\') => match chars.next().map(|(_, c)| c) {
                                    Some('n') => value.push('\n'),
                                    Some(c @ ('\\' | '"')) => value.push(c),
                                    other => panic!("bad escape {other:?} in {line:?}"),
                                },
                                Some('"') => break,
                                Some(c) => value.push(c),
                                None => panic!("unterminated value in {line:?}"),
                            }
                        }
                        assert!(
                            label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                            "bad label name {label:?}"
                        );
                        labels.insert(std::mem::take(&mut label), value);
                    }
                    c => label.push(c),
                }
            }
            let consumed = chars.next().map_or(inner.len(), |(i, _)| i);
            rest = &inner[consumed..];
        }
        let value =
            rest.trim().replace("+Inf", "inf").parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let family = types.keys().find(|f| {
            name == f.as_str() || ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(f.as_str()))
        });
        assert!(family.is_some(), "sample without a TYPE line: {line:?}");
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

async fn check_prometheus(gw: &Gateway, calls: &Calls) {
    let response = client().get(format!("{}/metrics", gw.url)).send().await.expect("metrics");
    assert_eq!(response.headers()["content-type"], "text/plain; version=0.0.4");
    let text = response.text().await.expect("text");
    let samples = parse_prometheus(&text);
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for (_, labels, value) in samples.iter().filter(|(name, _, _)| name == "aigw_llm_total_tokens_total") {
        assert_eq!(labels["otel_scope_name"], "aigw.test");
        assert_eq!(labels["API_ID"], "aoai");
        *totals.entry(labels["team"].clone()).or_default() += *value as u64;
    }
    assert_eq!(totals, calls.per_team_of(|t| t.total), "/metrics per team:\n{text}");
    let input_count = samples
        .iter()
        .filter(|(name, labels, _)| {
            name == "gen_ai_client_token_usage_count"
                && labels.get("gen_ai_token_type").map(String::as_str) == Some("input")
        })
        .map(|(_, _, v)| *v as u64)
        .sum::<u64>();
    assert_eq!(input_count, calls.requests, "one input observation per call");
    for limit_store in ["aigw_limit_store_failures_total", "aigw_limit_store_shared"] {
        assert!(samples.iter().any(|(name, labels, _)| name == limit_store && labels.is_empty()), "{limit_store}");
    }
}

type Sample = (String, BTreeMap<String, String>, f64);

/// The sum of the samples of `name` whose labels include `labels`.
fn sum_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, value)| value)
        .sum()
}

async fn scrape(gw: &Gateway) -> (String, Vec<Sample>) {
    let text = client().get(format!("{}/metrics", gw.url)).send().await.expect("metrics").text().await.expect("text");
    let samples = parse_prometheus(&text);
    (text, samples)
}

/// The client that left mid-stream is counted once the gateway has drained the backend.
async fn wait_for_disconnect(gw: &Gateway) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (text, samples) = scrape(gw).await;
        if sum_of(&samples, "aigw_stream_client_disconnects_total", &[("api", "plain")]) == 1.0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no client disconnect counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline
    }
}

#[tokio::test]
async fn exports_over_http_protobuf_while_running() {
    let received = Received::default();
    let endpoint = http_receiver(received.clone()).await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ("OTEL_SERVICE_NAME", "aigw-under-test"),
    ];
    let (_sim, gw) = start_pair_with_env(&[], METRICS_API, &env).await;
    let calls = make_calls(&gw).await;
    assert_eq!(calls.per_team.len(), 2);
    let requests = wait_for_totals(&received, &calls.per_team_of(|t| t.total)).await;
    let requests = next_export(&received, requests.len()).await;
    check_export(&requests, &calls, "aigw-under-test");
    check_prometheus(&gw, &calls).await;
    wait_for_disconnect(&gw).await;
}

/// gRPC, with the default 60 s interval: what the collector gets comes from the flush at the end
/// of graceful shutdown.
#[tokio::test]
async fn exports_over_grpc_and_flushes_at_shutdown() {
    let received = Received::default();
    let endpoint = grpc_receiver(received.clone()).await;
    let env =
        [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc")];
    let (_sim, mut gw) = start_pair_with_env(&[], METRICS_API, &env).await;
    let calls = make_calls(&gw).await;
    check_prometheus(&gw, &calls).await;
    wait_for_disconnect(&gw).await;
    assert!(received.all().is_empty(), "nothing exported before the interval or shutdown");
    gw.proc.signal("TERM");
    let status = gw.proc.wait_exit(WAIT).await;
    assert!(status.success(), "{status:?}");
    let requests = wait_for_totals(&received, &calls.per_team_of(|t| t.total)).await;
    check_export(&requests, &calls, "aigw");
}

#[tokio::test]
async fn bad_otel_variables_stop_start_up_naming_the_variable() {
    let sim = Sim::start(&[]).await;
    let config = write_config(&config(&sim, METRICS_API));
    let cases = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "soon"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization"),
    ];
    for (variable, value) in cases {
        let mut command = Command::new(aigw_bin());
        command.args(["serve", "--config"]).arg(&config).args(["--listen", "127.0.0.1:0"]);
        command.env("SIM_BACKEND_KEY", BACKEND_KEY).env("OTHER_KEY", OTHER_KEY);
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9").env(variable, value);
        let mut proc = Proc::spawn(command);
        let status = proc.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(2), "{variable}={value}");
        let lines = proc.lines().join("\n");
        assert!(lines.contains(&format!("{variable}: ")), "{variable} named in:\n{lines}");
    }
    let _ = std::fs::remove_file(config);
}

/// A semantic cache hit costs no backend tokens: it shows as saved tokens (the cached answer's
/// usage), while the calls that reached the backend show as usage.
#[tokio::test]
async fn cache_hits_count_as_saved_tokens_not_usage() {
    let cached_api = r#"
[apis.cached]
kind = "openai"
path = "/cached"
backend = "openai"
inbound = [{ policy = "semantic-cache-lookup" }]
outbound = [
  { policy = "semantic-cache-store" },
  { policy = "emit-token-metric", dimensions = [{ name = "team" }, { name = "cache" }] },
]
"#;
    let (_sim, gw) = start_pair(&[], cached_api).await;
    let body = chat_body("What is the boiling point of water at sea level?", false);
    let (mut usage, mut saved, mut hits) = (0, 0, 0);
    let deadline = tokio::time::Instant::now() + WAIT;
    // The answer is stored once the first call completes; ask until a hit comes back.
    while hits == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no cache hit");
        let response = client()
            .post(format!("{}/cached/v1/chat/completions", gw.url))
            .header("api-key", KEY)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200);
        let status = response.headers()["x-llm-cache-status"].to_str().expect("ascii").to_owned();
        let answer: Value = response.json().await.expect("json");
        let total = answer["usage"]["total_tokens"].as_u64().expect("usage");
        match status.as_str() {
            "hit" => {
                hits += 1;
                saved += total;
            }
            "miss" => usage += total,
            other => panic!("cache status {other}"),
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (text, samples) = scrape(&gw).await;
        let team = ("team", "team-a");
        let seen = (
            sum_of(&samples, "aigw_llm_total_tokens_total", &[team]),
            sum_of(&samples, "aigw_llm_total_tokens_total", &[team, ("cache", "miss")]),
            sum_of(&samples, "aigw_llm_saved_tokens_total", &[team, ("cache", "hit")]),
            sum_of(&samples, "aigw_cache_lookups_total", &[("api", "cached"), ("result", "hit")]),
        );
        if seen == (usage as f64, usage as f64, saved as f64, 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "(usage, usage on misses, saved on hits, hits) = {seen:?}, expected ({usage}, {usage}, {saved}, 1):\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline
    }
}

/// The gateway's own instruments, with no policy configured: request count and status, limit
/// rejections by kind, and backend errors by backend and kind.
#[tokio::test]
async fn limit_rejections_and_backend_errors_are_counted() {
    let apis = r#"
[backends.dead]
url = "http://127.0.0.1:9/v1"
kind = "openai"
connect-timeout-ms = 200

[apis.limited]
kind = "openai"
path = "/limited"
backend = "openai"
inbound = [{ policy = "rate-limit-by-key", calls = 1, renewal-period = 60 }]

[apis.down]
kind = "openai"
path = "/down"
backend = "dead"
"#;
    let (_sim, gw) = start_pair(&[], apis).await;
    let call = |path: &str, fault: Option<&str>| {
        let mut request = client()
            .post(format!("{}{path}/v1/chat/completions", gw.url))
            .header("api-key", KEY)
            .json(&chat_body("count me", false));
        if let Some(fault) = fault {
            request = request.header("x-sim-fault", fault);
        }
        request.send()
    };
    assert_eq!(call("/limited", None).await.expect("send").status(), 200);
    assert_eq!(call("/limited", None).await.expect("send").status(), 429);
    assert_eq!(call("/down", None).await.expect("send").status(), 502);
    assert_eq!(call("", Some("500")).await.expect("send").status(), 500);

    let expected = [
        ("http_server_request_duration_seconds_count", vec![("api", "limited")], 2.0),
        (
            "http_server_request_duration_seconds_count",
            vec![("api", "limited"), ("http_response_status_code", "429")],
            1.0,
        ),
        ("aigw_limit_rejections_total", vec![("api", "limited"), ("kind", "rate-limit")], 1.0),
        ("aigw_backend_errors_total", vec![("backend", "dead"), ("kind", "unavailable")], 1.0),
        ("aigw_backend_errors_total", vec![("backend", "openai"), ("kind", "5xx")], 1.0),
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (text, samples) = scrape(&gw).await;
        let seen: Vec<f64> = expected.iter().map(|(name, labels, _)| sum_of(&samples, name, labels)).collect();
        if seen.iter().zip(&expected).all(|(got, (_, _, want))| got == want) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen:?} for {expected:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling with a deadline
    }
}
