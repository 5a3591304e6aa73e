//! Counters in Redis, shared by every gateway instance.
//!
//! Each operation is one Lua script, so one round trip and atomic on the server: a reservation
//! over a per-minute window and a quota is checked and recorded together or not at all, and
//! never as GET-then-SET from several instances. Scripts use the server's clock, so instances
//! with skewed clocks still agree on windows. Plain Redis 7 is enough; keys expire on their own.
//!
//! Redis trouble must not hold requests up: every call goes through a [`Breaker`] (a short
//! timeout per call, a cool-down after repeated failures, then one probe).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::infra::redis::lazy_connection;

use super::{Admission, CounterStore, Limit, StoreError, Ticket, Window};
use crate::infra::breaker::Breaker;
use crate::infra::clock::Clock;

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
        let (_, connection) = lazy_connection(url, timeout, cooldown)?;
        Ok(Self {
            connection,
            reserve: redis::Script::new(include_str!("redis/reserve.lua")),
            adjust: redis::Script::new(include_str!("redis/adjust.lua")),
            timeout,
            clock,
            breaker: Breaker::new(
                "counter store (Redis)",
                "fail-open limits use this instance's own counters and fail-closed limits refuse requests until it \
                 is back",
                "limits are shared across instances again",
                cooldown,
            ),
        })
    }

    fn now_arg(&self) -> String {
        self.clock.as_ref().map(|c| c.now_ms().to_string()).unwrap_or_default()
    }

    /// Runs a script through the breaker, bounded by the timeout.
    async fn call(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Vec<i64>, StoreError> {
        let mut connection = self.connection.clone();
        self.breaker
            .call(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut connection))
            .await
            .map_err(StoreError::Unavailable)
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
