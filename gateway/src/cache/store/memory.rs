//! The cache of one instance: the index holds the answers too, behind one lock held only for the
//! search or the copy of a row. Time is the injected clock, so TTLs are tested without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::index::{IndexEntry, SharedIndex};
use super::{CacheError, CacheLimits, CacheStore, Candidate, EntryId, NewEntry};
use crate::infra::clock::Clock;

pub struct MemoryCacheStore {
    index: SharedIndex<Bytes>,
    clock: Arc<dyn Clock>,
    next_id: AtomicU64,
}

impl MemoryCacheStore {
    pub fn new(limits: CacheLimits, clock: Arc<dyn Clock>) -> Self {
        Self { index: SharedIndex::new(limits), clock, next_id: AtomicU64::new(1) }
    }
}

/// When an entry stored now with `ttl` expires, in ms since the epoch.
fn expiry_ms(now_ms: u64, ttl: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

#[async_trait]
impl CacheStore for MemoryCacheStore {
    async fn search(
        &self,
        partition: &str,
        query: &[f32],
        min_score: f32,
        max: usize,
    ) -> Result<Vec<Candidate>, CacheError> {
        let index = self.index.read();
        index.search(partition, query, min_score, max, self.clock.now_ms())
    }

    async fn answer(&self, partition: &str, id: EntryId) -> Result<Option<Bytes>, CacheError> {
        let index = self.index.read();
        Ok(index.payload(partition, id, self.clock.now_ms()).cloned())
    }

    async fn insert(&self, entry: NewEntry) -> Result<(), CacheError> {
        if entry.ttl.is_zero() {
            return Ok(());
        }
        let now_ms = self.clock.now_ms();
        let row = IndexEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            vector: &entry.vector,
            prompt: entry.prompt.into(),
            expires_ms: expiry_ms(now_ms, entry.ttl),
            payload: entry.answer,
        };
        let mut index = self.index.write();
        index.insert(&entry.partition, row, now_ms)
    }

    fn len(&self) -> usize {
        let mut index = self.index.write();
        index.prune(self.clock.now_ms());
        index.len()
    }
}
