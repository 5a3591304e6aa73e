//! The typed state of one request as it moves through the pipeline.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method};

use crate::error::GatewayError;
use crate::protocol::openai::{ChatRequest, EmbeddingsRequest, Usage};
use crate::protocol::{Operation, Route};
use crate::subscription::Subscription;
use crate::upstream::backend::Backend;
use crate::upstream::pool::Target;

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

/// One request's state. Each field says which phase writes it (see `policy::pipeline` for the
/// phases); later phases only read it.
pub struct RequestContext {
    /// Front door (`server`).
    pub request_id: String,
    /// Front door.
    pub started: Instant,
    /// Front door (`client_ip`: trusted proxies and `X-Forwarded-For`).
    pub client_ip: IpAddr,
    /// Front door: the API whose route matched.
    pub api: Arc<ApiInfo>,
    /// Front door (`protocol::OPENAI_ROUTES`, or pass-through).
    pub operation: Operation,
    /// Front door; inbound policies edit its headers; the body phase (`proxy::body`,
    /// `protocol::parse_payload`) fills in `body`.
    pub request: InboundRequest,
    /// Inbound: subscription-key auth.
    pub subscription: Option<Arc<Subscription>>,
    /// Inbound: where `set-backend-service` sends the request (else the API's default): a backend
    /// or a pool.
    pub target: Option<Target>,
    /// Backend phase (`proxy::failover`): the backend the request went to; with failover, the one
    /// that answered last.
    pub backend: Option<Arc<Backend>>,
    /// Response phase: from a JSON answer (`policy::pipeline`) or a stream's end (`proxy::relay`).
    pub usage: Option<Usage>,
    /// Inbound and outbound: named values policies hand to later policies.
    pub variables: HashMap<String, String>,
    /// Inbound: what limit policies reserved, to be reconciled when the exchange is complete.
    pub reservations: Vec<Reservation>,
    /// Inbound: what the semantic cache lookup decided.
    pub cache: Option<CacheState>,
    /// Response phase: the backend's answer as a chat completion JSON (a stream's assembled from
    /// its chunks, by `proxy::relay`), kept only when a policy asked for it (`Policy::wants_answer`).
    pub answer: Option<Bytes>,
    /// Pipeline: status and first byte when the response is handed over, the error (on-error
    /// phase), and the stream's end (`proxy::relay`). Read by the completed phase.
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
    pub ticket: crate::limits::Ticket,
    pub source: crate::limits::Source,
    /// What each of the policy's limits had left after the reservation.
    pub remaining: Vec<u64>,
}

impl InboundRequest {
    /// The request as it came in, its body not read yet.
    pub fn new(parts: http::request::Parts, route: Route) -> Self {
        Self {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers,
            route,
            body: RequestBody::Unread,
        }
    }
}

impl RequestContext {
    /// A request's context as the front door hands it to the pipeline: everything the phases
    /// write (subscription, target, backend, usage, variables, reservations, cache, answer,
    /// outcome) starts empty.
    pub fn new(
        request_id: String,
        client_ip: IpAddr,
        api: Arc<ApiInfo>,
        operation: Operation,
        request: InboundRequest,
    ) -> Self {
        Self {
            request_id,
            started: Instant::now(),
            client_ip,
            api,
            operation,
            request,
            subscription: None,
            target: None,
            backend: None,
            usage: None,
            variables: HashMap::new(),
            reservations: Vec::new(),
            cache: None,
            answer: None,
            outcome: Outcome::default(),
        }
    }

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
