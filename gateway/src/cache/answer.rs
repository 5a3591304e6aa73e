//! Cached answers: what the cache keeps and how a hit is served.
//!
//! The cache keeps one form of an answer, the chat completion JSON, whether the backend answered
//! with JSON or with a stream: a stream is assembled into the completion it amounts to (content
//! and tool-call deltas joined per choice, the finish reason, the usage). A hit is served in the
//! form the client asked for: the JSON as stored, or replayed as a well-formed event stream
//! (a role chunk, content chunks, tool calls, the finish reason, usage if the client asked for
//! it, and `[DONE]`), so a streamed request hits entries stored from plain ones and vice versa.

use std::fmt::Write as _;

use bytes::Bytes;
use serde_json::{Map, Value, json};

/// Words per replayed content chunk: small enough to look like a live stream to a UI, large
/// enough that a long answer is not thousands of events.
const WORDS_PER_CHUNK: usize = 4;

/// Most choices a stream may carry: OpenAI's `n` is at most 128. The choice list is sized from the
/// backend's `index`, so a larger one (4000000000 from a broken or hostile backend) would make the
/// gateway allocate without bound.
pub const MAX_CHOICES: usize = 128;
/// Most tool calls one choice may make, for the same reason: a request names at most 128 tools and
/// a model calls one several times in parallel at most; 1024 leaves room for that.
pub const MAX_TOOL_CALLS: usize = 1024;
/// Most chunk data an answer is assembled from. Far more than any completion a model writes
/// (128k tokens are about 512 KiB of text, a few MiB as chunks); beyond it the answer is not
/// assembled (so not cached) while the stream itself goes on.
const MAX_ASSEMBLED_BYTES: usize = 16 * 1024 * 1024;

/// Whether a completion is worth caching: every choice ended on its own (`stop`, or asking for
/// tools). A `length` cut-off or a content filter depends on more than the prompt.
pub fn is_cacheable(completion: &Value) -> bool {
    let Some(choices) = completion.get("choices").and_then(Value::as_array) else { return false };
    !choices.is_empty()
        && choices
            .iter()
            .all(|choice| matches!(choice.get("finish_reason").and_then(Value::as_str), Some("stop" | "tool_calls")))
}

/// Joins a stream's chunks into the chat completion they amount to.
#[derive(Default)]
pub struct StreamAssembler {
    head: Map<String, Value>,
    choices: Vec<ChoiceParts>,
    usage: Option<Value>,
    /// A chunk that was not a JSON object, or more text than [`MAX_ASSEMBLED_BYTES`]: the stream
    /// is not one we can reproduce.
    unreadable: bool,
    /// Chunk data taken so far, towards [`MAX_ASSEMBLED_BYTES`].
    held_bytes: usize,
}

#[derive(Default)]
struct ChoiceParts {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCallParts>,
    finish_reason: Option<Value>,
}

#[derive(Default)]
struct ToolCallParts {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

fn append(target: &mut Option<String>, piece: Option<&str>) {
    if let Some(piece) = piece {
        target.get_or_insert_with(String::new).push_str(piece);
    }
}

impl StreamAssembler {
    /// Takes the payload of one `data:` line (not `[DONE]`). An error says which bound a chunk
    /// broke (a choice or tool-call index beyond [`MAX_CHOICES`] or [`MAX_TOOL_CALLS`]): the
    /// stream is not one an OpenAI-compatible backend sends, and must not be relayed further.
    pub fn push(&mut self, data: &[u8]) -> Result<(), &'static str> {
        if self.unreadable {
            return Ok(());
        }
        self.held_bytes += data.len();
        if self.held_bytes > MAX_ASSEMBLED_BYTES {
            *self = Self { unreadable: true, ..Self::default() };
            return Ok(());
        }
        let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else {
            self.unreadable = true;
            return Ok(());
        };
        for field in ["id", "created", "model", "system_fingerprint", "service_tier"] {
            if let Some(value) = chunk.get(field).filter(|v| !v.is_null()) {
                self.head.entry(field).or_insert_with(|| value.clone());
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        for choice in chunk.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let index = usize::try_from(index).ok().filter(|i| *i < MAX_CHOICES).ok_or("a choice index beyond 127")?;
            if index >= self.choices.len() {
                self.choices.resize_with(index + 1, ChoiceParts::default);
            }
            let parts = &mut self.choices[index];
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                parts.finish_reason = Some(reason.clone());
            }
            let Some(delta) = choice.get("delta") else { continue };
            if let Some(role) = delta.get("role").and_then(Value::as_str) {
                parts.role = Some(role.to_owned());
            }
            append(&mut parts.content, delta.get("content").and_then(Value::as_str));
            append(&mut parts.refusal, delta.get("refusal").and_then(Value::as_str));
            for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                let i = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                let i =
                    usize::try_from(i).ok().filter(|i| *i < MAX_TOOL_CALLS).ok_or("a tool-call index beyond 1023")?;
                if i >= parts.tool_calls.len() {
                    parts.tool_calls.resize_with(i + 1, ToolCallParts::default);
                }
                let tool = &mut parts.tool_calls[i];
                if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
                    tool.id = Some(id.clone());
                }
                if let Some(kind) = call.get("type").filter(|v| !v.is_null()) {
                    tool.kind = Some(kind.clone());
                }
                if let Some(function) = call.get("function") {
                    tool.name.push_str(function.get("name").and_then(Value::as_str).unwrap_or(""));
                    tool.arguments.push_str(function.get("arguments").and_then(Value::as_str).unwrap_or(""));
                }
            }
        }
        Ok(())
    }

    /// The assembled completion, or `None` when the chunks do not make a whole one.
    pub fn finish(self) -> Option<Value> {
        if self.unreadable || self.choices.is_empty() {
            return None;
        }
        let mut completion = self.head;
        completion.insert("object".into(), "chat.completion".into());
        let choices = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(index, parts)| {
                let mut message = Map::new();
                message.insert("role".into(), parts.role.unwrap_or_else(|| "assistant".into()).into());
                message.insert("content".into(), parts.content.map_or(Value::Null, Value::from));
                message.insert("refusal".into(), parts.refusal.map_or(Value::Null, Value::from));
                if !parts.tool_calls.is_empty() {
                    let calls = parts.tool_calls.into_iter().map(|call| {
                        json!({
                            "id": call.id.unwrap_or(Value::Null),
                            "type": call.kind.unwrap_or_else(|| "function".into()),
                            "function": {"name": call.name, "arguments": call.arguments},
                        })
                    });
                    message.insert("tool_calls".into(), Value::Array(calls.collect()));
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": parts.finish_reason.unwrap_or(Value::Null),
                })
            })
            .collect();
        completion.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = self.usage {
            completion.insert("usage".into(), usage);
        }
        Some(Value::Object(completion))
    }
}

/// A stored completion replayed as the event stream the backend would have sent.
pub fn replay_as_stream(completion: &Value, include_usage: bool) -> Bytes {
    let mut head = Map::new();
    for field in ["id", "created", "model", "system_fingerprint", "service_tier"] {
        if let Some(value) = completion.get(field) {
            head.insert(field.into(), value.clone());
        }
    }
    head.insert("object".into(), "chat.completion.chunk".into());
    let mut out = String::new();
    let mut event = |choices: Value, usage: Option<&Value>| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), choices);
        if include_usage {
            chunk.insert("usage".into(), usage.cloned().unwrap_or(Value::Null));
        }
        // Serialising a map of JSON values cannot fail.
        let _ = write!(out, "data: {}\n\n", Value::Object(chunk));
    };
    let delta = |index: &Value, delta: Value| json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]);
    for choice in completion.get("choices").and_then(Value::as_array).into_iter().flatten() {
        let index = choice.get("index").cloned().unwrap_or_else(|| 0.into());
        let message = choice.get("message").cloned().unwrap_or_default();
        let role = message.get("role").cloned().unwrap_or_else(|| "assistant".into());
        // As OpenAI streams it: `""` opens a text answer, `null` one that only calls tools.
        let content = message.get("content").and_then(Value::as_str);
        event(delta(&index, json!({"role": role, "content": content.map(|_| "")})), None);
        if let Some(content) = content {
            for piece in word_groups(content, WORDS_PER_CHUNK) {
                event(delta(&index, json!({"content": piece})), None);
            }
        }
        if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
            event(delta(&index, json!({"refusal": refusal})), None);
        }
        for (i, call) in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let function = call.get("function").cloned().unwrap_or_default();
            let start = json!({"tool_calls": [{
                "index": i,
                "id": call.get("id"),
                "type": call.get("type").cloned().unwrap_or_else(|| "function".into()),
                "function": {"name": function.get("name"), "arguments": ""},
            }]});
            event(delta(&index, start), None);
            let arguments = function.get("arguments").cloned().unwrap_or_else(|| "".into());
            event(delta(&index, json!({"tool_calls": [{"index": i, "function": {"arguments": arguments}}]})), None);
        }
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        event(json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}]), None);
    }
    if include_usage {
        event(json!([]), completion.get("usage"));
    }
    out.push_str("data: [DONE]\n\n");
    Bytes::from(out)
}

/// `text` cut after every `words`-th word, keeping all whitespace, so the pieces join back to it.
fn word_groups(text: &str, words: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut seen = 0;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                seen += 1;
                in_word = false;
            }
        } else {
            if !in_word && seen == words {
                pieces.push(&text[start..i]);
                start = i;
                seen = 0;
            }
            in_word = true;
        }
    }
    if start < text.len() || pieces.is_empty() {
        pieces.push(&text[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion() -> Value {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris is the capital of France, on the Seine.", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23},
        })
    }

    fn events(stream: &Bytes) -> Vec<String> {
        let text = std::str::from_utf8(stream).expect("utf-8");
        assert!(text.ends_with("data: [DONE]\n\n"), "ends with [DONE]: {text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("data").to_owned())
            .collect()
    }

    fn reassemble(stream: &Bytes) -> Value {
        let mut assembler = StreamAssembler::default();
        for data in events(stream).iter().filter(|d| *d != "[DONE]") {
            assembler.push(data.as_bytes()).expect("within bounds");
        }
        assembler.finish().expect("a whole completion")
    }

    #[test]
    fn a_replayed_stream_assembles_back_into_the_stored_completion() {
        let stored = completion();
        let stream = replay_as_stream(&stored, true);
        assert!(events(&stream).len() > 4, "content arrives in several chunks");
        let back = reassemble(&stream);
        assert_eq!(back["choices"], stored["choices"]);
        assert_eq!(back["usage"], stored["usage"]);
        assert_eq!(back["id"], "chatcmpl-1");
    }

    #[test]
    fn usage_is_replayed_only_when_asked_for() {
        let without = replay_as_stream(&completion(), false);
        assert!(events(&without).iter().all(|e| !e.contains("\"usage\"")));
        let with = replay_as_stream(&completion(), true);
        let last_chunk: Value = serde_json::from_str(&events(&with)[events(&with).len() - 2]).expect("json");
        assert_eq!(last_chunk["choices"], json!([]));
        assert_eq!(last_chunk["usage"]["total_tokens"], 23);
    }

    #[test]
    fn tool_calls_survive_assembly_and_replay() {
        let mut assembler = StreamAssembler::default();
        let chunks = [
            r#"{"id":"c","model":"m","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]}}]}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#,
        ];
        for chunk in chunks {
            assembler.push(chunk.as_bytes()).expect("within bounds");
        }
        let assembled = assembler.finish().expect("whole");
        assert!(is_cacheable(&assembled));
        let call = &assembled["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(call["id"], "call_1");
        assert_eq!(assembled["usage"]["total_tokens"], 8);
        assert_eq!(reassemble(&replay_as_stream(&assembled, true))["choices"], assembled["choices"]);
    }

    #[test]
    fn unfinished_or_unreadable_answers_are_not_cached() {
        let mut cut = completion();
        cut["choices"][0]["finish_reason"] = "length".into();
        assert!(!is_cacheable(&cut));
        let mut assembler = StreamAssembler::default();
        assembler.push(b"not json").expect("not json is not out of bounds");
        assert!(assembler.finish().is_none());
        assert!(StreamAssembler::default().finish().is_none());
    }

    #[test]
    fn word_groups_keep_every_character() {
        for text in [
            "",
            "one",
            "  leading and trailing  ",
            "a b c d e f g h i",
            "multi\nline\n\ntext with  gaps",
            "é ü 日本 語",
        ] {
            let pieces = word_groups(text, 2);
            assert_eq!(pieces.concat(), text);
        }
        assert_eq!(word_groups("a b c d e", 2), vec!["a b ", "c d ", "e"]);
    }

    #[test]
    fn indexes_beyond_the_bounds_are_refused_before_anything_is_sized_from_them() {
        let chunk = |choice: usize, call: usize| {
            format!(
                r#"{{"choices":[{{"index":{choice},"delta":{{"tool_calls":[{{"index":{call},"function":{{"name":"f"}}}}]}}}}]}}"#
            )
        };
        let mut assembler = StreamAssembler::default();
        assert_eq!(assembler.push(chunk(MAX_CHOICES - 1, MAX_TOOL_CALLS - 1).as_bytes()), Ok(()));
        assert_eq!(assembler.push(chunk(MAX_CHOICES, 0).as_bytes()), Err("a choice index beyond 127"));
        assert_eq!(assembler.push(chunk(4_000_000_000, 0).as_bytes()), Err("a choice index beyond 127"));
        assert_eq!(assembler.push(chunk(0, MAX_TOOL_CALLS).as_bytes()), Err("a tool-call index beyond 1023"));
        assert_eq!(assembler.push(chunk(0, 4_000_000_000).as_bytes()), Err("a tool-call index beyond 1023"));
        assert_eq!(assembler.choices.len(), MAX_CHOICES);
    }

    #[test]
    fn an_answer_beyond_the_assembly_bound_is_given_up() {
        let mut assembler = StreamAssembler::default();
        let piece = format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#, "x".repeat(64 * 1024));
        for _ in 0..=MAX_ASSEMBLED_BYTES / piece.len() {
            assert_eq!(assembler.push(piece.as_bytes()), Ok(()));
        }
        assert!(assembler.finish().is_none(), "too long to assemble");
    }
}
