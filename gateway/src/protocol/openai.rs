//! The parts of the OpenAI protocol the gateway itself reads: request validation, the body the
//! backend gets, and token usage in responses.
//!
//! Requests are checked field by field so a bad one gets a 400 naming the field (`param`), exactly
//! where OpenAI would, instead of a backend error or a 5xx. Fields the gateway does not read pass
//! through untouched; the original bytes are forwarded unless the body has to change.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::GatewayError;

/// A validated chat completions request.
#[derive(Debug)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage` itself.
    pub client_wants_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    pub body: Map<String, Value>,
}

/// A validated embeddings request.
#[derive(Debug)]
pub struct EmbeddingsRequest {
    pub model: Option<String>,
    pub body: Map<String, Value>,
}

fn object(raw: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(GatewayError::invalid("The request body must be a JSON object.", None)),
        Err(e) => Err(GatewayError::invalid(format!("We could not parse the JSON body of your request: {e}."), None)),
    }
}

fn wrong_type(field: &'static str, expected: &str) -> GatewayError {
    GatewayError::invalid(format!("Invalid type for '{field}': expected {expected}."), Some(field))
}

fn optional_string(body: &Map<String, Value>, field: &'static str) -> Result<Option<String>, GatewayError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(wrong_type(field, "a string")),
    }
}

fn optional_bool(body: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, GatewayError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(wrong_type(field, "a boolean")),
    }
}

fn optional_count(body: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, GatewayError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| wrong_type(field, "a non-negative integer")),
    }
}

/// `model` is required unless the route names a deployment.
fn model(body: &Map<String, Value>, deployment: Option<&str>) -> Result<Option<String>, GatewayError> {
    let model = optional_string(body, "model")?;
    if model.is_none() && deployment.is_none() {
        return Err(GatewayError::invalid("You must provide a model parameter.", Some("model")));
    }
    // The model names metrics, ledger rows and cache partitions, and some backends echo it in a
    // header: a name of kilobytes, or one with control characters, is refused here.
    if let Some(name) = &model
        && (name.len() > backend_url::MAX_NAME_LEN || name.chars().any(char::is_control))
    {
        return Err(GatewayError::invalid(
            format!(
                "Invalid 'model': expected a model name of at most {} characters, without control characters.",
                backend_url::MAX_NAME_LEN
            ),
            Some("model"),
        ));
    }
    Ok(model)
}

impl ChatRequest {
    pub fn parse(raw: &[u8], deployment: Option<&str>) -> Result<Self, GatewayError> {
        let body = object(raw)?;
        let model = model(&body, deployment)?;
        let messages = match body.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => messages,
            Some(Value::Array(_)) => {
                return Err(GatewayError::invalid("'messages' must contain at least one message.", Some("messages")));
            }
            None => return Err(GatewayError::invalid("Missing required parameter: 'messages'.", Some("messages"))),
            Some(_) => return Err(wrong_type("messages", "an array")),
        };
        for (i, message) in messages.iter().enumerate() {
            let role = message.get("role").and_then(Value::as_str);
            if role.is_none() {
                return Err(GatewayError::invalid(
                    format!("Invalid value for 'messages[{i}]': each message must be an object with a string 'role'."),
                    Some("messages"),
                ));
            }
            match message.get("content") {
                None | Some(Value::Null | Value::String(_) | Value::Array(_)) => {}
                Some(_) => {
                    return Err(GatewayError::invalid(
                        format!(
                            "Invalid type for 'messages[{i}].content': expected a string or an array of content parts."
                        ),
                        Some("messages"),
                    ));
                }
            }
        }
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let client_wants_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => match options.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(wrong_type("stream_options", "an object with a boolean 'include_usage'")),
            },
            Some(_) => return Err(wrong_type("stream_options", "an object")),
        };
        let max_tokens = match optional_count(&body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => optional_count(&body, "max_tokens")?,
        };
        if !matches!(body.get("tools"), None | Some(Value::Null | Value::Array(_))) {
            return Err(wrong_type("tools", "an array"));
        }
        Ok(Self { model, stream, client_wants_usage, max_tokens, body })
    }

    /// The body the backend gets. Streams always ask for usage, so the gateway can account for them
    /// even when the client did not ask; a backend that needs a model gets the deployment name.
    pub fn backend_body(&self, raw: &Bytes, model_to_add: Option<&str>) -> Bytes {
        let add_usage = self.stream && !self.client_wants_usage;
        let add_model = model_to_add.filter(|_| self.model.is_none());
        if !add_usage && add_model.is_none() {
            return raw.clone();
        }
        reserialize(&self.body, raw, |body| {
            if add_usage {
                let options = body.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
                if !options.is_object() {
                    *options = Value::Object(Map::new());
                }
                if let Some(options) = options.as_object_mut() {
                    options.insert("include_usage".to_owned(), Value::Bool(true));
                }
            }
            if let Some(model) = add_model {
                body.insert("model".to_owned(), Value::String(model.to_owned()));
            }
        })
    }
}

impl EmbeddingsRequest {
    pub fn parse(raw: &[u8], deployment: Option<&str>) -> Result<Self, GatewayError> {
        let body = object(raw)?;
        let model = model(&body, deployment)?;
        let valid_input = match body.get("input") {
            Some(Value::String(_)) => true,
            Some(Value::Array(items)) if !items.is_empty() => {
                let all = |f: fn(&Value) -> bool| items.iter().all(f);
                all(Value::is_string)
                    || all(Value::is_u64)
                    || all(|item| {
                        item.as_array().is_some_and(|tokens| !tokens.is_empty() && tokens.iter().all(Value::is_u64))
                    })
            }
            None => return Err(GatewayError::invalid("Missing required parameter: 'input'.", Some("input"))),
            Some(_) => false,
        };
        if !valid_input {
            return Err(GatewayError::invalid(
                "'input' must be a string, an array of strings, or an array of token arrays (non-empty).",
                Some("input"),
            ));
        }
        optional_string(&body, "encoding_format")?;
        optional_count(&body, "dimensions")?;
        Ok(Self { model, body })
    }

    pub fn backend_body(&self, raw: &Bytes, model_to_add: Option<&str>) -> Bytes {
        match model_to_add.filter(|_| self.model.is_none()) {
            None => raw.clone(),
            Some(model) => reserialize(&self.body, raw, |body| {
                body.insert("model".to_owned(), Value::String(model.to_owned()));
            }),
        }
    }
}

/// The body with `edit` applied; only called when something changes, since it re-serialises.
fn reserialize(body: &Map<String, Value>, raw: &Bytes, edit: impl FnOnce(&mut Map<String, Value>)) -> Bytes {
    let mut body = body.clone();
    edit(&mut body);
    Bytes::from(serde_json::to_vec(&body).unwrap_or_else(|_| raw.to_vec()))
}

/// Token usage of one call, as the gateway accounts for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(wire: WireUsage) -> Self {
        Self {
            prompt_tokens: wire.prompt_tokens,
            completion_tokens: wire.completion_tokens,
            total_tokens: wire.total_tokens.max(wire.prompt_tokens + wire.completion_tokens),
            cached_tokens: wire.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
        }
    }
}

/// The `usage` of a JSON response (chat completion or embeddings), if it has one.
pub fn usage_of_response(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Envelope {
        usage: Option<WireUsage>,
    }
    serde_json::from_slice::<Envelope>(body).ok()?.usage.map(Usage::from)
}

/// What one streamed chunk says about usage.
pub struct ChunkUsage {
    pub usage: Usage,
    /// The chunk carries nothing but usage (`"choices": []`): the one a client that did not ask
    /// for usage must not see.
    pub usage_only: bool,
}

/// Reads the usage of one SSE `data:` payload; `None` for chunks without usage (the common case).
pub fn usage_of_chunk(data: &[u8]) -> Option<ChunkUsage> {
    // Nearly every chunk lacks usage or has `"usage":null`; only parse the ones that may have one.
    memchr::memmem::find(data, b"\"usage\"")?;
    #[derive(Deserialize)]
    struct Chunk {
        usage: Option<WireUsage>,
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    let chunk: Chunk = serde_json::from_slice(data).ok()?;
    let usage = chunk.usage?;
    Some(ChunkUsage { usage: usage.into(), usage_only: chunk.choices.is_none_or(|c| c.is_empty()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(raw: &str) -> (String, Option<&'static str>) {
        match ChatRequest::parse(raw.as_bytes(), None) {
            Err(GatewayError::InvalidRequest { message, param }) => (
                message,
                param.map(|p| match p {
                    std::borrow::Cow::Borrowed(p) => p,
                    std::borrow::Cow::Owned(p) => panic!("validation names fields statically, not {p:?}"),
                }),
            ),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn chat_validation_names_the_field() {
        assert_eq!(bad("{nope").1, None);
        assert_eq!(bad("[1]").1, None);
        assert_eq!(bad(r#"{"messages":[{"role":"user","content":"x"}]}"#).1, Some("model"));
        assert_eq!(bad(r#"{"model":"m"}"#).1, Some("messages"));
        assert_eq!(bad(r#"{"model":"m","messages":"hi"}"#).1, Some("messages"));
        assert_eq!(bad(r#"{"model":"m","messages":[{"content":"x"}]}"#).1, Some("messages"));
        assert_eq!(bad(r#"{"model":7,"messages":[{"role":"user"}]}"#).1, Some("model"));
        let long_model = format!(r#"{{"model":"{}","messages":[{{"role":"user"}}]}}"#, "m".repeat(257));
        assert_eq!(bad(&long_model).1, Some("model"));
        assert_eq!(bad(r#"{"model":"a\nb","messages":[{"role":"user"}]}"#).1, Some("model"));
        assert_eq!(bad(r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#).1, Some("stream"));
        assert_eq!(bad(r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":-1}"#).1, Some("max_tokens"));
        assert_eq!(bad(r#"{"model":"m","messages":[{"role":"user"}],"tools":{}}"#).1, Some("tools"));
    }

    #[test]
    fn streams_ask_the_backend_for_usage() {
        let raw = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#);
        let chat = ChatRequest::parse(&raw, None).expect("valid");
        assert!(chat.stream && !chat.client_wants_usage);
        let sent: Value = serde_json::from_slice(&chat.backend_body(&raw, None)).expect("json");
        assert_eq!(sent["stream_options"]["include_usage"], true);

        let raw = Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true},"stream":true}"#,
        );
        let chat = ChatRequest::parse(&raw, Some("dep")).expect("valid on a deployment route");
        assert!(chat.client_wants_usage);
        let sent: Value = serde_json::from_slice(&chat.backend_body(&raw, Some("dep"))).expect("json");
        assert_eq!(sent["model"], "dep");
        let untouched = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let chat = ChatRequest::parse(&untouched, None).expect("valid");
        assert_eq!(chat.backend_body(&untouched, Some("dep")), untouched);
    }

    #[test]
    fn embeddings_validation() {
        let ok = |raw: &str| EmbeddingsRequest::parse(raw.as_bytes(), None).is_ok();
        assert!(ok(r#"{"model":"e","input":"hi"}"#));
        assert!(ok(r#"{"model":"e","input":["a","b"]}"#));
        assert!(ok(r#"{"model":"e","input":[[1,2],[3]]}"#));
        assert!(!ok(r#"{"model":"e","input":[]}"#));
        assert!(!ok(r#"{"model":"e","input":[1,"a"]}"#));
        assert!(!ok(r#"{"model":"e"}"#));
        assert!(!ok(r#"{"model":"e","input":"x","dimensions":"big"}"#));
    }

    #[test]
    fn reads_usage_from_responses_and_chunks() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        assert_eq!(
            usage_of_response(body),
            Some(Usage { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18, cached_tokens: 4 })
        );
        let embeddings = br#"{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(usage_of_response(embeddings).map(|u| u.total_tokens), Some(5));
        assert!(usage_of_chunk(br#"{"choices":[{"delta":{"content":"hi"}}]}"#).is_none());
        assert!(usage_of_chunk(br#"{"choices":[{"delta":{}}],"usage":null}"#).is_none());
        let last =
            usage_of_chunk(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#)
                .expect("usage");
        assert!(last.usage_only);
        assert_eq!(last.usage.total_tokens, 5);
    }
}
