//! The expression compiler and evaluator on arbitrary text, as `@(...)` or `@{...}`: errors are
//! fine, panics, hangs and stack overflows are not.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use apim_policy::{Position, RequestSnapshot, Value, compile};
use libfuzzer_sys::fuzz_target;

/// Never compared with anything, so the fuzzer cannot learn it from comparisons.
const KEY: &str = "k-7f3a9c1e55d04b2a";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let src = match mode % 3 {
        0 => format!("@({text})"),
        1 => format!("@{{{text}}}"),
        _ => text.to_owned(),
    };
    let Ok(program) = compile(&src, Position::START) else { return };
    let context = RequestSnapshot {
        subscription: (mode & 4 == 0).then(|| ("sub".to_string(), "name".to_string())),
        headers: vec![("x".into(), "1,2".into()), ("api-key".into(), KEY.into()), ("Authorization".into(), KEY.into())],
        query: vec![("q".into(), "v".into())],
        variables: HashMap::from([
            ("s".to_string(), Value::Str("text".into())),
            ("n".to_string(), Value::Int(-3)),
            ("j".to_string(), Value::Json(Arc::new(serde_json::json!({"a": [1, "b", null], "c": {"d": true}})))),
        ]),
        response_status: (mode & 8 == 0).then_some(429),
        body: Some(Arc::new(serde_json::json!({"messages": [{"content": "hi"}], "n": 1.5}))),
        ..RequestSnapshot::default()
    };
    if let Ok(value) = program.evaluate(&context) {
        // Reading a key header must never give its value back.
        assert!(!value.to_string().contains(KEY), "an expression read the api-key header: {src}");
    }
});
