//! The usage ledger: what chargeback is computed from.
//!
//! Every finished call that used tokens (the backend's `usage`) or was answered from the semantic
//! cache (the tokens the hit spared) is appended once, keyed by its request id, to a bucket of
//! (hour, subscription, team, model, API). Money is never stored: the chargeback query prices the
//! tokens with the configured price table when it runs (see [`chargeback`]), so a price change
//! applies to past usage too.
//!
//! Two stores behind [`LedgerStore`], chosen once at start-up: [`redis::RedisLedger`] when
//! `[redis]` is configured (shared by every instance, one atomic script per append), else
//! [`embedded::EmbeddedLedger`] (memory plus a journal file flushed every second).
//!
//! Appending happens in the pipeline's completion phase, off the response path, and never fails
//! the call: a store that cannot write keeps the record and retries.

pub mod chargeback;
pub mod embedded;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, EnvLookup, RedisConfig};
use crate::context::{CacheStatus, RequestContext};
use crate::infra::clock::{Clock, SystemClock};

/// Where a call's usage is filed. Unauthenticated APIs file under an empty subscription and team,
/// calls without a model under an empty model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BucketKey {
    /// Start of the hour (UTC), in seconds since the Unix epoch.
    pub hour: u64,
    pub subscription: String,
    pub team: String,
    pub model: String,
    pub api: String,
}

/// What a bucket counts. `saved_*` are the tokens semantic-cache hits spared the backend, kept
/// apart from the backend's own usage (and prompt apart from completion, so they can be priced).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    pub requests: u64,
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// Prompt tokens the backend served from its own prompt cache (`prompt_tokens_details`).
    pub cached: u64,
    pub saved_prompt: u64,
    pub saved_completion: u64,
}

impl Counts {
    /// The metric names, in the order of [`Counts::values`]; Redis field names use them.
    pub const METRICS: [&'static str; 7] =
        ["requests", "prompt", "completion", "total", "cached", "saved_prompt", "saved_completion"];

    pub fn values(&self) -> [u64; 7] {
        [self.requests, self.prompt, self.completion, self.total, self.cached, self.saved_prompt, self.saved_completion]
    }

    /// Adds `value` to the metric named `metric`; false for an unknown name.
    pub fn add_metric(&mut self, metric: &str, value: u64) -> bool {
        let field = match metric {
            "requests" => &mut self.requests,
            "prompt" => &mut self.prompt,
            "completion" => &mut self.completion,
            "total" => &mut self.total,
            "cached" => &mut self.cached,
            "saved_prompt" => &mut self.saved_prompt,
            "saved_completion" => &mut self.saved_completion,
            _ => return false,
        };
        *field = field.saturating_add(value);
        true
    }

    pub fn add(&mut self, other: &Counts) {
        for (metric, value) in Self::METRICS.iter().zip(other.values()) {
            self.add_metric(metric, value);
        }
    }

    pub fn saved(&self) -> u64 {
        self.saved_prompt.saturating_add(self.saved_completion)
    }
}

/// One call's usage, as appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub request_id: String,
    pub key: BucketKey,
    pub counts: Counts,
}

impl UsageRecord {
    /// The record of a finished call, filed under the hour of `now_secs`; `None` when the call
    /// used no tokens (no backend usage and no cache hit).
    pub fn of(ctx: &RequestContext, now_secs: u64) -> Option<Self> {
        let saved = ctx.cache.as_ref().filter(|c| c.status == CacheStatus::Hit).and_then(|c| c.saved);
        if ctx.usage.is_none() && saved.is_none() {
            return None;
        }
        let mut counts = Counts { requests: 1, ..Counts::default() };
        if let Some(usage) = ctx.usage {
            counts.prompt = usage.prompt_tokens;
            counts.completion = usage.completion_tokens;
            counts.total = usage.total_tokens;
            counts.cached = usage.cached_tokens;
        }
        if let Some(saved) = saved {
            counts.saved_prompt = saved.prompt_tokens;
            counts.saved_completion = saved.completion_tokens;
        }
        let (subscription, team) =
            ctx.subscription.as_ref().map(|s| (s.id.clone(), s.team.clone())).unwrap_or_default();
        Some(Self {
            request_id: ctx.request_id.clone(),
            key: BucketKey {
                hour: floor_hour(now_secs),
                subscription,
                team,
                model: ctx.model().unwrap_or_default().to_owned(),
                api: ctx.api.id.clone(),
            },
            counts,
        })
    }
}

pub fn floor_hour(secs: u64) -> u64 {
    secs / 3600 * 3600
}

/// Buckets in key order (hour first), so an hour range is one range scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buckets(BTreeMap<BucketKey, Counts>);

impl Buckets {
    pub fn add(&mut self, key: &BucketKey, counts: &Counts) {
        match self.0.get_mut(key) {
            Some(existing) => existing.add(counts),
            None => {
                self.0.insert(key.clone(), *counts);
            }
        }
    }

    pub fn merge(&mut self, other: Buckets) {
        for (key, counts) in other.0 {
            self.add(&key, &counts);
        }
    }

    /// The buckets whose hour starts in `[from, to)`.
    pub fn range(&self, from: u64, to: u64) -> Vec<(BucketKey, Counts)> {
        let start = BucketKey {
            hour: from,
            subscription: String::new(),
            team: String::new(),
            model: String::new(),
            api: String::new(),
        };
        self.0.range(start..).take_while(|(key, _)| key.hour < to).map(|(k, c)| (k.clone(), *c)).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&BucketKey, &Counts)> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerError {
    /// The store could not be read or written now (Redis down or slow, a disk error).
    Unavailable(String),
    /// The journal file cannot be used: in use by another process, unreadable, or corrupt.
    Journal(String),
}

impl std::fmt::Display for LedgerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "usage ledger unavailable: {why}"),
            Self::Journal(why) => write!(f, "usage ledger journal: {why}"),
        }
    }
}

impl std::error::Error for LedgerError {}

#[async_trait]
pub trait LedgerStore: Send + Sync {
    /// Adds a call's usage unless its request id was appended already. Never fails: a store that
    /// cannot write now keeps the record and retries in the background.
    async fn append(&self, record: UsageRecord);

    /// The buckets whose hour starts in `[from, to)` (seconds since the epoch).
    async fn query(&self, from: u64, to: u64) -> Result<Vec<(BucketKey, Counts)>, LedgerError>;

    /// Writes out whatever is still held in memory (at shutdown).
    async fn flush(&self) -> Result<(), LedgerError>;

    /// What went wrong writing so far, for the metrics.
    fn write_failures(&self) -> WriteFailures;
}

/// Counts of the store's write troubles since start-up.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteFailures {
    /// Writes that failed or timed out (the records are kept and retried).
    pub failed: u64,
    /// Records given up on because the retry queue was full.
    pub dropped: u64,
}

/// The gateway's ledger: the store chosen at start-up.
pub struct Ledger {
    store: Arc<dyn LedgerStore>,
}

impl Ledger {
    /// Redis when `[redis]` is configured, else the embedded journal at `[ledger] path` (locked
    /// for this process). Must be called within a Tokio runtime (background flush or retry task).
    pub fn open(config: &Config, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let store: Arc<dyn LedgerStore> = match &config.redis {
            Some(redis_config) => Arc::new(redis_ledger(redis_config, env)?),
            None => Arc::new(
                embedded::EmbeddedLedger::open(&config.ledger.path)
                    .map_err(|e| ConfigError::at("ledger.path", e.to_string()))?,
            ),
        };
        Ok(Self { store })
    }

    pub fn store(&self) -> &Arc<dyn LedgerStore> {
        &self.store
    }

    /// Appends a finished call's usage, if it used any.
    pub async fn record(&self, ctx: &RequestContext) {
        if let Some(record) = UsageRecord::of(ctx, SystemClock.now_ms() / 1000) {
            self.store.append(record).await;
        }
    }

    pub fn write_failures(&self) -> WriteFailures {
        self.store.write_failures()
    }

    pub async fn flush(&self) {
        if let Err(error) = self.store.flush().await {
            tracing::warn!(%error, "usage ledger: could not write everything out at shutdown");
        }
    }
}

fn redis_ledger(config: &RedisConfig, env: EnvLookup<'_>) -> Result<redis::RedisLedger, ConfigError> {
    redis::RedisLedger::new(
        &config.url(env)?,
        Duration::from_millis(config.timeout_ms),
        Duration::from_millis(config.breaker_cooldown_ms),
    )
    .map_err(|e| ConfigError::at("redis.url", e))
}

/// The buckets of `[from, to)` for `aigw chargeback`: from Redis, or read from the embedded
/// journal without taking its lock (so it works while the gateway runs).
pub async fn read_buckets(
    config: &Config,
    env: EnvLookup<'_>,
    from: u64,
    to: u64,
) -> Result<Vec<(BucketKey, Counts)>, LedgerError> {
    match &config.redis {
        Some(redis_config) => {
            let store = redis_ledger(redis_config, env).map_err(|e| LedgerError::Unavailable(e.to_string()))?;
            store.query(from, to).await
        }
        None => {
            let path = &config.ledger.path;
            if !path.exists() {
                let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
                return Err(LedgerError::Journal(format!(
                    "no ledger at {} (relative paths are from the working directory, {cwd}); run this \
                     where the gateway runs",
                    path.display()
                )));
            }
            Ok(embedded::read_journal(path)?.buckets.range(from, to))
        }
    }
}

/// Locks a mutex even if a panicking thread poisoned it: the data under it (counters) stays usable.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hour: u64, team: &str) -> BucketKey {
        BucketKey { hour, subscription: "s".into(), team: team.into(), model: "m".into(), api: "a".into() }
    }

    #[test]
    fn ranges_select_by_hour_start() {
        let mut buckets = Buckets::default();
        let one = Counts { requests: 1, prompt: 5, ..Counts::default() };
        for hour in [0, 3600, 7200, 10_800] {
            buckets.add(&key(hour, "a"), &one);
            buckets.add(&key(hour, "b"), &one);
        }
        buckets.add(&key(3600, "a"), &one);
        let got = buckets.range(3600, 10_800);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|(k, _)| k.hour == 3600 || k.hour == 7200));
        assert_eq!(got[0].1, Counts { requests: 2, prompt: 10, ..Counts::default() });
        assert!(buckets.range(10_801, 20_000).is_empty());
    }

    #[test]
    fn metrics_round_trip_by_name() {
        let counts =
            Counts { requests: 1, prompt: 2, completion: 3, total: 5, cached: 1, saved_prompt: 7, saved_completion: 8 };
        let mut rebuilt = Counts::default();
        for (metric, value) in Counts::METRICS.iter().zip(counts.values()) {
            assert!(rebuilt.add_metric(metric, value));
        }
        assert_eq!(rebuilt, counts);
        assert!(!rebuilt.add_metric("bogus", 1));
        assert_eq!(floor_hour(7199), 3600);
    }
}
