//! `aigw cache-eval` on the repository's labelled pairs: the regression gate for the semantic
//! cache's hit decision (issue 4's targets), and its handling of bad input.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{Sim, aigw_bin, write_config};
use serde_json::Value;

/// A configuration with one semantic-cache-lookup policy on its defaults (threshold 0.85, guard
/// on, the local model): the settings the quickstart ships.
const LOOKUP_CONFIG: &str = r#"
[backends.sim]
url = "http://127.0.0.1:9/v1"
kind = "openai"

[apis.chat]
kind = "openai"
backend = "sim"
subscription-required = false
inbound = [{ policy = "semantic-cache-lookup" }]
"#;

fn pairs_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../loadtest/cache-eval.jsonl")
}

fn cache_eval(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(aigw_bin()).arg("cache-eval").args(args).output().expect("run aigw cache-eval")
}

fn figure(report: &Value, path: &[&str]) -> f64 {
    let mut value = report;
    for key in path {
        value = &value[*key];
    }
    value.as_f64().unwrap_or_else(|| panic!("{} is not a number in {report}", path.join(".")))
}

#[test]
fn the_guard_meets_the_targets_on_the_labelled_pairs() {
    let config = write_config(LOOKUP_CONFIG);
    let output = cache_eval(&[
        "--pairs".as_ref(),
        pairs_file().as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
        "--json".as_ref(),
    ]);
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cache-eval failed: {stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("--json prints one JSON object");

    assert_eq!(figure(&report, &["threshold"]), 0.85);
    assert!(figure(&report, &["pairs"]) >= 400.0, "the labelled set shrank: {report}");
    let false_hits = figure(&report, &["with_guard", "false_hit_rate"]);
    let retained = figure(&report, &["retained"]);
    assert!(
        false_hits < 0.02,
        "with the guard, {:.1}% of look-alike pairs are served a wrong answer (target < 2%)",
        false_hits * 100.0
    );
    assert!(
        retained >= 0.85,
        "the guard keeps only {:.1}% of the paraphrases cosine similarity serves (target >= 85%)",
        retained * 100.0
    );
    // The look-alikes are close enough to fool cosine similarity alone; otherwise they test nothing.
    let unguarded = figure(&report, &["without_guard", "false_hit_rate"]);
    assert!(unguarded > 0.5, "only {:.1}% of look-alike pairs pass the threshold without the guard", unguarded * 100.0);
    for split in ["dev", "holdout"] {
        assert!(report["splits"][split]["with_guard"]["false_hit_rate"].is_number(), "no {split} figures in {report}");
    }
    assert!(report["kinds"]["negation"]["without_guard"]["recall"].is_null(), "negation pairs are all look-alikes");
}

/// The embeddings backend path decides like the local model: llm-sim serves the same model's vectors.
#[tokio::test]
async fn a_backend_embeddings_source_decides_like_the_local_model() {
    let model_dir = aigw::embed::LocalModel::locate(None).unwrap_or_else(|e| panic!("{e}"));
    let model_dir = model_dir.to_str().expect("utf-8 model path");
    let sim = Sim::start(&["--embedding-model", model_dir]).await;
    sim.proc.wait_line("llm-sim's embeddings line", |l| l.starts_with("embeddings: ")).await;
    let pairs = write_config(concat!(
        r#"{"a": "How do I enable two-factor authentication?", "b": "How do I disable two-factor authentication?", "label": "different"}"#,
        "\n",
        r#"{"a": "In Python, how do I reverse a string?", "b": "How do I reverse a string in Python?", "label": "same"}"#,
        "\n",
        r#"{"a": "Convert Celsius to Fahrenheit", "b": "Convert Fahrenheit to Celsius", "label": "different"}"#,
        "\n",
        r#"{"a": "Hi! How do I exit vim? Thanks", "b": "How do I exit vim?", "label": "same"}"#,
        "\n",
    ));
    let local = write_config(LOOKUP_CONFIG);
    let backend = write_config(&LOOKUP_CONFIG.replace("http://127.0.0.1:9/v1", &format!("{}/v1", sim.url)).replace(
        "{ policy = \"semantic-cache-lookup\" }",
        "{ policy = \"semantic-cache-lookup\", embeddings = { source = \"backend\", backend-id = \"sim\", model = \"text-embedding-3-small\" } }",
    ));
    let run = |config: &PathBuf| {
        let output = cache_eval(&[
            "--pairs".as_ref(),
            pairs.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
            "--json".as_ref(),
        ]);
        assert!(output.status.success(), "cache-eval failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).expect("--json prints one JSON object")
    };
    let (from_local, from_backend) = (run(&local), run(&backend));
    for file in [&pairs, &local, &backend] {
        let _ = std::fs::remove_file(file);
    }
    for rule in ["with_guard", "without_guard"] {
        assert_eq!(from_backend[rule], from_local[rule], "{rule} differs between the sources");
    }
    assert_eq!(figure(&from_backend, &["without_guard", "false_hits"]), 2.0, "{from_backend}");
    assert_eq!(figure(&from_backend, &["with_guard", "false_hits"]), 0.0, "{from_backend}");
    assert_eq!(figure(&from_backend, &["with_guard", "true_hits"]), 2.0, "{from_backend}");
}

#[test]
fn a_bad_line_is_named_and_exits_2() {
    let cases = [
        (
            "{\"a\": \"x\", \"b\": \"y\", \"label\": \"same\"}\n{\"a\": \"x\", \"b\": \"y\"}\n",
            "line 2: missing \"label\"",
        ),
        (
            "\n\n{\"a\": \"x\", \"b\": \"y\", \"label\": \"maybe\"}\n",
            "line 3: \"label\" must be \"same\" or \"different\"",
        ),
        ("{\"a\": \"x\", \"label\": \"same\", \"extra\": 1}\n", "line 1: missing \"b\""),
        ("{\"a\": \"x\", \"b\": 7, \"label\": \"same\"}\n", "line 1: \"b\" must be a string"),
        ("{\"a\": \"x\", \"b\": \"y\", \"label\": \"same\"}\nnot json\n", "line 2: not JSON"),
        ("", "no pairs"),
    ];
    for (pairs, expected) in cases {
        let path = write_config(pairs);
        let output = cache_eval(&["--pairs".as_ref(), path.as_os_str()]);
        let _ = std::fs::remove_file(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "for {pairs:?}: {stderr}");
        assert!(stderr.contains(expected), "for {pairs:?}, expected {expected:?} in: {stderr}");
        assert!(output.stdout.is_empty(), "nothing on stdout for bad input");
    }
}

#[test]
fn a_configuration_without_a_lookup_policy_is_named_and_exits_2() {
    let config = write_config(&LOOKUP_CONFIG.replace("inbound = [{ policy = \"semantic-cache-lookup\" }]", ""));
    let output = cache_eval(&["--pairs".as_ref(), pairs_file().as_os_str(), "--config".as_ref(), config.as_os_str()]);
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("no semantic-cache-lookup policy in {}", config.display())), "{stderr}");
}
