//! The typed state of one request as it moves through the pipeline.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method};

use crate::backend::Backend;
use crate::error::GatewayError;
use crate::openai::{ChatRequest, EmbeddingsRequest, Usage};
use crate::pool::Target;
use crate::subscription::Subscription;

/// What the client called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Embeddings,
    ListModels,
    /// Any method and path under an `http` API's prefix.
    Passthrough,
}

impl Operation {
    pub fn id(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat-completions",
            Self::Embeddings => "embeddings",
            Self::ListModels => "list-models",
            Self::Passthrough => "passthrough",
        }
    }
}

/// Which family of routes the request came in on; decides how the backend URL is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v1/...`
    OpenAi,
    /// `/openai/deployments/{deployment}/...?api-version=...`
    AzureDeployment { deployment: String },
    /// `/openai/v1/...`
    AzureV1,
    /// Under an `http` API's prefix; the rest of the path (starting with `/`, or empty).
    Passthrough { rest: String },
}

impl Route {
    /// Refuses client text that would leave the backend's base path once put into a URL (see
    /// `backend_url`), before any policy runs or any backend is called; decodes the deployment
    /// name, which the backend URL builder encodes again as exactly one segment.
    pub fn check(&mut self) -> Result<(), GatewayError> {
        let refused = |refusal: backend_url::Refusal| GatewayError::invalid(refusal.to_string(), None);
        match self {
            Self::Passthrough { rest } => backend_url::check_client_path(rest).map_err(refused),
            Self::AzureDeployment { deployment } => {
                let decoded = backend_url::percent_decode(deployment).map_err(refused)?;
                backend_url::check_name(&decoded).map_err(|refusal| match refusal {
                    backend_url::Refusal::BadLength => GatewayError::invalid(
                        format!("The deployment name must be 1 to {} characters long.", backend_url::MAX_NAME_LEN),
                        Some("deployment"),
                    ),
                    other => refused(other),
                })?;
                *deployment = decoded;
                Ok(())
            }
            Self::OpenAi | Self::AzureV1 => Ok(()),
        }
    }
}

/// The API a request belongs to, as policies see it.
#[derive(Debug)]
pub struct ApiInfo {
    pub id: String,
}

/// The body as the pipeline knows it: unread until a policy or the backend call needs it (the
/// unread stream itself stays with the pipeline: it is not `Sync`, the context must be).
pub enum RequestBody {
    Unread,
    Read { raw: Bytes, payload: Payload },
}

/// The parsed request, for the operations whose body the gateway reads.
#[derive(Debug)]
pub enum Payload {
    Chat(ChatRequest),
    Embeddings(EmbeddingsRequest),
    /// Forwarded as it came (models listing, passthrough APIs).
    Opaque,
}

pub struct InboundRequest {
    pub method: Method,
    /// Without the query string.
    pub path: String,
    /// The query string as the client sent it (it may hold the subscription key: the backend URL
    /// and the request log leave it out).
    pub query: Option<String>,
    /// The client's headers; inbound policies may edit them. Credentials and hop-by-hop headers
    /// are removed when the backend request is built.
    pub headers: HeaderMap,
    pub route: Route,
    pub body: RequestBody,
}

pub struct RequestContext {
    pub request_id: String,
    pub started: Instant,
    pub client_ip: IpAddr,
    pub api: Arc<ApiInfo>,
    pub operation: Operation,
    pub request: InboundRequest,
    pub subscription: Option<Arc<Subscription>>,
    /// Where `set-backend-service` sends the request (else the API's default): a backend or a pool.
    pub target: Option<Target>,
    /// The backend the request went to; with failover, the one that answered last.
    pub backend: Option<Arc<Backend>>,
    pub usage: Option<Usage>,
    /// Named values policies hand to later policies.
    pub variables: HashMap<String, String>,
    /// What limit policies reserved, to be reconciled when the exchange is complete.
    pub reservations: Vec<Reservation>,
    /// What the semantic cache lookup decided.
    pub cache: Option<CacheState>,
    /// The backend's answer as a chat completion JSON (a stream's assembled from its chunks), kept
    /// only when a policy asked for it (`Policy::wants_answer`).
    pub answer: Option<Bytes>,
    pub outcome: Outcome,
}

/// The `x-llm-cache-status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    /// The request skipped the cache (see the reason).
    Bypass,
    /// The lookup failed (embeddings source or store); the request went to the backend.
    Error,
}

impl CacheStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
            Self::Error => "error",
        }
    }
}

#[derive(Debug)]
pub struct CacheState {
    pub status: CacheStatus,
    /// The cosine similarity of the entry that served a hit.
    pub score: Option<f32>,
    /// Why the cache was bypassed or failed, or why a similar entry was refused.
    pub reason: Option<&'static str>,
    /// On a hit: the usage of the cached answer, i.e. the backend tokens the hit saved.
    pub saved: Option<Usage>,
    /// On a miss: where `semantic-cache-store` files the backend's answer.
    pub pending: Option<PendingEntry>,
}

impl CacheState {
    pub fn new(status: CacheStatus) -> Self {
        Self { status, score: None, reason: None, saved: None, pending: None }
    }

    pub fn because(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }
}

#[derive(Debug)]
pub struct PendingEntry {
    pub partition: String,
    pub vector: Vec<f32>,
    pub prompt: String,
}

/// A limit policy's reservation in the counter store.
#[derive(Debug)]
pub struct Reservation {
    /// The policy that made it (its id in the pipeline).
    pub policy: usize,
    pub ticket: crate::store::Ticket,
    pub source: crate::store::Source,
    /// What each of the policy's limits had left after the reservation.
    pub remaining: Vec<u64>,
}

impl RequestContext {
    pub fn reservation(&self, policy: usize) -> Option<&Reservation> {
        self.reservations.iter().find(|r| r.policy == policy)
    }
}

/// How the exchange ended, for the completion phase and the request log.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: u16,
    pub error: Option<GatewayError>,
    /// Time until the response head was handed to the client.
    pub first_byte_us: u64,
    /// A streamed response lost its client before the end (the backend was still read to the end).
    pub client_disconnected: bool,
    /// The backend's stream ended without `[DONE]` or broke off.
    pub stream_incomplete: bool,
}

impl RequestContext {
    pub fn payload(&self) -> Option<&Payload> {
        match &self.request.body {
            RequestBody::Read { payload, .. } => Some(payload),
            _ => None,
        }
    }

    /// The model the client asked for: the body's `model`, else the deployment name.
    pub fn model(&self) -> Option<&str> {
        let from_body = match self.payload() {
            Some(Payload::Chat(chat)) => chat.model.as_deref(),
            Some(Payload::Embeddings(embeddings)) => embeddings.model.as_deref(),
            _ => None,
        };
        from_body.or(match &self.request.route {
            Route::AzureDeployment { deployment, .. } => Some(deployment.as_str()),
            _ => None,
        })
    }
}
