//! Policies and the pipeline that runs them, in API Management's phases.
//!
//! For each request the pipeline runs, in this order:
//!
//! 1. **inbound**: the API's inbound policies in configured order. Subscription-key auth comes
//!    first wherever a subscription is required (before the body is read). A policy may answer on
//!    its own (`Flow::Respond`: a cache hit) or refuse (`Err`: a 401, a 429).
//! 2. **backend**: the request goes to the backend or pool chosen by `set-backend-service` or the
//!    API's default; streams always ask for usage. A 429, 5xx or transport error is retried on the
//!    pool's next available member before anything reaches the client (see `send_with_failover`).
//! 3. **outbound**: once the backend's response head is in (and for JSON, its body and usage).
//! 4. **on-error**: instead of outbound, when any step failed; may edit the error response.
//!    Then every policy may add its response headers (limit policies report what is left).
//! 5. **completed**: after the last byte (an OpenAI stream is read to its end even when the
//!    client left; an `http` API's stream is let go), with the usage known, and always off the response path (in a task of its
//!    own). Accounting (token limits, emit-token-metric) hooks in here; then the call's usage is
//!    appended to the ledger, the gateway's own metrics are recorded, and the request log line
//!    is written.
//!
//! A client that disconnects cannot cut steps 2-5 short: the server moves a run whose client went
//! away into a task of its own (see `server::CompleteOnDrop`), and a streamed response is relayed
//! by a task of its own. Graceful shutdown waits for these tasks.
//!
//! Adding a policy: a module here implementing [`Policy`], a variant in `config::PolicyConfig`,
//! and a line in [`build_policy`].

pub mod call_limit;
pub mod emit_token_metric;
pub mod semantic_cache;
pub mod set_backend_service;
pub mod set_header;
pub mod set_variable;
pub mod subscription_key;
pub mod template;
pub mod token_limit;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderName, header};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::access_log::RequestLog;
use crate::backend::{Backend, forwardable_response_header};
use crate::cache::CacheDeps;
use crate::circuit::Outcome;
use crate::config::{ApiConfig, BackendKind, PolicyConfig};
use crate::context::{ApiInfo, Operation, Payload, RequestBody, RequestContext, Route};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::metrics::{GatewayInstruments, Metrics};
use crate::openai::{ChatRequest, EmbeddingsRequest, usage_of_response};
use crate::pool::Target;
use crate::sse::SseRelay;
use crate::store::Counters;
use crate::subscription::SubscriptionStore;

pub type ResponseHead = http::response::Parts;

/// What an inbound policy decided.
pub enum Flow {
    Continue,
    /// Answer the client now, without calling the backend.
    Respond(Response),
}

/// One policy. Each phase has a default that does nothing, so a policy implements only the
/// phases it acts in; the pipeline calls the phase of the section it is configured in.
#[async_trait]
pub trait Policy: Send + Sync {
    /// Whether `inbound` needs the request body read and parsed first.
    fn reads_body(&self) -> bool {
        true
    }

    async fn inbound(&self, _ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    async fn outbound(&self, _ctx: &mut RequestContext, _response: &mut ResponseHead) -> Result<(), GatewayError> {
        Ok(())
    }

    async fn on_error(&self, _ctx: &mut RequestContext, _error: &GatewayError, _response: &mut ResponseHead) {}

    /// Headers this policy puts on the response, whatever section it is configured in and whether
    /// the request succeeded or not: how limit policies in inbound report what is left.
    fn response_headers(&self, _ctx: &RequestContext, _headers: &mut http::HeaderMap) {}

    /// Whether the pipeline should keep the backend's answer for `completed` (`ctx.answer`):
    /// costs nothing for JSON, and assembling a stream's chunks for a stream.
    fn wants_answer(&self, _ctx: &RequestContext) -> bool {
        false
    }

    async fn completed(&self, _ctx: &RequestContext) {}
}

/// An API's policies, ready to run.
pub struct Pipeline {
    pub api: Arc<ApiInfo>,
    inbound: Vec<Box<dyn Policy>>,
    outbound: Vec<Box<dyn Policy>>,
    on_error: Vec<Box<dyn Policy>>,
    default_target: Option<Target>,
    max_body_bytes: usize,
    log: RequestLog,
    instruments: GatewayInstruments,
    tasks: TaskTracker,
    ledger: Arc<Ledger>,
}

/// What policies are built with, besides their own config.
pub struct PolicyDeps<'a> {
    /// Backends and pools by id.
    pub targets: &'a BTreeMap<String, Target>,
    pub subscriptions: &'a Arc<SubscriptionStore>,
    pub invalid_keys: &'a Option<Arc<crate::key_guessing::InvalidKeyLimiter>>,
    pub counters: &'a Arc<Counters>,
    pub cache: &'a CacheDeps,
    pub ledger: &'a Arc<Ledger>,
    pub max_body_bytes: usize,
    pub log: RequestLog,
    pub metrics: &'a Metrics,
    pub tasks: TaskTracker,
}

/// Ids that tell a policy's own reservation apart from another's in the request context.
static POLICY_IDS: AtomicUsize = AtomicUsize::new(0);

fn build_policy(config: &PolicyConfig, deps: &PolicyDeps<'_>) -> Result<Box<dyn Policy>, String> {
    let id = POLICY_IDS.fetch_add(1, Ordering::Relaxed);
    Ok(match config {
        PolicyConfig::SetHeader(c) => Box::new(set_header::SetHeader::new(c)?),
        PolicyConfig::SetVariable(c) => Box::new(set_variable::SetVariable::new(c)?),
        PolicyConfig::TokenLimit(c) => Box::new(token_limit::TokenLimit::new(id, c, deps.counters.clone())?),
        PolicyConfig::RateLimitByKey(c) => {
            Box::new(call_limit::CallLimit::new(id, call_limit::CallLimitKind::Rate, c, deps.counters.clone())?)
        }
        PolicyConfig::QuotaByKey(c) => {
            Box::new(call_limit::CallLimit::new(id, call_limit::CallLimitKind::Quota, c, deps.counters.clone())?)
        }
        PolicyConfig::SemanticCacheLookup(c) => {
            let embedder = match c.switched_off {
                Some(reason) => Err(reason),
                None => Ok(deps.cache.embedder(&c.embeddings)?),
            };
            Box::new(semantic_cache::SemanticCacheLookup::new(c, embedder, deps.cache.store()?)?)
        }
        PolicyConfig::SemanticCacheStore(c) => {
            Box::new(semantic_cache::SemanticCacheStore::new(c, deps.cache.store()?))
        }
        PolicyConfig::EmitTokenMetric(c) => Box::new(
            emit_token_metric::EmitTokenMetric::new(c, &deps.metrics.meter(&c.namespace)).map_err(|e| e.to_string())?,
        ),
        PolicyConfig::SetBackendService(c) => Box::new(set_backend_service::SetBackendService {
            target: deps
                .targets
                .get(&c.backend_id)
                .cloned()
                .ok_or_else(|| format!("unknown backend or pool {:?}", c.backend_id))?,
        }),
    })
}

impl Pipeline {
    /// Builds an API's pipeline from validated config.
    pub fn build(id: &str, config: &ApiConfig, deps: &PolicyDeps<'_>) -> Result<Self, String> {
        let section = |policies: &[PolicyConfig]| -> Result<Vec<Box<dyn Policy>>, String> {
            policies.iter().map(|p| build_policy(p, deps)).collect()
        };
        let mut inbound: Vec<Box<dyn Policy>> = Vec::new();
        if config.subscription_required {
            inbound.push(Box::new(subscription_key::SubscriptionKeyAuth {
                store: deps.subscriptions.clone(),
                invalid_keys: deps.invalid_keys.clone(),
            }));
        }
        inbound.extend(section(&config.inbound)?);
        let outbound = section(&config.outbound)?;
        let on_error = section(&config.on_error)?;
        Ok(Self {
            api: Arc::new(ApiInfo { id: id.to_owned() }),
            inbound,
            outbound,
            on_error,
            default_target: config.backend.as_ref().and_then(|b| deps.targets.get(b).cloned()),
            max_body_bytes: deps.max_body_bytes,
            log: deps.log.clone(),
            instruments: deps.metrics.gateway.clone(),
            tasks: deps.tasks.clone(),
            ledger: deps.ledger.clone(),
        })
    }

    /// Runs one request and returns its response. A stream is relayed, completed and logged by a
    /// task of its own; a JSON answer is completed by a task of its own too, as every completion
    /// appends to the ledger (a store round trip with Redis).
    pub async fn run(self: Arc<Self>, mut ctx: RequestContext, body: Body) -> Response {
        let mut body = Some(body);
        let (mut response, stream) = match self.respond(&mut ctx, &mut body).await {
            Ok(ready) => ready,
            Err(error) => (self.error_response(&mut ctx, error).await, None),
        };
        if let Some(unread) = body {
            crate::connection::settle_unread_body(unread, &ctx.request.headers, response.headers_mut()).await;
        }
        for policy in self.inbound.iter().chain(&self.outbound).chain(&self.on_error) {
            policy.response_headers(&ctx, response.headers_mut());
        }
        ctx.outcome.status = response.status().as_u16();
        ctx.outcome.first_byte_us = elapsed_us(&ctx);
        match stream {
            Some(stream) => {
                let this = self.clone();
                self.tasks.spawn(async move {
                    stream.relay(&mut ctx).await;
                    this.complete(&ctx).await;
                });
            }
            None => {
                let this = self.clone();
                self.tasks.spawn(async move { this.complete(&ctx).await });
            }
        }
        response
    }

    async fn complete(&self, ctx: &RequestContext) {
        for policy in self.inbound.iter().chain(&self.outbound).chain(&self.on_error) {
            policy.completed(ctx).await;
        }
        self.ledger.record(ctx).await;
        self.instruments.record(ctx);
        self.log.record(ctx);
    }

    async fn respond(
        &self,
        ctx: &mut RequestContext,
        body: &mut Option<Body>,
    ) -> Result<(Response, Option<StreamRelay>), GatewayError> {
        ctx.request.route.check()?;
        for policy in &self.inbound {
            if policy.reads_body() {
                self.read_body(ctx, body).await?;
            }
            if let Flow::Respond(response) = policy.inbound(ctx).await? {
                return Ok((response, None));
            }
        }
        self.read_body(ctx, body).await?;
        self.forward(ctx).await
    }

    /// Reads and validates the body once, on first need.
    async fn read_body(&self, ctx: &mut RequestContext, body: &mut Option<Body>) -> Result<(), GatewayError> {
        let Some(body) = body.take() else { return Ok(()) };
        let declared =
            ctx.request.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes as u64) {
            return Err(GatewayError::BodyTooLarge { limit: self.max_body_bytes });
        }
        let raw = axum::body::to_bytes(body, self.max_body_bytes).await.map_err(|e| {
            if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
                GatewayError::BodyTooLarge { limit: self.max_body_bytes }
            } else {
                GatewayError::invalid("The request body could not be read.", None)
            }
        })?;
        let deployment = match &ctx.request.route {
            Route::AzureDeployment { deployment } => {
                let has_api_version = ctx.request.query.as_deref().is_some_and(|q| {
                    q.split('&')
                        .any(|pair| pair.split_once('=').is_some_and(|(k, v)| k == "api-version" && !v.is_empty()))
                });
                if !has_api_version {
                    return Err(GatewayError::invalid(
                        "Missing required query parameter 'api-version' (e.g. ?api-version=2024-10-21).",
                        Some("api-version"),
                    ));
                }
                Some(deployment.as_str())
            }
            _ => None,
        };
        let payload = match ctx.operation {
            Operation::ChatCompletions => Payload::Chat(ChatRequest::parse(&raw, deployment)?),
            Operation::Embeddings => Payload::Embeddings(EmbeddingsRequest::parse(&raw, deployment)?),
            Operation::ListModels | Operation::Passthrough => Payload::Opaque,
        };
        ctx.request.body = RequestBody::Read { raw, payload };
        Ok(())
    }

    async fn forward(&self, ctx: &mut RequestContext) -> Result<(Response, Option<StreamRelay>), GatewayError> {
        let target = ctx.target.clone().or_else(|| self.default_target.clone()).ok_or(GatewayError::Internal)?;
        let (backend, upstream) = send_with_failover(ctx, &target).await?;

        let mut head = Response::new(()).into_parts().0;
        head.status = upstream.status();
        for (name, value) in upstream.headers() {
            if name == "x-request-id" {
                // The gateway's own id goes out under this name; keep the backend's for support cases.
                head.headers.append(HeaderName::from_static("x-backend-request-id"), value.clone());
            } else if forwardable_response_header(name) {
                head.headers.append(name.clone(), value.clone());
            }
        }

        let event_stream = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if event_stream && head.status.is_success() {
            for policy in &self.outbound {
                policy.outbound(ctx, &mut head).await?;
            }
            // An `http` API's stream is not OpenAI's: it passes as it comes (see `relay_passthrough`).
            let relay = (ctx.operation != Operation::Passthrough).then(|| {
                let strip_usage = matches!(ctx.payload(), Some(Payload::Chat(chat)) if !chat.client_wants_usage);
                let relay = SseRelay::new(strip_usage);
                if self.outbound.iter().any(|p| p.wants_answer(ctx)) { relay.assembling() } else { relay }
            });
            let (tx, rx) = mpsc::channel(32);
            let relay = StreamRelay { upstream, relay, tx, backend };
            let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            return Ok((Response::from_parts(head, body), Some(relay)));
        }

        // An `http` API's answer is not bounded by the request's own timeout (see `Backend::send`).
        let deadline = tokio::time::Instant::from_std(ctx.started) + backend.timeout();
        let bytes = tokio::time::timeout_at(deadline, read_answer(upstream, &backend))
            .await
            .map_err(|_| GatewayError::BackendTimeout { backend: backend.id.clone() })??;
        if head.status.is_success() && matches!(ctx.operation, Operation::ChatCompletions | Operation::Embeddings) {
            ctx.usage = usage_of_response(&bytes);
            if self.outbound.iter().any(|p| p.wants_answer(ctx)) {
                ctx.answer = Some(bytes.clone());
            }
        }
        for policy in &self.outbound {
            policy.outbound(ctx, &mut head).await?;
        }
        Ok((Response::from_parts(head, Body::from(bytes)), None))
    }

    async fn error_response(&self, ctx: &mut RequestContext, error: GatewayError) -> Response {
        let (mut head, body) = error.clone().into_response().into_parts();
        for policy in &self.on_error {
            policy.on_error(ctx, &error, &mut head).await;
        }
        ctx.outcome.error = Some(error);
        Response::from_parts(head, body)
    }
}

/// Sends the request to the target's backends until one answers with something other than 429,
/// 5xx or a transport error: a pool's next available member (by priority and weight), never the
/// same backend twice, at most `max-attempts` times. Nothing has reached the client yet (a
/// stream's status comes before its body), so a failed attempt is invisible to it; the buffered
/// body is sent again. Every answer goes into the backend's circuit breaker.
///
/// When attempts run out, the client gets the last backend's answer, unless every member of the
/// pool is now tripped (or none was available to begin with): then a 503 with `Retry-After`.
async fn send_with_failover(
    ctx: &mut RequestContext,
    target: &Target,
) -> Result<(Arc<Backend>, reqwest::Response), GatewayError> {
    let mut tried = Vec::new();
    let mut last = None;
    for _ in 0..target.max_attempts() {
        let Some((backend, permit)) = target.next(&mut tried) else { break };
        ctx.backend = Some(backend.clone());
        let body = backend_body(ctx, backend);
        let sent = backend.send(ctx, body).await;
        let failed = match &sent {
            Ok(response) => {
                permit.record(&Outcome::Response(response.status(), response.headers()));
                let status = response.status();
                (status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()).then(|| status.to_string())
            }
            Err(
                error @ (GatewayError::BackendTimeout { .. }
                | GatewayError::BackendUnavailable { .. }
                | GatewayError::BackendInvalidResponse { .. }),
            ) => {
                permit.record(&Outcome::TransportError);
                Some(error.code().to_owned())
            }
            // Not the backend's doing (the permit is dropped unreported).
            Err(_) => None,
        };
        let Some(failure) = failed else { return sent.map(|response| (backend.clone(), response)) };
        if let Target::Pool(pool) = target {
            tracing::warn!(
                request_id = %ctx.request_id, pool = %pool.id, backend = %backend.id, failure = %failure,
                "pool member failed; the request goes to the next available member, if any"
            );
        }
        last = Some((backend.clone(), sent));
    }
    match last {
        Some((backend, sent)) if matches!(target, Target::Backend(_)) || target.available() => {
            sent.map(|response| (backend, response))
        }
        _ => Err(GatewayError::NoBackendAvailable {
            target: target.id().to_owned(),
            pool: matches!(target, Target::Pool(_)),
            retry_after_secs: target.retry_after_secs(),
        }),
    }
}

/// The body the backend gets: the client's, unless streams need usage or the backend needs the
/// deployment name as the model.
fn backend_body(ctx: &RequestContext, backend: &Backend) -> bytes::Bytes {
    let RequestBody::Read { raw, payload } = &ctx.request.body else { return bytes::Bytes::new() };
    let model_to_add = match (&ctx.request.route, backend.kind) {
        (Route::AzureDeployment { deployment, .. }, BackendKind::Openai) => Some(deployment.as_str()),
        _ => None,
    };
    match payload {
        Payload::Chat(chat) => chat.backend_body(raw, model_to_add),
        Payload::Embeddings(embeddings) => embeddings.backend_body(raw, model_to_add),
        Payload::Opaque => raw.clone(),
    }
}

/// Most of a backend's answer the gateway holds in memory: a JSON answer is read whole (for its
/// usage, and for the cache). The largest answer OpenAI sends is a batch of 2048 embeddings of
/// 3072 dimensions as JSON floats, about 126 MiB; beyond this a backend is broken or hostile.
const MAX_ANSWER_BYTES: usize = 128 * 1024 * 1024;

/// The backend's whole answer, or a 502 when it is (or says it will be) over [`MAX_ANSWER_BYTES`].
async fn read_answer(mut upstream: reqwest::Response, backend: &Backend) -> Result<bytes::Bytes, GatewayError> {
    let too_large =
        || GatewayError::BackendInvalidResponse { backend: backend.id.clone(), detail: "an answer over 128 MiB" };
    if upstream.content_length().is_some_and(|len| len > MAX_ANSWER_BYTES as u64) {
        return Err(too_large());
    }
    let mut answer = bytes::BytesMut::new();
    while let Some(piece) = upstream.chunk().await.map_err(|e| backend.error(&e))? {
        if answer.len() + piece.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        answer.extend_from_slice(&piece);
    }
    Ok(answer.freeze())
}

/// A stream that broke one of the relay's bounds (`detail`), logged as transport errors are.
fn invalid_stream(backend: &Backend, detail: &'static str) -> GatewayError {
    tracing::warn!(backend = %backend.id, detail, "backend stream refused: it broke a bound of the relay");
    GatewayError::BackendInvalidResponse { backend: backend.id.clone(), detail }
}

/// An OpenAI `error` event: how a stream that cannot go on tells the client (the SDKs raise on it).
fn error_event(error: &GatewayError) -> bytes::Bytes {
    let mut event = bytes::BytesMut::from(&b"data: "[..]);
    event.extend_from_slice(&error.body());
    event.extend_from_slice(b"\n\n");
    event.freeze()
}

fn elapsed_us(ctx: &RequestContext) -> u64 {
    u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Moves a streamed response from the backend to the client.
struct StreamRelay {
    upstream: reqwest::Response,
    /// Reads an OpenAI stream's usage; `None` for an `http` API's stream, passed as it comes.
    relay: Option<SseRelay>,
    /// An error aborts the client's response, so a cut pass-through stream does not look whole.
    tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    backend: Arc<Backend>,
}

impl StreamRelay {
    async fn relay(self, ctx: &mut RequestContext) {
        let Self { upstream, relay, tx, backend } = self;
        match relay {
            Some(relay) => relay_openai(upstream, relay, tx, &backend, ctx).await,
            None => relay_passthrough(upstream, tx, &backend, ctx).await,
        }
    }
}

/// An `http` API's stream (an agent's SSE, an MCP server's stream) goes to the client as it
/// comes, unread: it has no usage and no `[DONE]`, and is complete when the backend ends its body
/// cleanly. It is bounded by `stream-idle-timeout-secs` between chunks rather than by the total
/// timeout, which would cut a long-lived stream that keeps sending. A client that leaves lets the
/// backend go at once: there is no usage to wait for, and an MCP GET stream never ends.
async fn relay_passthrough(
    upstream: reqwest::Response,
    tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    backend: &Backend,
    ctx: &mut RequestContext,
) {
    let idle = backend.stream_idle_timeout();
    let mut body = upstream.bytes_stream();
    let (mut complete, mut client_gone) = (false, false);
    loop {
        let next = tokio::select! {
            () = tx.closed() => {
                client_gone = true;
                break;
            }
            next = tokio::time::timeout(idle, body.next()) => next,
        };
        let bytes = match next {
            Ok(Some(Ok(bytes))) => bytes,
            Ok(None) => {
                complete = true;
                break;
            }
            Ok(Some(Err(error))) => {
                let _logged = backend.error(&error);
                break;
            }
            Err(_) => {
                tracing::warn!(
                    request_id = %ctx.request_id, backend = %backend.id, idle_secs = idle.as_secs(),
                    "pass-through stream ended: the backend sent nothing for stream-idle-timeout-secs"
                );
                break;
            }
        };
        if !matches!(tokio::time::timeout(idle, tx.send(Ok(bytes))).await, Ok(Ok(()))) {
            client_gone = true;
            break;
        }
    }
    if !complete && !client_gone {
        let _ = tx.try_send(Err(std::io::Error::other("the backend's stream was cut")));
    }
    ctx.outcome.client_disconnected = client_gone;
    ctx.outcome.stream_incomplete = !complete && !client_gone;
}

/// Relays an OpenAI stream until the backend's body ends. A client that leaves (or stops reading
/// until the backend's deadline) is let go, but the backend is read to its end so the usage is
/// known.
async fn relay_openai(
    upstream: reqwest::Response,
    mut relay: SseRelay,
    tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    backend: &Backend,
    ctx: &mut RequestContext,
) {
    let deadline = tokio::time::Instant::from_std(ctx.started) + backend.timeout();
    let mut body = upstream.bytes_stream();
    let mut client_gone = false;
    loop {
        // A stream that breaks off or breaks a bound ends with an error event and never with
        // `[DONE]`: a truncated answer must not look whole. The half-received event, if any,
        // is dropped: it cannot be completed. The backend is not read any further.
        let (out, ended) = match body.next().await {
            Some(Ok(bytes)) => match relay.push(&bytes) {
                Ok(out) => (out, false),
                Err(detail) => (error_event(&invalid_stream(backend, detail)), true),
            },
            None => match relay.finish() {
                Ok(out) => (out, true),
                Err(detail) => (error_event(&invalid_stream(backend, detail)), true),
            },
            Some(Err(error)) => (error_event(&backend.error(&error)), true),
        };
        if !out.is_empty() && !client_gone {
            let sent = tokio::time::timeout_at(deadline, tx.send(Ok(out))).await;
            client_gone = !matches!(sent, Ok(Ok(())));
        }
        if ended {
            break;
        }
    }
    ctx.usage = relay.usage();
    ctx.answer = relay.assembled();
    ctx.outcome.client_disconnected = client_gone;
    ctx.outcome.stream_incomplete = !relay.saw_done();
}
