//! The circuit breaker every Redis user goes through (the counter store, the semantic cache), so
//! Redis trouble never holds requests up: every call is bounded by a short timeout, and after
//! [`FAILURES_TO_OPEN`] failures in a row the breaker stops calling Redis for a cool-down, then
//! lets one call through to probe it. When the probe succeeds Redis is used again: no restart.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const FAILURES_TO_OPEN: u32 = 3;

/// Stops calling Redis after repeated failures; after a cool-down, one call probes it.
pub struct Breaker {
    /// Who is calling, for the log lines: "counter store (Redis)".
    name: &'static str,
    /// What the gateway does while the breaker is open, for the warning.
    while_open: &'static str,
    /// What changes once Redis answers again, for the recovery line.
    once_back: &'static str,
    started: Instant,
    cooldown_ms: u64,
    failures: AtomicU32,
    /// 0 while closed; else when (ms since `started`) the next probe may go.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    pub fn new(name: &'static str, while_open: &'static str, once_back: &'static str, cooldown: Duration) -> Self {
        Self {
            name,
            while_open,
            once_back,
            started: Instant::now(),
            cooldown_ms: u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX).max(1),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Runs `call` unless the breaker is open, bounded by `timeout`; the error says why it failed.
    /// `call` is not polled at all while the breaker is open.
    pub async fn call<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        let Some(mut leave) = self.allows() else {
            return Err("breaker open".to_owned());
        };
        let outcome = tokio::time::timeout(timeout, call).await;
        // The outcome is recorded below: nothing for the guard to release.
        leave.probe = false;
        match outcome {
            Ok(Ok(reply)) => {
                self.succeeded();
                Ok(reply)
            }
            Ok(Err(error)) => {
                self.failed();
                Err(format!("{:?}", error.kind()))
            }
            Err(_) => {
                self.failed();
                Err(format!("no answer within {} ms", timeout.as_millis()))
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Leave to call Redis, or `None` while the breaker is open.
    fn allows(&self) -> Option<Leave<'_>> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Some(Leave { breaker: self, probe: false });
        }
        // Open: after the cool-down, exactly one caller probes.
        let probe = self.now_ms() >= until
            && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok();
        probe.then_some(Leave { breaker: self, probe })
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            self.probing.store(false, Ordering::Release);
            tracing::info!("{} is reachable again; {}", self.name, self.once_back);
        }
    }

    fn failed(&self) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let probe_failed = self.probing.swap(false, Ordering::AcqRel);
        if failures >= FAILURES_TO_OPEN || probe_failed {
            let was_closed = self.open_until_ms.swap(self.now_ms() + self.cooldown_ms, Ordering::AcqRel) == 0;
            if was_closed {
                tracing::warn!(cooldown_ms = self.cooldown_ms, "{} unavailable; {}", self.name, self.while_open);
            }
        }
    }
}

/// Leave for one call. A probe whose caller was cancelled mid-call (a client that went away drops
/// the request's future) never reaches `succeeded` or `failed`; dropping its leave frees the probe
/// slot, or Redis would stay switched off until restart.
struct Leave<'a> {
    breaker: &'a Breaker,
    /// This call probes an open breaker and its outcome is not recorded yet.
    probe: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}
