//! The pipeline: an API's policies run in API Management's phases around the proxy engine.
//!
//! For each request the pipeline runs, in this order:
//!
//! 1. **inbound**: the API's inbound policies in configured order. Subscription-key auth comes
//!    first wherever a subscription is required (before the body is read). A policy may answer on
//!    its own (`Flow::Respond`: a cache hit) or refuse (`Err`: a 401, a 429).
//! 2. **backend**: the request goes to the backend or pool chosen by `set-backend-service` or the
//!    API's default; streams always ask for usage. A 429, 5xx or transport error is retried on the
//!    pool's next available member before anything reaches the client (see
//!    `proxy::failover::send_with_failover`).
//! 3. **outbound**: once the backend's response head is in (and for JSON, its body and usage).
//! 4. **on-error**: instead of outbound, when any step failed; may edit the error response.
//!    Then every policy may add its response headers (limit policies report what is left).
//! 5. **completed**: after the last byte (an OpenAI stream is read to its end even when the
//!    client left; an `http` API's stream is let go), with the usage known, and always off the
//!    response path (in a task of its own). Accounting (token limits, emit-token-metric) hooks in here; then the call's usage is
//!    appended to the ledger, the gateway's own metrics are recorded, and the request log line
//!    is written.
//!
//! A client that disconnects cannot cut steps 2-5 short: the server moves a run whose client went
//! away into a task of its own (see `server::CompleteOnDrop`), and a streamed response is relayed
//! by a task of its own. Graceful shutdown waits for these tasks.

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use tokio_util::task::TaskTracker;

use super::{Flow, Policy, PolicyDeps, build_policy, subscription_key};
use crate::access_log::RequestLog;
use crate::config::{ApiConfig, PolicyConfig};
use crate::context::{ApiInfo, Payload, RequestBody, RequestContext};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::metrics::GatewayInstruments;
use crate::protocol::openai::usage_of_response;
use crate::protocol::sse::SseRelay;
use crate::protocol::{Operation, parse_payload};
use crate::proxy::body::read_bounded;
use crate::proxy::forward::forward;
use crate::proxy::relay::StreamRelay;
use crate::upstream::pool::Target;

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

    /// Reads and validates the body once, on first need: writes `ctx.request.body`.
    async fn read_body(&self, ctx: &mut RequestContext, body: &mut Option<Body>) -> Result<(), GatewayError> {
        let Some(body) = body.take() else { return Ok(()) };
        let raw = read_bounded(body, &ctx.request.headers, self.max_body_bytes).await?;
        let payload = parse_payload(ctx.operation, &ctx.request.route, ctx.request.query.as_deref(), &raw)?;
        ctx.request.body = RequestBody::Read { raw, payload };
        Ok(())
    }

    /// The backend call and the outbound section: writes `ctx.backend`, and for a JSON answer
    /// `ctx.usage` and (when a policy wants it) `ctx.answer`; a stream's are written by its relay.
    async fn forward(&self, ctx: &mut RequestContext) -> Result<(Response, Option<StreamRelay>), GatewayError> {
        let target = ctx.target.clone().or_else(|| self.default_target.clone()).ok_or(GatewayError::Internal)?;
        let mut upstream = forward(ctx, &target).await?;

        if upstream.is_event_stream() {
            for policy in &self.outbound {
                policy.outbound(ctx, &mut upstream.head).await?;
            }
            // An `http` API's stream is not OpenAI's: it passes as it comes (see `proxy::relay`).
            let relay = (ctx.operation != Operation::Passthrough).then(|| {
                let strip_usage = matches!(ctx.payload(), Some(Payload::Chat(chat)) if !chat.client_wants_usage);
                let relay = SseRelay::new(strip_usage);
                if self.outbound.iter().any(|p| p.wants_answer(ctx)) { relay.assembling() } else { relay }
            });
            let (response, relay) = upstream.into_stream(relay);
            return Ok((response, Some(relay)));
        }

        let (mut head, bytes) = upstream.into_bytes(ctx.started).await?;
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

    /// The error's response in the protocol's shape, after the on-error section: writes
    /// `ctx.outcome.error`.
    async fn error_response(&self, ctx: &mut RequestContext, error: GatewayError) -> Response {
        let (mut head, body) = error.clone().into_response().into_parts();
        for policy in &self.on_error {
            policy.on_error(ctx, &error, &mut head).await;
        }
        ctx.outcome.error = Some(error);
        Response::from_parts(head, body)
    }
}

fn elapsed_us(ctx: &RequestContext) -> u64 {
    u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use serde_json::json;

    use crate::harness::{Harness, KEY};

    const API: &str = r#"
        [apis.chat]
        kind = "openai"
        backend = "stub"
        inbound = [{ policy = "set-header", name = "x-inbound", value = "{subscription.id}" }]
        outbound = [{ policy = "set-header", name = "x-outbound", value = "{api.id}" }]
        on-error = [{ policy = "set-header", name = "x-on-error", value = "{api.id}" }]
    "#;

    /// Inbound runs before the backend call, outbound after it; on-error does not run.
    #[tokio::test]
    async fn phases_run_in_order_around_the_backend_call() {
        let gw = Harness::start(API).await;
        let answer = gw.chat(&[]).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["usage"]["total_tokens"], 12);
        assert_eq!(answer.header("x-outbound"), Some("chat"));
        assert_eq!(answer.header("x-on-error"), None);
        let sent = gw.backend.last();
        assert_eq!(sent.headers["x-inbound"], "sub-a");
        assert!(sent.headers.get("x-outbound").is_none());
        // The gateway's request id goes to the backend and back to the client; the client's
        // credential does not go to the backend.
        assert_eq!(
            sent.headers["x-request-id"].to_str().expect("text"),
            answer.header("x-request-id").expect("request id")
        );
        assert!(sent.headers.get("api-key").is_none());
    }

    /// The subscription key is checked before the body is read: an unauthenticated request with a
    /// body that is not JSON is a 401, not a 400, and runs on-error, not the backend.
    #[tokio::test]
    async fn authentication_comes_before_the_body() {
        let gw = Harness::start(API).await;
        let request = http::Request::post("/v1/chat/completions").body(Body::from("not json")).expect("request");
        let response = gw.send(request).await;
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["x-on-error"], "chat");
        assert!(response.headers().get("x-outbound").is_none());

        let request = http::Request::post("/v1/chat/completions")
            .header("api-key", KEY)
            .body(Body::from("not json"))
            .expect("request");
        let response = gw.send(request).await;
        assert_eq!(response.status(), 400);
        assert!(gw.backend.received().is_empty());
    }

    /// A body above `server.max-body-bytes` is a 413 before any parsing.
    #[tokio::test]
    async fn bodies_are_bounded() {
        let gw = Harness::start_with_server("max-body-bytes = 64", API).await;
        let big = json!({ "model": "m", "messages": [{ "role": "user", "content": "x".repeat(100) }] });
        let answer = gw.call(http::Method::POST, "/v1/chat/completions", &[], Some(big)).await;
        assert_eq!(answer.status, 413, "{}", answer.body);
        assert!(gw.backend.received().is_empty());
    }
}
