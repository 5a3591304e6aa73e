//! Counters in Redis, shared by every gateway instance.
//!
//! Each operation is one Lua script, so one round trip and atomic on the server: a reservation
//! over a per-minute window and a quota is checked and recorded together or not at all, and
//! never as GET-then-SET from several instances. Scripts use the server's clock, so instances
//! with skewed clocks still agree on windows. Plain Redis 7 is enough; keys expire on their own.
//!
//! Redis trouble must not hold requests up: every call is bounded by a short timeout, and after
//! [`FAILURES_TO_OPEN`] failures in a row a breaker stops calling Redis for a cool-down, then lets
//! one request through to probe it. When the probe succeeds Redis is used again: no restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Admission, Clock, CounterStore, Limit, StoreError, Ticket, Window};

const FAILURES_TO_OPEN: u32 = 3;

pub struct RedisStore {
    connection: ConnectionManager,
    reserve: redis::Script,
    adjust: redis::Script,
    timeout: Duration,
    /// `None`: the server's clock. Tests inject one to step across window boundaries.
    clock: Option<Arc<dyn Clock>>,
    breaker: Breaker,
}

impl RedisStore {
    /// Sets the store up without connecting: the first request connects, so the gateway starts
    /// (and fails open or closed as configured) while Redis is still down.
    pub fn new(
        url: &str,
        timeout: Duration,
        cooldown: Duration,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {:?}", e.kind()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(cooldown);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot set up the Redis connection: {:?}", e.kind()))?;
        Ok(Self {
            connection,
            reserve: redis::Script::new(include_str!("redis/reserve.lua")),
            adjust: redis::Script::new(include_str!("redis/adjust.lua")),
            timeout,
            clock,
            breaker: Breaker::new(cooldown),
        })
    }

    fn now_arg(&self) -> String {
        self.clock.as_ref().map(|c| c.now_ms().to_string()).unwrap_or_default()
    }

    /// Runs a script through the breaker, bounded by the timeout.
    async fn call(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Vec<i64>, StoreError> {
        if !self.breaker.allows() {
            return Err(StoreError::Unavailable("breaker open".to_owned()));
        }
        let mut connection = self.connection.clone();
        let result = tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut connection)).await;
        match result {
            Ok(Ok(reply)) => {
                self.breaker.succeeded();
                Ok(reply)
            }
            Ok(Err(error)) => {
                self.breaker.failed();
                Err(StoreError::Unavailable(format!("{:?}", error.kind())))
            }
            Err(_) => {
                self.breaker.failed();
                Err(StoreError::Unavailable(format!("no answer within {} ms", self.timeout.as_millis())))
            }
        }
    }
}

fn window_args(window: Window) -> (&'static str, String) {
    match window {
        Window::Sliding { secs } => ("s", secs.to_string()),
        Window::Fixed(period) => ("p", period.name().into_owned()),
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn reserve(&self, limits: &[Limit], cost: u64) -> Result<Admission, StoreError> {
        let mut invocation = self.reserve.prepare_invoke();
        invocation.arg(self.now_arg()).arg(cost);
        for limit in limits {
            let (kind, param) = window_args(limit.window);
            invocation.key(&limit.key).arg(kind).arg(param).arg(limit.max);
        }
        let reply = self.call(invocation).await?;
        let malformed = || StoreError::Unavailable(format!("unexpected reply from the reserve script: {reply:?}"));
        let index = |i: i64| usize::try_from(i - 1).ok().filter(|i| *i < limits.len());
        match reply.first().copied() {
            Some(1) if reply.len() == 1 + 2 * limits.len() => {
                let slots = limits.iter().zip(reply[1..].chunks(2)).map(|(l, pair)| (l.key.clone(), pair[0])).collect();
                let remaining = reply[1..].chunks(2).map(|pair| u64::try_from(pair[1]).unwrap_or(0)).collect();
                Ok(Admission::Granted { ticket: Ticket { slots, reserved: cost }, remaining })
            }
            Some(0) if reply.len() == 3 => Ok(Admission::Refused {
                limit: index(reply[1]).ok_or_else(malformed)?,
                retry_after_secs: u64::try_from(reply[2]).unwrap_or(1),
            }),
            Some(-1) if reply.len() == 2 => Ok(Admission::TooLarge { limit: index(reply[1]).ok_or_else(malformed)? }),
            _ => Err(malformed()),
        }
    }

    async fn adjust(&self, ticket: &Ticket, actual: u64) -> Result<(), StoreError> {
        let delta = actual as i64 - ticket.reserved as i64;
        if delta == 0 {
            return Ok(());
        }
        let mut invocation = self.adjust.prepare_invoke();
        invocation.arg(delta);
        for (key, slot) in &ticket.slots {
            invocation.key(key).arg(slot);
        }
        self.call(invocation).await.map(drop)
    }
}

/// Stops calling Redis after repeated failures; after a cool-down, one call probes it.
struct Breaker {
    started: Instant,
    cooldown_ms: u64,
    failures: AtomicU32,
    /// 0 while closed; else when (ms since `started`) the next probe may go.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    fn new(cooldown: Duration) -> Self {
        Self {
            started: Instant::now(),
            cooldown_ms: u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX).max(1),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn allows(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        // Open: after the cool-down, exactly one caller probes.
        self.now_ms() >= until
            && self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            self.probing.store(false, Ordering::Release);
            tracing::info!("counter store (Redis) is reachable again; limits are shared across instances again");
        }
    }

    fn failed(&self) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let probe_failed = self.probing.swap(false, Ordering::AcqRel);
        if failures >= FAILURES_TO_OPEN || probe_failed {
            let was_closed = self.open_until_ms.swap(self.now_ms() + self.cooldown_ms, Ordering::AcqRel) == 0;
            if was_closed {
                tracing::warn!(
                    cooldown_ms = self.cooldown_ms,
                    "counter store (Redis) unavailable; fail-open limits use this instance's own counters \
                     and fail-closed limits refuse requests until it is back"
                );
            }
        }
    }
}
