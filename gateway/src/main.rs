//! `aigw`: run the gateway (`serve`), try it on one command (`quickstart`), validate a
//! configuration document (`check-config`), measure the semantic cache's hit decision on
//! labelled prompt pairs (`cache-eval`), or report usage and cost per team (`chargeback`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aigw::config::Config;
use aigw::metrics::Metrics;
use aigw::quickstart;
use aigw::server::{Gateway, instance_id};
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "aigw",
    version,
    about = "AI gateway: API Management's AI policies in front of OpenAI and Azure OpenAI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a configuration document.
    Serve {
        #[arg(long, env = "AIGW_CONFIG")]
        config: PathBuf,
        /// Address to listen on; overrides `server.listen`.
        #[arg(long, env = "AIGW_LISTEN")]
        listen: Option<SocketAddr>,
    },
    /// Run the gateway on embedded defaults with llm-sim as its backend.
    Quickstart {
        #[arg(long, env = "AIGW_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Path to the llm-sim binary (default: next to aigw, then PATH).
        #[arg(long, env = "AIGW_SIM")]
        sim: Option<PathBuf>,
        /// Use an llm-sim that is already running at this URL instead of starting one.
        #[arg(long, env = "AIGW_SIM_URL", conflicts_with = "sim")]
        sim_url: Option<String>,
    },
    /// Validate a configuration document; exits non-zero with the path of the first bad field.
    CheckConfig { file: PathBuf },
    /// Run the semantic cache's hit decision (embedding, threshold, guard) on labelled prompt
    /// pairs and report precision, recall and false-hit rate with and without the guard.
    CacheEval {
        /// JSON lines: {"a": ..., "b": ..., "label": "same"|"different", "kind": ..., "split": ...}.
        #[arg(long)]
        pairs: PathBuf,
        /// The configuration whose first semantic-cache-lookup policy is evaluated (default: the quickstart's).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the figures as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Tokens and cost per team (or subscription, model, day, API) from the usage ledger: Redis
    /// when the configuration has [redis], else the journal file (read while the gateway runs).
    Chargeback {
        #[arg(long, env = "AIGW_CONFIG")]
        config: PathBuf,
        /// Start, inclusive: YYYY-MM-DD (UTC) or an RFC 3339 timestamp; default: the first of this month.
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive: YYYY-MM-DD (UTC) or an RFC 3339 timestamp; default: now.
        #[arg(long)]
        to: Option<String>,
        /// team, subscription, model, day or api; default: team.
        #[arg(long)]
        group_by: Option<String>,
        /// table, csv or json; default: table.
        #[arg(long)]
        format: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::CheckConfig { file } => return check_config(file),
        Command::CacheEval { pairs, config, json } => return cache_eval(pairs, config.as_deref(), *json),
        Command::Chargeback { config, from, to, group_by, format } => {
            let options = [("from", from), ("to", to), ("group-by", group_by), ("format", format)];
            let given = options.iter().filter_map(|(name, value)| Some((*name, value.as_deref()?)));
            return chargeback(config, given);
        }
        _ => {}
    }
    init_logs();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("aigw: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

fn check_config(file: &Path) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    match Config::load(file, &env) {
        Ok(config) => {
            println!(
                "{}: ok ({} APIs, {} backends, {} subscriptions)",
                file.display(),
                config.apis.len(),
                config.backends.len(),
                config.subscriptions.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// Prints the figures on stdout (nothing else goes there, so `--json` output parses), progress and
/// errors on stderr.
fn cache_eval(pairs: &Path, config: Option<&Path>, json: bool) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("aigw: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |done: usize, total: usize| {
        if terminal {
            eprint!("\rembedding prompts: {done}/{total}");
            let _ = std::io::stderr().flush();
            if done == total {
                eprintln!();
            }
        }
    };
    match runtime.block_on(aigw::cache::eval::run(pairs, config, &env, &mut progress)) {
        Ok((report, pairs)) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.table(&pairs));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aigw cache-eval: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints the report on stdout; bad options exit 2 with the message on stderr.
fn chargeback<'a>(path: &Path, options: impl Iterator<Item = (&'a str, &'a str)>) -> ExitCode {
    use aigw::ledger::chargeback::{Asker, Prices, Query, Report};
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::load(path, &env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let query = match Query::parse(options, Asker::Cli, jiff::Timestamp::now()) {
        Ok(query) => query,
        Err(e) => {
            eprintln!("aigw chargeback: --{}: {e}", e.param);
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("aigw: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (from, to) = query.hours();
    match runtime.block_on(aigw::ledger::read_buckets(&config, &env, from, to)) {
        Ok(buckets) => {
            print!("{}", Report::new(&query, &buckets, &Prices::from_config(&config.prices)).render().1);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aigw chargeback: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}

async fn run(command: Command) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    // The simulator must outlive the server; it is stopped when this scope ends.
    let mut _simulator = None;
    // The quickstart's keys, and the line saying its semantic cache is off, if it is.
    let (config, quickstart) = match command {
        Command::Serve { config: path, listen } => match Config::load(&path, &env) {
            Ok(mut config) => {
                config.server.listen = listen.unwrap_or(config.server.listen);
                (config, None)
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "configuration error; `aigw check-config FILE` shows the same message");
                return ExitCode::from(2);
            }
        },
        Command::Quickstart { listen, sim, sim_url } => {
            let keys = quickstart::Keys::from_env();
            let mut config = match quickstart::config(&keys) {
                Ok(config) => config,
                Err(e) => {
                    tracing::error!(error = %e, "the embedded quickstart configuration is invalid");
                    return ExitCode::FAILURE;
                }
            };
            config.server.listen = listen;
            let cache_off = quickstart::switch_off_cache_without_model(&mut config);
            let sim_url = match sim_url {
                Some(url) => url,
                None => match quickstart::start_simulator(sim.as_deref(), cache_off.is_none()).await {
                    Ok(simulator) => {
                        let url = simulator.url.clone();
                        _simulator = Some(simulator);
                        url
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the quickstart backend");
                        return ExitCode::FAILURE;
                    }
                },
            };
            if let Err(e) = quickstart::point_at_simulator(&mut config, &sim_url) {
                tracing::error!(error = %e, "the embedded quickstart configuration is invalid");
                return ExitCode::FAILURE;
            }
            (config, Some((keys, cache_off)))
        }
        Command::CheckConfig { .. } | Command::CacheEval { .. } | Command::Chargeback { .. } => {
            unreachable!("handled before the runtime starts")
        }
    };

    let listen = config.server.listen;
    let instance = instance_id();
    let metrics = match Metrics::start(&env, &instance) {
        Ok(metrics) => metrics,
        Err(e) => {
            tracing::error!(error = %e, "metrics configuration error (OpenTelemetry environment variables)");
            return ExitCode::from(2);
        }
    };
    let exports_otlp = metrics.exports_otlp();
    let gateway = match Gateway::build(config, &env, metrics) {
        Ok(gateway) => gateway,
        Err(e) => {
            tracing::error!(error = %e, "configuration error");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "another process is listening there: stop it, or pick another address with --listen / AIGW_LISTEN (127.0.0.1:0 picks a free port)"
                }
                std::io::ErrorKind::PermissionDenied => "ports below 1024 need privileges: use a port above 1024",
                _ => "check the address in --listen / AIGW_LISTEN / server.listen",
            };
            tracing::error!(addr = %listen, error = %e, hint, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    let apis: Vec<&String> = gateway.config.apis.keys().collect();
    tracing::info!(addr = %addr, url = %format!("http://{addr}"), instance = %instance, apis = ?apis, otlp_metrics = exports_otlp, "aigw listening");
    if let Some((keys, cache_off)) = &quickstart {
        println!("{}", quickstart::banner(&format!("http://{addr}"), keys));
        if let Some(line) = cache_off {
            println!("  {line}\n");
        }
    }
    for backend in gateway.backends.values() {
        tokio::spawn(probe(backend.id.clone(), backend.base_url().to_owned()));
    }
    match gateway.serve(listener, &instance, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("aigw stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server error");
            ExitCode::FAILURE
        }
    }
}

/// Warns at start-up about a backend that cannot be reached, the commonest first-run mistake.
async fn probe(id: String, url: String) {
    let Ok(parsed) = reqwest::Url::parse(&url) else { return };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else { return };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let connect = tokio::net::TcpStream::connect((host, port));
    let failure = match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 3 s".to_owned(),
    };
    tracing::warn!(
        backend = %id, url = %url, error = %failure,
        hint = "requests routed to this backend fail with 502 until it is reachable; check backends.<id>.url",
        "backend unreachable"
    );
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
