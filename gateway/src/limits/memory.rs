//! Counters in this process's memory: the store when no Redis is configured, and the fail-open
//! fallback while Redis is unavailable. The algorithm is the one of `redis/reserve.lua`, step by
//! step, so both stores pass the same behaviour tests.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Admission, CounterStore, Limit, StoreError, Ticket, Window, bucket_secs, period_bounds};
use crate::infra::clock::Clock;

const SHARDS: usize = 16;
/// Expired counters are swept from a shard every this many operations on it.
const SWEEP_EVERY: u32 = 1024;

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    hasher: RandomState,
    shards: [Mutex<Shard>; SHARDS],
}

#[derive(Default)]
struct Shard {
    counters: HashMap<String, Counter>,
    operations: u32,
}

struct Counter {
    slots: BTreeMap<i64, i64>,
    expires_ms: u64,
}

/// Where one limit stands at `now`, as both stores compute it.
struct Position {
    slot: i64,
    /// Slots below this no longer count.
    oldest: i64,
    ttl_ms: u64,
    /// When each slot stops counting (sliding) or the period ends (fixed), for Retry-After.
    kind: Kind,
}

enum Kind {
    Sliding { bucket_ms: u64, buckets: i64 },
    Fixed { end_ms: u64 },
}

impl Position {
    fn of(window: Window, now_ms: u64) -> Self {
        match window {
            Window::Sliding { secs } => {
                let bucket = bucket_secs(secs);
                let bucket_ms = bucket * 1000;
                let buckets = secs.div_ceil(bucket) as i64;
                let slot = (now_ms / bucket_ms) as i64;
                Self {
                    slot,
                    oldest: slot - buckets,
                    ttl_ms: (buckets as u64 + 2) * bucket_ms,
                    kind: Kind::Sliding { bucket_ms, buckets },
                }
            }
            Window::Fixed(period) => {
                let (start, end) = period_bounds(period, now_ms / 1000);
                let end_ms = end * 1000;
                // A minute past the end leaves room for reconciles of the period's last requests.
                Self {
                    slot: start as i64,
                    oldest: start as i64,
                    ttl_ms: end_ms - now_ms + 60_000,
                    kind: Kind::Fixed { end_ms },
                }
            }
        }
    }

    /// Seconds until `cost` fits, given the counted slots (ascending) and their sum.
    fn retry_after_secs(&self, counted: &[(i64, i64)], used: i64, cost: i64, max: i64, now_ms: u64) -> u64 {
        let at_ms = match self.kind {
            Kind::Fixed { end_ms } => end_ms,
            Kind::Sliding { bucket_ms, buckets } => {
                let mut freed = 0;
                let mut at_ms = now_ms;
                for &(slot, amount) in counted {
                    freed += amount;
                    at_ms = (slot + buckets + 1) as u64 * bucket_ms;
                    if used - freed + cost <= max {
                        break;
                    }
                }
                at_ms
            }
        };
        at_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
    }
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock, hasher: RandomState::new(), shards: std::array::from_fn(|_| Mutex::default()) }
    }

    /// Both steps under one lock per shard in a fixed order, so a reservation over several keys is
    /// atomic like the Lua script.
    fn locked(&self, keys: &[&str]) -> Vec<(usize, std::sync::MutexGuard<'_, Shard>)> {
        let mut indexes: Vec<usize> = keys.iter().map(|k| self.hasher.hash_one(k) as usize % SHARDS).collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes.into_iter().map(|i| (i, self.shards[i].lock().unwrap_or_else(|e| e.into_inner()))).collect()
    }
}

fn shard_of<'a, 'g>(guards: &'a mut [(usize, std::sync::MutexGuard<'g, Shard>)], index: usize) -> &'a mut Shard {
    let position = guards.iter().position(|(i, _)| *i == index).unwrap_or(0);
    &mut guards[position].1
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn reserve(&self, limits: &[Limit], cost: u64) -> Result<Admission, StoreError> {
        let now_ms = self.clock.now_ms();
        let cost = cost as i64;
        let keys: Vec<&str> = limits.iter().map(|l| l.key.as_str()).collect();
        let mut guards = self.locked(&keys);
        let mut positions = Vec::with_capacity(limits.len());
        let mut remaining = Vec::with_capacity(limits.len());
        for (i, limit) in limits.iter().enumerate() {
            let position = Position::of(limit.window, now_ms);
            let max = limit.max as i64;
            if cost > max {
                return Ok(Admission::TooLarge { limit: i });
            }
            let index = self.hasher.hash_one(&limit.key) as usize % SHARDS;
            let shard = shard_of(&mut guards, index);
            let counted: Vec<(i64, i64)> = shard
                .counters
                .get(&limit.key)
                .filter(|c| c.expires_ms > now_ms)
                .map(|c| c.slots.range(position.oldest..).map(|(s, a)| (*s, *a)).collect())
                .unwrap_or_default();
            let used: i64 = counted.iter().map(|(_, a)| a).sum();
            if used + cost > max {
                let retry_after_secs = position.retry_after_secs(&counted, used, cost, max, now_ms);
                return Ok(Admission::Refused { limit: i, retry_after_secs });
            }
            remaining.push((max - used - cost) as u64);
            positions.push(position);
        }
        let mut slots = Vec::with_capacity(limits.len());
        for (limit, position) in limits.iter().zip(&positions) {
            let index = self.hasher.hash_one(&limit.key) as usize % SHARDS;
            let shard = shard_of(&mut guards, index);
            shard.operations = shard.operations.wrapping_add(1);
            if shard.operations.is_multiple_of(SWEEP_EVERY) {
                shard.counters.retain(|_, c| c.expires_ms > now_ms);
            }
            let counter = shard
                .counters
                .entry(limit.key.clone())
                .or_insert_with(|| Counter { slots: BTreeMap::new(), expires_ms: 0 });
            if counter.expires_ms <= now_ms {
                counter.slots.clear();
            }
            counter.slots = counter.slots.split_off(&position.oldest);
            *counter.slots.entry(position.slot).or_insert(0) += cost;
            counter.expires_ms = now_ms + position.ttl_ms;
            slots.push((limit.key.clone(), position.slot));
        }
        Ok(Admission::Granted { ticket: Ticket { slots, reserved: cost as u64 }, remaining })
    }

    async fn adjust(&self, ticket: &Ticket, actual: u64) -> Result<(), StoreError> {
        let now_ms = self.clock.now_ms();
        let delta = actual as i64 - ticket.reserved as i64;
        if delta == 0 {
            return Ok(());
        }
        let keys: Vec<&str> = ticket.slots.iter().map(|(k, _)| k.as_str()).collect();
        let mut guards = self.locked(&keys);
        for (key, slot) in &ticket.slots {
            let index = self.hasher.hash_one(key) as usize % SHARDS;
            let shard = shard_of(&mut guards, index);
            let live = shard.counters.get_mut(key).filter(|c| c.expires_ms > now_ms);
            if let Some(amount) = live.and_then(|counter| counter.slots.get_mut(slot)) {
                *amount = (*amount + delta).max(0);
            }
        }
        Ok(())
    }
}
