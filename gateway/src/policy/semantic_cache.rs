//! `semantic-cache-lookup` and `semantic-cache-store`: API Management's llm-semantic-cache-lookup
//! and -store. A chat completion whose prompt is similar enough to one answered before, in the
//! same partition, is answered from the cache without calling the backend.
//!
//! What a hit must share with the cached entry:
//! - the **partition**, an exact match on everything that changes the answer but is not the
//!   prompt's text: the `vary-by` values (the subscription by default, so tenants never share),
//!   the model or deployment, the tool definitions and tool choice, the response format, the
//!   number of choices, the embedding space, and the system messages when they are left out of
//!   the similarity (`ignore-system-messages`);
//! - a prompt embedding with cosine similarity at or above `similarity-threshold`;
//! - with `verify-hits` (on by default), the same decisive details: numbers, dates, units,
//!   negation, direction, entities, versions, code identifiers, languages (`cache::guard`).
//!
//! Skipped (`bypass`): other operations, conversations longer than `max-message-count`, requests
//! carrying tool results, prompts with non-text parts, and prompts longer than the embedding model
//! reads (it would compare only their beginnings). Every request skips a lookup that is switched off
//! (`aigw quickstart` without its embeddings model).
//!
//! The lookup fails open: when the embeddings source or the store fails, the request goes to the
//! backend (`x-llm-cache-status: error`). A hit is answered in the form the client asked for
//! (JSON, or a replayed stream) and reports no backend usage, so a token limit configured after
//! the lookup gives its reservation back and one configured before is never reached.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::template::Template;
use super::{Flow, Policy};
use crate::cache::answer::{is_cacheable, replay_as_stream};
use crate::cache::guard::{HitRule, Miss};
use crate::cache::store::{CacheStore, NewEntry};
use crate::config::{SemanticCacheLookupConfig, SemanticCacheStoreConfig};
use crate::context::{CacheState, CacheStatus, Payload, PendingEntry, RequestContext};
use crate::embed::Embedder;
use crate::error::GatewayError;
use crate::protocol::Operation;
use crate::protocol::openai::{ChatRequest, usage_of_response};

/// Similar entries checked per lookup: when the most similar one is refused by the guard (a
/// look-alike asking something else), a less similar true paraphrase may still serve.
const CANDIDATES: usize = 5;
/// At most one warning per this interval when the embeddings source or the store fails, so an
/// outage does not flood the log.
const WARN_INTERVAL_SECS: u64 = 10;

/// Request fields that change the answer without being part of the prompt's text.
const ANSWER_SHAPING_FIELDS: [&str; 10] = [
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "n",
    "logprobs",
    "top_logprobs",
    "modalities",
];

pub struct SemanticCacheLookup {
    rule: HitRule,
    vary_by: Vec<Template>,
    ignore_system_messages: bool,
    max_message_count: Option<usize>,
    bypass_tool_results: bool,
    /// Where prompt embeddings come from, or why the lookup is switched off.
    embedder: Result<Arc<dyn Embedder>, &'static str>,
    embeddings_timeout: Duration,
    store: Arc<dyn CacheStore>,
    warnings: Throttle,
}

/// A request's place in the cache: the partition and the text compared for similarity.
struct CacheKey {
    partition: String,
    prompt: String,
}

impl SemanticCacheLookup {
    pub fn new(
        config: &SemanticCacheLookupConfig,
        embedder: Result<Arc<dyn Embedder>, &'static str>,
        store: Arc<dyn CacheStore>,
    ) -> Result<Self, String> {
        Ok(Self {
            rule: HitRule::from_config(config),
            vary_by: config.vary_by.iter().map(|t| Template::parse(t)).collect::<Result<_, _>>()?,
            ignore_system_messages: config.ignore_system_messages,
            max_message_count: config.max_message_count,
            bypass_tool_results: config.bypass_tool_results,
            embedder,
            embeddings_timeout: Duration::from_millis(config.embeddings_timeout_ms),
            store,
            warnings: Throttle::default(),
        })
    }

    /// The request's partition and prompt text, or why it skips the cache.
    fn key(&self, embedder: &dyn Embedder, ctx: &RequestContext, chat: &ChatRequest) -> Result<CacheKey, &'static str> {
        let messages = chat.body.get("messages").and_then(Value::as_array).ok_or("no messages")?;
        if self.max_message_count.is_some_and(|max| messages.len() > max) {
            return Err("conversation longer than max-message-count");
        }
        let mut hasher = Sha256::new();
        let mut field = |name: &str, value: &str| {
            // Length-prefixed, so no two different sets of values hash alike.
            hasher.update(format!("{name}:{}:", value.len()));
            hasher.update(value);
        };
        for template in &self.vary_by {
            field("vary-by", &template.render(ctx));
        }
        field("space", embedder.space());
        field("model", ctx.model().unwrap_or(""));
        for name in ANSWER_SHAPING_FIELDS {
            if let Some(value) = chat.body.get(name).filter(|v| !v.is_null()) {
                // serde_json's maps are sorted, so equal definitions serialise equally.
                field(name, &value.to_string());
            }
        }
        let mut prompt = String::new();
        for message in messages {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("");
            if role == "tool" && self.bypass_tool_results {
                return Err("request carries tool results");
            }
            let text = message_text(message).ok_or("prompt has non-text content")?;
            if matches!(role, "system" | "developer") && self.ignore_system_messages {
                field("system", &text);
                continue;
            }
            if message.get("tool_calls").is_some_and(|calls| !calls.is_null()) {
                field("tool-calls", &message["tool_calls"].to_string());
            }
            if !prompt.is_empty() {
                prompt.push('\n');
            }
            prompt.push_str(&text);
        }
        if prompt.trim().is_empty() {
            return Err("no prompt text");
        }
        if embedder.truncates(&prompt) {
            return Err("prompt longer than the embedding model reads");
        }
        Ok(CacheKey { partition: hex::encode(&hasher.finalize()[..16]), prompt })
    }

    fn warn(&self, what: &str, error: &dyn std::fmt::Display) {
        if self.warnings.ready() {
            tracing::warn!(error = %error, "semantic cache: {what} failed; requests go to the backend (fail-open)");
        }
    }

    /// Serves the first similar, verified entry whose answer is still stored.
    async fn find(&self, key: &CacheKey, vector: &[f32], state: &mut CacheState) -> Result<Option<Bytes>, ()> {
        let candidates = self
            .store
            .search(&key.partition, vector, self.rule.threshold, CANDIDATES)
            .await
            .map_err(|e| self.warn("the cache search", &e))?;
        for candidate in candidates {
            match self.rule.accepts(candidate.score, &key.prompt, &candidate.prompt) {
                Ok(()) => {}
                Err(Miss::Refused(refusal)) => {
                    state.reason.get_or_insert(refusal.reason);
                    continue;
                }
                Err(Miss::BelowThreshold) => continue,
            }
            let answer = self
                .store
                .answer(&key.partition, candidate.id)
                .await
                .map_err(|e| self.warn("reading an answer", &e))?;
            if let Some(answer) = answer {
                state.score = Some(candidate.score);
                return Ok(Some(answer));
            }
        }
        Ok(None)
    }
}

/// The text of a message's content (a string or text parts); `None` for images, audio or files.
fn message_text(message: &Value) -> Option<String> {
    match message.get("content") {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(parts)) => {
            let texts: Option<Vec<&str>> = parts
                .iter()
                .map(|part| match part.get("type").and_then(Value::as_str) {
                    Some("text") => part.get("text").and_then(Value::as_str),
                    _ => None,
                })
                .collect();
            texts.map(|t| t.join("\n"))
        }
        Some(_) => None,
    }
}

/// The response for a hit, in the form the client asked for.
fn hit_response(chat: &ChatRequest, answer: &Bytes) -> Option<Response> {
    let (content_type, body) = if chat.stream {
        let completion: Value = serde_json::from_slice(answer).ok()?;
        ("text/event-stream", replay_as_stream(&completion, chat.client_wants_usage))
    } else {
        ("application/json", answer.clone())
    };
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if chat.stream {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    Some(response)
}

#[async_trait]
impl Policy for SemanticCacheLookup {
    async fn inbound(&self, ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        let keyed = match (&self.embedder, ctx.operation, ctx.payload()) {
            (Err(switched_off), _, _) => Err(*switched_off),
            (Ok(embedder), Operation::ChatCompletions, Some(Payload::Chat(chat))) => {
                self.key(embedder.as_ref(), ctx, chat).map(|key| (embedder, key))
            }
            _ => Err("not a chat completion"),
        };
        let (embedder, key) = match keyed {
            Ok(keyed) => keyed,
            Err(reason) => {
                ctx.cache = Some(CacheState::new(CacheStatus::Bypass).because(reason));
                return Ok(Flow::Continue);
            }
        };
        let embedded = tokio::time::timeout(self.embeddings_timeout, embedder.embed(&key.prompt)).await;
        let vector = match embedded {
            Ok(Ok(vector)) => vector,
            Ok(Err(error)) => {
                self.warn("embedding the prompt", &error);
                ctx.cache = Some(CacheState::new(CacheStatus::Error).because("embeddings source failed"));
                return Ok(Flow::Continue);
            }
            Err(_) => {
                let error = format!("no embedding within {} ms", self.embeddings_timeout.as_millis());
                self.warn("embedding the prompt", &error);
                ctx.cache = Some(CacheState::new(CacheStatus::Error).because("embeddings source failed"));
                return Ok(Flow::Continue);
            }
        };
        let mut state = CacheState::new(CacheStatus::Miss);
        let found = self.find(&key, &vector, &mut state).await;
        let hit = match (found, ctx.payload()) {
            (Ok(Some(answer)), Some(Payload::Chat(chat))) => hit_response(chat, &answer).map(|r| (r, answer)),
            (Err(()), _) => {
                ctx.cache = Some(CacheState::new(CacheStatus::Error).because("cache store failed"));
                return Ok(Flow::Continue);
            }
            _ => None,
        };
        if let Some((response, answer)) = hit {
            state.status = CacheStatus::Hit;
            state.saved = usage_of_response(&answer);
            ctx.cache = Some(state);
            return Ok(Flow::Respond(response));
        }
        state.pending = Some(PendingEntry { partition: key.partition, vector, prompt: key.prompt });
        ctx.cache = Some(state);
        Ok(Flow::Continue)
    }

    fn response_headers(&self, ctx: &RequestContext, headers: &mut HeaderMap) {
        let Some(state) = &ctx.cache else { return };
        headers.insert("x-llm-cache-status", HeaderValue::from_static(state.status.name()));
        if let Some(score) = state.score.filter(|_| state.status == CacheStatus::Hit)
            && let Ok(value) = HeaderValue::try_from(format!("{score:.4}"))
        {
            headers.insert("x-llm-cache-score", value);
        }
    }
}

pub struct SemanticCacheStore {
    ttl: Duration,
    store: Arc<dyn CacheStore>,
    warnings: Throttle,
}

impl SemanticCacheStore {
    pub fn new(config: &SemanticCacheStoreConfig, store: Arc<dyn CacheStore>) -> Self {
        Self { ttl: Duration::from_secs(config.duration), store, warnings: Throttle::default() }
    }
}

#[async_trait]
impl Policy for SemanticCacheStore {
    fn reads_body(&self) -> bool {
        false
    }

    fn wants_answer(&self, ctx: &RequestContext) -> bool {
        ctx.cache.as_ref().is_some_and(|state| state.pending.is_some())
    }

    /// Stores a complete, successful answer once the exchange is over (for a stream: after its
    /// last chunk), off the response path.
    async fn completed(&self, ctx: &RequestContext) {
        let Some(pending) = ctx.cache.as_ref().and_then(|state| state.pending.as_ref()) else { return };
        let Some(answer) = ctx.answer.as_ref() else { return };
        if ctx.outcome.status != 200 || ctx.outcome.stream_incomplete {
            return;
        }
        let cacheable = serde_json::from_slice::<Value>(answer).is_ok_and(|completion| is_cacheable(&completion));
        if !cacheable {
            return;
        }
        let entry = NewEntry {
            partition: pending.partition.clone(),
            vector: pending.vector.clone(),
            prompt: pending.prompt.clone(),
            answer: answer.clone(),
            ttl: self.ttl,
        };
        if let Err(error) = self.store.insert(entry).await
            && self.warnings.ready()
        {
            tracing::warn!(error = %error, "semantic cache: storing an answer failed; it will be a miss next time");
        }
    }
}

/// Lets one warning through per [`WARN_INTERVAL_SECS`].
#[derive(Default)]
struct Throttle {
    last_secs: AtomicU64,
}

impl Throttle {
    fn ready(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let last = self.last_secs.load(Ordering::Relaxed);
        now >= last + WARN_INTERVAL_SECS
            && self.last_secs.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_text_reads_strings_and_text_parts_only() {
        assert_eq!(message_text(&serde_json::json!({"content": "hi"})).as_deref(), Some("hi"));
        let parts = serde_json::json!({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]});
        assert_eq!(message_text(&parts).as_deref(), Some("a\nb"));
        let image = serde_json::json!({"content": [{"type": "image_url", "image_url": {"url": "x"}}]});
        assert_eq!(message_text(&image), None);
        assert_eq!(message_text(&serde_json::json!({"role": "assistant"})).as_deref(), Some(""));
    }

    #[test]
    fn the_throttle_lets_one_warning_through_per_interval() {
        let throttle = Throttle::default();
        assert!(throttle.ready());
        assert!(!throttle.ready());
    }

    #[test]
    fn answer_shaping_fields_are_distinct() {
        let mut names = ANSWER_SHAPING_FIELDS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ANSWER_SHAPING_FIELDS.len());
    }
}
