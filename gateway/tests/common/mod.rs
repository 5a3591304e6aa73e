//! Test harness: real `aigw` and `llm-sim` processes on free loopback ports.
//!
//! Each process's stdout is read line by line into memory; tests wait for a line to appear (with a
//! deadline) instead of sleeping. Processes are killed when dropped.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

pub const WAIT: Duration = Duration::from_secs(20);

/// `target/<profile>`: where cargo put this test's binaries and the workspace's other binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(|deps| deps.parent()).expect("target dir").to_owned()
}

pub fn aigw_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_aigw"))
}

pub fn sim_bin() -> PathBuf {
    let path = bin_dir().join("llm-sim");
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

pub struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
}

impl Proc {
    pub fn spawn(mut command: Command) -> Self {
        command.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
        let mut child = command.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, count) = watch::channel(0);
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut lines = sink.lock().expect("lines");
                lines.push(line);
                let _ = tx.send(lines.len());
            }
        });
        Self { child, lines, count }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits until a stdout line satisfies `matches`, and returns it.
    pub async fn wait_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let mut count = self.count.clone();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(line) = self.lines.lock().expect("lines").iter().find(|l| matches(l)) {
                    return line.clone();
                }
                if count.changed().await.is_err() {
                    panic!("process ended before printing {what}; output:\n{}", self.lines().join("\n"));
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {what} within {WAIT:?}; output:\n{}", self.lines().join("\n")))
    }

    /// The JSON log lines (the gateway logs one JSON object per line).
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The request log line of one request.
    pub async fn request_log(&self, request_id: &str) -> Value {
        let needle = format!("\"request_id\":\"{request_id}\"");
        let line = self
            .wait_line(&format!("request log line for {request_id}"), |l| {
                l.contains("\"aigw::request\"") && l.contains(&needle)
            })
            .await;
        serde_json::from_str(&line).expect("json log line")
    }

    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        let mut count = self.count.clone();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "process did not exit within {within:?}");
            // Exit closes stdout, which ends the reader thread and the watch channel.
            let _ = tokio::time::timeout_at(deadline, count.changed()).await;
            if count.has_changed().is_err() {
                return self.child.wait().expect("wait");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Sim {
    pub proc: Proc,
    pub url: String,
}

impl Sim {
    pub async fn start(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", args).await
    }

    /// Starts (or restarts) a simulator on a given address.
    pub async fn start_on(listen: &str, args: &[&str]) -> Self {
        let mut command = Command::new(sim_bin());
        command.args(["--listen", listen]).args(args);
        let proc = Proc::spawn(command);
        let line = proc.wait_line("llm-sim's listening line", |l| l.starts_with("llm-sim listening on ")).await;
        let url = line.trim_start_matches("llm-sim listening on ").to_owned();
        Self { proc, url }
    }

    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }
}

pub struct Gateway {
    pub proc: Proc,
    pub url: String,
    pub config_path: PathBuf,
    /// The process's working directory (where relative paths such as the default ledger land).
    pub workdir: PathBuf,
    /// Whether `workdir` was made for this gateway alone, and is removed with it.
    owns_workdir: bool,
}

static CONFIGS: AtomicUsize = AtomicUsize::new(0);

pub fn write_config(toml: &str) -> PathBuf {
    let n = CONFIGS.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("aigw-test-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, toml).expect("write config");
    path
}

/// A new empty directory under the system's temp directory.
pub fn fresh_dir(label: &str) -> PathBuf {
    let n = CONFIGS.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("aigw-test-{}-{n}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl Gateway {
    /// Starts a gateway in a working directory of its own, removed when it is dropped.
    pub async fn start(toml: &str, env: &[(&str, &str)]) -> Self {
        let mut gateway = Self::start_in(&fresh_dir("wd"), toml, env).await;
        gateway.owns_workdir = true;
        gateway
    }

    /// Starts a gateway in `workdir`, which outlives it (restart tests).
    pub async fn start_in(workdir: &std::path::Path, toml: &str, env: &[(&str, &str)]) -> Self {
        let config_path = write_config(toml);
        let mut command = Command::new(aigw_bin());
        command.current_dir(workdir);
        command.args(["serve", "--config"]).arg(&config_path).args(["--listen", "127.0.0.1:0"]);
        command.env_remove("AIGW_LISTEN").env_remove("HOSTNAME").env_remove("WEBSITE_INSTANCE_ID");
        command.env("RUST_LOG", "info");
        for (name, value) in env {
            command.env(name, value);
        }
        let proc = Proc::spawn(command);
        let line = proc.wait_line("aigw's listening line", |l| l.contains("\"aigw listening\"")).await;
        let log: Value = serde_json::from_str(&line).expect("json");
        let url = format!("http://{}", log["addr"].as_str().expect("addr"));
        Self { proc, url, config_path, workdir: workdir.to_owned(), owns_workdir: false }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
        if self.owns_workdir {
            // Stop the process first: it may still be writing there.
            let _ = self.proc.child.kill();
            let _ = self.proc.child.wait();
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}

pub const KEY: &str = "test-key-team-a";
pub const OTHER_KEY: &str = "test-key-team-b";
pub const BACKEND_KEY: &str = "backend-secret-1234";

pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A config with an OpenAI-kind backend and an Azure-kind backend (api-key auth) on the same
/// simulator, an `aoai` API on each, and two subscriptions: team A may call both APIs, team B only
/// the OpenAI one. `extra` is appended (more APIs, policies).
pub fn config(sim: &Sim, extra: &str) -> String {
    format!(
        r#"
[server]
max-body-bytes = 65536
shutdown-grace-secs = 10

[backends.openai]
url = "{url}/v1"
kind = "openai"

[backends.azure]
url = "{url}"
kind = "azure-openai"
auth = {{ type = "api-key", env = "SIM_BACKEND_KEY" }}

[[subscriptions]]
id = "sub-a"
name = "Team A app"
team = "team-a"
apis = ["*"]
key-sha256 = "{key_hash}"

[[subscriptions]]
id = "sub-b"
name = "Team B app"
team = "team-b"
apis = ["aoai"]
key-env = "OTHER_KEY"

[apis.aoai]
kind = "openai"
backend = "openai"
outbound = [{{ policy = "set-header", name = "x-team", value = "{{subscription.team}}" }}]
on-error = [{{ policy = "set-header", name = "x-error-api", value = "{{api.id}}" }}]

[apis.azure]
kind = "openai"
path = "/azure"
backend = "azure"
{extra}
"#,
        url = sim.url,
        key_hash = sha256_hex(KEY),
    )
}

/// Simulator (requiring the backend key) and gateway with [`config`].
pub async fn start_pair(sim_args: &[&str], extra: &str) -> (Sim, Gateway) {
    start_pair_with_env(sim_args, extra, &[]).await
}

/// [`start_pair`] with more environment variables for the gateway.
pub async fn start_pair_with_env(sim_args: &[&str], extra: &str, env: &[(&str, &str)]) -> (Sim, Gateway) {
    let mut args = vec!["--api-key", BACKEND_KEY];
    args.extend_from_slice(sim_args);
    // The OpenAI-kind backend sends no credential; give it one too so the simulator accepts it.
    let sim = Sim::start(&args).await;
    let mut toml = config(&sim, extra);
    toml = toml.replace(
        "kind = \"openai\"\n\n[backends.azure]",
        "kind = \"openai\"\nauth = { type = \"bearer\", env = \"SIM_BACKEND_KEY\" }\n\n[backends.azure]",
    );
    let mut all_env = vec![("SIM_BACKEND_KEY", BACKEND_KEY), ("OTHER_KEY", OTHER_KEY)];
    all_env.extend_from_slice(env);
    let gateway = Gateway::start(&toml, &all_env).await;
    (sim, gateway)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().expect("client")
}

pub fn chat_body(prompt: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    })
}

/// The `[p:xxxxxxxx]` marker llm-sim puts in an answer to `prompt`.
pub fn prompt_marker(prompt: &str) -> String {
    format!("[p:{}]", &sha256_hex(prompt)[..8])
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}

/// Concatenated `delta.content` of a chat stream.
pub fn stream_text(data: &[String]) -> String {
    data.iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

/// Asserts an OpenAI-shaped error body and returns it.
pub async fn openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert!(response.headers().contains_key("x-request-id"), "x-request-id on errors too");
    assert!(response.headers().contains_key("x-gateway-instance"), "x-gateway-instance on errors too");
    let body: Value = response.json().await.expect("JSON error body");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"].get("param").is_some() && body["error"].get("code").is_some(), "{body}");
    assert_eq!(body["statusCode"], status, "{body}");
    body
}

/// A `redis-server` of the test's own on a free loopback port (never the machine's 6379), keeping
/// nothing on disk. Killed when dropped.
pub struct RedisServer {
    pub proc: Proc,
    pub port: u16,
}

impl RedisServer {
    /// A server if `redis-server` is installed, else `None` (see [`RedisServer::installed`]).
    pub async fn start_if_installed(test: &str) -> Option<Self> {
        if Self::installed(test) { Some(Self::start().await) } else { None }
    }

    /// Whether `redis-server` is installed; if not, says on stderr that `test`'s Redis half is
    /// skipped. Unless `AIGW_REQUIRE_REDIS` is set (`.ci/run` sets it): then a missing
    /// `redis-server` fails the test, so CI never passes by skipping.
    pub fn installed(test: &str) -> bool {
        let installed = Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var_os("AIGW_REQUIRE_REDIS").is_none(),
                "{test}: redis-server is not installed and AIGW_REQUIRE_REDIS is set"
            );
            eprintln!(
                "{test}: redis-server is not installed; skipping the Redis half (install redis-server to run it)"
            );
        }
        installed
    }

    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        Self::start_on(port).await
    }

    /// Starts (or restarts) a server on a given port.
    pub async fn start_on(port: u16) -> Self {
        let mut command = Command::new("redis-server");
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.args(["--loglevel", "notice", "--daemonize", "no"]);
        let proc = Proc::spawn(command);
        proc.wait_line("redis-server's ready line", |l| l.contains("Ready to accept connections")).await;
        Self { proc, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
