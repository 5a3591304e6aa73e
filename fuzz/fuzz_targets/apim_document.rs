//! The policy document reader on arbitrary text, then every expression it finds compiled and
//! evaluated: errors are fine, panics and hangs are not.
#![no_main]

use std::collections::HashMap;

use apim_policy::document::FragmentLoader;
use apim_policy::{Document, RequestSnapshot, Sources, compile_value};
use libfuzzer_sys::fuzz_target;

/// `loop` includes itself, `inner` includes `loop`; anything else is missing.
struct Fragments;

impl FragmentLoader for Fragments {
    fn load(&self, fragment_id: &str) -> Result<String, String> {
        match fragment_id {
            "loop" => Ok(r#"<fragment><include-fragment fragment-id="loop" /></fragment>"#.into()),
            "inner" => Ok(r#"<fragment><set-header name="x"><value>@("a")</value></set-header></fragment>"#.into()),
            other => Err(format!("no fragment `{other}`")),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let named_values = HashMap::from([("name".to_string(), "@(context.Api.Id)".to_string())]);
    let placeholders = HashMap::from([("backend-id".to_string(), "b".to_string())]);
    let sources = Sources { named_values: &named_values, placeholders: &placeholders, fragments: &Fragments };
    let Ok(document) = Document::read(src, &sources) else { return };
    let context = RequestSnapshot::default();
    for (_, value, position) in document.root.values() {
        if let Ok(Some(program)) = compile_value(value, position) {
            let _ = program.evaluate(&context);
        }
    }
});
