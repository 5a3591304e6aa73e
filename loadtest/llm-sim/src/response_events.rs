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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::{Answer, PromptHash};
    use crate::chat::ToolCall;

    /// `(event line, data)` of each SSE frame.
    fn parse(events: &[Bytes]) -> Vec<(String, Value)> {
        events
            .iter()
            .map(|e| {
                let s = std::str::from_utf8(e).expect("utf-8");
                let frame = s.strip_suffix("\n\n").expect("frame ends with a blank line");
                let (event, data) = frame.split_once('\n').expect("two lines");
                let kind = event.strip_prefix("event: ").expect("event line");
                let data = data.strip_prefix("data: ").expect("data line");
                (kind.to_owned(), serde_json::from_str(data).expect("event JSON"))
            })
            .collect()
    }

    fn objects(status: Status, output: &Output) -> (Value, Value) {
        let started = json!({"id": "resp_1", "object": "response", "status": "in_progress", "output": []});
        let item = match output {
            Output::Text(answer) => message_item("msg_1", status, vec![text_part(answer.text())]),
            Output::ToolCall(call) => function_call_item("fc_1", call, status, &call.arguments),
        };
        let done = json!({"id": "resp_1", "object": "response", "status": "completed", "output": [item],
            "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}});
        (started, done)
    }

    #[test]
    fn text_events_in_openai_order() {
        let answer = Answer::simulated(&PromptHash::of("hi"));
        let text = answer.text().to_owned();
        let output = Output::Text(answer);
        let (started, done) = objects(Status::Completed, &output);
        let (events, schedule) = events(started, &done, "msg_1", &output, Status::Completed, false);
        let parsed = parse(&events);
        for (i, (kind, data)) in parsed.iter().enumerate() {
            assert_eq!(data["type"], kind.as_str(), "the event line names the data's type");
            assert_eq!(data["sequence_number"], i);
        }
        let kinds: Vec<&str> = parsed.iter().map(|(k, _)| k.as_str()).collect();
        let deltas: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i] == "response.output_text.delta").collect();
        assert_eq!(schedule.pieces, deltas[0]..=*deltas.last().expect("deltas"), "the schedule spaces the deltas");
        let others: Vec<&str> = kinds.iter().copied().filter(|k| *k != "response.output_text.delta").collect();
        assert_eq!(
            others,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let joined: String = deltas.iter().map(|&i| parsed[i].1["delta"].as_str().expect("delta")).collect();
        assert_eq!(joined, text);
        for &i in &deltas {
            let d = &parsed[i].1;
            assert_eq!(
                (d["item_id"].as_str(), d["output_index"].as_u64(), d["content_index"].as_u64()),
                (Some("msg_1"), Some(0), Some(0))
            );
        }
        let added = &parsed[2].1["item"];
        assert_eq!(
            (added["status"].as_str(), added["content"].as_array().map(Vec::len)),
            (Some("in_progress"), Some(0))
        );
        assert_eq!(parsed[3].1["part"]["text"], "");
        assert_eq!(parsed[deltas[deltas.len() - 1] + 1].1["text"], text.as_str());
        assert_eq!(parsed[kinds.len() - 2].1["item"], done["output"][0]);
        assert_eq!(parsed[kinds.len() - 1].1["response"], done);
        assert_eq!(schedule.usage_at, events.len() - 1, "usage goes out with the terminal event");
        assert!(!schedule.drop);
    }

    #[test]
    fn function_call_events() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"location":"Paris","unit":"celsius"}"#.into(),
        };
        let output = Output::ToolCall(call);
        let (started, done) = objects(Status::Completed, &output);
        let (events, schedule) = events(started, &done, "fc_1", &output, Status::Completed, true);
        let parsed = parse(&events);
        let kinds: Vec<&str> = parsed.iter().map(|(k, _)| k.as_str()).collect();
        let n = kinds.len();
        assert_eq!(kinds[..3], ["response.created", "response.in_progress", "response.output_item.added"]);
        assert_eq!(
            kinds[n - 3..],
            ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
        );
        assert!(kinds[3..n - 3].iter().all(|k| *k == "response.function_call_arguments.delta"));
        assert_eq!(schedule.pieces, 3..=n - 4);
        let added = &parsed[2].1["item"];
        assert_eq!(
            *added,
            json!({"id": "fc_1", "type": "function_call", "status": "in_progress", "arguments": "",
                "call_id": "call_1", "name": "get_weather"})
        );
        let joined: String = parsed[3..n - 3].iter().map(|(_, d)| d["delta"].as_str().expect("delta")).collect();
        assert_eq!(joined, r#"{"location":"Paris","unit":"celsius"}"#);
        assert_eq!(parsed[n - 3].1["arguments"], joined.as_str());
        assert!(schedule.drop);
    }

    #[test]
    fn a_cut_answer_ends_incomplete() {
        let mut answer = Answer::simulated(&PromptHash::of("long"));
        answer.limit(16);
        let output = Output::Text(answer);
        let (started, done) = objects(Status::Incomplete, &output);
        let (events, _) = events(started, &done, "msg_1", &output, Status::Incomplete, false);
        let parsed = parse(&events);
        assert_eq!(parsed[parsed.len() - 1].0, "response.incomplete");
        assert_eq!(parsed[parsed.len() - 2].1["item"]["status"], "incomplete");
    }
}
