//! `POST .../embeddings`: all-MiniLM-L6-v2's real embeddings when the model is installed (the gateway's own local
//! model), otherwise deterministic unit vectors seeded by the input text.

use std::borrow::Cow;
use std::path::{self, PathBuf};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use aigw::embed::{EmbedError, LocalModel, MODEL_DIR_ENV, normalized};
use tokio::sync::OnceCell;

use crate::answer::{PromptHash, SplitMix};
use crate::api::{self, ApiError, AppState, Target};
use crate::{faults, tokens};

/// text-embedding-3-small's native size.
const DEFAULT_DIMENSIONS: usize = 1536;
/// text-embedding-3-large's native size, the largest OpenAI serves.
const MAX_DIMENSIONS: usize = 3072;
/// OpenAI's limit on inputs per request.
const MAX_INPUTS: usize = 2048;
/// Inputs the model runs at once: a batch is padded to its longest input, so a request of 2048 long inputs in one
/// batch would need gigabytes for its attention scores.
const MODEL_BATCH: usize = 16;

/// What `/embeddings` answers with.
pub enum Source {
    /// Deterministic unit vectors seeded by the text; `why` the model is not used.
    Hash { why: &'static str },
    /// The model's real embeddings. It loads in the background from start-up, so the listening line is not held up.
    Model { dir: PathBuf, loaded: OnceCell<Result<Arc<LocalModel>, String>> },
}

impl Source {
    /// From `--embedding-model`: a model directory, `none` for hash vectors, or absent for the installed model if
    /// there is one (found as the gateway finds it). A directory named but without the model is an error.
    pub fn choose(flag: Option<&path::Path>) -> Result<Self, EmbedError> {
        let model = |dir| Self::Model { dir, loaded: OnceCell::new() };
        match flag {
            Some(flag) if flag == path::Path::new("none") => Ok(Self::Hash { why: "--embedding-model none" }),
            Some(dir) => LocalModel::locate(Some(dir)).map(model),
            None if std::env::var_os(MODEL_DIR_ENV).is_some() => LocalModel::locate(None).map(model),
            None => Ok(LocalModel::locate(None).map_or(Self::Hash { why: "model not installed" }, model)),
        }
    }

    /// The start-up line that says what is served.
    pub fn describe(&self) -> String {
        match self {
            Self::Hash { why } => format!("embeddings: hash vectors ({why})"),
            Self::Model { dir, .. } => format!("embeddings: all-MiniLM-L6-v2 from {}", dir.display()),
        }
    }

    /// The model, once loaded; `None` for hash vectors.
    pub async fn model(&self) -> Result<Option<Arc<LocalModel>>, ApiError> {
        let Self::Model { dir, loaded } = self else { return Ok(None) };
        let loaded = loaded
            .get_or_init(|| async {
                let dir = dir.clone();
                match tokio::task::spawn_blocking(move || LocalModel::shared(Some(&dir))).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("loading the embeddings model failed: {e}")),
                }
            })
            .await;
        loaded.clone().map(Some).map_err(ApiError::internal)
    }

    /// The default and the largest `dimensions`.
    fn dimensions(&self) -> (usize, usize) {
        match self {
            Self::Hash { .. } => (DEFAULT_DIMENSIONS, MAX_DIMENSIONS),
            Self::Model { .. } => (LocalModel::DIMENSIONS, LocalModel::DIMENSIONS),
        }
    }
}

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

#[derive(Clone, Copy)]
enum Format {
    Float,
    Base64,
}

/// One input after validation: the text that seeds its vector (token-id
/// inputs are decoded, so they embed like the text they encode) and its
/// token count.
struct Input<'a> {
    text: Cow<'a, str>,
    tokens: usize,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

async fn handle(state: &AppState, target: Target, headers: &HeaderMap, body: &[u8]) -> Response {
    let req = match api::parse_object(body) {
        Ok(req) => req,
        Err(err) => return err.into_response(),
    };
    let parsed = target.model(&req).and_then(|model| {
        let inputs = inputs(req.get("input"))?;
        let dims = dimensions(req.get("dimensions"), state.embeddings.dimensions())?;
        let format = format(req.get("encoding_format"))?;
        Ok((model, inputs, dims, format))
    });
    let (model, inputs, dims, format) = match parsed {
        Ok(p) => p,
        Err(err) => return err.into_response(),
    };
    let hash = PromptHash::of(&inputs[0].text);
    let mut resp = respond(state, headers, &model, &inputs, dims, format).await;
    api::tag_response(&mut resp, &model, Some(hash.short()));
    resp
}

async fn respond(
    state: &AppState,
    headers: &HeaderMap,
    model: &str,
    inputs: &[Input<'_>],
    dims: usize,
    format: Format,
) -> Response {
    let plan = match faults::plan(state, headers) {
        Ok(plan) => plan,
        Err(err) => return err.into_response(),
    };
    if !plan.ttft.is_zero() {
        tokio::time::sleep(plan.ttft).await;
    }
    if plan.drop {
        return faults::dropped_response();
    }
    let vectors = match vectors(state, inputs, dims).await {
        Ok(vectors) => vectors,
        Err(err) => return err.into_response(),
    };
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding",
            index,
            embedding: match format {
                Format::Float => Vector::Float(v),
                Format::Base64 => Vector::Base64(to_base64(&v)),
            },
        })
        .collect();
    let prompt_tokens = inputs.iter().map(|i| i.tokens).sum();
    let list = EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens },
    };
    if let Some(tally) = state.tally.pending(headers, prompt_tokens, 0, 0) {
        tally.report();
    }
    api::json_response(StatusCode::OK, &list)
}

/// One unit vector of `dims` components per input, from the model or the hash.
async fn vectors(state: &AppState, inputs: &[Input<'_>], dims: usize) -> Result<Vec<Vec<f32>>, ApiError> {
    let Some(model) = state.embeddings.model().await? else {
        return Ok(inputs.iter().map(|input| vector(&input.text, dims)).collect());
    };
    let texts: Vec<String> = inputs.iter().map(|input| input.text.clone().into_owned()).collect();
    let embedded = tokio::task::spawn_blocking(move || {
        let mut vectors = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(MODEL_BATCH) {
            vectors.extend(model.embed_batch(&chunk.iter().map(String::as_str).collect::<Vec<_>>())?);
        }
        Ok::<_, EmbedError>(vectors)
    })
    .await;
    let vectors =
        embedded.map_err(|e| ApiError::internal(e.to_string()))?.map_err(|e| ApiError::internal(e.to_string()))?;
    // Like OpenAI's v3 models: a shorter vector is the leading components, scaled back to unit length.
    vectors
        .into_iter()
        .map(|mut v| {
            v.truncate(dims);
            normalized(v).ok_or_else(|| ApiError::internal("the model produced a zero vector"))
        })
        .collect()
}

fn invalid_input() -> ApiError {
    // OpenAI's wording for every malformed `input`.
    ApiError::invalid_request(
        "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
    )
    .param("input")
}

/// Accepts a string, an array of strings, an array of token ids, or an array
/// of token-id arrays; nothing empty, at most [`MAX_INPUTS`] entries.
fn inputs(v: Option<&Value>) -> Result<Vec<Input<'_>>, ApiError> {
    let items = match v {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(Value::String(s)) => return Ok(vec![text_input(s)?]),
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_INPUTS => items,
        Some(_) => return Err(invalid_input()),
    };
    if items.iter().all(Value::is_number) {
        return Ok(vec![token_input(items)?]);
    }
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => text_input(s),
            Value::Array(ids) => token_input(ids),
            _ => Err(invalid_input()),
        })
        .collect()
}

fn text_input(s: &str) -> Result<Input<'_>, ApiError> {
    if s.is_empty() {
        return Err(invalid_input());
    }
    Ok(Input { text: Cow::Borrowed(s), tokens: tokens::count(s) })
}

fn token_input(ids: &[Value]) -> Result<Input<'static>, ApiError> {
    let ids: Vec<u32> = ids
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect::<Option<_>>()
        .ok_or_else(invalid_input)?;
    if ids.is_empty() {
        return Err(invalid_input());
    }
    // Ids outside the vocabulary still get a stable vector: seed from the ids.
    let text = tokens::decode(&ids).unwrap_or_else(|| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    Ok(Input { text: Cow::Owned(text), tokens: ids.len() })
}

/// `dimensions` within 1..=max, `default` when absent.
fn dimensions(v: Option<&Value>, (default, max): (usize, usize)) -> Result<usize, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            n.as_u64().and_then(|d| usize::try_from(d).ok()).filter(|d| (1..=max).contains(d)).ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "Invalid 'dimensions': expected an integer between 1 and {max}, but got {n} instead."
                ))
                .param("dimensions")
                .code("invalid_value")
            })
        }
        Some(other) => Err(ApiError::invalid_type("dimensions", "an integer", other)),
    }
}

fn format(v: Option<&Value>) -> Result<Format, ApiError> {
    match v.and_then(Value::as_str) {
        None if v.is_none_or(Value::is_null) => Ok(Format::Float),
        Some("float") => Ok(Format::Float),
        Some("base64") => Ok(Format::Base64),
        _ => Err(ApiError::invalid_request(format!(
            "Invalid value for 'encoding_format': expected 'float' or 'base64', but got {}.",
            v.map_or_else(String::new, Value::to_string)
        ))
        .param("encoding_format")
        .code("invalid_value")),
    }
}

/// Unit-length vector whose components are a pure function of `text`.
fn vector(text: &str, dims: usize) -> Vec<f32> {
    let digest = Sha256::digest(text.as_bytes());
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    let mut rng = SplitMix::new(u64::from_le_bytes(seed));
    let mut v: Vec<f32> = (0..dims)
        // Top 24 bits -> [0, 1) exactly representable in f32, then [-1, 1).
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0)
        .collect();
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    v
}

/// What the OpenAI SDKs expect for `encoding_format: "base64"`: the raw
/// little-endian f32 bytes, base64-encoded.
fn to_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vectors_are_deterministic_unit_length() {
        let a = vector("hello", 1536);
        assert_eq!(a.len(), 1536);
        assert_eq!(a, vector("hello", 1536));
        assert_ne!(a, vector("hello!", 1536));
        let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        assert_eq!(vector("x", 8).len(), 8);
    }

    #[test]
    fn base64_round_trip() {
        let v = vector("round trip", 64);
        let decoded = BASE64.decode(to_base64(&v)).expect("valid base64");
        assert_eq!(decoded.len(), 64 * 4);
        let back: Vec<f32> = decoded.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(back, v);
    }

    #[test]
    fn dimensions_default_to_and_stop_at_what_the_source_serves() {
        let hash = Source::choose(Some(path::Path::new("none"))).expect("hash vectors need nothing");
        assert_eq!(hash.describe(), "embeddings: hash vectors (--embedding-model none)");
        assert_eq!(dimensions(None, hash.dimensions()).ok(), Some(DEFAULT_DIMENSIONS));
        assert_eq!(dimensions(Some(&json!(MAX_DIMENSIONS)), hash.dimensions()).ok(), Some(MAX_DIMENSIONS));

        let model = Source::Model { dir: PathBuf::from("/m"), loaded: OnceCell::new() };
        assert_eq!(model.describe(), "embeddings: all-MiniLM-L6-v2 from /m");
        assert_eq!(dimensions(None, model.dimensions()).ok(), Some(384));
        assert_eq!(dimensions(Some(&json!(64)), model.dimensions()).ok(), Some(64));
        for bad in [json!(385), json!(0), json!(-1), json!(1.5)] {
            assert!(dimensions(Some(&bad), model.dimensions()).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn input_shapes() {
        let one = json!("hello world");
        assert_eq!(inputs(Some(&one)).map(|i| i.len()).ok(), Some(1));
        let many = json!(["a", "b", "c"]);
        assert_eq!(inputs(Some(&many)).map(|i| i.len()).ok(), Some(3));

        // Token ids embed like the text they decode to.
        let ids: Vec<u32> = tokens::encode("hello world");
        let as_ids = json!(ids);
        let parsed = inputs(Some(&as_ids)).expect("token ids");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].text, "hello world");
        assert_eq!(parsed[0].tokens, ids.len());
        let nested = json!([ids, [1, 2, 3]]);
        assert_eq!(inputs(Some(&nested)).map(|i| i.len()).ok(), Some(2));

        for bad in [json!(""), json!([]), json!([1, "a"]), json!({"a": 1}), json!([[]]), json!([-1])] {
            assert!(inputs(Some(&bad)).is_err(), "{bad} must be rejected");
        }
        assert!(inputs(None).is_err());
    }
}
