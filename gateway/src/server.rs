//! The front door: routes, transport layers, and the listener's lifecycle.
//!
//! Layers, outermost first (transport concerns only; everything about the request's meaning is
//! a policy in the API's pipeline):
//!
//! 1. catch-panic: a bug answers 500 in the OpenAI error shape instead of dropping the connection;
//! 2. `x-gateway-instance` on every response;
//! 3. request id: a fresh `x-request-id` for every request (a client's own id is not trusted, as
//!    accounting is keyed by it), on the response and to the backend;
//! 4. the router: `/health`, `/ready`, each API's routes (which run the request through the API's
//!    [`Pipeline`]), and OpenAI-shaped 404/405 fallbacks.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use axum::serve::ListenerExt;
use http::{HeaderName, HeaderValue, StatusCode};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::admin;
pub use crate::app::Gateway;
use crate::config::ApiKind;
use crate::context::{InboundRequest, RequestContext};
use crate::error::GatewayError;
use crate::ledger::chargeback::Prices;
use crate::limits::Counters;
use crate::metrics::Metrics;
use crate::policy::Pipeline;
use crate::protocol::{OPENAI_ROUTES, Operation, Route};
use crate::upstream::pool::{self, Target};

/// What the server shares with its handlers and in-flight requests.
pub(crate) struct Shared {
    pub(crate) ready: AtomicBool,
    pub(crate) tasks: TaskTracker,
}

/// The id that `x-gateway-instance` carries: App Service's instance id, else the host name,
/// else a random id made at start-up.
pub fn instance_id() -> String {
    ["WEBSITE_INSTANCE_ID", "HOSTNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| format!("aigw-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
}

impl Gateway {
    pub fn router(&self, instance: &str) -> Router {
        let ready_shared = self.shared.clone();
        let counters = self.counters.clone();
        let targets = self.targets.clone();
        let metrics = self.metrics.clone();
        let mut router = Router::new()
            .route("/health", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
            .route("/ready", get(move || ready(ready_shared.clone(), targets.clone())))
            .route("/metrics", get(move || prometheus(metrics.clone(), counters.clone())))
            .merge(admin::routes(self.admin_key, self.ledger.clone(), Prices::from_config(&self.config.prices)));
        for (kind, prefix, pipeline) in &self.apis {
            match kind {
                ApiKind::Openai => {
                    for route in OPENAI_ROUTES {
                        let method_router = if route.operation == Operation::ListModels { get } else { post };
                        let endpoint = self.endpoint(pipeline, route.operation, Some(route.route), prefix);
                        router = router.route(&format!("{prefix}{}", route.path), method_router(endpoint));
                    }
                }
                ApiKind::Http => {
                    let endpoint = self.endpoint(pipeline, Operation::Passthrough, None, prefix);
                    router = router
                        .route(prefix, any(endpoint.clone()))
                        .route(&format!("{prefix}/{{*rest}}"), any(endpoint));
                }
            }
        }
        let instance = HeaderValue::try_from(instance).unwrap_or(HeaderValue::from_static("aigw"));
        router
            .fallback(|request: Request| async move {
                let error = GatewayError::NotFound {
                    method: request.method().to_string(),
                    path: request.uri().path().to_owned(),
                };
                refuse_unread(error, request).await
            })
            .method_not_allowed_fallback(|request: Request| refuse_unread(GatewayError::MethodNotAllowed, request))
            .layer(axum::middleware::from_fn(assign_request_id))
            .layer(SetResponseHeaderLayer::overriding(HeaderName::from_static("x-gateway-instance"), instance))
            .layer(CatchPanicLayer::custom(|_| GatewayError::Internal.into_response()))
    }

    /// The handler for one route of one API: an `openai` route reads its [`Route`] from the path
    /// after the API's prefix; without one, the route is the pass-through's rest of the path.
    fn endpoint(
        &self,
        pipeline: &Arc<Pipeline>,
        operation: Operation,
        route_of: Option<fn(&str) -> Route>,
        prefix: &str,
    ) -> MethodRouter {
        let pipeline = pipeline.clone();
        let tasks = self.shared.tasks.clone();
        let proxies = self.proxies.clone();
        let prefix_len = prefix.len();
        let handler = move |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request| {
            let pipeline = pipeline.clone();
            let tasks = tasks.clone();
            let proxies = proxies.clone();
            async move {
                let (parts, body) = request.into_parts();
                let route = match route_of {
                    // Read from the path as the client sent it, percent-encoded: `Route::check`
                    // decodes and checks it (axum's own extractors would decode it first, and
                    // refuse non-UTF-8 in their own words).
                    Some(route_of) => route_of(&parts.uri.path()[prefix_len..]),
                    None => Route::Passthrough { rest: parts.uri.path()[prefix_len..].to_owned() },
                };
                let request_id = parts.extensions.get::<RequestId>().map(|id| id.0.clone()).unwrap_or_default();
                let client_ip = proxies.client_ip(peer.ip(), &parts.headers);
                let request = InboundRequest::new(parts, route);
                let ctx = RequestContext::new(request_id, client_ip, pipeline.api.clone(), operation, request);
                CompleteOnDrop::new(pipeline.run(ctx, body), tasks).await
            }
        };
        any(handler)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests (streams
    /// included) and their accounting finish within the grace period, exports the metrics
    /// recorded last, and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        instance: &str,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = Duration::from_secs(self.config.server.shutdown_grace_secs);
        let shared = self.shared.clone();
        let app = self.router(instance).into_make_service_with_connect_info::<SocketAddr>();
        // Nagle's algorithm meeting delayed ACKs costs tens of milliseconds per response.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (signalled, mut signal) = watch::channel(None::<tokio::time::Instant>);
        let draining = shared.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            draining.ready.store(false, Ordering::SeqCst);
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutting down: no new connections; finishing in-flight requests"
            );
            let _ = signalled.send(Some(tokio::time::Instant::now() + grace));
        });
        let deadline = async move {
            let deadline = loop {
                if let Some(deadline) = *signal.borrow_and_update() {
                    break deadline;
                }
                if signal.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::time::sleep_until(deadline).await;
            deadline
        };
        tokio::pin!(deadline);
        let served = tokio::select! {
            served = server => Some(served),
            _ = &mut deadline => None,
        };
        match served {
            Some(Ok(())) => {
                shared.tasks.close();
                if tokio::time::timeout(grace, shared.tasks.wait()).await.is_err() {
                    tracing::warn!(
                        in_flight = shared.tasks.len(),
                        "shutdown grace period over; exiting with accounting unfinished"
                    );
                }
            }
            Some(Err(e)) => return Err(e),
            None => tracing::warn!(
                in_flight = shared.tasks.len(),
                "shutdown grace period over; exiting with requests still in flight"
            ),
        }
        // After in-flight requests, whose completions append to it.
        self.ledger.flush().await;
        self.log.flush();
        self.metrics.shutdown().await;
        Ok(())
    }
}

/// Runs a request's future in the connection's own task (no hand-off to another task on the
/// common path), but if the connection drops it before it is done, because the client went away,
/// moves the rest of it into a tracked task so the backend call, accounting and log still finish.
struct CompleteOnDrop<F: Future<Output = Response> + Send + 'static> {
    run: Option<Pin<Box<F>>>,
    tasks: TaskTracker,
}

impl<F: Future<Output = Response> + Send + 'static> CompleteOnDrop<F> {
    fn new(run: F, tasks: TaskTracker) -> Self {
        Self { run: Some(Box::pin(run)), tasks }
    }
}

impl<F: Future<Output = Response> + Send + 'static> Future for CompleteOnDrop<F> {
    type Output = Response;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        let Some(run) = self.run.as_mut() else { return Poll::Ready(GatewayError::Internal.into_response()) };
        let response = std::task::ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(response)
    }
}

impl<F: Future<Output = Response> + Send + 'static> Drop for CompleteOnDrop<F> {
    fn drop(&mut self) {
        // A run that panicked cannot be resumed; CatchPanic answers that request.
        if std::thread::panicking() {
            return;
        }
        if let Some(run) = self.run.take() {
            self.tasks.spawn(async move {
                run.await;
            });
        }
    }
}

/// 200 unless draining; "degraded" while some pool has no available member. Lists each backend's
/// circuit breaker and each pool's availability.
async fn ready(shared: Arc<Shared>, targets: Arc<BTreeMap<String, Target>>) -> Response {
    if shared.ready.load(Ordering::SeqCst) {
        let report = pool::readiness(&targets);
        let status = if report.degraded { "degraded" } else { "ready" };
        axum::Json(serde_json::json!({ "status": status, "backends": report.backends, "pools": report.pools }))
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "draining" }))).into_response()
    }
}

/// Prometheus text: the OpenTelemetry instruments, then the counter store's health (plain
/// counters, without labels, as the limit benchmarks and dashboards read them).
async fn prometheus(metrics: Metrics, counters: Arc<Counters>) -> Response {
    let stats = &counters.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut body = metrics.prometheus_text();
    let _ = write!(
        body,
        "# HELP aigw_limit_store_failures_total Counter-store operations that failed, timed out, or were skipped while the breaker was open.\n\
         # TYPE aigw_limit_store_failures_total counter\n\
         aigw_limit_store_failures_total {}\n\
         # HELP aigw_limit_store_fallback_total Limit decisions made on this instance's own counters (fail-open).\n\
         # TYPE aigw_limit_store_fallback_total counter\n\
         aigw_limit_store_fallback_total {}\n\
         # HELP aigw_limit_store_refused_total Requests refused because the counter store was unavailable (fail-closed).\n\
         # TYPE aigw_limit_store_refused_total counter\n\
         aigw_limit_store_refused_total {}\n\
         # HELP aigw_limit_store_shared Whether limits are counted in a store shared by every instance.\n\
         # TYPE aigw_limit_store_shared gauge\n\
         aigw_limit_store_shared {}\n",
        load(&stats.failures),
        load(&stats.fallback_decisions),
        load(&stats.refused_unavailable),
        u8::from(counters.shared),
    );
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// An error answer to a request whose body was not read (see `connection`).
async fn refuse_unread(error: GatewayError, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut response = error.into_response();
    crate::connection::settle_unread_body(body, &parts.headers, response.headers_mut()).await;
    response
}

/// The gateway's id for one request.
#[derive(Clone)]
struct RequestId(String);

async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    let header = HeaderValue::try_from(id.as_str()).ok();
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    if let Some(header) = header {
        response.headers_mut().insert(HeaderName::from_static("x-request-id"), header);
    }
    response
}
