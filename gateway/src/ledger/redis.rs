//! The ledger in Redis, shared by every gateway instance.
//!
//! In Redis:
//! - `aigw:ledger:seen:<request-id>`: set for a day by the first append of a request id;
//! - `aigw:ledger:h:<hour>`: one hash per hour, field `<metric>|<json [subscription, team, model,
//!   api]>`, value the count;
//! - `aigw:ledger:hours`: a zset of the hours that have a hash, scored by hour, so a query finds
//!   the hashes of a range with one `ZRANGEBYSCORE`.
//!
//! An append is one Lua script (`redis/append.lua`): it sets the request id's marker and, only if
//! the marker is new, increments the bucket's fields and indexes the hour; atomic, so a request
//! id counts once whichever instance appends it and however often. Appends are bounded by
//! `[redis] timeout-ms` and go through a [`Breaker`]; one that fails (Redis down or slow) is kept
//! in a bounded in-memory queue that a background task retries with back-off (safe: the script
//! is idempotent per request id), and that is tried once more at shutdown.
//!
//! The ledger keeps no expiry: Redis must persist (AOF or RDB) for it to survive a Redis restart.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use super::{BucketKey, Counts, LedgerError, LedgerStore, UsageRecord, WriteFailures, lock};
use crate::infra::breaker::Breaker;
use crate::infra::redis::lazy_connection;

const PREFIX: &str = "aigw:ledger:";
const HOURS_KEY: &str = "aigw:ledger:hours";
/// Failed appends kept for retry; beyond it the oldest are dropped (and counted).
pub const RETRY_CAPACITY: usize = 100_000;
/// Retry back-off while Redis is unavailable.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// Queries read up to an hash per hour of the range: bounded by at least this, whatever
/// `timeout-ms` (which is sized for one append) says.
const QUERY_TIMEOUT_FLOOR: Duration = Duration::from_secs(5);

fn hour_key(hour: u64) -> String {
    format!("{PREFIX}h:{hour}")
}

/// Counts what goes wrong with appends.
#[derive(Default)]
pub struct RedisLedgerStats {
    /// Append attempts that failed or timed out (first tries and retries).
    pub append_failures: AtomicU64,
    /// Records dropped because the retry queue was full.
    pub dropped: AtomicU64,
}

pub struct RedisLedger {
    inner: Arc<Inner>,
    _retrier: AbortOnDropHandle<()>,
}

struct Inner {
    connection: ConnectionManager,
    append: redis::Script,
    timeout: Duration,
    breaker: Breaker,
    retry: std::sync::Mutex<VecDeque<UsageRecord>>,
    wake: Notify,
    stats: RedisLedgerStats,
}

impl RedisLedger {
    /// Sets the store up without connecting (the first append connects). Must be called within
    /// a Tokio runtime (the retry task).
    pub fn new(url: &str, timeout: Duration, cooldown: Duration) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the Redis ledger must be created within a Tokio runtime".to_owned())?;
        let (_, connection) = lazy_connection(url, timeout, cooldown)?;
        let inner = Arc::new(Inner {
            connection,
            append: redis::Script::new(include_str!("redis/append.lua")),
            timeout,
            breaker: Breaker::new(
                "usage ledger (Redis)",
                "usage is kept in memory and retried until it is back",
                "queued usage is being written",
                cooldown,
            ),
            retry: std::sync::Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            stats: RedisLedgerStats::default(),
        });
        let retrier = runtime.spawn(retry_failed(inner.clone()));
        Ok(Self { inner, _retrier: AbortOnDropHandle::new(retrier) })
    }

    pub fn stats(&self) -> &RedisLedgerStats {
        &self.inner.stats
    }

    /// Records waiting for a retry.
    pub fn queued(&self) -> usize {
        lock(&self.inner.retry).len()
    }
}

impl Inner {
    /// Runs the append script once, through the breaker or (at shutdown) straight.
    async fn send(&self, record: &UsageRecord, through_breaker: bool) -> Result<(), String> {
        let key = &record.key;
        let dimensions = serde_json::json!([key.subscription, key.team, key.model, key.api]).to_string();
        let mut invocation = self.append.prepare_invoke();
        invocation.key(format!("{PREFIX}seen:{}", record.request_id)).key(hour_key(key.hour)).key(HOURS_KEY);
        invocation.arg(key.hour).arg(dimensions);
        for (metric, value) in Counts::METRICS.iter().zip(record.counts.values()) {
            if value > 0 {
                invocation.arg(*metric).arg(value);
            }
        }
        let mut connection = self.connection.clone();
        let call = invocation.invoke_async::<i64>(&mut connection);
        let result = if through_breaker {
            self.breaker.call(self.timeout, call).await
        } else {
            match tokio::time::timeout(self.timeout, call).await {
                Ok(reply) => reply.map_err(|e| format!("{:?}", e.kind())),
                Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            }
        };
        if result.is_err() {
            self.stats.append_failures.fetch_add(1, Ordering::Relaxed);
        }
        result.map(drop)
    }

    /// Queues a record whose append failed, dropping the oldest when full.
    fn keep_for_retry(&self, record: UsageRecord, error: &str) {
        let mut queue = lock(&self.retry);
        if queue.is_empty() {
            tracing::warn!(error, "usage ledger: appending to Redis failed; keeping usage in memory and retrying");
        }
        if queue.len() >= RETRY_CAPACITY {
            queue.pop_front();
            if self.stats.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    capacity = RETRY_CAPACITY,
                    "usage ledger: retry queue full; dropping the oldest usage records"
                );
            }
        }
        queue.push_back(record);
        drop(queue);
        self.wake.notify_one();
    }

    /// Sends queued records until the queue is empty (`Ok`) or one fails (put back, `Err`).
    async fn drain(&self, through_breaker: bool) -> Result<(), String> {
        loop {
            let Some(record) = lock(&self.retry).pop_front() else { return Ok(()) };
            if let Err(error) = self.send(&record, through_breaker).await {
                lock(&self.retry).push_front(record);
                return Err(error);
            }
        }
    }
}

async fn retry_failed(inner: Arc<Inner>) {
    let mut backoff = BACKOFF.0;
    loop {
        inner.wake.notified().await;
        loop {
            tokio::time::sleep(backoff).await;
            if inner.drain(true).await.is_ok() {
                backoff = BACKOFF.0;
                break;
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
        tracing::info!("usage ledger: queued usage written to Redis");
    }
}

#[async_trait]
impl LedgerStore for RedisLedger {
    fn write_failures(&self) -> WriteFailures {
        let stats = &self.inner.stats;
        WriteFailures {
            failed: stats.append_failures.load(Ordering::Relaxed),
            dropped: stats.dropped.load(Ordering::Relaxed),
        }
    }

    async fn append(&self, record: UsageRecord) {
        if let Err(error) = self.inner.send(&record, true).await {
            self.inner.keep_for_retry(record, &error);
        }
    }

    async fn query(&self, from: u64, to: u64) -> Result<Vec<(BucketKey, Counts)>, LedgerError> {
        let unavailable = |e: redis::RedisError| LedgerError::Unavailable(format!("Redis: {:?}", e.kind()));
        let timeout = self.inner.timeout.max(QUERY_TIMEOUT_FLOOR);
        let timed_out = || LedgerError::Unavailable(format!("Redis did not answer within {} ms", timeout.as_millis()));
        if to <= from {
            return Ok(Vec::new());
        }
        let mut connection = self.inner.connection.clone();
        let mut hours_query = redis::cmd("ZRANGEBYSCORE");
        hours_query.arg(HOURS_KEY).arg(from).arg(format!("({to}"));
        let hours: Vec<u64> = tokio::time::timeout(timeout, hours_query.query_async(&mut connection))
            .await
            .map_err(|_| timed_out())?
            .map_err(unavailable)?;
        if hours.is_empty() {
            // An empty pipeline is an error to the client.
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for hour in &hours {
            pipe.cmd("HGETALL").arg(hour_key(*hour));
        }
        let hashes: Vec<Vec<(String, u64)>> = tokio::time::timeout(timeout, pipe.query_async(&mut connection))
            .await
            .map_err(|_| timed_out())?
            .map_err(unavailable)?;
        let mut buckets = super::Buckets::default();
        for (hour, fields) in hours.iter().zip(hashes) {
            for (field, value) in fields {
                let parsed = field.split_once('|').and_then(|(metric, dimensions)| {
                    let [subscription, team, model, api] = serde_json::from_str::<[String; 4]>(dimensions).ok()?;
                    Some((metric.to_owned(), BucketKey { hour: *hour, subscription, team, model, api }))
                });
                let mut counts = Counts::default();
                match parsed {
                    Some((metric, key)) if counts.add_metric(&metric, value) => buckets.add(&key, &counts),
                    _ => {
                        return Err(LedgerError::Unavailable(format!(
                            "unexpected field in {}: {field:?}",
                            hour_key(*hour)
                        )));
                    }
                }
            }
        }
        Ok(buckets.range(from, to))
    }

    /// Tries every queued record once more, straight to Redis (not waiting for the breaker);
    /// stops at the first failure.
    async fn flush(&self) -> Result<(), LedgerError> {
        self.inner.drain(false).await.map_err(|error| {
            LedgerError::Unavailable(format!(
                "{} usage records could not be written to Redis ({error}) and are lost",
                self.queued()
            ))
        })
    }
}
