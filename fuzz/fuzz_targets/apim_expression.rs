//! The expression compiler and evaluator on arbitrary text, as `@(...)` or `@{...}`: errors are
//! fine, panics, hangs and stack overflows are not.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use apim_policy::{JsonToken, Position, RequestSnapshot, Value, compile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let src = match mode % 3 {
        0 => format!("@({text})"),
        1 => format!("@{{{text}}}"),
        _ => text.to_owned(),
    };
    let Ok(program) = compile(&src, Position::START) else { return };
    // The same request with two different keys gives the same result: no expression reads a key.
    // Compared as text, because NaN is not equal to itself.
    let with_key_a = format!("{:?}", program.evaluate(&request(mode, "key-a")));
    let with_key_b = format!("{:?}", program.evaluate(&request(mode, "key-b")));
    assert_eq!(with_key_a, with_key_b, "an expression read a key header or parameter: {src}");
});

fn request(mode: u8, key: &str) -> RequestSnapshot {
    RequestSnapshot {
        subscription: (mode & 4 == 0).then(|| ("sub".to_string(), "name".to_string())),
        headers: vec![
            ("x".into(), "1,2".into()),
            ("api-key".into(), key.into()),
            ("Authorization".into(), key.into()),
            ("Ocp-Apim-Subscription-Key".into(), key.into()),
            ("x-api-key".into(), key.into()),
            ("Cookie".into(), key.into()),
        ],
        query: vec![("q".into(), "v".into()), ("subscription-key".into(), key.into())],
        variables: HashMap::from([
            ("s".to_string(), Value::Str("text".into())),
            ("n".to_string(), Value::Int(-3)),
            (
                "j".to_string(),
                Value::Json(JsonToken::new(Arc::new(serde_json::json!({"a": [1, "b", null], "c": {"d": true}})))),
            ),
        ]),
        response_status: (mode & 8 == 0).then_some(429),
        body: Some(Arc::new(serde_json::json!({"messages": [{"content": "hi"}], "n": 1.5}))),
        ..RequestSnapshot::default()
    }
}
