//! Streamed Responses: the typed events OpenAI sends, in its order, each an SSE `event:` line
//! naming its type and a `data:` line with `type` and `sequence_number`, and no `[DONE]`.
//!
//! `response.created`, `response.in_progress`, `response.output_item.added`, then for text
//! `response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
//! `response.content_part.done`, or for a function call
//! `response.function_call_arguments.delta`..., `response.function_call_arguments.done`; then
//! `response.output_item.done` and `response.completed` (`response.incomplete` when
//! `max_output_tokens` cut the text), which carries the usage.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::chat::Output;
use crate::responses::{Status, function_call_item, message_item, text_part};
use crate::sse::{self, Schedule};

/// Events of one stream, numbered as they are added.
struct Events(Vec<Bytes>);

impl Events {
    fn push(&mut self, kind: &str, mut fields: Value) {
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("type".to_owned(), Value::from(kind));
            obj.insert("sequence_number".to_owned(), Value::from(self.0.len()));
        }
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(kind.as_bytes());
        buf.extend_from_slice(b"\ndata: ");
        // Serializing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut buf, &fields);
        buf.extend_from_slice(b"\n\n");
        self.0.push(Bytes::from(buf));
    }
}

/// The events of a response that starts as `started` (in progress, no output) and ends as `done`
/// (whose one output item `item_id` is `output`, ending in `status`), and when to send them.
/// `drop` cuts the stream after the first delta.
pub fn events(
    started: Value,
    done: &Value,
    item_id: &str,
    output: &Output,
    status: Status,
    drop: bool,
) -> (Vec<Bytes>, Schedule) {
    let mut ev = Events(Vec::new());
    ev.push("response.created", json!({"response": started}));
    ev.push("response.in_progress", json!({"response": started}));
    let at = |extra: Value| {
        let mut fields = json!({"item_id": item_id, "output_index": 0});
        if let (Some(obj), Value::Object(extra)) = (fields.as_object_mut(), extra) {
            obj.extend(extra);
        }
        fields
    };
    // The deltas, which the token delay spaces out.
    let pieces = match output {
        Output::Text(answer) => {
            let item = message_item(item_id, Status::InProgress, Vec::new());
            ev.push("response.output_item.added", json!({"output_index": 0, "item": item}));
            ev.push("response.content_part.added", at(json!({"content_index": 0, "part": text_part("")})));
            let first = ev.0.len();
            for delta in answer.pieces() {
                ev.push("response.output_text.delta", at(json!({"content_index": 0, "delta": delta, "logprobs": []})));
            }
            let pieces = first..=ev.0.len() - 1;
            let text = answer.text();
            ev.push("response.output_text.done", at(json!({"content_index": 0, "text": text, "logprobs": []})));
            ev.push("response.content_part.done", at(json!({"content_index": 0, "part": text_part(text)})));
            pieces
        }
        Output::ToolCall(call) => {
            let item = function_call_item(item_id, call, Status::InProgress, "");
            ev.push("response.output_item.added", json!({"output_index": 0, "item": item}));
            let first = ev.0.len();
            for delta in sse::fragments(&call.arguments) {
                ev.push("response.function_call_arguments.delta", at(json!({"delta": delta})));
            }
            let pieces = first..=ev.0.len() - 1;
            ev.push("response.function_call_arguments.done", at(json!({"arguments": call.arguments})));
            pieces
        }
    };
    ev.push("response.output_item.done", json!({"output_index": 0, "item": done["output"][0]}));
    let terminal = match status {
        Status::Incomplete => "response.incomplete",
        _ => "response.completed",
    };
    ev.push(terminal, json!({"response": done}));
    let usage_at = ev.0.len() - 1;
    (ev.0, Schedule { pieces, usage_at, drop })
}
