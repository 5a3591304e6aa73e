//! A backend's circuit breaker, with API Management's semantics: after `failure-count` failures
//! (configured status codes, connection errors, timeouts) within `interval-secs`, the backend is
//! tripped and gets no traffic for the trip duration (`trip-secs`, or with `accept-retry-after`
//! the failing response's `Retry-After`, capped by `max-trip-secs`). Then it is half-open: one
//! request probes it; success closes the breaker (traffic returns on its own), failure trips it
//! again.
//!
//! One breaker per backend per gateway instance, like API Management's per-gateway state. The
//! state changes under a mutex (a few comparisons long); what `/ready` and metrics read is
//! mirrored into atomics so readers never wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http::HeaderMap;

use crate::config::{CircuitBreakerConfig, parse_status_range};
use crate::infra::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// A snapshot of a breaker, for `/ready` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub state: CircuitState,
    /// Failures since start-up (whether or not they tripped the breaker).
    pub failures: u64,
    /// Times the breaker opened since start-up.
    pub trips: u64,
    /// While open: how long until a request may probe the backend again.
    pub retry_in_ms: Option<u64>,
}

impl Health {
    /// Whether a request could be sent now (a half-open breaker may already be probing).
    pub fn available(&self) -> bool {
        self.state != CircuitState::Open
    }
}

/// When the breaker trips and for how long.
struct TripRule {
    failure_count: usize,
    interval_ms: u64,
    trip_ms: u64,
    max_trip_ms: u64,
    accept_retry_after: bool,
}

enum State {
    /// Failure times within the interval, oldest first.
    Closed {
        recent: VecDeque<u64>,
    },
    Open {
        until_ms: u64,
    },
    HalfOpen {
        probing: bool,
    },
}

/// What one attempt at the backend came to (the request's own outcome is `context::Outcome`).
pub enum Attempt<'a> {
    /// The backend answered with this status and these headers.
    Response(http::StatusCode, &'a HeaderMap),
    /// No answer: the connection failed or the backend timed out.
    TransportError,
}

pub struct CircuitBreaker {
    /// The backend's id, for the log lines.
    backend: String,
    /// None: never trips.
    rule: Option<TripRule>,
    failure_statuses: Vec<(u16, u16)>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    // Mirrors of the state for lock-free readers.
    state_code: AtomicU8,
    open_until_ms: AtomicU64,
    failures: AtomicU64,
    trips: AtomicU64,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker").field("backend", &self.backend).field("health", &self.health()).finish()
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

impl CircuitBreaker {
    /// A breaker from validated config; without config it never trips but still counts failures
    /// (of API Management's default failure statuses).
    pub fn new(backend: &str, config: Option<&CircuitBreakerConfig>, clock: Arc<dyn Clock>) -> Self {
        let defaults = CircuitBreakerConfig::default();
        let statuses = config.map_or(&defaults.status_codes, |c| &c.status_codes);
        Self {
            backend: backend.to_owned(),
            rule: config.map(|c| TripRule {
                failure_count: usize::try_from(c.failure_count).unwrap_or(usize::MAX).max(1),
                interval_ms: c.interval_secs.saturating_mul(1000),
                trip_ms: c.trip_secs.saturating_mul(1000),
                max_trip_ms: c.max_trip_secs.saturating_mul(1000),
                accept_retry_after: c.accept_retry_after,
            }),
            failure_statuses: statuses.iter().filter_map(|range| parse_status_range(range).ok()).collect(),
            clock,
            state: Mutex::new(State::Closed { recent: VecDeque::new() }),
            state_code: AtomicU8::new(CLOSED),
            open_until_ms: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            trips: AtomicU64::new(0),
        }
    }

    pub fn health(&self) -> Health {
        let now = self.clock.now_ms();
        let until = self.open_until_ms.load(Ordering::Acquire);
        let (state, retry_in_ms) = match self.state_code.load(Ordering::Acquire) {
            // Past the trip duration the next request probes: half-open in all but name.
            OPEN if now >= until => (CircuitState::HalfOpen, None),
            OPEN => (CircuitState::Open, Some(until - now)),
            HALF_OPEN => (CircuitState::HalfOpen, None),
            _ => (CircuitState::Closed, None),
        };
        Health {
            state,
            failures: self.failures.load(Ordering::Relaxed),
            trips: self.trips.load(Ordering::Relaxed),
            retry_in_ms,
        }
    }

    /// Asks to send one request. `None` while the breaker is open, or half-open with its one
    /// probe already under way.
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        if self.rule.is_none() {
            return Some(Permit { breaker: self, probe: false });
        }
        let now = self.clock.now_ms();
        let mut state = self.lock();
        let probe = match &*state {
            State::Closed { .. } => false,
            State::Open { until_ms } if now < *until_ms => return None,
            State::HalfOpen { probing: true } => return None,
            State::Open { .. } | State::HalfOpen { probing: false } => true,
        };
        if probe {
            *state = State::HalfOpen { probing: true };
            self.state_code.store(HALF_OPEN, Ordering::Release);
            tracing::info!(backend = %self.backend, "circuit breaker half-open: probing the backend with one request");
        }
        Some(Permit { breaker: self, probe })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement; a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_failure(&self, attempt: &Attempt<'_>) -> bool {
        match attempt {
            Attempt::TransportError => true,
            Attempt::Response(status, _) => {
                let code = status.as_u16();
                self.failure_statuses.iter().any(|(low, high)| (*low..=*high).contains(&code))
            }
        }
    }

    fn record(&self, probe: bool, outcome: &Attempt<'_>) {
        let failed = self.is_failure(outcome);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let Some(rule) = &self.rule else { return };
        let now = self.clock.now_ms();
        let mut state = self.lock();
        match (&mut *state, failed) {
            (State::HalfOpen { .. }, false) if probe => {
                *state = State::Closed { recent: VecDeque::new() };
                self.state_code.store(CLOSED, Ordering::Release);
                tracing::info!(backend = %self.backend, "circuit breaker closed: the backend answered the probe");
            }
            (State::HalfOpen { .. }, true) if probe => self.trip(&mut state, rule, now, outcome),
            (State::Closed { recent }, true) => {
                while recent.front().is_some_and(|t| now.saturating_sub(*t) >= rule.interval_ms) {
                    recent.pop_front();
                }
                recent.push_back(now);
                if recent.len() >= rule.failure_count {
                    self.trip(&mut state, rule, now, outcome);
                }
            }
            // Answers to requests sent before the breaker changed state say nothing new.
            _ => {}
        }
    }

    fn trip(&self, state: &mut State, rule: &TripRule, now: u64, outcome: &Attempt<'_>) {
        let told = match outcome {
            Attempt::Response(_, headers) if rule.accept_retry_after => retry_after_ms(headers, now),
            _ => None,
        };
        let trip_ms = told.map_or(rule.trip_ms, |ms| ms.min(rule.max_trip_ms));
        let until_ms = now.saturating_add(trip_ms);
        *state = State::Open { until_ms };
        self.open_until_ms.store(until_ms, Ordering::Release);
        self.state_code.store(OPEN, Ordering::Release);
        self.trips.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            backend = %self.backend, trip_ms, from_retry_after = told.is_some(),
            "circuit breaker open: the backend gets no traffic until the trip duration has passed"
        );
    }

    /// A probe that ended without an outcome (its request was abandoned) frees the slot for the next.
    fn release(&self) {
        let mut state = self.lock();
        if let State::HalfOpen { probing } = &mut *state {
            *probing = false;
        }
    }
}

/// Leave to send one request; report how it went with [`Permit::record`]. A permit dropped
/// without a report (the request was abandoned) counts for nothing.
#[must_use]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    /// This request probes a half-open breaker.
    probe: bool,
}

impl Permit<'_> {
    pub fn record(mut self, outcome: &Attempt<'_>) {
        self.breaker.record(self.probe, outcome);
        // Reported: nothing for Drop to release.
        self.probe = false;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.release();
        }
    }
}

/// How long a response asks the client to wait: `retry-after-ms` (Azure OpenAI's), else
/// `Retry-After` in seconds or as an HTTP date (RFC 9110 §10.2.3). `now_ms` is Unix time.
pub fn retry_after_ms(headers: &HeaderMap, now_ms: u64) -> Option<u64> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).filter(|ms| ms.is_finite()) {
        // Saturating float-to-int conversion; negatives become 0.
        return Some(ms.ceil() as u64);
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    let date_ms = u64::try_from(date.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()?;
    Some(date_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::clock::ManualClock;
    use http::{HeaderValue, StatusCode};

    fn config() -> CircuitBreakerConfig {
        // Three failures in 10 s trip it for 30 s; statuses 429 and 500-599.
        CircuitBreakerConfig { accept_retry_after: true, max_trip_secs: 120, ..CircuitBreakerConfig::default() }
    }

    fn breaker(config: Option<&CircuitBreakerConfig>) -> (CircuitBreaker, Arc<ManualClock>) {
        let clock = ManualClock::at(1_000_000);
        (CircuitBreaker::new("east", config, clock.clone()), clock)
    }

    fn status(breaker: &CircuitBreaker, code: u16) {
        let headers = HeaderMap::new();
        let status = StatusCode::from_u16(code).expect("status");
        breaker.try_acquire().expect("available").record(&Attempt::Response(status, &headers));
    }

    fn retry_after(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::try_from(value).expect("header"));
        headers
    }

    #[test]
    fn trips_after_the_failure_count_within_the_interval_then_probes_once_and_closes() {
        let (breaker, clock) = breaker(Some(&config()));
        status(&breaker, 500);
        status(&breaker, 200);
        status(&breaker, 400);
        status(&breaker, 503);
        assert_eq!(breaker.health().state, CircuitState::Closed, "two failures: still closed");
        breaker.try_acquire().expect("closed").record(&Attempt::TransportError);
        let health = breaker.health();
        assert_eq!(health.state, CircuitState::Open);
        assert_eq!((health.failures, health.trips, health.retry_in_ms), (3, 1, Some(30_000)));
        assert!(breaker.try_acquire().is_none(), "open: no traffic");

        clock.advance(29_999);
        assert!(breaker.try_acquire().is_none(), "still inside the trip duration");
        clock.advance(1);
        assert_eq!(breaker.health().state, CircuitState::HalfOpen);
        let probe = breaker.try_acquire().expect("the probe");
        assert!(breaker.try_acquire().is_none(), "one probe at a time");
        probe.record(&Attempt::Response(StatusCode::OK, &HeaderMap::new()));
        assert_eq!(breaker.health().state, CircuitState::Closed, "failback");
        assert!(breaker.try_acquire().is_some());
    }

    #[test]
    fn failures_older_than_the_interval_do_not_count() {
        let (breaker, clock) = breaker(Some(&config()));
        status(&breaker, 429);
        clock.advance(6_000);
        status(&breaker, 429);
        clock.advance(6_000);
        status(&breaker, 429);
        assert_eq!(breaker.health().state, CircuitState::Closed, "the first failure left the 10 s window");
        status(&breaker, 429);
        assert_eq!(breaker.health().state, CircuitState::Open);
    }

    #[test]
    fn a_failed_probe_trips_again_and_an_abandoned_probe_frees_the_slot() {
        let (breaker, clock) = breaker(Some(&CircuitBreakerConfig { failure_count: 1, ..config() }));
        breaker.try_acquire().expect("closed").record(&Attempt::TransportError);
        clock.advance(30_000);
        drop(breaker.try_acquire().expect("probe"));
        assert_eq!(breaker.health().state, CircuitState::HalfOpen);
        breaker.try_acquire().expect("the slot is free again").record(&Attempt::TransportError);
        let health = breaker.health();
        assert_eq!((health.state, health.trips, health.retry_in_ms), (CircuitState::Open, 2, Some(30_000)));
    }

    #[test]
    fn retry_after_sets_the_trip_duration_capped_by_max_trip() {
        let (breaker, clock) = breaker(Some(&CircuitBreakerConfig { failure_count: 1, ..config() }));
        let headers = retry_after("retry-after", "2");
        breaker.try_acquire().expect("closed").record(&Attempt::Response(StatusCode::TOO_MANY_REQUESTS, &headers));
        assert_eq!(breaker.health().retry_in_ms, Some(2_000));
        clock.advance(2_000);
        let headers = retry_after("retry-after", "86400");
        breaker.try_acquire().expect("probe").record(&Attempt::Response(StatusCode::TOO_MANY_REQUESTS, &headers));
        assert_eq!(breaker.health().retry_in_ms, Some(120_000), "capped by max-trip-secs");

        let ignoring = CircuitBreakerConfig { failure_count: 1, accept_retry_after: false, ..config() };
        let (breaker, _) = self::breaker(Some(&ignoring));
        let headers = retry_after("retry-after", "2");
        breaker.try_acquire().expect("closed").record(&Attempt::Response(StatusCode::TOO_MANY_REQUESTS, &headers));
        assert_eq!(breaker.health().retry_in_ms, Some(30_000), "trip-secs when Retry-After is not accepted");
    }

    #[test]
    fn without_config_it_counts_failures_but_never_trips() {
        let (breaker, _) = breaker(None);
        for _ in 0..10 {
            status(&breaker, 500);
        }
        let health = breaker.health();
        assert_eq!((health.state, health.failures, health.trips), (CircuitState::Closed, 10, 0));
    }

    #[test]
    fn status_codes_outside_the_configured_ranges_are_successes() {
        let (breaker, _) = breaker(Some(&CircuitBreakerConfig {
            failure_count: 1,
            status_codes: vec!["502-504".to_owned()],
            ..config()
        }));
        status(&breaker, 429);
        status(&breaker, 500);
        assert_eq!(breaker.health().failures, 0);
        status(&breaker, 503);
        assert_eq!(breaker.health().state, CircuitState::Open);
    }

    #[test]
    fn retry_after_forms() {
        let now = 1_445_412_480_000; // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(retry_after_ms(&retry_after("retry-after", "7"), now), Some(7_000));
        assert_eq!(retry_after_ms(&retry_after("retry-after", " 0 "), now), Some(0));
        assert_eq!(retry_after_ms(&retry_after("retry-after-ms", "1500.2"), now), Some(1_501));
        assert_eq!(retry_after_ms(&retry_after("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT"), now), Some(30_000));
        assert_eq!(retry_after_ms(&retry_after("retry-after", "Wed, 21 Oct 2015 07:27:00 GMT"), now), Some(0));
        assert_eq!(retry_after_ms(&retry_after("retry-after", "soon"), now), None);
        assert_eq!(retry_after_ms(&retry_after("retry-after", "-3"), now), None);
        assert_eq!(retry_after_ms(&HeaderMap::new(), now), None);
        let mut both = retry_after("retry-after", "9");
        both.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after_ms(&both, now), Some(250), "the finer figure wins");
    }
}
