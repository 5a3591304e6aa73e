//! Latency and fault injection: CLI defaults, per-request header overrides,
//! and the "drop the connection" bodies.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, AppState};

const X_SIM_FAULT: HeaderName = HeaderName::from_static("x-sim-fault");
const X_SIM_TTFT_MS: HeaderName = HeaderName::from_static("x-sim-ttft-ms");
const X_SIM_TOKEN_DELAY_MS: HeaderName = HeaderName::from_static("x-sim-token-delay-ms");

pub struct Latency {
    pub ttft: Duration,
    pub token_delay: Duration,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FaultRates {
    pub rate_429: f64,
    pub rate_500: f64,
    pub rate_slow: f64,
    pub rate_drop: f64,
    #[serde(rename = "slow_ms", serialize_with = "as_millis")]
    pub slow: Duration,
    /// The `Retry-After` of injected 429s.
    pub retry_after_secs: u64,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_millis())
}

/// `PUT /sim/faults`: change the fault rates of a running simulator (a backend that starts
/// throttling, failing, or recovers). Fields left out keep their value; answers the new settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    rate_429: Option<f64>,
    rate_500: Option<f64>,
    rate_slow: Option<f64>,
    rate_drop: Option<f64>,
    slow_ms: Option<u64>,
    retry_after_secs: Option<u64>,
}

pub async fn update(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let update: FaultUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => return ApiError::invalid_request(format!("Invalid fault settings: {e}")).into_response(),
    };
    let mut faults = state.faults.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut next = *faults;
    for (rate, value) in [
        (&mut next.rate_429, update.rate_429),
        (&mut next.rate_500, update.rate_500),
        (&mut next.rate_slow, update.rate_slow),
        (&mut next.rate_drop, update.rate_drop),
    ] {
        if let Some(value) = value {
            *rate = value;
        }
    }
    let total = next.rate_429 + next.rate_500 + next.rate_slow + next.rate_drop;
    if [next.rate_429, next.rate_500, next.rate_slow, next.rate_drop].iter().any(|r| !(0.0..=1.0).contains(r))
        || total > 1.0
    {
        return ApiError::invalid_request("Fault rates must each be within 0.0..=1.0 and sum to at most 1.0.")
            .into_response();
    }
    next.slow = update.slow_ms.map_or(next.slow, Duration::from_millis);
    next.retry_after_secs = update.retry_after_secs.unwrap_or(next.retry_after_secs);
    *faults = next;
    Json(next).into_response()
}

enum Fault {
    RateLimit,
    ServerError,
    Slow,
    Drop,
}

/// What a request that passed validation should experience.
pub struct Plan {
    /// Time to first byte, including the slow fault's extra delay.
    pub ttft: Duration,
    pub token_delay: Duration,
    /// Abort the connection: mid-stream for SSE, before any response otherwise.
    pub drop: bool,
}

/// Decides latency and fault for one request. 429/500 come back as the error
/// to send; header overrides win over the CLI defaults and rates.
pub fn plan(state: &AppState, headers: &HeaderMap) -> Result<Plan, ApiError> {
    let ttft = header_ms(headers, &X_SIM_TTFT_MS)?.unwrap_or(state.latency.ttft);
    let token_delay = header_ms(headers, &X_SIM_TOKEN_DELAY_MS)?.unwrap_or(state.latency.token_delay);
    let fault = match headers.get(X_SIM_FAULT) {
        Some(v) => Some(match v.as_bytes() {
            b"429" => Fault::RateLimit,
            b"500" => Fault::ServerError,
            b"slow" => Fault::Slow,
            b"drop" => Fault::Drop,
            _ => {
                return Err(ApiError::invalid_request(
                    "Invalid x-sim-fault header: expected one of 429, 500, slow, drop.",
                ));
            }
        }),
        None => None,
    };
    let faults = *state.faults.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    match fault.or_else(|| roll(&faults)) {
        Some(Fault::RateLimit) => Err(ApiError::rate_limited(faults.retry_after_secs)),
        Some(Fault::ServerError) => Err(ApiError::server_error()),
        Some(Fault::Slow) => Ok(Plan { ttft: ttft + faults.slow, token_delay, drop: false }),
        Some(Fault::Drop) => Ok(Plan { ttft, token_delay, drop: true }),
        None => Ok(Plan { ttft, token_delay, drop: false }),
    }
}

/// One uniform draw spread over the rates in order (429, 500, slow, drop), so
/// at most one fault hits a request and each rate is its own probability as
/// long as they sum to <= 1.
fn roll(rates: &FaultRates) -> Option<Fault> {
    let table = [
        (rates.rate_429, Fault::RateLimit),
        (rates.rate_500, Fault::ServerError),
        (rates.rate_slow, Fault::Slow),
        (rates.rate_drop, Fault::Drop),
    ];
    // Skip the RNG entirely in the common no-fault benchmark configuration.
    if table.iter().all(|(rate, _)| *rate <= 0.0) {
        return None;
    }
    let mut draw = fastrand::f64();
    for (rate, fault) in table {
        if draw < rate {
            return Some(fault);
        }
        draw -= rate;
    }
    None
}

fn header_ms(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).map(|ms| Some(Duration::from_millis(ms))).ok_or_else(
        || {
            ApiError::invalid_request(format!(
                "Invalid {name} header: expected a non-negative integer of milliseconds."
            ))
        },
    )
}

/// The error a dropping body yields; hyper reacts by aborting the connection.
pub fn drop_error() -> std::io::Error {
    std::io::Error::other("llm-sim: simulated connection drop")
}

/// A response whose body fails before producing a byte, so hyper tears the
/// connection down and the client sees no (complete) response.
pub fn dropped_response() -> Response {
    let body = stream::once(async { Err::<Bytes, _>(drop_error()) });
    Response::new(Body::from_stream(body))
}
