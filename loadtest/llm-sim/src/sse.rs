//! Streamed chat completions: `chat.completion.chunk` events over SSE,
//! shaped and ordered like OpenAI's.

use std::ops::RangeInclusive;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use serde::Serialize;

use crate::chat::{Output, Usage};
use crate::faults;
use crate::usage::Pending;

pub const SYSTEM_FINGERPRINT: &str = "fp_llmsim";

/// Streamed tool-call arguments arrive in fragments of about this many bytes,
/// like token-sized pieces from the real API.
const ARGUMENT_FRAGMENT: usize = 8;

/// Fields shared by every chunk of one completion.
pub struct Meta<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub include_usage: bool,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: &'a [ChunkChoice<'a>],
    /// Absent without `include_usage`; `null` on every chunk but the last
    /// with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Delta<'a> {
    Start {
        role: &'static str,
        content: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_calls: Option<[ToolCallStart<'a>; 1]>,
        refusal: Option<()>,
    },
    Content {
        content: &'a str,
    },
    Arguments {
        tool_calls: [ToolCallArguments<'a>; 1],
    },
    End {},
}

#[derive(Serialize)]
struct ToolCallStart<'a> {
    index: u32,
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionStart<'a>,
}

#[derive(Serialize)]
struct FunctionStart<'a> {
    name: &'a str,
    arguments: &'static str,
}

#[derive(Serialize)]
struct ToolCallArguments<'a> {
    index: u32,
    function: ArgumentsOnly<'a>,
}

#[derive(Serialize)]
struct ArgumentsOnly<'a> {
    arguments: &'a str,
}

/// All events of one stream, pre-serialized.
struct Events {
    events: Vec<Bytes>,
    /// Events `1..=pieces` carry content (or argument fragments); the token
    /// delay is applied between them.
    pieces: usize,
}

impl Meta<'_> {
    fn event(&self, delta: Delta<'_>, finish_reason: Option<&'static str>) -> Bytes {
        let choices = [ChunkChoice { index: 0, delta, logprobs: None, finish_reason }];
        self.encode(&choices, self.include_usage.then_some(None))
    }

    fn encode(&self, choices: &[ChunkChoice<'_>], usage: Option<Option<&Usage>>) -> Bytes {
        let chunk = Chunk {
            id: self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model,
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices,
            usage,
        };
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"data: ");
        // Serializing our own structs into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut buf, &chunk);
        buf.extend_from_slice(b"\n\n");
        Bytes::from(buf)
    }
}

fn events(meta: &Meta<'_>, output: &Output, usage: &Usage) -> Events {
    let mut events = Vec::new();
    match output {
        Output::Text(answer) => {
            events.push(
                meta.event(
                    Delta::Start { role: "assistant", content: Some(""), tool_calls: None, refusal: None },
                    None,
                ),
            );
            events.extend(answer.pieces().map(|content| meta.event(Delta::Content { content }, None)));
        }
        Output::ToolCall(call) => {
            // OpenAI puts the role and the call's id/name in the same first delta.
            events.push(meta.event(
                Delta::Start {
                    role: "assistant",
                    content: None,
                    tool_calls: Some([ToolCallStart {
                        index: 0,
                        id: &call.id,
                        kind: "function",
                        function: FunctionStart { name: &call.name, arguments: "" },
                    }]),
                    refusal: None,
                },
                None,
            ));
            events.extend(fragments(&call.arguments).map(|arguments| {
                meta.event(
                    Delta::Arguments {
                        tool_calls: [ToolCallArguments { index: 0, function: ArgumentsOnly { arguments } }],
                    },
                    None,
                )
            }));
        }
    }
    let pieces = events.len() - 1;
    events.push(meta.event(Delta::End {}, Some(output.finish_reason())));
    if meta.include_usage {
        events.push(meta.encode(&[], Some(Some(usage))));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Events { events, pieces }
}

/// Splits `s` into fragments of at most [`ARGUMENT_FRAGMENT`] bytes on char
/// boundaries.
pub fn fragments(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = ARGUMENT_FRAGMENT.min(rest.len());
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

/// The SSE response. `drop` sends the first content event and then fails the
/// body, which makes hyper abort the connection mid-stream (no `[DONE]`).
/// `tally` is reported when the usage chunk is sent.
pub fn response(
    meta: &Meta<'_>,
    output: &Output,
    usage: &Usage,
    token_delay: Duration,
    drop: bool,
    tally: Option<Pending>,
) -> Response {
    let Events { events, pieces } = events(meta, output, usage);
    let schedule = Schedule {
        pieces: 1..=pieces,
        // The usage chunk comes just before `[DONE]`.
        usage_at: events.len().saturating_sub(2),
        drop,
    };
    body(events, &schedule, token_delay, tally)
}

/// When the events of a stream go out.
pub struct Schedule {
    /// The events carrying content (or argument fragments): `token_delay` apart, and a dropped
    /// connection dies right after the first of them.
    pub pieces: RangeInclusive<usize>,
    /// The event carrying the usage: `tally` is reported as it is sent.
    pub usage_at: usize,
    pub drop: bool,
}

/// A `text/event-stream` response sending pre-serialized `events` on `schedule`.
pub fn body(events: Vec<Bytes>, schedule: &Schedule, token_delay: Duration, tally: Option<Pending>) -> Response {
    let (first, last) = (*schedule.pieces.start(), *schedule.pieces.end());
    let usage_at = schedule.usage_at;
    let drop_at = schedule.drop.then_some(first + 1);
    let state = (events.into_iter().enumerate(), false, tally);
    let body = stream::unfold(state, move |(mut iter, failed, mut tally)| async move {
        if failed {
            return None;
        }
        let (i, event) = iter.next()?;
        if drop_at == Some(i) {
            // Let hyper flush what was sent so far before tearing down.
            tokio::task::yield_now().await;
            return Some((Err(faults::drop_error()), (iter, true, None)));
        }
        if i > first && i <= last && !token_delay.is_zero() {
            tokio::time::sleep(token_delay).await;
        }
        if i == usage_at
            && let Some(tally) = tally.take()
        {
            tally.report();
        }
        Some((Ok(event), (iter, false, tally)))
    });
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::{Answer, PromptHash};
    use crate::chat::ToolCall;
    use serde_json::Value;

    fn parse(events: &[Bytes]) -> Vec<Option<Value>> {
        events
            .iter()
            .map(|e| {
                let s = std::str::from_utf8(e).expect("utf-8");
                let data = s.strip_prefix("data: ").and_then(|d| d.strip_suffix("\n\n")).expect("SSE framing");
                (data != "[DONE]").then(|| serde_json::from_str(data).expect("chunk JSON"))
            })
            .collect()
    }

    fn meta(include_usage: bool) -> Meta<'static> {
        Meta { id: "chatcmpl-simtest", created: 1, model: "gpt-4o", include_usage }
    }

    fn usage() -> Usage {
        Usage::new(10, 5, 0)
    }

    #[test]
    fn text_stream_without_usage() {
        let answer = Answer::simulated(&PromptHash::of("hi"));
        let text = answer.text().to_owned();
        let out = Output::Text(answer);
        let ev = events(&meta(false), &out, &usage());
        let parsed = parse(&ev.events);
        let n = parsed.len();
        assert!(parsed[n - 1].is_none(), "ends with [DONE]");
        assert_eq!(ev.pieces, n - 3);

        let first = parsed[0].as_ref().expect("chunk");
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            first["choices"][0]["delta"],
            serde_json::json!({"role": "assistant", "content": "", "refusal": null})
        );
        let mut content = String::new();
        for chunk in parsed[..n - 1].iter().map(|c| c.as_ref().expect("chunk")) {
            assert!(chunk.get("usage").is_none(), "no usage field without include_usage");
            assert_eq!(chunk["id"], "chatcmpl-simtest");
            assert_eq!(chunk["system_fingerprint"], SYSTEM_FINGERPRINT);
            if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
                content.push_str(c);
            }
        }
        assert_eq!(content, text);
        let last = parsed[n - 2].as_ref().expect("chunk");
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        for chunk in &parsed[..n - 2] {
            assert!(chunk.as_ref().expect("chunk")["choices"][0]["finish_reason"].is_null());
        }
    }

    #[test]
    fn text_stream_with_usage() {
        let out = Output::Text(Answer::simulated(&PromptHash::of("hi")));
        let ev = events(&meta(true), &out, &usage());
        let parsed = parse(&ev.events);
        let n = parsed.len();
        assert!(parsed[n - 1].is_none());
        let usage_chunk = parsed[n - 2].as_ref().expect("chunk");
        assert_eq!(usage_chunk["choices"], serde_json::json!([]));
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], 10);
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
        assert_eq!(usage_chunk["usage"]["total_tokens"], 15);
        assert_eq!(parsed[n - 3].as_ref().expect("chunk")["choices"][0]["finish_reason"], "stop");
        for chunk in &parsed[..n - 2] {
            let chunk = chunk.as_ref().expect("chunk");
            assert!(chunk.get("usage").is_some_and(Value::is_null), "usage: null");
        }
    }

    #[test]
    fn tool_call_stream() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"location":"Paris","unit":"celsius"}"#.into(),
        };
        let args = call.arguments.clone();
        let ev = events(&meta(false), &Output::ToolCall(call), &usage());
        let parsed = parse(&ev.events);
        let n = parsed.len();
        let first = &parsed[0].as_ref().expect("chunk")["choices"][0]["delta"];
        assert_eq!(first["role"], "assistant");
        assert!(first["content"].is_null());
        assert_eq!(
            first["tool_calls"],
            serde_json::json!([{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}])
        );
        let mut joined = String::new();
        for chunk in &parsed[1..n - 2] {
            let tc = &chunk.as_ref().expect("chunk")["choices"][0]["delta"]["tool_calls"][0];
            assert_eq!(tc["index"], 0);
            assert!(tc.get("id").is_none());
            joined.push_str(tc["function"]["arguments"].as_str().expect("fragment"));
        }
        assert_eq!(joined, args);
        assert!(ev.pieces > 1);
        assert_eq!(parsed[n - 2].as_ref().expect("chunk")["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn fragments_respect_char_boundaries() {
        let s = "{\"city\":\"Zürich→Genève\"}";
        let parts: Vec<&str> = fragments(s).collect();
        assert_eq!(parts.concat(), s);
        assert!(parts.len() > 2);
    }
}
