//! `aigw quickstart`: the gateway on embedded defaults with llm-sim as its backend, on one command.
//!
//! The configuration is `policies/quickstart.toml`, compiled in; the simulator is started as a child
//! process on a free port (and stopped with the gateway), and the demo subscription's key comes
//! from `AIGW_DEMO_KEY` or is made up at start-up.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::{Config, ConfigError};
use crate::subscription::key_sha256_hex;

pub const CONFIG: &str = include_str!("../../policies/quickstart.toml");
pub const DEMO_KEY_ENV: &str = "AIGW_DEMO_KEY";
pub const ADMIN_KEY_ENV: &str = "AIGW_ADMIN_KEY";
const SIM_BACKEND: &str = "sim";

/// The quickstart's keys: each from its variable, else made up at start-up.
pub struct Keys {
    /// The demo subscription's key.
    pub demo: String,
    /// The admin API's key (`/admin/chargeback`).
    pub admin: String,
}

impl Keys {
    pub fn from_env() -> Self {
        let key = |var: &str, prefix: &str| {
            std::env::var(var)
                .ok()
                .filter(|k| !k.trim().is_empty())
                .unwrap_or_else(|| format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
        };
        Self { demo: key(DEMO_KEY_ENV, "aigw-demo"), admin: key(ADMIN_KEY_ENV, "aigw-admin") }
    }
}

/// The quickstart configuration pointed at the simulator at `sim_url`. The keys go into it as
/// their SHA-256, so the gateway built from it needs no environment variable for them (the
/// made-up ones exist in no environment).
pub fn config(keys: &Keys, sim_url: &str) -> Result<Config, ConfigError> {
    let env = |name: &str| match name {
        DEMO_KEY_ENV => Some(keys.demo.clone()),
        ADMIN_KEY_ENV => Some(keys.admin.clone()),
        _ => std::env::var(name).ok(),
    };
    let mut config = Config::parse(CONFIG, &env)?;
    for subscription in &mut config.subscriptions {
        if subscription.key_env.as_deref() == Some(DEMO_KEY_ENV) {
            subscription.key_env = None;
            subscription.key_sha256 = Some(key_sha256_hex(&keys.demo));
        }
    }
    if let Some(admin) = &mut config.admin {
        admin.key_env = None;
        admin.key_sha256 = Some(key_sha256_hex(&keys.admin));
    }
    let backend = config
        .backends
        .get_mut(SIM_BACKEND)
        .ok_or_else(|| ConfigError::at("backends", "the quickstart config lost its \"sim\" backend"))?;
    backend.url = format!("{}/v1", sim_url.trim_end_matches('/'));
    Ok(config)
}

/// A running llm-sim; stopped when dropped.
pub struct Simulator {
    pub url: String,
    _child: Child,
}

/// Finds the llm-sim binary: the given path, else next to this executable (where `cargo build`
/// puts it), else on PATH.
fn simulator_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(format!("llm-sim{}", std::env::consts::EXE_SUFFIX))));
    sibling.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("llm-sim"))
}

pub async fn start_simulator(explicit: Option<&Path>) -> Result<Simulator, String> {
    let binary = simulator_binary(explicit);
    let mut child = Command::new(&binary)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start the simulator {} ({e}). Build it with `cargo build --release` (it is part of the \
                 workspace), or pass --sim PATH, or --sim-url URL for one already running.",
                binary.display()
            )
        })?;
    let stdout = child.stdout.take().ok_or("the simulator has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let announce = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "the simulator did not start within 30 s".to_owned())?
        .map_err(|e| format!("cannot read the simulator's output: {e}"))?
        .ok_or("the simulator exited before it was listening")?;
    let url = announce
        .strip_prefix("llm-sim listening on ")
        .ok_or_else(|| format!("unexpected first line from the simulator: {announce:?}"))?
        .to_owned();
    // Keep draining its stdout so it can never block on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Simulator { url, _child: child })
}

/// What the quickstart prints once it listens.
pub fn banner(base: &str, keys: &Keys) -> String {
    let Keys { demo: key, admin } = keys;
    format!(
        "\n  aigw quickstart is running at {base}  (backend: llm-sim; any model name works)\n\
         \n  demo subscription key: {key}\n\
         \n  admin key: {admin}\n    curl -s -H 'Authorization: Bearer {admin}' '{base}/admin/chargeback?group-by=team&format=csv'\n\
         \n  try:\n    curl -s {base}/v1/chat/completions \\\n      -H 'api-key: {key}' -H 'content-type: application/json' \\\n      \
         -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n\
         \n  OpenAI SDK: OpenAI(base_url=\"{base}/v1\", api_key=\"{key}\")\
         \n  Azure SDK:  AzureOpenAI(azure_endpoint=\"{base}\", api_key=\"{key}\", api_version=\"2024-10-21\")\n"
    )
}
