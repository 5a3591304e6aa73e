//! `POST .../chat/completions`: validation, answer selection, JSON response.
//! Streaming lives in `sse.rs`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::answer::{Answer, PromptHash};
use crate::api::{self, ApiError, AppState, Target};
use crate::tokens::{self, PromptCounter};
use crate::{faults, sse, tools};

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function"];

pub async fn openai(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(&state, Target::OpenAi, &headers, &body).await
}

pub async fn azure(
    State(state): State<Arc<AppState>>,
    Path(deployment): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match Target::azure(deployment, &uri) {
        Ok(target) => handle(&state, target, &headers, &body).await,
        Err(err) => err.into_response(),
    }
}

/// What the assistant says.
pub enum Output {
    Text(Answer),
    ToolCall(ToolCall),
}

pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl Output {
    /// What the simulated model answers to `user_text` (the last user message, `hash` its hash),
    /// the same for chat and Responses: after tool results (those that follow the last user
    /// message), an answer quoting them; with function tools
    /// offered and not declined, a call of one; else the simulated answer. Text is cut to
    /// `max_tokens`.
    pub fn choose(
        tools: &[tools::FunctionTool<'_>],
        choice: &tools::ToolChoice<'_>,
        user_text: &str,
        hash: &PromptHash,
        tool_results: &[String],
        max_tokens: Option<usize>,
    ) -> Result<Self, ApiError> {
        let mut answer = if !tool_results.is_empty() {
            Answer::tool_result(tool_results, hash)
        } else if !tools.is_empty() && !matches!(choice, tools::ToolChoice::None) {
            let tool = tools::select(tools, choice, user_text)?;
            return Ok(Self::ToolCall(ToolCall {
                id: format!("call_{}", hash.long()),
                name: tool.name.to_owned(),
                arguments: tools::arguments(tool, user_text, hash.seed()),
            }));
        } else {
            Answer::simulated(hash)
        };
        if let Some(max) = max_tokens {
            answer.limit(max);
        }
        Ok(Self::Text(answer))
    }

    pub fn completion_tokens(&self) -> usize {
        match self {
            Self::Text(answer) => answer.completion_tokens(),
            Self::ToolCall(call) => tokens::count(&call.name) + tokens::count(&call.arguments),
        }
    }

    pub fn finish_reason(&self) -> &'static str {
        match self {
            Self::Text(a) if a.truncated => "length",
            Self::Text(_) => "stop",
            Self::ToolCall(_) => "tool_calls",
        }
    }
}

#[derive(Serialize)]
pub struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
    prompt_tokens_details: PromptTokensDetails,
    completion_tokens_details: CompletionTokensDetails,
}

#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: u32,
    audio_tokens: u32,
}

#[derive(Serialize)]
struct CompletionTokensDetails {
    reasoning_tokens: u32,
    audio_tokens: u32,
    accepted_prediction_tokens: u32,
    rejected_prediction_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u32::try_from(cached_tokens).unwrap_or(u32::MAX),
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: 0,
                audio_tokens: 0,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            },
        }
    }
}

/// A validated request reduced to what the response needs.
struct Prepared {
    model: String,
    hash: PromptHash,
    stream: bool,
    include_usage: bool,
    output: Output,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// The prompt's leading messages (all but the last) and their length, for prompt caching.
    prefix: [u8; 32],
    prefix_tokens: usize,
}

async fn handle(state: &AppState, target: Target, headers: &HeaderMap, body: &[u8]) -> Response {
    let p = match prepare(&target, body) {
        Ok(p) => p,
        Err(err) => return err.into_response(),
    };
    let mut resp = respond(state, headers, &p).await;
    api::tag_response(&mut resp, &p.model, Some(p.hash.short()));
    resp
}

async fn respond(state: &AppState, headers: &HeaderMap, p: &Prepared) -> Response {
    let plan = match faults::plan(state, headers) {
        Ok(plan) => plan,
        Err(err) => return err.into_response(),
    };
    let cached = state.prompt_cache.cached_tokens(p.prefix, p.prefix_tokens, p.prompt_tokens);
    let usage = Usage::new(p.prompt_tokens, p.completion_tokens, cached);
    let tally = state.tally.pending(headers, p.prompt_tokens, p.completion_tokens, cached);
    let id = format!("chatcmpl-sim{}{:016x}", p.hash.short(), fastrand::u64(..));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());

    if p.stream {
        sleep(plan.ttft).await;
        let meta = sse::Meta { id: &id, created, model: &p.model, include_usage: p.include_usage };
        // Without `include_usage` the stream reports no usage, so there is nothing to tally.
        let tally = tally.filter(|_| p.include_usage);
        return sse::response(&meta, &p.output, &usage, plan.token_delay, plan.drop, tally);
    }

    let tokens = u32::try_from(p.completion_tokens).unwrap_or(u32::MAX);
    sleep(plan.ttft + plan.token_delay.saturating_mul(tokens)).await;
    if plan.drop {
        return faults::dropped_response();
    }
    let (content, tool_calls) = match &p.output {
        Output::Text(answer) => (Some(answer.text()), None),
        Output::ToolCall(call) => (
            None,
            Some([ToolCallJson {
                id: &call.id,
                kind: "function",
                function: FunctionJson { name: &call.name, arguments: &call.arguments },
            }]),
        ),
    };
    let completion = Completion {
        id: &id,
        object: "chat.completion",
        created,
        model: &p.model,
        system_fingerprint: sse::SYSTEM_FINGERPRINT,
        choices: [Choice {
            index: 0,
            message: Message { role: "assistant", content, tool_calls, refusal: None },
            logprobs: None,
            finish_reason: p.output.finish_reason(),
        }],
        usage: &usage,
    };
    if let Some(tally) = tally {
        tally.report();
    }
    api::json_response(StatusCode::OK, &completion)
}

pub async fn sleep(d: std::time::Duration) {
    // Zero-latency mode must not touch the timer wheel at all.
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: [Choice<'a>; 1],
    usage: &'a Usage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallJson<'a>; 1]>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct ToolCallJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionJson<'a>,
}

#[derive(Serialize)]
struct FunctionJson<'a> {
    name: &'a str,
    arguments: &'a str,
}

fn prepare(target: &Target, body: &[u8]) -> Result<Prepared, ApiError> {
    let req = api::parse_object(body)?;
    let model = target.model(&req)?;
    let messages = match req.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::missing("messages")),
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(ApiError::invalid_request(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            )
            .param("messages")
            .code("empty_array"));
        }
        Some(Value::Array(m)) => m,
        Some(other) => return Err(ApiError::invalid_type("messages", "an array", other)),
    };
    let stream = optional_bool(req.get("stream"), "stream")?.unwrap_or(false);
    let include_usage = match req.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
            .param("stream_options")
            .code("invalid_value"));
        }
        Some(Value::Object(o)) => {
            optional_bool(o.get("include_usage"), "stream_options.include_usage")?.unwrap_or(false)
        }
        Some(other) => return Err(ApiError::invalid_type("stream_options", "an object", other)),
    };
    // `max_completion_tokens` superseded `max_tokens`; honour either.
    let max_tokens = match max_tokens(req.get("max_completion_tokens"), "max_completion_tokens", 1)? {
        Some(n) => Some(n),
        None => max_tokens(req.get("max_tokens"), "max_tokens", 1)?,
    };
    let tool_list = tools::parse_tools(req.get("tools"), tools::Shape::Chat)?;
    let tool_choice = tools::parse_tool_choice(req.get("tool_choice"), tools::Shape::Chat)?;

    let mut counter = PromptCounter::new();
    let mut texts: Vec<(&str, Cow<'_, str>)> = Vec::with_capacity(messages.len());
    let mut prefix = Sha256::new();
    prefix.update(model.as_bytes());
    let mut prefix_tokens = 0;
    for (i, msg) in messages.iter().enumerate() {
        if i + 1 == messages.len() {
            prefix_tokens = counter.total();
        } else {
            prefix.update(msg.to_string().as_bytes());
        }
        let (role, text) = message(i, msg, &mut counter)?;
        texts.push((role, text));
    }

    let last_user = texts.iter().rposition(|(role, _)| *role == "user");
    let user_text = last_user.map_or("", |i| texts[i].1.as_ref());
    let hash = PromptHash::of(user_text);
    let tool_results: Vec<String> = texts[last_user.map_or(0, |i| i + 1)..]
        .iter()
        .filter(|(role, _)| *role == "tool")
        .map(|(_, text)| text.to_string())
        .collect();

    let output = Output::choose(&tool_list, &tool_choice, user_text, &hash, &tool_results, max_tokens)?;
    let completion_tokens = output.completion_tokens();

    Ok(Prepared {
        model,
        hash,
        stream,
        include_usage,
        output,
        prompt_tokens: counter.total(),
        completion_tokens,
        prefix: prefix.finalize().into(),
        prefix_tokens,
    })
}

/// Validates `messages[i]`, adds it to the prompt count, and returns its role
/// and text (content parts joined by newlines).
fn message<'a>(i: usize, msg: &'a Value, counter: &mut PromptCounter) -> Result<(&'a str, Cow<'a, str>), ApiError> {
    let Some(obj) = msg.as_object() else {
        return Err(ApiError::invalid_type(format!("messages[{i}]"), "an object", msg));
    };
    let role = match obj.get("role") {
        None | Some(Value::Null) => return Err(ApiError::missing(format!("messages[{i}].role"))),
        Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
        Some(Value::String(r)) => {
            return Err(ApiError::invalid_request(format!(
                "Invalid value: '{r}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."
            ))
            .param(format!("messages[{i}].role"))
            .code("invalid_value"));
        }
        Some(other) => {
            return Err(ApiError::invalid_type(format!("messages[{i}].role"), "a string", other));
        }
    };
    let text = match obj.get("content") {
        Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Some(Value::Array(parts)) => Cow::Owned(
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        // Assistant turns that only carry tool calls have no content.
        None | Some(Value::Null) if role == "assistant" => Cow::Borrowed(""),
        None | Some(Value::Null) => {
            return Err(ApiError::missing(format!("messages[{i}].content")));
        }
        Some(other) => {
            return Err(ApiError::invalid_type(format!("messages[{i}].content"), "a string or an array", other));
        }
    };
    if role == "tool" && !obj.get("tool_call_id").is_some_and(Value::is_string) {
        return Err(ApiError::missing(format!("messages[{i}].tool_call_id")));
    }
    counter.message(role, &text, obj.get("name").and_then(Value::as_str));
    if let Some(calls) = obj.get("tool_calls").and_then(Value::as_array) {
        for function in calls.iter().filter_map(|c| c.get("function")) {
            for key in ["name", "arguments"] {
                if let Some(s) = function.get(key).and_then(Value::as_str) {
                    counter.extra(s);
                }
            }
        }
    }
    Ok((role, text))
}

/// A boolean parameter; `None` when left out (or `null`).
pub fn optional_bool(v: Option<&Value>, param: &'static str) -> Result<Option<bool>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::invalid_type(param, "a boolean", other)),
    }
}

/// A token budget of at least `min` (1 for chat's, 16 for `max_output_tokens`).
pub fn max_tokens(v: Option<&Value>, param: &'static str, min: u64) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(n), _) if n >= min => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            (_, Some(n)) => Err(ApiError::invalid_request(format!(
                "Invalid '{param}': integer below minimum value. Expected a value >= {min}, but got {n} instead."
            ))
            .param(param)
            .code("integer_below_min_value")),
            _ => Err(ApiError::invalid_type(param, "an integer", &Value::Number(n.clone()))),
        },
        Some(other) => Err(ApiError::invalid_type(param, "an integer", other)),
    }
}
