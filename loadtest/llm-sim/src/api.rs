//! Shared HTTP plumbing: state, OpenAI-shaped errors, the auth/echo-header
//! middleware, route target resolution and the small static routes.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::faults::{FaultRates, Latency};
use crate::usage::{PromptCache, Tally};
use crate::{embeddings, responses};

pub const X_SIM_MODEL: HeaderName = HeaderName::from_static("x-sim-model");
pub const X_SIM_PROMPT_HASH: HeaderName = HeaderName::from_static("x-sim-prompt-hash");
const X_SIM_API_VERSION: HeaderName = HeaderName::from_static("x-sim-api-version");
const X_SIM_AUTH: HeaderName = HeaderName::from_static("x-sim-auth");
const X_SIM_REQUEST_ID: HeaderName = HeaderName::from_static("x-sim-request-id");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Models advertised by `GET /v1/models`; (id, created) pairs use OpenAI's
/// real creation timestamps so clients that sort by `created` behave.
const MODELS: &[(&str, u64)] = &[
    ("gpt-4o", 1_715_367_049),
    ("gpt-4o-mini", 1_721_172_741),
    ("gpt-4.1", 1_744_316_542),
    ("text-embedding-3-small", 1_705_948_997),
];

pub struct AppState {
    api_key: Option<String>,
    pub embeddings: embeddings::Source,
    pub latency: Latency,
    /// Changed at run time by `PUT /sim/faults`.
    pub faults: RwLock<FaultRates>,
    pub tally: Arc<Tally>,
    pub prompt_cache: PromptCache,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
    pub responses: responses::Store,
    /// The model list never changes, so it is serialized once.
    models_body: Bytes,
}

impl AppState {
    pub fn new(api_key: Option<String>, embeddings: embeddings::Source, latency: Latency, faults: FaultRates) -> Self {
        let list = ModelList {
            object: "list",
            data: MODELS
                .iter()
                .map(|&(id, created)| Model { id, object: "model", created, owned_by: "llm-sim" })
                .collect(),
        };
        Self {
            api_key,
            embeddings,
            latency,
            faults: RwLock::new(faults),
            tally: Arc::default(),
            prompt_cache: PromptCache::default(),
            responses: responses::Store::default(),
            models_body: Bytes::from(serde_json::to_vec(&list).unwrap_or_default()),
        }
    }
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

#[derive(Serialize)]
struct Model {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

/// An error rendered in OpenAI's `{"error":{...}}` shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: Cow<'static, str>,
    kind: &'static str,
    param: Option<Cow<'static, str>>,
    code: Option<&'static str>,
    /// Seconds for a 429's `Retry-After`.
    retry_after_secs: u64,
}

impl ApiError {
    pub fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_secs: 1,
        }
    }

    pub fn param(mut self, param: impl Into<Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// `Missing required parameter: 'x'.` as OpenAI phrases it.
    pub fn missing(param: impl Into<Cow<'static, str>>) -> Self {
        let param = param.into();
        Self::invalid_request(format!("Missing required parameter: '{param}'."))
            .param(param)
            .code("missing_required_parameter")
    }

    /// `Invalid type for 'x': expected ..., but got ... instead.`
    pub fn invalid_type(param: impl Into<Cow<'static, str>>, expected: &str, got: &Value) -> Self {
        let param = param.into();
        Self::invalid_request(format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            type_name(got)
        ))
        .param(param)
        .code("invalid_type")
    }

    /// A 404 of the API (an unknown path or object).
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self { status: StatusCode::NOT_FOUND, ..Self::invalid_request(message) }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "Rate limit reached for requests (simulated by llm-sim). Please try again in {retry_after_secs}s."
            )
            .into(),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after_secs,
        }
    }

    /// A real failure of the simulator (not an injected fault), in OpenAI's 500 shape.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_secs: 1,
        }
    }

    pub fn server_error() -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request. Sorry about that! (simulated by llm-sim)"
                .into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_secs: 1,
        }
    }

    fn unauthorized(message: &'static str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after_secs: 1,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        let mut resp = json_response(self.status, &body);
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after_secs));
        }
        resp
    }
}

/// JSON article for error messages: "a string", "an object", ...
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    // Serializing our own structs cannot fail (no non-string map keys).
    let body = serde_json::to_vec(value).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// Parses the request body the way OpenAI does: it must be a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::invalid_request(format!(
            "Invalid request body: expected a JSON object, but got {} instead.",
            type_name(&other)
        ))),
        Err(err) => Err(ApiError::invalid_request(format!(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON: {err}.)"
        ))),
    }
}

/// Which flavour of route a request came in on.
pub enum Target {
    /// `/v1/...` and `/openai/v1/...`: `model` is required in the body.
    OpenAi,
    /// `/openai/deployments/{deployment}/...`: the deployment is the default model.
    Deployment(String),
}

impl Target {
    /// Azure deployment routes refuse requests without `api-version`.
    pub fn azure(deployment: String, uri: &Uri) -> Result<Self, ApiError> {
        require_api_version(uri)?;
        Ok(Self::Deployment(deployment))
    }

    pub fn model(&self, body: &Map<String, Value>) -> Result<String, ApiError> {
        match (body.get("model"), self) {
            (Some(Value::String(m)), _) => Ok(m.clone()),
            (None | Some(Value::Null), Self::Deployment(d)) => Ok(d.clone()),
            (None | Some(Value::Null), Self::OpenAi) => {
                Err(ApiError::invalid_request("you must provide a model parameter"))
            }
            (Some(other), _) => Err(ApiError::invalid_type("model", "a string", other)),
        }
    }
}

/// Azure OpenAI's routes without `/v1` (`/openai/deployments/...`, `/openai/responses`) need
/// `?api-version=`.
pub fn require_api_version(uri: &Uri) -> Result<(), ApiError> {
    match query_param(uri, "api-version") {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(ApiError::invalid_request("Missing required query parameter: api-version")
            .param("api-version")
            .code("missing_required_parameter")),
    }
}

/// Middleware form of [`require_api_version`], for whole route groups.
pub async fn api_version_required(req: Request, next: Next) -> Response {
    match require_api_version(req.uri()) {
        Ok(()) => next.run(req).await,
        Err(err) => err.into_response(),
    }
}

pub fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Adds `x-sim-model` / `x-sim-prompt-hash` to a handler's response.
pub fn tag_response(resp: &mut Response, model: &str, prompt_hash: Option<&str>) {
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(model) {
        headers.insert(X_SIM_MODEL, v);
    }
    if let Some(hash) = prompt_hash.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(X_SIM_PROMPT_HASH, hash);
    }
}

/// The credential a request presented; `api-key` wins over a bearer token,
/// mirroring Azure OpenAI.
enum Credential<'a> {
    None,
    ApiKey(&'a str),
    Bearer(&'a str),
}

impl<'a> Credential<'a> {
    fn from_headers(headers: &'a HeaderMap) -> Self {
        if let Some(key) = headers.get(API_KEY).and_then(|v| v.to_str().ok()) {
            return Self::ApiKey(key);
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        bearer.map_or(Self::None, Self::Bearer)
    }

    fn secret(&self) -> Option<&'a str> {
        match self {
            Self::None => None,
            Self::ApiKey(s) | Self::Bearer(s) => Some(s),
        }
    }

    /// `none` | `api-key:<8 hex>` | `bearer:<8 hex>`: tests can check which
    /// credential reached the backend without the sim echoing secrets.
    fn describe(&self) -> HeaderValue {
        let (kind, secret) = match self {
            Self::None => return HeaderValue::from_static("none"),
            Self::ApiKey(s) => ("api-key", s),
            Self::Bearer(s) => ("bearer", s),
        };
        let digest = Sha256::digest(secret.as_bytes());
        let value = format!("{kind}:{}", hex::encode(&digest[..4]));
        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("none"))
    }
}

/// Enforces `--api-key` on the API routes and stamps every response with the
/// headers that let tests see what the backend received.
pub async fn sim_headers(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let credential = Credential::from_headers(headers);
    let auth = credential.describe();
    let request_id = headers.get(X_REQUEST_ID).cloned();
    let api_version = query_param(req.uri(), "api-version").and_then(|v| HeaderValue::from_str(v).ok());

    let path = req.uri().path();
    let protected = path.starts_with("/v1/") || path.starts_with("/openai/");
    let rejection = match (&state.api_key, credential.secret()) {
        (Some(_), None) if protected => Some(ApiError::unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the api-key header.",
        )),
        (Some(expected), Some(got)) if protected && expected != got => Some(ApiError::unauthorized(
            "Incorrect API key provided. You can find your API key in llm-sim's --api-key flag.",
        )),
        _ => None,
    };

    let mut resp = match rejection {
        Some(err) => err.into_response(),
        None => next.run(req).await,
    };
    let out = resp.headers_mut();
    out.insert(X_SIM_AUTH, auth);
    if let Some(v) = api_version {
        out.insert(X_SIM_API_VERSION, v);
    }
    if let Some(v) = request_id {
        out.insert(X_SIM_REQUEST_ID, v);
    }
    resp
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], Body::from(state.models_body.clone()))
        .into_response()
}

/// OpenAI answers unknown paths (and wrong methods) with this 404.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("Invalid URL ({method} {})", uri.path()))
}
