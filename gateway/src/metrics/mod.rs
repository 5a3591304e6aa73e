//! Metrics: one OpenTelemetry meter provider for the process, read two ways.
//!
//! - `/metrics` collects a [`ManualReader`] on each scrape and renders Prometheus text
//!   (see [`prometheus`]), for users without a collector.
//! - OTLP (gRPC or HTTP/protobuf), pushed by a periodic reader, only when the standard
//!   `OTEL_*` environment asks for it (see [`otlp`]).
//!
//! Instruments come from two places: the gateway's own, recorded for every request when the
//! pipeline completes ([`GatewayInstruments`]), and the `emit-token-metric` policy's, on a meter
//! named after the policy's namespace. Attributes never carry secrets: the values are ids, names
//! and statuses, and a dimension may not read a credential header.

mod otlp;
pub mod prometheus;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::metrics::{AsyncInstrument, Counter, Histogram, Meter, MeterProvider};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality};

use crate::config::EnvLookup;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::upstream::backend::Backend;
use crate::upstream::circuit::{CircuitState, Health};

/// The meter (instrumentation scope) of the gateway's own instruments.
const GATEWAY_METER: &str = "aigw";

/// The request-duration buckets of the HTTP semantic conventions, extended for LLM calls that
/// stream for minutes.
const DURATION_BUCKETS_SECS: [f64; 18] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0, 300.0];

/// A bad `OTEL_*` value, or an exporter that cannot be built: named by its variable.
#[derive(Debug)]
pub struct MetricsError {
    pub variable: String,
    pub message: String,
}

impl MetricsError {
    fn at(variable: impl Into<String>, message: impl Into<String>) -> Self {
        Self { variable: variable.into(), message: message.into() }
    }
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

impl std::error::Error for MetricsError {}

/// The process's meter provider and the handles that read it. Clones share them.
#[derive(Clone)]
pub struct Metrics {
    provider: SdkMeterProvider,
    scrape: ScrapeReader,
    pub gateway: GatewayInstruments,
    exports_otlp: bool,
}

impl Metrics {
    /// Builds the provider from the environment; `instance` is the `x-gateway-instance` id.
    /// Call from within the Tokio runtime (the gRPC exporter's channel lives on it).
    pub fn start(env: EnvLookup<'_>, instance: &str) -> Result<Self, MetricsError> {
        let service = env("OTEL_SERVICE_NAME").filter(|s| !s.is_empty()).unwrap_or_else(|| "aigw".to_owned());
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
            .build();
        let scrape = ScrapeReader::new();
        let mut builder = SdkMeterProvider::builder().with_resource(resource).with_reader(scrape.clone());
        let exporter = otlp::periodic_reader(env)?;
        let exports_otlp = exporter.is_some();
        if let Some(reader) = exporter {
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        let gateway = GatewayInstruments::new(&provider.meter(GATEWAY_METER));
        Ok(Self { provider, scrape, gateway, exports_otlp })
    }

    /// Whether an OTLP exporter pushes these metrics (for the start-up log).
    pub fn exports_otlp(&self) -> bool {
        self.exports_otlp
    }

    /// The meter for instruments of one instrumentation scope (a policy's namespace).
    pub fn meter(&self, scope: &str) -> Meter {
        self.provider.meter_with_scope(InstrumentationScope::builder(scope.to_owned()).build())
    }

    /// Read-outs of state kept elsewhere, observed at each collection: every backend's circuit
    /// breaker (state, trips, failures) and the usage ledger's write failures.
    pub fn observe(&self, backends: &BTreeMap<String, Arc<Backend>>, ledger: Arc<Ledger>) {
        let meter = self.meter(GATEWAY_METER);
        let each = |backends: &[Arc<Backend>], read: fn(&Health) -> u64| {
            let backends = backends.to_vec();
            move |observer: &dyn AsyncInstrument<u64>| {
                for backend in &backends {
                    observer.observe(read(&backend.health()), &[KeyValue::new("backend", backend.id.clone())]);
                }
            }
        };
        let backends: Vec<Arc<Backend>> = backends.values().cloned().collect();
        let states = backends.clone();
        meter
            .u64_observable_gauge("aigw.backend.circuit.state")
            .with_description("1 for the state each backend's circuit breaker is in (closed, open, half-open).")
            .with_callback(move |observer| {
                for backend in &states {
                    let current = backend.health().state;
                    for state in [CircuitState::Closed, CircuitState::Open, CircuitState::HalfOpen] {
                        let attributes =
                            [KeyValue::new("backend", backend.id.clone()), KeyValue::new("state", state.name())];
                        observer.observe(u64::from(state == current), &attributes);
                    }
                }
            })
            .build();
        meter
            .u64_observable_counter("aigw.backend.circuit.trips")
            .with_unit("{trip}")
            .with_description("Times a backend's circuit breaker opened.")
            .with_callback(each(&backends, |health| health.trips))
            .build();
        meter
            .u64_observable_counter("aigw.backend.circuit.failures")
            .with_unit("{failure}")
            .with_description("Backend answers and errors the circuit breaker counts as failures (retried ones too).")
            .with_callback(each(&backends, |health| health.failures))
            .build();
        let failed = ledger.clone();
        meter
            .u64_observable_counter("aigw.ledger.write_failures")
            .with_unit("{write}")
            .with_description("Usage-ledger writes that failed or timed out (the records are kept and retried).")
            .with_callback(move |observer| observer.observe(failed.write_failures().failed, &[]))
            .build();
        meter
            .u64_observable_counter("aigw.ledger.dropped")
            .with_unit("{record}")
            .with_description("Usage records given up on because the ledger's retry queue was full.")
            .with_callback(move |observer| observer.observe(ledger.write_failures().dropped, &[]))
            .build();
    }

    /// Everything recorded so far, as Prometheus text.
    pub fn prometheus_text(&self) -> String {
        let mut collected = ResourceMetrics::default();
        if let Err(e) = self.scrape.collect(&mut collected) {
            tracing::warn!(error = %e, "collecting metrics for /metrics failed");
        }
        prometheus::render(&collected)
    }

    /// Exports what is pending (OTLP) and stops the readers; the end of graceful shutdown.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        // Shutting down waits for the last export, which the gRPC exporter sends through this
        // runtime: block a thread of the blocking pool, not a worker.
        match tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(10))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing metrics at shutdown failed"),
            Err(e) => tracing::warn!(error = %e, "flushing metrics at shutdown failed"),
        }
    }
}

/// The scrape side: a manual reader the provider owns and `/metrics` collects on demand.
#[derive(Debug, Clone)]
struct ScrapeReader(Arc<ManualReader>);

impl ScrapeReader {
    fn new() -> Self {
        Self(Arc::new(ManualReader::builder().build()))
    }
}

impl MetricReader for ScrapeReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// What the gateway records about every request, whatever its policies.
#[derive(Clone)]
pub struct GatewayInstruments {
    duration: Histogram<f64>,
    cache_lookups: Counter<u64>,
    limit_rejections: Counter<u64>,
    backend_errors: Counter<u64>,
    client_disconnects: Counter<u64>,
}

impl GatewayInstruments {
    fn new(meter: &Meter) -> Self {
        Self {
            duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Time from the request's arrival to the response's last byte.")
                .with_boundaries(DURATION_BUCKETS_SECS.to_vec())
                .build(),
            cache_lookups: meter
                .u64_counter("aigw.cache.lookups")
                .with_unit("{lookup}")
                .with_description("Semantic cache lookups by result: hit, miss, bypass, error.")
                .build(),
            limit_rejections: meter
                .u64_counter("aigw.limit.rejections")
                .with_unit("{request}")
                .with_description(
                    "Requests refused by a limit: token-limit, token-quota, rate-limit, call-quota, \
                     limit-store-unavailable.",
                )
                .build(),
            backend_errors: meter
                .u64_counter("aigw.backend.errors")
                .with_unit("{error}")
                .with_description("Backend failures by kind: unavailable, timeout, 5xx, stream-broken.")
                .build(),
            client_disconnects: meter
                .u64_counter("aigw.stream.client_disconnects")
                .with_unit("{stream}")
                .with_description(
                    "Streamed responses whose client left before the end (the backend was read to the end).",
                )
                .build(),
        }
    }

    /// Records one completed request.
    pub fn record(&self, ctx: &RequestContext) {
        let api = KeyValue::new("api", ctx.api.id.clone());
        let operation = KeyValue::new("operation", ctx.operation.id());
        let status = KeyValue::new("http.response.status_code", i64::from(ctx.outcome.status));
        self.duration.record(ctx.started.elapsed().as_secs_f64(), &[api.clone(), operation, status]);
        if let Some(cache) = &ctx.cache {
            self.cache_lookups.add(1, &[api.clone(), KeyValue::new("result", cache.status.name())]);
        }
        if let Some(kind) = ctx.outcome.error.as_ref().and_then(limit_rejection) {
            self.limit_rejections.add(1, &[api.clone(), KeyValue::new("kind", kind)]);
        }
        if let Some((backend, kind)) = backend_error(ctx) {
            self.backend_errors.add(1, &[KeyValue::new("backend", backend.to_owned()), KeyValue::new("kind", kind)]);
        }
        if ctx.outcome.client_disconnected {
            self.client_disconnects.add(1, &[api]);
        }
    }
}

/// The limit that refused a request, if one did.
fn limit_rejection(error: &GatewayError) -> Option<&'static str> {
    Some(match error {
        GatewayError::TokenLimitExceeded { .. } | GatewayError::TokensOverLimit { .. } => "token-limit",
        GatewayError::TokenQuotaExceeded { .. } => "token-quota",
        GatewayError::RateLimitExceeded { .. } => "rate-limit",
        GatewayError::CallQuotaExceeded { .. } => "call-quota",
        GatewayError::LimitStoreUnavailable => "limit-store-unavailable",
        GatewayError::TooManyInvalidKeys { .. } => "invalid-key",
        _ => return None,
    })
}

/// The backend that failed a request, and how.
fn backend_error(ctx: &RequestContext) -> Option<(&str, &'static str)> {
    match &ctx.outcome.error {
        Some(GatewayError::BackendUnavailable { backend, .. }) => return Some((backend, "unavailable")),
        Some(GatewayError::BackendTimeout { backend }) => return Some((backend, "timeout")),
        Some(GatewayError::BackendInvalidResponse { backend, .. }) => return Some((backend, "invalid-response")),
        Some(_) => return None,
        None => {}
    }
    let backend = ctx.backend.as_deref()?;
    if ctx.outcome.status >= 500 {
        Some((&backend.id, "5xx"))
    } else if ctx.outcome.stream_incomplete {
        Some((&backend.id, "stream-broken"))
    } else {
        None
    }
}
