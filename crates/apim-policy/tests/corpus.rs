//! Every policy file under policies/apim/ (public API Management AI-gateway samples and the
//! reference sample) is read and every expression in it compiled and evaluated: each file loads,
//! or is refused with a message that names the construct, line and column. None panics.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use apim_policy::document::NoFragments;
use apim_policy::{Document, RequestSnapshot, Sources, Value, compile_value};

/// The named values the corpus refers to; a file that needs another one is refused naming it.
const NAMED_VALUES: &[(&str, &str)] = &[
    ("openai-lb-config", r#"[{"name":"backend-1","priority":1,"weight":1}]"#),
    ("entraid-tenant", "00000000-0000-0000-0000-000000000000"),
    ("backend-url-1", "http://127.0.0.1:1/"),
    ("backend-url-2", "http://127.0.0.1:2/"),
    ("alternate-host", "http://127.0.0.1:3/"),
    ("alternate-path-and-query", "/alternate"),
];

/// The deployment templates' placeholders, as the samples' notebooks fill them in.
const PLACEHOLDERS: &[(&str, &str)] =
    &[("backend-id", "openai-backend-pool"), ("retry-count", "2"), ("tpm", "1000"), ("tenant-id", "tenant")];

/// What each file gives: `None` when it reads and every expression compiles, else a fragment of
/// the first refusal (the message names the construct; the line and column are checked apart).
const EXPECTED: &[(&str, Option<&str>)] = &[
    ("ai-gateway--access-controlling--policy.xml", None),
    (
        "ai-gateway--advanced-load-balancing--policy.xml",
        Some(r#"line 22, column 40: `JArray` is not supported in policy"#),
    ),
    ("ai-gateway--ai-foundry-model-gateway--policy.xml", None),
    ("ai-gateway--backend-circuit-breaking--policy.xml", None),
    ("ai-gateway--backend-pool-load-balancing--policy.xml", None),
    ("ai-gateway--built-in-logging--policy.xml", None),
    ("ai-gateway--content-filtering--contentsafety-policy.xml", None),
    (
        "ai-gateway--content-filtering--prompt-shield-policy.xml",
        Some(r#"line 3, column 79: policy expressions cannot read the `api-key` header"#),
    ),
    ("ai-gateway--content-safety--policy.xml", None),
    ("ai-gateway--finops-framework--policy.xml", Some(r#"line 9, column 56: `context.Product` is not supported in"#)),
    ("ai-gateway--image-generation--policy.xml", None),
    ("ai-gateway--model-routing--policy.xml", Some(r#"line 6, column 66: `context.Request.MatchedParameters` is"#)),
    ("ai-gateway--realtime-audio--policy.xml", None),
    ("ai-gateway--response-streaming--policy.xml", Some(r#"line 11, column 141: `.Type` is not supported in policy"#)),
    (
        "ai-gateway--secure-responses-api--secure-policy.xml",
        Some(r#"line 26, column 33: `context.Request.MatchedParameters` is"#),
    ),
    ("ai-gateway--self-hosted-ollama--policy.xml", None),
    ("ai-gateway--semantic-caching--policy.xml", None),
    (
        "ai-gateway--session-awareness--policy.xml",
        Some(r#"line 10, column 30: `context.RequestId` is not supported in"#),
    ),
    ("ai-gateway--token-metrics-emitting--policy.xml", None),
    ("ai-gateway--token-rate-limiting--policy.xml", None),
    ("ai-gateway--zero-to-production--policy-1.xml", None),
    ("ai-gateway--zero-to-production--policy-2.xml", None),
    ("ai-gateway--zero-to-production--policy-3.xml", None),
    ("ai-gateway--zero-to-production--policy-4.xml", None),
    ("genai-gateway-apim--apim-api-policy.xml", None),
    ("policy-snippets--random-load-balancer.xml", Some(r#"line 6, column 45: `new` (creating objects) is not"#)),
    ("policy-snippets--route-by-size.xml", Some(r#"line 12, column 69: indexing context.Request.Headers is not"#)),
    ("policy-snippets--route-to-regional-backend.xml", None),
    ("policy-snippets--send-request-context.xml", Some(r#"line 10, column 26: `context.Product` is not supported in"#)),
    ("reference-aoai-policy.xml", None),
];

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Every refusal in `src`, as `line L, column C: message`: a read error, or each expression that
/// does not compile.
fn refusals(src: &str) -> Vec<String> {
    let (named_values, placeholders) = (map(NAMED_VALUES), map(PLACEHOLDERS));
    let sources = Sources { named_values: &named_values, placeholders: &placeholders, fragments: &NoFragments };
    let document = match Document::read(src, &sources) {
        Ok(d) => d,
        Err(e) => return vec![e.to_string()],
    };
    let mut refusals = Vec::new();
    for (element, value, position) in document.root.values() {
        match compile_value(value, position) {
            Ok(None) => {}
            Ok(Some(program)) => {
                // Evaluation may fail (a variable another element sets is missing here); it must not panic.
                let _ = program.evaluate(&snapshot());
            }
            Err(e) => refusals.push(format!("{e} (in <{}>)", element.name)),
        }
    }
    refusals
}

fn snapshot() -> RequestSnapshot {
    RequestSnapshot {
        subscription: Some(("sub-1".into(), "Subscription one".into())),
        api: ("openai".into(), "Azure OpenAI".into()),
        operation: ("chat".into(), "Chat completions".into()),
        client_ip: "127.0.0.1".into(),
        headers: vec![("x-user-id".into(), "u1".into())],
        query: vec![("api-version".into(), "2024-10-21".into())],
        variables: HashMap::from([("managed-id-access-token".to_string(), Value::Str("token".into()))]),
        response_status: Some(200),
        region: "West Europe".into(),
        body: Some(Arc::new(
            serde_json::json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )),
    }
}

#[test]
fn every_corpus_file_loads_or_is_refused_clearly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/apim");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("policies/apim exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    assert!(files.len() >= 13, "the corpus has a dozen public files and the reference sample");
    let mut report = String::new();
    let mut mismatches = Vec::new();
    for path in &files {
        let name = path.file_name().and_then(|n| n.to_str()).expect("file name");
        let src = std::fs::read_to_string(path).expect("readable policy file");
        let all = refusals(&src);
        let listed = if all.is_empty() { "loads".to_string() } else { all.join("<br>") };
        report.push_str(&format!("| {name} | {listed} |\n"));
        let outcome = all.into_iter().next();
        if let Some(refusal) = &outcome {
            assert!(
                refusal.starts_with("line ") && refusal.contains(", column "),
                "{name}: no line and column in `{refusal}`"
            );
        }
        let expected = EXPECTED.iter().find(|(n, _)| *n == name).map(|(_, e)| *e);
        let matches = match (&outcome, expected) {
            (None, Some(None)) => true,
            (Some(refusal), Some(Some(fragment))) => refusal.contains(fragment),
            _ => false,
        };
        if !matches {
            mismatches.push(format!("{name}: expected {expected:?}, got {outcome:?}"));
        }
    }
    println!("{report}");
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// The reference sample's expressions give what its gateway needs, per request.
#[test]
fn the_reference_policy_evaluates_per_request() {
    let src = include_str!("../../../policies/apim/reference-aoai-policy.xml");
    let empty = HashMap::new();
    let sources = Sources { named_values: &empty, placeholders: &empty, fragments: &NoFragments };
    let document = Document::read(src, &sources).expect("the reference policy reads");
    let compiled: Vec<(String, apim_policy::Program)> = document
        .root
        .values()
        .into_iter()
        .filter_map(|(element, value, position)| {
            let program = compile_value(value, position).expect("every reference expression compiles")?;
            Some((element.name.clone(), program))
        })
        .collect();
    let evaluate_all = |request: &RequestSnapshot| -> Vec<(String, String)> {
        compiled
            .iter()
            .map(|(element, p)| (element.clone(), p.evaluate(request).expect("evaluates").to_string()))
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter().map(|(e, v)| (e.to_string(), v.to_string())).collect()
    };
    let mut request = snapshot();
    request.variables.insert("aoai-token".into(), Value::Str("eyJ0eXAi".into()));
    assert_eq!(
        evaluate_all(&request),
        pairs(&[
            ("value", "Bearer eyJ0eXAi"),
            ("azure-openai-token-limit", "sub-1"),
            ("vary-by", "sub-1"),
            ("dimension", "sub-1"),
            ("dimension", "openai"),
            ("dimension", "chat"),
            ("dimension", "127.0.0.1"),
        ])
    );
    request.subscription = None;
    let anonymous = evaluate_all(&request);
    assert_eq!(anonymous[1], ("azure-openai-token-limit".to_string(), "anonymous".to_string()));
    assert_eq!(anonymous[2], ("vary-by".to_string(), "anonymous".to_string()));
}
