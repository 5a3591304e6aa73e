//! Prompt-token estimates for the token-limit policy.
//!
//! The policy works reserve-then-reconcile: before a request goes to the backend the gateway reserves
//! the prompt tokens it expects the backend to bill, so concurrent requests cannot overshoot a limit
//! while they are in flight, and once the response's `usage` arrives the reservation is corrected to
//! the real figure. The estimate therefore only has to be close and cheap, not exact: it follows the
//! openai-cookbook's "How to count tokens with tiktoken" accounting, which is what llm-sim (our test
//! backend) bills, and is approximate where OpenAI's hidden prompt formatting is not public (tool
//! definitions, images).

use std::sync::OnceLock;

use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;

/// Framing of every chat message (`<|start|>{role}<|message|>…<|end|>` in the cookbook's words).
const TOKENS_PER_MESSAGE: u64 = 3;
/// A `name` costs one token on top of its text.
const TOKENS_PER_NAME: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING_TOKENS: u64 = 3;
/// Flat charge per image content part. The real cost depends on the image's size and `detail`
/// (85 is OpenAI's price of a low-detail image, and the base of a high-detail one), which the gateway
/// cannot know without fetching and decoding the image; reconciliation corrects the difference.
const IMAGE_PART_TOKENS: u64 = 85;

/// Request bodies above this many bytes are estimated on tokio's blocking pool rather than on an
/// async worker. Measured with o200k_base in a release build on the (loaded, 2-core) CI machine:
/// 32 KiB took 1.9 ms of English prose and 6.3 ms of source code per estimate, 60-200 ns a byte.
/// So a body up to 8 KiB holds a worker for at most about 0.5-1.6 ms, and the hand-over to the
/// blocking pool (a thread hand-off and a copy of the parsed body) would cost about as much as it
/// saves; anything longer would hold up every connection on that worker for milliseconds.
pub const BLOCKING_ESTIMATE_BYTES: usize = 8 * 1024;

/// What kind of request a prompt estimate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    Chat,
    Embeddings,
}

/// Counts tokens with the encoding of the requested model. The encoders are built once per process,
/// on first use or by [`TokenEstimator::warm_up`], since building one takes about 0.1 s.
pub struct TokenEstimator {
    o200k: OnceLock<CoreBPE>,
    cl100k: OnceLock<CoreBPE>,
}

static GLOBAL: TokenEstimator = TokenEstimator { o200k: OnceLock::new(), cl100k: OnceLock::new() };

impl TokenEstimator {
    /// The process-wide estimator.
    pub fn global() -> &'static TokenEstimator {
        &GLOBAL
    }

    /// Builds the encoder of current models (and of unknown deployment names) now, so the first
    /// limited request does not pay for it. Called at start-up when a token-limit policy is
    /// configured. cl100k_base, for gpt-4/gpt-3.5-era models, is built on first use instead:
    /// it holds about 15 MiB resident (o200k_base about 40 MiB), which a gateway that never sees
    /// those models should not carry.
    pub fn warm_up(&self) {
        self.o200k();
    }

    /// Prompt tokens of a chat-completions request: per message 3 framing tokens plus the text of
    /// `role`, `content`, `name` (+1), `tool_call_id` and each tool call's function `name` and
    /// `arguments`; then 3 for the reply priming. Content-part arrays count their `text` parts
    /// (several are joined by newlines first, as llm-sim does) and [`IMAGE_PART_TOKENS`] per
    /// `image_url` part. A `tools` array is counted as its serialized JSON: OpenAI renders tool
    /// definitions in a hidden format whose count differs from that by a few tokens. llm-sim does
    /// not bill `tool_call_id`, so against it tool results are estimated a few tokens high.
    ///
    /// The body is only borrowed; the joined multi-part text and the serialized `tools` are the
    /// only strings built.
    pub fn chat_prompt_tokens(&self, model: Option<&str>, body: &Map<String, Value>) -> u64 {
        let bpe = self.encoder(model);
        let messages = body.get("messages").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        let mut total = REPLY_PRIMING_TOKENS;
        for message in messages.iter().filter_map(Value::as_object) {
            total += TOKENS_PER_MESSAGE + message_tokens(bpe, message);
        }
        if let Some(tools) = body.get("tools").filter(|tools| tools.is_array()) {
            // Serializing a `Value` cannot fail: its map keys are strings.
            total += serde_json::to_string(tools).map_or(0, |json| count(bpe, &json));
        }
        total
    }

    /// Input tokens of an embeddings request: `input` is a string, an array of strings, an array of
    /// token ids, or an array of token-id arrays; ids count one token each.
    pub fn embedding_input_tokens(&self, model: Option<&str>, body: &Map<String, Value>) -> u64 {
        let bpe = self.encoder(model);
        match body.get("input") {
            Some(Value::String(text)) => count(bpe, text),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => count(bpe, text),
                    Value::Number(_) => 1,
                    Value::Array(ids) => ids.len() as u64,
                    _ => 0,
                })
                .sum(),
            _ => 0,
        }
    }

    /// The prompt tokens of a request of this kind.
    pub fn prompt_tokens(&self, kind: PromptKind, model: Option<&str>, body: &Map<String, Value>) -> u64 {
        match kind {
            PromptKind::Chat => self.chat_prompt_tokens(model, body),
            PromptKind::Embeddings => self.embedding_input_tokens(model, body),
        }
    }

    /// [`Self::prompt_tokens`] without holding an async worker: a body of more than
    /// [`BLOCKING_ESTIMATE_BYTES`] (`body_len`, its size as received) is counted on the blocking
    /// pool, from a copy of the parsed body.
    pub async fn prompt_tokens_off_worker(
        &'static self,
        kind: PromptKind,
        model: Option<&str>,
        body: &Map<String, Value>,
        body_len: usize,
    ) -> u64 {
        if body_len <= BLOCKING_ESTIMATE_BYTES {
            return self.prompt_tokens(kind, model, body);
        }
        let (model, body) = (model.map(str::to_owned), body.clone());
        match tokio::task::spawn_blocking(move || self.prompt_tokens(kind, model.as_deref(), &body)).await {
            Ok(tokens) => tokens,
            // The estimate panicked: let it panic the request as it would have on the worker.
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Cancelled: only when the runtime shuts down, and then nothing waits for the answer.
            Err(_) => 0,
        }
    }

    fn encoder(&self, model: Option<&str>) -> &CoreBPE {
        if model.is_some_and(uses_cl100k) { self.cl100k() } else { self.o200k() }
    }

    fn o200k(&self) -> &CoreBPE {
        self.o200k.get_or_init(|| {
            tiktoken_rs::o200k_base().expect("o200k_base is built from a vocabulary compiled into tiktoken-rs")
        })
    }

    fn cl100k(&self) -> &CoreBPE {
        self.cl100k.get_or_init(|| {
            tiktoken_rs::cl100k_base().expect("cl100k_base is built from a vocabulary compiled into tiktoken-rs")
        })
    }
}

/// Whether `model` is one of the older models tokenized with cl100k_base. Everything else, including
/// names we do not know (Azure deployment names are arbitrary), gets o200k_base: it is the encoding
/// of every current model. `gpt-35-*` is Azure's spelling of `gpt-3.5-*`.
fn uses_cl100k(model: &str) -> bool {
    model == "gpt-4"
        || model.starts_with("gpt-4-")
        || model.starts_with("gpt-3.5")
        || model.starts_with("gpt-35")
        || model == "text-embedding-ada-002"
        || model.starts_with("text-embedding-3-")
}

/// Tokens of `text` as ordinary text: special-token strings such as `<|endoftext|>` in user content
/// are counted as the text they are, like the API does, instead of being rejected.
fn count(bpe: &CoreBPE, text: &str) -> u64 {
    bpe.count_ordinary(text) as u64
}

fn str_tokens(bpe: &CoreBPE, object: &Map<String, Value>, key: &str) -> u64 {
    object.get(key).and_then(Value::as_str).map_or(0, |text| count(bpe, text))
}

/// One message's tokens, without the per-message framing.
fn message_tokens(bpe: &CoreBPE, message: &Map<String, Value>) -> u64 {
    let mut total = str_tokens(bpe, message, "role")
        + content_tokens(bpe, message.get("content"))
        + str_tokens(bpe, message, "tool_call_id");
    if let Some(name) = message.get("name").and_then(Value::as_str) {
        total += TOKENS_PER_NAME + count(bpe, name);
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for function in calls.iter().filter_map(|call| call.get("function")).filter_map(Value::as_object) {
            total += str_tokens(bpe, function, "name") + str_tokens(bpe, function, "arguments");
        }
    }
    total
}

fn content_tokens(bpe: &CoreBPE, content: Option<&Value>) -> u64 {
    let parts = match content {
        Some(Value::String(text)) => return count(bpe, text),
        Some(Value::Array(parts)) => parts,
        _ => return 0,
    };
    let is = |part: &Value, kind: &str| part.get("type").and_then(Value::as_str) == Some(kind);
    let images = parts.iter().filter(|part| is(part, "image_url")).count() as u64;
    let mut texts =
        parts.iter().filter(|part| is(part, "text")).filter_map(|part| part.get("text").and_then(Value::as_str));
    let text = match (texts.next(), texts.next()) {
        (None, _) => 0,
        (Some(only), None) => count(bpe, only),
        // Joined like llm-sim does, since a newline can merge with its neighbours into one token.
        (Some(first), Some(second)) => {
            let mut joined = format!("{first}\n{second}");
            for text in texts {
                joined.push('\n');
                joined.push_str(text);
            }
            count(bpe, &joined)
        }
    };
    text + images * IMAGE_PART_TOKENS
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("test body must be an object, got {other}"),
        }
    }

    fn chat(model: &str, value: Value) -> u64 {
        TokenEstimator::global().chat_prompt_tokens(Some(model), &body(value))
    }

    fn embeddings(value: Value) -> u64 {
        TokenEstimator::global().embedding_input_tokens(Some("text-embedding-3-small"), &body(value))
    }

    #[test]
    fn counts_known_strings() {
        let estimator = TokenEstimator::global();
        estimator.warm_up();
        assert_eq!(count(estimator.o200k(), "hello world"), 2);
        assert_eq!(count(estimator.cl100k(), "hello world"), 2);
        assert_eq!(count(estimator.o200k(), ""), 0);
    }

    #[test]
    fn special_token_text_is_counted_as_text() {
        let estimator = TokenEstimator::global();
        // Ordinary text, so several tokens rather than the single special token (or a panic).
        assert_eq!(count(estimator.o200k(), "<|endoftext|>"), 7);
        assert_eq!(count(estimator.cl100k(), "<|endoftext|>"), 7);
        let prompt = json!({"messages": [{"role": "user", "content": "<|endoftext|>"}]});
        assert_eq!(chat("gpt-4o", prompt), 3 + 3 + 1 + 7);
    }

    #[test]
    fn selects_encoding_by_model() {
        for model in ["gpt-4", "gpt-4-0613", "gpt-4-turbo", "gpt-3.5-turbo", "gpt-35-turbo", "text-embedding-ada-002"] {
            assert!(uses_cl100k(model), "{model}");
        }
        for model in ["text-embedding-3-small", "text-embedding-3-large"] {
            assert!(uses_cl100k(model), "{model}");
        }
        for model in
            ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.5-preview", "o1", "o3-mini", "o4-mini", "my-deployment", ""]
        {
            assert!(!uses_cl100k(model), "{model}");
        }
        // The choice shows in the count: the encodings split this text differently.
        let input = body(json!({"input": "ａｂｃ 你好世界 ===== \n\n\n"}));
        let estimator = TokenEstimator::global();
        let by_model = |model| estimator.embedding_input_tokens(model, &input);
        assert_eq!(by_model(Some("text-embedding-ada-002")), 14);
        assert_eq!(by_model(Some("gpt-4")), 14);
        assert_eq!(by_model(Some("gpt-4o")), 10);
        assert_eq!(by_model(Some("my-deployment")), 10);
        assert_eq!(by_model(None), 10);
    }

    /// The cookbook's example conversation; it reports 129 prompt tokens for gpt-4 / gpt-3.5-turbo
    /// and 124 for gpt-4o.
    #[test]
    fn matches_cookbook_example() {
        let prompt = json!({"messages": [
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ]});
        assert_eq!(chat("gpt-4", prompt.clone()), 129);
        assert_eq!(chat("gpt-3.5-turbo", prompt.clone()), 129);
        assert_eq!(chat("gpt-4o", prompt), 124);
    }

    #[test]
    fn two_message_chat_follows_the_formula() {
        let prompt = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello world"},
        ]});
        // priming 3 + (3 + "system" 1 + "You are terse." 4) + (3 + "user" 1 + "hello world" 2)
        assert_eq!(chat("gpt-4o", prompt), 17);
        assert_eq!(chat("gpt-4o", json!({})), 3);
    }

    /// The `usage.prompt_tokens` llm-sim answered for these same requests.
    #[test]
    fn agrees_with_llm_sim() {
        let named = json!({"messages": [{"role": "user", "name": "bob", "content": "hello world"}]});
        assert_eq!(chat("gpt-4o", named), 11);
        let parts = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello"},
            {"type": "text", "text": "world."},
            {"type": "text", "text": "\nbye"},
        ]}]});
        // Counted as "hello\nworld.\n\nbye" (5 tokens).
        assert_eq!(chat("gpt-4o", parts), 12);
        let calls = json!({"messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            ]},
        ]});
        // 3 + (3 + 1 + 4) + (3 + "assistant" 1 + "get_weather" 2 + arguments 5).
        assert_eq!(chat("gpt-4o", calls), 22);
    }

    #[test]
    fn counts_content_parts_and_images() {
        let single = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]});
        assert_eq!(chat("gpt-4o", single), 3 + 3 + 1 + 2);
        let with_images = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "high"}},
        ]}]});
        assert_eq!(chat("gpt-4o", with_images), 3 + 3 + 1 + 2 + 2 * IMAGE_PART_TOKENS);
        let images_only = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]}]});
        assert_eq!(chat("gpt-4o", images_only), 3 + 3 + 1 + IMAGE_PART_TOKENS);
    }

    #[test]
    fn counts_tool_results_and_tool_definitions() {
        let result = json!({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]});
        // "tool" 1, "call_1" 3, "sunny" 2: llm-sim does not count `tool_call_id` and answers 9.
        assert_eq!(chat("gpt-4o", result), 3 + 3 + 1 + 3 + 2);
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        // Serialized with sorted keys: [{"function":{"name":"get_weather","parameters":{"type":"object"}},"type":"function"}]
        let with_tools = json!({"messages": [{"role": "user", "content": "hello world"}], "tools": tools});
        assert_eq!(chat("gpt-4o", with_tools), 3 + 3 + 1 + 2 + 21);
        let not_an_array = json!({"messages": [{"role": "user", "content": "hello world"}], "tools": null});
        assert_eq!(chat("gpt-4o", not_an_array), 3 + 3 + 1 + 2);
    }

    #[test]
    fn counts_embedding_inputs() {
        assert_eq!(embeddings(json!({"input": "hello world"})), 2);
        assert_eq!(embeddings(json!({"input": ["hello world", "hello", ""]})), 3);
        assert_eq!(embeddings(json!({"input": [15339, 1917, 0]})), 3);
        assert_eq!(embeddings(json!({"input": [[15339, 1917], [0], []]})), 3);
        assert_eq!(embeddings(json!({"input": null})), 0);
        assert_eq!(embeddings(json!({})), 0);
    }

    #[tokio::test]
    async fn a_large_prompt_is_counted_the_same_on_the_blocking_pool() {
        let estimator = TokenEstimator::global();
        let prose = "The gateway counts the tokens of every prompt it limits. ".repeat(1_000);
        for (kind, value) in [
            (PromptKind::Chat, json!({"messages": [{"role": "user", "content": prose}]})),
            (PromptKind::Embeddings, json!({"input": [prose, "hello world"]})),
        ] {
            let body = body(value);
            let len = serde_json::to_vec(&body).map(|json| json.len()).unwrap_or(0);
            assert!(len > BLOCKING_ESTIMATE_BYTES, "{len} bytes take the blocking path");
            let on_worker = estimator.prompt_tokens(kind, Some("gpt-4o"), &body);
            assert!(on_worker > 10_000, "{kind:?}: {on_worker}");
            assert_eq!(
                estimator.prompt_tokens_off_worker(kind, Some("gpt-4o"), &body, len).await,
                on_worker,
                "{kind:?}"
            );
            assert_eq!(
                estimator.prompt_tokens_off_worker(kind, Some("gpt-4o"), &body, 10).await,
                on_worker,
                "{kind:?}"
            );
        }
    }
}
