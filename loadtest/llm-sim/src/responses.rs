//! The Responses API: `POST .../responses` (JSON, or the typed event stream of
//! `response_events.rs`), `POST .../responses/input_tokens`, and `GET`/`DELETE`
//! `.../responses/{id}`, `.../responses/{id}/cancel` and `.../responses/{id}/input_items` on the
//! responses kept in memory.
//!
//! A request is reduced to the conversation it continues (the turns of its `previous_response_id`
//! chain, then its `input`) and answered like chat: the same answer choice, the same token
//! accounting (a message item costs what the equivalent chat message costs; `instructions` count
//! as a system message), the same prompt caching, tally and faults.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::answer::PromptHash;
use crate::api::{self, ApiError, AppState, Target};
use crate::chat::{self, Output};
use crate::tokens::PromptCounter;
use crate::{faults, response_events, sse, tools};

/// Responses kept for `previous_response_id` and `GET`; the oldest are forgotten beyond this.
const MAX_STORED_RESPONSES: usize = 10_000;
/// OpenAI's floor for `max_output_tokens`.
const MIN_OUTPUT_TOKENS: u64 = 16;
const MESSAGE_ROLES: &[&str] = &["user", "assistant", "system", "developer"];

/// The routes under `prefix` (`/v1`, `/openai/v1`, or `/openai` with `?api-version=`).
pub fn routes(prefix: &str) -> Router<Arc<AppState>> {
    Router::new()
        .route(&format!("{prefix}/responses"), post(create))
        .route(&format!("{prefix}/responses/input_tokens"), post(input_tokens))
        .route(&format!("{prefix}/responses/{{id}}"), get(retrieve).delete(delete))
        .route(&format!("{prefix}/responses/{{id}}/cancel"), post(cancel))
        .route(&format!("{prefix}/responses/{{id}}/input_items"), get(input_items))
}

/// One turn of a conversation, reduced to what answers and token counts need.
#[derive(Debug, Clone, PartialEq)]
enum Turn {
    Message { role: String, text: String },
    FunctionCall { call_id: String, name: String, arguments: String },
    FunctionCallOutput { call_id: String, output: String },
}

impl Turn {
    /// Counted as the equivalent chat message: a call is an assistant message with a tool call,
    /// its output a `tool` message.
    fn count(&self, counter: &mut PromptCounter) {
        match self {
            Self::Message { role, text } => counter.message(role, text, None),
            Self::FunctionCall { name, arguments, .. } => {
                counter.message("assistant", "", None);
                counter.extra(name);
                counter.extra(arguments);
            }
            Self::FunctionCallOutput { output, .. } => counter.message("tool", output, None),
        }
    }

    fn digest(&self, hasher: &mut Sha256) {
        let fields: &[&str] = match self {
            Self::Message { role, text } => &["message", role, text],
            Self::FunctionCall { call_id, name, arguments } => &["function_call", call_id, name, arguments],
            Self::FunctionCallOutput { call_id, output } => &["function_call_output", call_id, output],
        };
        for field in fields {
            hasher.update(field.as_bytes());
            hasher.update([0]);
        }
    }
}

/// A response kept in memory.
pub struct Stored {
    /// The response object as it was answered.
    object: Value,
    /// The request's `input`, as `input_items` lists it.
    input_items: Vec<Value>,
    /// The conversation before this response (its `previous_response_id`).
    previous: Option<Arc<Stored>>,
    /// This response's input turns and its output.
    turns: Vec<Turn>,
    background: bool,
}

impl Stored {
    /// Every turn of the conversation up to and including this response, oldest first.
    fn conversation(&self) -> Vec<Turn> {
        let mut chain = vec![self];
        while let Some(previous) = chain.last().and_then(|s| s.previous.as_deref()) {
            chain.push(previous);
        }
        chain.iter().rev().flat_map(|s| s.turns.iter().cloned()).collect()
    }
}

/// The stored responses, by id, bounded.
#[derive(Default)]
pub struct Store(Mutex<StoreInner>);

#[derive(Default)]
struct StoreInner {
    by_id: HashMap<String, Arc<Stored>>,
    /// Ids oldest first (deleted ones included until they age out), for eviction.
    order: VecDeque<String>,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, id: String, stored: Stored) {
        let mut inner = self.lock();
        while inner.order.len() >= MAX_STORED_RESPONSES {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
        inner.order.push_back(id.clone());
        inner.by_id.insert(id, Arc::new(stored));
    }

    fn get(&self, id: &str) -> Option<Arc<Stored>> {
        self.lock().by_id.get(id).cloned()
    }

    fn remove(&self, id: &str) -> bool {
        self.lock().by_id.remove(id).is_some()
    }
}

/// A validated create request reduced to what the response needs.
struct Prepared {
    model: String,
    hash: PromptHash,
    stream: bool,
    store: bool,
    background: bool,
    previous: Option<Arc<Stored>>,
    /// This request's input turns.
    turns: Vec<Turn>,
    input_items: Vec<Value>,
    output: Output,
    input_tokens: usize,
    /// The prompt but its last turn (instructions included), hashed, and its length: prompt caching.
    prefix: [u8; 32],
    prefix_tokens: usize,
    /// Request parameters the response object repeats, with OpenAI's defaults.
    echo: Map<String, Value>,
}

async fn create(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let p = match prepare(&state, &body) {
        Ok(p) => p,
        Err(err) => return err.into_response(),
    };
    let (model, hash) = (p.model.clone(), p.hash.short().to_owned());
    let mut resp = respond(&state, &headers, p).await;
    api::tag_response(&mut resp, &model, Some(&hash));
    resp
}

/// A response's (or an output item's) `status`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    InProgress,
    Completed,
    Incomplete,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Incomplete => "incomplete",
        }
    }
}

async fn respond(state: &AppState, headers: &HeaderMap, p: Prepared) -> Response {
    let plan = match faults::plan(state, headers) {
        Ok(plan) => plan,
        Err(err) => return err.into_response(),
    };
    let completion_tokens = p.output.completion_tokens();
    let cached = state.prompt_cache.cached_tokens(p.prefix, p.prefix_tokens, p.input_tokens);
    let tally = state.tally.pending(headers, p.input_tokens, completion_tokens, cached);
    let created_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let shell = Shell { id: new_id("resp"), created_at, model: &p.model, echo: &p.echo };
    let item_id = new_id(match p.output {
        Output::Text(_) => "msg",
        Output::ToolCall(_) => "fc",
    });
    let status = match &p.output {
        Output::Text(answer) if answer.truncated => Status::Incomplete,
        _ => Status::Completed,
    };
    let usage = usage(p.input_tokens, completion_tokens, cached);
    let done = shell.object(status, vec![output_item(&item_id, &p.output, status)], Some(usage));

    if p.stream {
        chat::sleep(plan.ttft).await;
    } else {
        let tokens = u32::try_from(completion_tokens).unwrap_or(u32::MAX);
        chat::sleep(plan.ttft + plan.token_delay.saturating_mul(tokens)).await;
    }
    // Kept once generated, even if the connection then drops: the provider has the response.
    if p.store {
        let mut turns = p.turns;
        turns.push(match &p.output {
            Output::Text(answer) => Turn::Message { role: "assistant".to_owned(), text: answer.text().to_owned() },
            Output::ToolCall(call) => Turn::FunctionCall {
                call_id: call.id.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
        });
        let stored = Stored {
            object: done.clone(),
            input_items: p.input_items,
            previous: p.previous,
            turns,
            background: p.background,
        };
        state.responses.insert(shell.id.clone(), stored);
    }
    if p.stream {
        let started = shell.object(Status::InProgress, Vec::new(), None);
        let (events, schedule) = response_events::events(started, &done, &item_id, &p.output, status, plan.drop);
        return sse::body(events, &schedule, plan.token_delay, tally);
    }
    if plan.drop {
        return faults::dropped_response();
    }
    if let Some(tally) = tally {
        tally.report();
    }
    api::json_response(StatusCode::OK, &done)
}

/// The fields every form of one response object shares.
struct Shell<'a> {
    id: String,
    created_at: u64,
    model: &'a str,
    echo: &'a Map<String, Value>,
}

impl Shell<'_> {
    fn object(&self, status: Status, output: Vec<Value>, usage: Option<Value>) -> Value {
        let mut object = self.echo.clone();
        let incomplete_details = match status {
            Status::Incomplete => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        };
        for (key, value) in [
            ("id", Value::from(self.id.as_str())),
            ("object", Value::from("response")),
            ("created_at", Value::from(self.created_at)),
            ("status", Value::from(status.as_str())),
            ("error", Value::Null),
            ("incomplete_details", incomplete_details),
            ("model", Value::from(self.model)),
            ("output", Value::Array(output)),
            ("usage", usage.unwrap_or(Value::Null)),
        ] {
            object.insert(key.to_owned(), value);
        }
        Value::Object(object)
    }
}

/// `resp_...`, `msg_...`, `fc_...`: OpenAI's prefixes, random hex.
fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", fastrand::u128(..))
}

fn usage(input: usize, output: usize, cached: usize) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

/// The output item of a finished response: the answer's message or the function call.
fn output_item(id: &str, output: &Output, status: Status) -> Value {
    match output {
        Output::Text(answer) => message_item(id, status, vec![text_part(answer.text())]),
        Output::ToolCall(call) => function_call_item(id, call, status, &call.arguments),
    }
}

pub fn message_item(id: &str, status: Status, content: Vec<Value>) -> Value {
    json!({"id": id, "type": "message", "status": status.as_str(), "content": content, "role": "assistant"})
}

pub fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
}

pub fn function_call_item(id: &str, call: &chat::ToolCall, status: Status, arguments: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": status.as_str(),
        "arguments": arguments,
        "call_id": call.id,
        "name": call.name,
    })
}

/// Parameters the response object repeats, and their values when the request leaves them out.
fn echo(req: &Map<String, Value>) -> Map<String, Value> {
    let defaults = [
        ("background", json!(false)),
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("max_tool_calls", Value::Null),
        ("metadata", json!({})),
        ("parallel_tool_calls", json!(true)),
        ("previous_response_id", Value::Null),
        ("prompt_cache_key", Value::Null),
        ("reasoning", json!({"effort": null, "summary": null})),
        ("safety_identifier", Value::Null),
        ("service_tier", json!("default")),
        ("store", json!(true)),
        ("temperature", json!(1.0)),
        ("text", json!({"format": {"type": "text"}, "verbosity": "medium"})),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("top_logprobs", json!(0)),
        ("top_p", json!(1.0)),
        ("truncation", json!("disabled")),
        ("user", Value::Null),
    ];
    defaults
        .into_iter()
        .map(|(key, default)| {
            let value = req.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default);
            (key.to_owned(), value)
        })
        .collect()
}

/// The request's prompt: what the model sees, counted.
struct Prompt {
    previous: Option<Arc<Stored>>,
    /// The stored conversation followed by this request's input turns.
    conversation: Vec<Turn>,
    /// Where this request's input starts in `conversation`.
    input_start: usize,
    input_items: Vec<Value>,
    tokens: usize,
    prefix: [u8; 32],
    prefix_tokens: usize,
}

/// Validates what create and `input_tokens` share (`instructions`, `input`,
/// `previous_response_id`) and counts the prompt `model` will see.
fn prompt(state: &AppState, req: &Map<String, Value>, model: &str) -> Result<Prompt, ApiError> {
    let instructions = match req.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => return Err(ApiError::invalid_type("instructions", "a string", other)),
    };
    let previous = match req.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(state.responses.get(id).ok_or_else(|| {
            ApiError::invalid_request(format!("Previous response with id '{id}' not found."))
                .param("previous_response_id")
                .code("previous_response_not_found")
        })?),
        Some(other) => return Err(ApiError::invalid_type("previous_response_id", "a string", other)),
    };
    if req.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid_request("llm-sim does not keep conversations; use 'previous_response_id'.")
            .param("conversation"));
    }
    let (turns, input_items) = match req.get("input") {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(Value::String(text)) => {
            let item = json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]});
            (vec![Turn::Message { role: "user".to_owned(), text: text.clone() }], vec![listed(&item)])
        }
        Some(Value::Array(items)) => input(items)?,
        Some(other) => return Err(ApiError::invalid_type("input", "a string or an array", other)),
    };

    let mut conversation = previous.as_deref().map(Stored::conversation).unwrap_or_default();
    let input_start = conversation.len();
    conversation.extend(turns);
    for turn in &conversation[input_start..] {
        if let Turn::FunctionCallOutput { call_id, .. } = turn {
            let called =
                conversation.iter().any(|t| matches!(t, Turn::FunctionCall { call_id: c, .. } if c == call_id));
            if !called {
                return Err(ApiError::invalid_request(format!(
                    "No tool call found for function call output with call_id {call_id}."
                ))
                .param("input"));
            }
        }
    }

    let mut counter = PromptCounter::new();
    let mut prefix = Sha256::new();
    prefix.update(model.as_bytes());
    if let Some(instructions) = instructions {
        counter.message("system", instructions, None);
        prefix.update(instructions.as_bytes());
    }
    let mut prefix_tokens = counter.total();
    for (i, turn) in conversation.iter().enumerate() {
        if i + 1 == conversation.len() {
            prefix_tokens = counter.total();
        } else {
            turn.digest(&mut prefix);
        }
        turn.count(&mut counter);
    }
    Ok(Prompt {
        previous,
        conversation,
        input_start,
        input_items,
        tokens: counter.total(),
        prefix: prefix.finalize().into(),
        prefix_tokens,
    })
}

fn prepare(state: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let req = api::parse_object(body)?;
    let model = Target::OpenAi.model(&req)?;
    let stream = chat::optional_bool(req.get("stream"), "stream")?.unwrap_or(false);
    let store = chat::optional_bool(req.get("store"), "store")?.unwrap_or(true);
    let background = chat::optional_bool(req.get("background"), "background")?.unwrap_or(false);
    if background && !store {
        return Err(ApiError::invalid_request("Background mode requires 'store' to be true.")
            .param("background")
            .code("invalid_value"));
    }
    let max_output_tokens = chat::max_tokens(req.get("max_output_tokens"), "max_output_tokens", MIN_OUTPUT_TOKENS)?;
    let tool_list = tools::parse_tools(req.get("tools"), tools::Shape::Responses)?;
    let tool_choice = tools::parse_tool_choice(req.get("tool_choice"), tools::Shape::Responses)?;
    let prompt = prompt(state, &req, &model)?;

    let conversation = &prompt.conversation;
    let last_user = conversation.iter().rposition(|t| matches!(t, Turn::Message { role, .. } if role == "user"));
    let user_text = match last_user.map(|i| &conversation[i]) {
        Some(Turn::Message { text, .. }) => text.as_str(),
        _ => "",
    };
    let hash = PromptHash::of(user_text);
    let tool_results: Vec<String> = conversation[last_user.map_or(0, |i| i + 1)..]
        .iter()
        .filter_map(|t| match t {
            Turn::FunctionCallOutput { output, .. } => Some(output.clone()),
            _ => None,
        })
        .collect();
    let output = Output::choose(&tool_list, &tool_choice, user_text, &hash, &tool_results, max_output_tokens)?;

    let Prompt { previous, mut conversation, input_start, input_items, tokens, prefix, prefix_tokens } = prompt;
    Ok(Prepared {
        model,
        hash,
        stream,
        store,
        background,
        previous,
        turns: conversation.split_off(input_start),
        input_items,
        output,
        input_tokens: tokens,
        prefix,
        prefix_tokens,
        echo: echo(&req),
    })
}

/// The turns and listed items of an `input` array.
fn input(items: &[Value]) -> Result<(Vec<Turn>, Vec<Value>), ApiError> {
    let mut turns = Vec::with_capacity(items.len());
    let mut listed_items = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return Err(ApiError::invalid_type(format!("input[{i}]"), "an object", item));
        };
        let kind = match obj.get("type") {
            // Easy input messages (`{"role": ..., "content": ...}`) carry no type.
            None | Some(Value::Null) => "message",
            Some(Value::String(t)) => t.as_str(),
            Some(other) => return Err(ApiError::invalid_type(format!("input[{i}].type"), "a string", other)),
        };
        let string = |key: &str| match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) => Err(ApiError::missing(format!("input[{i}].{key}"))),
            Some(other) => Err(ApiError::invalid_type(format!("input[{i}].{key}"), "a string", other)),
        };
        match kind {
            "message" => {
                let role = string("role")?;
                if !MESSAGE_ROLES.contains(&role.as_str()) {
                    return Err(ApiError::invalid_request(format!(
                        "Invalid value: '{role}'. Supported values are: 'assistant', 'system', 'developer', and 'user'."
                    ))
                    .param(format!("input[{i}].role"))
                    .code("invalid_value"));
                }
                let text = content_text(obj.get("content"), &format!("input[{i}].content"))?;
                turns.push(Turn::Message { role, text });
            }
            "function_call" => turns.push(Turn::FunctionCall {
                call_id: string("call_id")?,
                name: string("name")?,
                arguments: string("arguments")?,
            }),
            "function_call_output" => turns.push(Turn::FunctionCallOutput {
                call_id: string("call_id")?,
                output: content_text(obj.get("output"), &format!("input[{i}].output"))?,
            }),
            // Reasoning the client hands back, and references to stored items, add nothing the
            // simulated model reads.
            "reasoning" | "item_reference" => {}
            other => {
                return Err(ApiError::invalid_request(format!(
                    "Invalid value: '{other}'. Supported values are: 'message', 'function_call', 'function_call_output', 'reasoning', and 'item_reference'."
                ))
                .param(format!("input[{i}].type"))
                .code("invalid_value"));
            }
        }
        listed_items.push(listed(item));
    }
    Ok((turns, listed_items))
}

/// A message's `content` or a call's `output`: a string, or content parts whose texts are joined
/// by newlines (images and files add no text).
fn content_text(v: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter(|p| matches!(p.get("type").and_then(Value::as_str), Some("input_text" | "output_text")))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        None | Some(Value::Null) => Err(ApiError::missing(param.to_owned())),
        Some(other) => Err(ApiError::invalid_type(param.to_owned(), "a string or an array", other)),
    }
}

/// An input item as `input_items` lists it: typed, with an id and a status, a message's string
/// content as a text part.
fn listed(item: &Value) -> Value {
    let mut obj = item.as_object().cloned().unwrap_or_default();
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("message").to_owned();
    if kind == "message"
        && let Some(Value::String(text)) = obj.get("content")
    {
        let part =
            if obj.get("role").and_then(Value::as_str) == Some("assistant") { "output_text" } else { "input_text" };
        let content = json!([{"type": part, "text": text}]);
        obj.insert("content".to_owned(), content);
    }
    let prefix = match kind.as_str() {
        "message" => "msg",
        "function_call" => "fc",
        "function_call_output" => "fco",
        "reasoning" => "rs",
        _ => "item",
    };
    obj.entry("id").or_insert_with(|| Value::from(new_id(prefix)));
    if kind != "item_reference" {
        obj.entry("status").or_insert_with(|| Value::from("completed"));
    }
    obj.insert("type".to_owned(), Value::from(kind));
    Value::Object(obj)
}

/// `POST .../responses/input_tokens`: the prompt's token count, nothing generated.
async fn input_tokens(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(fault) = fault(&state, &headers) {
        return fault;
    }
    let counted = api::parse_object(&body).and_then(|req| {
        let model = Target::OpenAi.model(&req)?;
        tools::parse_tools(req.get("tools"), tools::Shape::Responses)?;
        prompt(&state, &req, &model)
    });
    match counted {
        Ok(prompt) => api::json_response(
            StatusCode::OK,
            &json!({"object": "response.input_tokens", "input_tokens": prompt.tokens}),
        ),
        Err(err) => err.into_response(),
    }
}

/// The injected fault of a request that generates nothing (429, 500, a dropped connection).
fn fault(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    match faults::plan(state, headers) {
        Err(err) => Some(err.into_response()),
        Ok(plan) if plan.drop => Some(faults::dropped_response()),
        Ok(_) => None,
    }
}

/// Answers a request about stored response `id` with `answer`, after the injected fault (if any)
/// and the 404 of an unknown id.
fn with_stored(state: &AppState, headers: &HeaderMap, id: &str, answer: impl FnOnce(&Stored) -> Response) -> Response {
    if let Some(fault) = fault(state, headers) {
        return fault;
    }
    match state.responses.get(id) {
        Some(stored) => answer(&stored),
        None => unknown(id).into_response(),
    }
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("Response with id '{id}' not found."))
}

async fn retrieve(State(state): State<Arc<AppState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    with_stored(&state, &headers, &id, |stored| api::json_response(StatusCode::OK, &stored.object))
}

async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(fault) = fault(&state, &headers) {
        return fault;
    }
    if !state.responses.remove(&id) {
        return unknown(&id).into_response();
    }
    api::json_response(StatusCode::OK, &json!({"id": id, "object": "response", "deleted": true}))
}

/// Only background responses can be cancelled; the simulator finishes them at once, so a cancel
/// finds them finished and answers them unchanged.
async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    with_stored(&state, &headers, &id, |stored| {
        if stored.background {
            api::json_response(StatusCode::OK, &stored.object)
        } else {
            ApiError::invalid_request("Only responses created with background=true can be cancelled.").into_response()
        }
    })
}

/// `GET .../responses/{id}/input_items?limit=&order=&after=`: a page of the request's input.
async fn input_items(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    with_stored(&state, &headers, &id, |stored| page(&stored.input_items, &uri))
}

/// A page of `items` (oldest first) per the query's `limit`, `order` and `after`.
fn page(items: &[Value], uri: &Uri) -> Response {
    let limit = match api::query_param(uri, "limit").map(str::parse::<usize>) {
        None => 20,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return ApiError::invalid_request("Invalid 'limit': expected an integer between 1 and 100.")
                .param("limit")
                .code("invalid_value")
                .into_response();
        }
    };
    let mut items: Vec<&Value> = items.iter().collect();
    match api::query_param(uri, "order") {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(_) => {
            return ApiError::invalid_request("Invalid 'order': expected 'asc' or 'desc'.")
                .param("order")
                .code("invalid_value")
                .into_response();
        }
    }
    if let Some(after) = api::query_param(uri, "after") {
        match items.iter().position(|item| item.get("id").and_then(Value::as_str) == Some(after)) {
            Some(at) => items = items.split_off(at + 1),
            None => {
                return ApiError::invalid_request("Invalid 'after': no such input item.")
                    .param("after")
                    .into_response();
            }
        }
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let id_of = |item: Option<&&Value>| item.and_then(|i| i.get("id")).cloned().unwrap_or(Value::Null);
    let page = json!({
        "object": "list",
        "data": items,
        "first_id": id_of(items.first()),
        "last_id": id_of(items.last()),
        "has_more": has_more,
    });
    api::json_response(StatusCode::OK, &page)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::faults::{FaultRates, Latency};

    fn app() -> Router {
        let embeddings = crate::embeddings::Source::choose(Some(std::path::Path::new("none"))).expect("hash vectors");
        let faults = FaultRates {
            rate_429: 0.0,
            rate_500: 0.0,
            rate_slow: 0.0,
            rate_drop: 0.0,
            slow: Duration::ZERO,
            retry_after_secs: 1,
        };
        let latency = Latency { ttft: Duration::ZERO, token_delay: Duration::ZERO };
        crate::router(Arc::new(AppState::new(None, embeddings, latency, faults)))
    }

    /// Sends one request through the router: status, headers and the body as JSON (or text).
    async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, HeaderMap, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .header("x-sim-tally", "unit")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (parts.status, parts.headers, value)
    }

    async fn tally(app: &Router) -> Value {
        call(app, "GET", "/sim/usage", None).await.2["unit"].clone()
    }

    fn weather_tool() -> Value {
        json!({"type": "function", "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}})
    }

    #[tokio::test]
    async fn json_response_object_and_usage() {
        let app = app();
        let (status, headers, r) = call(
            &app,
            "POST",
            "/v1/responses",
            Some(json!({"model": "gpt-4o", "input": "Hello", "metadata": {"k": "v"}})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        let marker = PromptHash::of("Hello").short().to_owned();
        assert_eq!(headers.get("x-sim-prompt-hash").and_then(|v| v.to_str().ok()), Some(marker.as_str()));
        assert_eq!(
            (r["object"].as_str(), r["status"].as_str(), r["model"].as_str()),
            (Some("response"), Some("completed"), Some("gpt-4o"))
        );
        assert_eq!(r["metadata"], json!({"k": "v"}), "request parameters are repeated");
        assert_eq!(r["store"], true);
        let text = r["output"][0]["content"][0]["text"].as_str().expect("output text");
        assert!(text.contains(&format!("[p:{marker}]")));
        let mut counter = PromptCounter::new();
        counter.message("user", "Hello", None);
        let usage = &r["usage"];
        assert_eq!(usage["input_tokens"], counter.total());
        assert_eq!(usage["output_tokens"], crate::tokens::count(text));
        assert_eq!(usage["total_tokens"], counter.total() + crate::tokens::count(text));
        assert_eq!(usage["input_tokens_details"], json!({"cached_tokens": 0}));
        assert_eq!(usage["output_tokens_details"], json!({"reasoning_tokens": 0}));
        let t = tally(&app).await;
        assert_eq!((t["requests"].as_u64(), t["total_tokens"].clone()), (Some(1), usage["total_tokens"].clone()));
    }

    #[tokio::test]
    async fn function_call_continued_by_previous_response_id() {
        let app = app();
        let prompt = "Weather in Paris? use get_weather";
        let (_, _, first) = call(
            &app,
            "POST",
            "/openai/v1/responses",
            Some(json!({"model": "gpt-4o", "instructions": "Be brief.", "input": prompt, "tools": [weather_tool()]})),
        )
        .await;
        let item = &first["output"][0];
        assert_eq!((item["type"].as_str(), item["name"].as_str()), (Some("function_call"), Some("get_weather")));
        let call_id = item["call_id"].as_str().expect("call_id");
        let args: Value = serde_json::from_str(item["arguments"].as_str().expect("arguments")).expect("JSON arguments");
        assert!(args["city"].is_string());

        let id = first["id"].as_str().expect("id");
        let output = json!([{"type": "function_call_output", "call_id": call_id, "output": "sunny"}]);
        let (status, _, second) = call(
            &app,
            "POST",
            "/openai/responses?api-version=2025-04-01-preview",
            Some(json!({"model": "gpt-4o", "previous_response_id": id, "input": output, "tools": [weather_tool()]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{second}");
        let marker = PromptHash::of(prompt).short().to_owned();
        assert_eq!(second["output"][0]["content"][0]["text"], format!("Based on the tool result: sunny [p:{marker}]"));
        // The stored turns count, the first request's instructions do not carry over.
        let mut counter = PromptCounter::new();
        counter.message("user", prompt, None);
        counter.message("assistant", "", None);
        counter.extra("get_weather");
        counter.extra(item["arguments"].as_str().expect("arguments"));
        counter.message("tool", "sunny", None);
        assert_eq!(second["usage"]["input_tokens"], counter.total());

        // `input_tokens` counts the same prompt without answering it.
        let (_, _, counted) = call(
            &app,
            "POST",
            "/v1/responses/input_tokens",
            Some(json!({"model": "gpt-4o", "previous_response_id": id, "input": output})),
        )
        .await;
        assert_eq!(counted, json!({"object": "response.input_tokens", "input_tokens": counter.total()}));

        // Without the first response the output answers no call.
        let (status, _, err) =
            call(&app, "POST", "/v1/responses", Some(json!({"model": "gpt-4o", "input": output}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err["error"]["param"], "input");
    }

    #[tokio::test]
    async fn stored_responses_retrieve_list_delete() {
        let app = app();
        let input = json!(["first", "second", "third"].map(|t| json!({"role": "user", "content": t})));
        let (_, _, created) =
            call(&app, "POST", "/v1/responses", Some(json!({"model": "gpt-4o", "input": input}))).await;
        let id = created["id"].as_str().expect("id");
        let (status, _, got) = call(&app, "GET", &format!("/v1/responses/{id}"), None).await;
        assert_eq!((status, &got), (StatusCode::OK, &created));

        let (_, _, page) = call(&app, "GET", &format!("/v1/responses/{id}/input_items?limit=2"), None).await;
        let texts: Vec<&str> =
            page["data"].as_array().expect("data").iter().filter_map(|i| i["content"][0]["text"].as_str()).collect();
        assert_eq!(texts, ["third", "second"], "newest first by default");
        assert_eq!(page["has_more"], true);
        assert_eq!(page["data"][0]["type"], "message");
        let after = page["last_id"].as_str().expect("last_id");
        let (_, _, rest) = call(&app, "GET", &format!("/v1/responses/{id}/input_items?after={after}"), None).await;
        assert_eq!(rest["data"][0]["content"][0]["text"], "first");
        assert_eq!(rest["has_more"], false);
        let (_, _, asc) = call(&app, "GET", &format!("/v1/responses/{id}/input_items?order=asc"), None).await;
        assert_eq!(asc["data"][0]["content"], json!([{"type": "input_text", "text": "first"}]));

        let (status, _, err) = call(&app, "POST", &format!("/v1/responses/{id}/cancel"), None).await;
        assert_eq!((status, err["error"]["type"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request_error")));
        let (status, _, deleted) = call(&app, "DELETE", &format!("/v1/responses/{id}"), None).await;
        assert_eq!((status, deleted), (StatusCode::OK, json!({"id": id, "object": "response", "deleted": true})));
        for (method, path) in [("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")] {
            let (status, _, err) = call(&app, method, &format!("/v1/responses/{id}{path}"), None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(err["error"]["message"], format!("Response with id '{id}' not found."));
        }
        let (status, _, err) = call(
            &app,
            "POST",
            "/v1/responses",
            Some(json!({"model": "gpt-4o", "input": "x", "previous_response_id": id})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err["error"]["code"], "previous_response_not_found");

        // `store: false` keeps nothing.
        let (_, _, unstored) =
            call(&app, "POST", "/v1/responses", Some(json!({"model": "gpt-4o", "input": "x", "store": false}))).await;
        let path = format!("/v1/responses/{}", unstored["id"].as_str().expect("id"));
        assert_eq!(call(&app, "GET", &path, None).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn stream_reports_usage_with_its_terminal_event() {
        let app = app();
        let (status, headers, body) =
            call(&app, "POST", "/v1/responses", Some(json!({"model": "gpt-4o", "input": "Hi", "stream": true}))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream; charset=utf-8"));
        let body = body.as_str().expect("SSE text");
        let last = body.trim_end().rsplit("\n\n").next().expect("frames");
        assert!(last.starts_with("event: response.completed\ndata: "), "{last}");
        let completed: Value = serde_json::from_str(&last["event: response.completed\ndata: ".len()..]).expect("JSON");
        let t = tally(&app).await;
        assert_eq!(t["total_tokens"], completed["response"]["usage"]["total_tokens"]);
        assert_eq!(t["requests"], 1);
    }

    #[tokio::test]
    async fn bad_requests_are_openai_400s() {
        let app = app();
        let cases = [
            (json!({"input": "x"}), None),
            (json!({"model": "gpt-4o"}), Some("input")),
            (json!({"model": "gpt-4o", "input": {"a": 1}}), Some("input")),
            (json!({"model": "gpt-4o", "input": [{"role": "robot", "content": "x"}]}), Some("input[0].role")),
            (json!({"model": "gpt-4o", "input": [{"type": "shell_call"}]}), Some("input[0].type")),
            (
                json!({"model": "gpt-4o", "input": [{"type": "function_call_output", "call_id": "c"}]}),
                Some("input[0].output"),
            ),
            (json!({"model": "gpt-4o", "input": "x", "instructions": 3}), Some("instructions")),
            (json!({"model": "gpt-4o", "input": "x", "max_output_tokens": 15}), Some("max_output_tokens")),
            (json!({"model": "gpt-4o", "input": "x", "previous_response_id": 7}), Some("previous_response_id")),
            (json!({"model": "gpt-4o", "input": "x", "tools": [{"type": "function"}]}), Some("tools[0].name")),
            (json!({"model": "gpt-4o", "input": "x", "background": true, "store": false}), Some("background")),
        ];
        for (body, param) in cases {
            let (status, _, err) = call(&app, "POST", "/v1/responses", Some(body.clone())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err["error"]["type"], "invalid_request_error", "{body}");
            assert_eq!(err["error"]["param"].as_str(), param, "{body}: {err}");
        }
        let (status, _, err) = call(&app, "POST", "/openai/responses", Some(json!({"model": "m", "input": "x"}))).await;
        assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("api-version")));
    }

    #[test]
    fn store_forgets_the_oldest_beyond_its_bound() {
        let store = Store::default();
        let stored = || Stored {
            object: Value::Null,
            input_items: Vec::new(),
            previous: None,
            turns: Vec::new(),
            background: false,
        };
        for i in 0..=MAX_STORED_RESPONSES {
            store.insert(format!("resp_{i}"), stored());
        }
        assert!(store.get("resp_0").is_none());
        assert!(store.get("resp_1").is_some());
        assert!(store.get(&format!("resp_{MAX_STORED_RESPONSES}")).is_some());
        assert!(store.remove("resp_1"));
        assert!(!store.remove("resp_1"));
    }
}
