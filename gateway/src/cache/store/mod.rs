//! Where cached answers live, behind one trait with two implementations chosen at start-up:
//! [`memory::MemoryCacheStore`] (one instance) and [`redis::RedisCacheStore`] (entries in Redis,
//! shared by every instance). Both search the same local [`index::Index`], so a lookup never waits
//! for the network; only fetching the answer of a hit does, with Redis.
//!
//! Entries are grouped in partitions (the caller's key: tenant, model, tools...); a search only
//! ever sees its own partition. Each entry carries an L2-normalised vector (so a dot product is
//! the cosine similarity), its prompt (for the caller's verification step), its answer and a TTL.
//!
//! Memory is bounded per partition by [`CacheLimits::max_entries_per_partition`]. Eviction rule,
//! applied when an insert takes a partition past its bound: expired entries go first, then the
//! entries that expire soonest (with one TTL for all entries: the oldest), possibly the new entry
//! itself when its TTL is the shortest. Both stores apply this same rule.

pub mod index;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::infra::clock::{Clock, SystemClock};

/// Unique across instances: random with Redis, a sequence in memory.
pub type EntryId = u64;

/// An answer to store.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub partition: String,
    /// L2-normalised; every entry of a partition has the dimension of its first one.
    pub vector: Vec<f32>,
    pub prompt: String,
    pub answer: bytes::Bytes,
    /// A zero TTL stores nothing.
    pub ttl: Duration,
}

/// A stored entry similar enough to a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: EntryId,
    /// Cosine similarity to the query.
    pub score: f32,
    pub prompt: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// Redis did not answer in time, failed, or its breaker is open.
    Unavailable(String),
    /// A vector that cannot go in (or be compared with) its partition: empty, or not of the
    /// partition's dimension.
    Vector(String),
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "cache store unavailable: {why}"),
            Self::Vector(why) => write!(f, "invalid cache vector: {why}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub max_entries_per_partition: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { max_entries_per_partition: 10_000 }
    }
}

#[async_trait]
pub trait CacheStore: Send + Sync {
    /// Entries of `partition` whose cosine similarity to `query` is >= `min_score`, best first, at
    /// most `max`. Local: no round trip, whatever the store.
    async fn search(
        &self,
        partition: &str,
        query: &[f32],
        min_score: f32,
        max: usize,
    ) -> Result<Vec<Candidate>, CacheError>;

    /// The stored answer, or None when the entry expired or was evicted meanwhile (the caller then
    /// treats it as a miss).
    async fn answer(&self, partition: &str, id: EntryId) -> Result<Option<bytes::Bytes>, CacheError>;

    async fn insert(&self, entry: NewEntry) -> Result<(), CacheError>;

    /// Entries currently indexed here (all partitions, expired ones left out), for /metrics and tests.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This instance's own store, on the system clock.
pub fn memory(limits: CacheLimits) -> Arc<dyn CacheStore> {
    memory_with_clock(limits, Arc::new(SystemClock))
}

/// This instance's own store, on an injected clock (tests step across TTLs without sleeping).
pub fn memory_with_clock(limits: CacheLimits, clock: Arc<dyn Clock>) -> Arc<dyn CacheStore> {
    Arc::new(memory::MemoryCacheStore::new(limits, clock))
}

/// The store shared through Redis at `url`; see [`redis::RedisCacheStore::new`]. Must be called
/// within a Tokio runtime: it starts the task that keeps the local index in step.
pub fn redis(
    url: &str,
    timeout: Duration,
    cooldown: Duration,
    limits: CacheLimits,
) -> Result<Arc<dyn CacheStore>, String> {
    Ok(Arc::new(redis::RedisCacheStore::new(url, timeout, cooldown, limits)?))
}
