//! The process around the gateway: start-up messages, config checking, graceful shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits_zero() {
    let (_sim, mut gw) = start_pair(&[], "").await;
    let response = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("api-key", KEY)
        .header("x-sim-token-delay-ms", "50")
        .json(&chat_body("finish me during shutdown", true))
        .send()
        .await
        .expect("send");
    let mut body = response.bytes_stream();
    let mut received = body.next().await.expect("first chunk").expect("bytes").to_vec();

    gw.proc.signal("TERM");
    gw.proc.wait_line("the shutdown line", |l| l.contains("shutting down")).await;
    // No new connections once draining.
    let refused = client().get(format!("{}/health", gw.url)).send().await;
    assert!(refused.is_err(), "a new connection after SIGTERM must be refused");

    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.expect("the stream is not cut"));
    }
    let text = String::from_utf8_lossy(&received);
    assert!(text.ends_with("data: [DONE]\n\n"), "the in-flight stream completed: {text}");
    let status = gw.proc.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert!(gw.proc.lines().iter().any(|l| l.contains("\"aigw stopped\"")));
}

#[tokio::test]
async fn check_config_reports_the_path_of_the_bad_field() {
    let sim = Sim::start(&[]).await;
    let good = write_config(&config(&sim, ""));
    let output = Command::new(aigw_bin())
        .arg("check-config")
        .arg(&good)
        .env("SIM_BACKEND_KEY", "k")
        .env("OTHER_KEY", "k")
        .output()
        .expect("run");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok (2 APIs, 2 backends, 2 subscriptions)"));

    let cases = [
        (config(&sim, "").replace("max-body-bytes = 65536", "max-body-bytes = \"lots\""), "server.max-body-bytes"),
        (
            config(&sim, "").replace("backend = \"azure\"", "backend = \"azur\""),
            "apis.azure.backend: unknown backend or pool \"azur\"",
        ),
        (config(&sim, "inbound = [{ policy = \"set-header\", nmae = \"x\" }]"), "apis.azure.inbound[0]"),
        (config(&sim, "inbound = [{ policy = \"rate-limit-everything\" }]"), "apis.azure.inbound[0]"),
        (
            config(&sim, "").replace("key-env = \"OTHER_KEY\"", "key-env = \"NOT_SET_ANYWHERE\""),
            "subscriptions[1].key-env: environment variable NOT_SET_ANYWHERE is not set",
        ),
    ];
    for (text, expected) in cases {
        let path = write_config(&text);
        let output = Command::new(aigw_bin())
            .arg("check-config")
            .arg(&path)
            .env("SIM_BACKEND_KEY", "k")
            .env("OTHER_KEY", "k")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(good);
}

#[tokio::test]
async fn start_up_failures_say_what_to_do() {
    // The port is taken.
    let (_sim, gw) = start_pair(&[], "").await;
    let taken = gw.url.trim_start_matches("http://").to_owned();
    let mut command = Command::new(aigw_bin());
    command.current_dir(fresh_dir("second"));
    command.args(["serve", "--config"]).arg(&gw.config_path).args(["--listen", &taken]);
    command.env("SIM_BACKEND_KEY", "k").env("OTHER_KEY", "k");
    let mut second = Proc::spawn(command);
    let line = second.wait_line("the bind error", |l| l.contains("cannot listen")).await;
    assert!(line.contains("--listen"), "{line}");
    assert_eq!(second.wait_exit(Duration::from_secs(10)).await.code(), Some(1));

    // A backend nobody listens on: the gateway starts, warns, and answers 502 until it is up.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = unused.local_addr().expect("addr");
    drop(unused);
    let toml = format!(
        "[backends.gone]\nurl = \"http://{dead}/v1\"\nkind = \"openai\"\n\n[apis.a]\nkind = \"openai\"\nbackend = \"gone\"\nsubscription-required = false\n"
    );
    let lonely = Gateway::start(&toml, &[]).await;
    let warning = lonely.proc.wait_line("the unreachable-backend warning", |l| l.contains("backend unreachable")).await;
    assert!(warning.contains("\"backend\":\"gone\""), "{warning}");
    let response = client()
        .post(format!("{}/v1/chat/completions", lonely.url))
        .json(&chat_body("x", false))
        .send()
        .await
        .expect("send");
    openai_error(response, 502).await;

    // A bad config file: exit 2 with the path of the field.
    let bad = write_config("[server]\nlisten = 8080\n");
    let output = Command::new(aigw_bin()).args(["serve", "--config"]).arg(&bad).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stdout).contains("server.listen"));
    let _ = std::fs::remove_file(bad);
}

/// `aigw quickstart` in a fresh working directory, on a free port, with `env` set (and no
/// AIGW_ADMIN_KEY, so it makes one up): the process, its URL and the admin key its banner shows.
async fn start_quickstart(label: &str, env: &[(&str, &std::ffi::OsStr)]) -> (Proc, String, String) {
    let mut command = Command::new(aigw_bin());
    command.current_dir(fresh_dir(label));
    command.args(["quickstart", "--listen", "127.0.0.1:0", "--sim", sim_bin().to_str().expect("utf-8")]);
    command.env_remove("AIGW_LISTEN").env_remove("AIGW_ADMIN_KEY");
    command.envs(env.iter().copied());
    let proc = Proc::spawn(command);
    let admin_line = proc.wait_line("the banner's admin key line", |l| l.contains("admin key:")).await;
    let admin_key = admin_line.rsplit(' ').next().expect("admin key").to_owned();
    assert!(admin_key.starts_with("aigw-admin-"), "{admin_line}");
    let listening: serde_json::Value =
        serde_json::from_str(&proc.wait_line("listening", |l| l.contains("\"aigw listening\"")).await).expect("json");
    let url = format!("http://{}", listening["addr"].as_str().expect("addr"));
    proc.wait_line("the curl hint", |l| l.contains(&format!("curl -s {url}/v1/chat/completions"))).await;
    (proc, url, admin_key)
}

/// Waits until the ledger bills `requests` calls to the demo team, read with `admin_key`.
async fn wait_for_demo_team_requests(url: &str, admin_key: &str, requests: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let chargeback: serde_json::Value = client()
            .get(format!("{url}/admin/chargeback?group-by=team"))
            .bearer_auth(admin_key)
            .send()
            .await
            .expect("chargeback")
            .json()
            .await
            .expect("json");
        if chargeback["rows"][0]["team"] == "demo-team" && chargeback["rows"][0]["requests"] == requests {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{chargeback}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn quickstart_runs_on_one_command_with_the_given_key() {
    let (mut proc, url, admin_key) = start_quickstart("quickstart", &[("AIGW_DEMO_KEY", "my-demo-key".as_ref())]).await;
    let banner = proc.wait_line("the banner's key line", |l| l.contains("demo subscription key:")).await;
    assert!(banner.contains("my-demo-key"));
    // Any model name works.
    let mut body = chat_body("hello quickstart", false);
    body["model"] = "my-own-model-name".into();
    let response = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("api-key", "my-demo-key")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-aigw-subscription"], "demo");
    let answer: serde_json::Value = response.json().await.expect("json");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .contains(&prompt_marker("hello quickstart"))
    );
    // The call is billed to the demo team, read with the made-up admin key.
    wait_for_demo_team_requests(&url, &admin_key, 1).await;
    // A clean stop also stops the simulator it started.
    proc.signal("TERM");
    assert_eq!(proc.wait_exit(Duration::from_secs(15)).await.code(), Some(0));
}

/// A first run before the embeddings model is installed: the quickstart starts with the semantic
/// cache off, says so in one line with the command that turns it on, and everything else works.
#[tokio::test]
async fn quickstart_without_the_model_starts_with_the_cache_off() {
    // The variable, when set, is the only place aigw looks for the model: an empty directory makes
    // it unfindable whatever Python packages this machine has.
    let no_model = fresh_dir("no-model");
    let env = [("AIGW_EMBEDDING_MODEL_DIR", no_model.as_os_str()), ("AIGW_DEMO_KEY", "demo-key".as_ref())];
    let (mut proc, url, admin_key) = start_quickstart("quickstart-no-model", &env).await;
    let off = proc.wait_line("the cache-off line", |l| l.contains("semantic cache: off")).await;
    let turn_on = format!("Turn it on: unset AIGW_EMBEDDING_MODEL_DIR && {}", aigw::embed::INSTALL_COMMAND);
    assert!(off.contains(&turn_on), "{off}");
    assert!(off.contains(&format!("AIGW_EMBEDDING_MODEL_DIR {}: no model.safetensors", no_model.display())), "{off}");

    // The same question twice: with the cache on the second would be a hit.
    for _ in 0..2 {
        let response = client()
            .post(format!("{url}/v1/chat/completions"))
            .header("api-key", "demo-key")
            .json(&chat_body("What is the capital of France?", false))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert_eq!(headers["x-llm-cache-status"], "bypass");
        assert!(headers.contains_key("x-ratelimit-remaining-tokens"), "the token limit counts: {headers:?}");
        let request_id = headers["x-request-id"].to_str().expect("ascii").to_owned();
        let logged = proc.request_log(&request_id).await;
        assert_eq!(logged["cache"], "bypass");
        assert_eq!(logged["cache_reason"], "semantic cache switched off: no embeddings model");
    }
    wait_for_demo_team_requests(&url, &admin_key, 2).await;
    let metrics = client().get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.lines().any(|l| l.starts_with("aigw_llm_total_tokens_total{")
            && l.contains("cache=\"bypass\"")
            && l.contains("team=\"demo-team\"")),
        "{metrics}"
    );
    proc.signal("TERM");
    assert_eq!(proc.wait_exit(Duration::from_secs(15)).await.code(), Some(0));
    let said = proc.lines().iter().filter(|l| l.contains("semantic cache: off")).count();
    assert_eq!(said, 1, "one line about the cache: {:?}", proc.lines());
}

/// `aigw serve` with the same configuration refuses to start without the model: a production
/// configuration must not silently lose its cache.
#[tokio::test]
async fn serve_without_the_model_refuses_to_start() {
    let no_model = fresh_dir("no-model");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/quickstart.toml");
    let output = Command::new(aigw_bin())
        .current_dir(fresh_dir("serve-no-model"))
        .args(["serve", "--config", config, "--listen", "127.0.0.1:0"])
        .env("AIGW_EMBEDDING_MODEL_DIR", &no_model)
        .env("AIGW_DEMO_KEY", "demo-key")
        .env("AIGW_ADMIN_KEY", "admin-key")
        .output()
        .expect("run aigw");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("the local embeddings model (all-MiniLM-L6-v2) was not found"), "{stdout}");
    assert!(stdout.contains(aigw::embed::INSTALL_COMMAND), "says how to install it: {stdout}");
    assert!(!stdout.contains("aigw listening"), "{stdout}");
}
