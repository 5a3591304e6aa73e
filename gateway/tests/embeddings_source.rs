//! The semantic cache's embeddings sources against a real llm-sim: the backend embedder on both backend kinds and
//! its errors, and llm-sim serving the same vectors as the in-process model.

mod common;

use std::sync::Arc;

use aigw::config::BackendConfig;
use aigw::embed::{BackendEmbedder, EmbedError, Embedder, LocalEmbedder, LocalModel};
use aigw::upstream::backend::Backend;
use common::*;
use serde_json::{Value, json};

const BACKEND_ENV: &str = "EMBEDDINGS_BACKEND_KEY";

/// A backend as the gateway builds it from config; `auth` is the TOML of its `auth` table.
fn backend(url: &str, kind: &str, auth: &str) -> Arc<Backend> {
    let config: BackendConfig =
        toml::from_str(&format!("url = \"{url}\"\nkind = \"{kind}\"\nauth = {auth}\ntimeout-secs = 20\n"))
            .expect("backend config");
    let env = |var: &str| (var == BACKEND_ENV).then(|| BACKEND_KEY.to_owned());
    Arc::new(Backend::from_config("sim", &config, &env).expect("backend"))
}

fn bearer() -> String {
    format!("{{ type = \"bearer\", env = \"{BACKEND_ENV}\" }}")
}

fn api_key() -> String {
    format!("{{ type = \"api-key\", env = \"{BACKEND_ENV}\" }}")
}

/// The installed model; CI installs it, so its absence is a failure with the install instructions.
fn local_model() -> Arc<LocalModel> {
    LocalModel::shared(None).unwrap_or_else(|e| panic!("{e}"))
}

async fn sim_with_model() -> Sim {
    let dir = local_model().dir().to_str().expect("utf-8 model path").to_owned();
    let sim = Sim::start(&["--api-key", BACKEND_KEY, "--embedding-model", &dir]).await;
    let served = sim.proc.wait_line("llm-sim's embeddings line", |l| l.starts_with("embeddings: ")).await;
    assert_eq!(served, format!("embeddings: all-MiniLM-L6-v2 from {dir}"));
    sim
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test]
async fn both_backend_kinds_serve_the_local_models_vectors_through_llm_sim() {
    let sim = sim_with_model().await;
    let text = "How do I reset my password?";
    let local = LocalEmbedder::new(local_model()).embed(text).await.expect("local embedding");

    let openai = BackendEmbedder::new(
        backend(&format!("{}/v1", sim.url), "openai", &bearer()),
        Some("text-embedding-3-small".to_owned()),
    );
    assert_eq!(openai.space(), "backend:sim:text-embedding-3-small");
    assert!(!openai.truncates(&"word ".repeat(1000)), "a backend's limit is its own");
    let via_openai = openai.embed(text).await.expect("openai-kind embedding");
    assert!(max_abs_difference(&via_openai, &local) < 1e-5, "llm-sim serves the local model's vector");

    // The deployment route needs the api-version the embedder adds (llm-sim refuses it otherwise).
    let azure = BackendEmbedder::new(backend(&sim.url, "azure-openai", &api_key()), Some("my-embeddings".to_owned()));
    let via_azure = azure.embed(text).await.expect("azure deployment embedding");
    assert!(max_abs_difference(&via_azure, &local) < 1e-5);

    let paraphrase = openai.embed("How can I change my password?").await.expect("embedding");
    let cosine: f32 = paraphrase.iter().zip(&via_openai).map(|(a, b)| a * b).sum();
    assert!(cosine > 0.7, "real embeddings: a paraphrase scores {cosine}");

    // `dimensions` as OpenAI's v3 models do it: the leading components, back at unit length; no more than 384.
    let request = |dimensions: usize| {
        client()
            .post(format!("{}/v1/embeddings", sim.url))
            .bearer_auth(BACKEND_KEY)
            .json(&json!({"model": "text-embedding-3-small", "input": text, "dimensions": dimensions}))
            .send()
    };
    let answer: Value = request(64).await.expect("send").json().await.expect("json");
    let short: Vec<f32> = serde_json::from_value(answer["data"][0]["embedding"].clone()).expect("floats");
    let leading = aigw::embed::normalized(local[..64].to_vec()).expect("non-zero");
    assert!(max_abs_difference(&short, &leading) < 1e-5);
    let too_many = request(LocalModel::DIMENSIONS + 1).await.expect("send");
    assert_eq!(too_many.status(), 400);
    let error: Value = too_many.json().await.expect("json");
    assert_eq!(error["error"]["param"], "dimensions");
}

#[tokio::test]
async fn hash_vectors_are_normalised_and_the_model_flag_none_forces_them() {
    let sim = Sim::start(&["--api-key", BACKEND_KEY, "--embedding-model", "none"]).await;
    let served = sim.proc.wait_line("llm-sim's embeddings line", |l| l.starts_with("embeddings: ")).await;
    assert_eq!(served, "embeddings: hash vectors (--embedding-model none)");
    let embedder = BackendEmbedder::new(
        backend(&format!("{}/v1", sim.url), "openai", &bearer()),
        Some("text-embedding-3-small".to_owned()),
    );
    let v = embedder.embed("hello").await.expect("embedding");
    assert_eq!(v.len(), 1536, "text-embedding-3-small's size");
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    assert_eq!(v, embedder.embed("hello").await.expect("embedding"), "deterministic");
}

#[tokio::test]
async fn backend_errors_say_what_failed_without_the_credential() {
    let sim = Sim::start(&["--api-key", BACKEND_KEY, "--embedding-model", "none"]).await;

    // The Azure v1 route takes the model from the body, and there is none.
    let no_model = BackendEmbedder::new(backend(&sim.url, "azure-openai", &api_key()), None);
    assert_eq!(no_model.space(), "backend:sim");
    match no_model.embed("hello").await {
        Err(EmbedError::BackendStatus { backend, status: 400, message: Some(message) }) => {
            assert_eq!(backend, "sim");
            assert_eq!(message, "you must provide a model parameter");
        }
        other => panic!("expected a 400 with OpenAI's message, got {other:?}"),
    }

    let unauthenticated = BackendEmbedder::new(
        backend(&format!("{}/v1", sim.url), "openai", "{ type = \"none\" }"),
        Some("m".to_owned()),
    );
    let error = unauthenticated.embed("hello").await.expect_err("llm-sim requires a key");
    assert!(matches!(error, EmbedError::BackendStatus { status: 401, .. }), "{error:?}");
    assert!(error.to_string().starts_with("embeddings backend \"sim\" answered 401: "), "{error}");

    let failing = Sim::start(&["--rate-500", "1", "--embedding-model", "none"]).await;
    let embedder = BackendEmbedder::new(
        backend(&format!("{}/v1", failing.url), "openai", &bearer()),
        Some("text-embedding-3-small".to_owned()),
    );
    let error = embedder.embed("hello").await.expect_err("every request fails");
    assert!(matches!(error, EmbedError::BackendStatus { status: 500, message: Some(_), .. }), "{error:?}");
    assert!(!error.to_string().contains(BACKEND_KEY));

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let unreachable = BackendEmbedder::new(
        backend(&format!("http://{addr}/v1"), "openai", &bearer()),
        Some("text-embedding-3-small".to_owned()),
    );
    match unreachable.embed("hello").await {
        Err(error @ EmbedError::BackendUnavailable { .. }) => {
            assert_eq!(error.to_string(), "embeddings backend \"sim\" is unavailable: could not connect");
        }
        other => panic!("expected a connection failure, got {other:?}"),
    }
}
