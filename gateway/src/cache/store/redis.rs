//! The cache shared by every instance through a plain Redis 7 (no modules).
//!
//! In Redis:
//! - an entry is a hash `aigw:cache:e:<id>` {p: partition, v: vector (little-endian f32), q:
//!   prompt, a: answer} that expires with its TTL;
//! - each partition has a zset `aigw:cache:z:<partition>` of its entry ids scored by expiry (ms,
//!   server clock), which is what the bound and the eviction rule work on;
//! - the stream `aigw:cache:log` (trimmed to about [`STREAM_LEN`] events) says what was added
//!   ("add": id, partition, expiry) and evicted ("del": id, partition).
//!
//! An insert is one Lua script (`redis/insert.lua`): it stores the hash, drops the partition's
//! expired ids, adds the new one, evicts down to the bound and appends the events, atomically.
//!
//! Each instance keeps its own [`Index`] of every entry (vectors and prompts, not answers), so a
//! search costs no round trip. A background task keeps it in step: it notes the stream's position,
//! loads what Redis holds, then follows the stream with a blocking `XREAD` on a connection of its
//! own, fetching the vector and prompt of each entry added elsewhere, so an answer stored through
//! one instance is found by the others within milliseconds. Entries that expire stop matching by
//! the local clock; an entry evicted or lost meanwhile is dropped when its `answer` comes back
//! empty. After any Redis error (an outage, a restart) or when the stream was trimmed past its
//! position, the task reloads everything, backing off while Redis is down.
//!
//! `answer` and `insert` go through a [`Breaker`] (timeout per call, cool-down): with Redis down
//! they fail fast, and the caller treats that as a miss, while `search` keeps working on the index.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisResult};
use tokio_util::task::AbortOnDropHandle;

use super::index::{Index, IndexEntry, SharedIndex};
use super::{CacheError, CacheLimits, CacheStore, Candidate, EntryId, NewEntry};
use crate::infra::breaker::Breaker;
use crate::infra::clock::{Clock, SystemClock};
use crate::infra::redis::lazy_connection;

const ENTRY_PREFIX: &str = "aigw:cache:e:";
const PARTITION_PREFIX: &str = "aigw:cache:z:";
const STREAM: &str = "aigw:cache:log";
/// Events kept in the stream: how far behind an instance may fall before it must reload.
pub const STREAM_LEN: u64 = 100_000;
/// How long one `XREAD` waits for events; events arrive as soon as they are written.
const BLOCK_MS: u64 = 250;
/// Events read, and entries fetched, per round trip.
const BATCH: usize = 256;
/// Reconnection back-off while Redis is down.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// How often the follower drops expired rows from the index.
const PRUNE_EVERY_MS: u64 = 1_000;

fn entry_key(id: EntryId) -> String {
    format!("{ENTRY_PREFIX}{id}")
}

pub struct RedisCacheStore {
    connection: ConnectionManager,
    insert: redis::Script,
    timeout: Duration,
    breaker: Breaker,
    limits: CacheLimits,
    index: Arc<SharedIndex<()>>,
    /// The follower; aborted when the store is dropped.
    _follower: AbortOnDropHandle<()>,
}

impl RedisCacheStore {
    /// Sets the store up without waiting for Redis: calls connect on first use, and the follower
    /// loads the index in the background (and retries while Redis is down). Each `answer` or
    /// `insert` is bounded by `timeout`; after repeated failures the breaker skips Redis for
    /// `cooldown`. Must be called within a Tokio runtime.
    pub fn new(url: &str, timeout: Duration, cooldown: Duration, limits: CacheLimits) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the Redis cache store must be created within a Tokio runtime".to_owned())?;
        let (client, connection) = lazy_connection(url, timeout, cooldown)?;
        let index = Arc::new(SharedIndex::new(limits));
        let follower = Follower { client, index: index.clone(), limits };
        Ok(Self {
            connection,
            insert: redis::Script::new(include_str!("redis/insert.lua")),
            timeout,
            breaker: Breaker::new(
                "semantic cache (Redis)",
                "lookups miss and answers are not stored until it is back",
                "the cache is shared across instances again",
                cooldown,
            ),
            limits,
            index,
            _follower: AbortOnDropHandle::new(runtime.spawn(follower.run())),
        })
    }
}

#[async_trait]
impl CacheStore for RedisCacheStore {
    async fn search(
        &self,
        partition: &str,
        query: &[f32],
        min_score: f32,
        max: usize,
    ) -> Result<Vec<Candidate>, CacheError> {
        self.index.read().search(partition, query, min_score, max, SystemClock.now_ms())
    }

    async fn answer(&self, partition: &str, id: EntryId) -> Result<Option<Bytes>, CacheError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("HMGET");
        command.arg(entry_key(id)).arg("p").arg("a");
        let stored: (Option<String>, Option<Vec<u8>>) = self
            .breaker
            .call(self.timeout, command.query_async(&mut connection))
            .await
            .map_err(CacheError::Unavailable)?;
        match stored {
            (Some(stored_partition), Some(answer)) if stored_partition == partition => Ok(Some(answer.into())),
            _ => {
                // Expired or evicted, and this index had not heard yet.
                self.index.write().remove(partition, id);
                Ok(None)
            }
        }
    }

    async fn insert(&self, entry: NewEntry) -> Result<(), CacheError> {
        let ttl_ms = u64::try_from(entry.ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Ok(());
        }
        // Refused before writing, so Redis never holds an entry no instance can index.
        self.index.read().check(&entry.partition, &entry.vector)?;
        let id: EntryId = uuid::Uuid::new_v4().as_u64_pair().0;
        let vector: Vec<u8> = entry.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut invocation = self.insert.prepare_invoke();
        invocation
            .key(entry_key(id))
            .key(format!("{PARTITION_PREFIX}{}", entry.partition))
            .key(STREAM)
            .arg(id)
            .arg(&entry.partition)
            .arg(vector)
            .arg(&entry.prompt)
            .arg(entry.answer.as_ref())
            .arg(ttl_ms)
            .arg(self.limits.max_entries_per_partition)
            .arg(STREAM_LEN)
            .arg(ENTRY_PREFIX);
        let mut connection = self.connection.clone();
        let (expires_ms, evicted): (u64, Vec<EntryId>) = self
            .breaker
            .call(self.timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(CacheError::Unavailable)?;
        // Indexed here at once, not when the follower reads the event (it will skip it then).
        let mut index = self.index.write();
        let row = IndexEntry { id, vector: &entry.vector, prompt: entry.prompt.into(), expires_ms, payload: () };
        index.insert(&entry.partition, row, SystemClock.now_ms())?;
        for gone in evicted {
            index.remove(&entry.partition, gone);
        }
        Ok(())
    }

    fn len(&self) -> usize {
        let mut index = self.index.write();
        index.prune(SystemClock.now_ms());
        index.len()
    }
}

/// Keeps an instance's index in step with Redis.
struct Follower {
    client: redis::Client,
    index: Arc<SharedIndex<()>>,
    limits: CacheLimits,
}

/// One line of the stream, parsed.
enum Event {
    Add { id: EntryId, partition: String, expires_ms: u64 },
    Del { id: EntryId, partition: String },
}

/// An entry's partition, vector and prompt, each None once the entry is gone.
type StoredRow = (Option<String>, Option<Vec<u8>>, Option<String>);

/// A stream entry as `XREAD` returns it: its id and its flat field/value list.
type StreamEntry = (String, Vec<String>);

impl Event {
    fn parse(fields: &[String]) -> Option<Self> {
        let (pairs, _) = fields.as_chunks::<2>();
        let field = |name: &str| pairs.iter().find(|[k, _]| k == name).map(|[_, v]| v.as_str());
        let id = field("id")?.parse().ok()?;
        let partition = field("p")?.to_owned();
        match field("op")? {
            "add" => Some(Self::Add { id, partition, expires_ms: field("x")?.parse().ok()? }),
            "del" => Some(Self::Del { id, partition }),
            _ => None,
        }
    }
}

/// A stream id, `<ms>-<seq>`, as a comparable pair.
fn stream_position(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The vector of a hash's `v` field; None when its length is not a whole number of floats.
fn decode_vector(bytes: &[u8]) -> Option<Vec<f32>> {
    let (floats, rest) = bytes.as_chunks::<4>();
    rest.is_empty().then(|| floats.iter().map(|f| f32::from_le_bytes(*f)).collect())
}

impl Follower {
    async fn run(self) {
        let mut backoff = BACKOFF.0;
        let mut outage = false;
        loop {
            let error = match self.connect().await {
                Ok(mut connection) => match self.reload(&mut connection).await {
                    Ok(position) => {
                        if std::mem::take(&mut outage) {
                            tracing::info!("semantic cache follows Redis again; its index is reloaded");
                        }
                        backoff = BACKOFF.0;
                        let Err(error) = self.follow(&mut connection, position).await;
                        error
                    }
                    Err(error) => error,
                },
                Err(error) => error,
            };
            if !std::mem::replace(&mut outage, true) {
                tracing::warn!(
                    error = ?error.kind(),
                    "semantic cache cannot follow Redis; lookups use this instance's index as it was until Redis is back"
                );
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }

    /// A connection of the follower's own: a blocking read on the store's shared connection would
    /// hold up its calls, and outlast their timeout.
    async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(BACKOFF.1))
            .set_response_timeout(Some(Duration::from_millis(BLOCK_MS) + BACKOFF.1));
        self.client.get_multiplexed_async_connection_with_config(&config).await
    }

    /// Replaces the index by what Redis holds; returns the stream position to follow from. The
    /// position is taken first, so whatever changes during the load is replayed after it (adding
    /// an indexed entry or removing a missing one again changes nothing).
    async fn reload(&self, connection: &mut MultiplexedConnection) -> RedisResult<String> {
        let mark = self.index.read().mark();
        let last: Vec<StreamEntry> =
            redis::cmd("XREVRANGE").arg(STREAM).arg("+").arg("-").arg("COUNT").arg(1).query_async(connection).await?;
        let position = last.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id);
        let mut fresh = Index::new(self.limits);
        let mut cursor: u64 = 0;
        loop {
            let (next, partitions): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PARTITION_PREFIX}*"))
                .arg("COUNT")
                .arg(BATCH)
                .arg("TYPE")
                .arg("zset")
                .query_async(connection)
                .await?;
            cursor = next;
            if partitions.is_empty() {
                if cursor == 0 {
                    break;
                }
                continue;
            }
            let mut pipe = redis::pipe();
            for key in &partitions {
                pipe.cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES");
            }
            let members: Vec<Vec<(EntryId, f64)>> = pipe.query_async(connection).await?;
            let entries: Vec<(EntryId, u64)> =
                members.into_iter().flatten().map(|(id, expiry)| (id, expiry as u64)).collect();
            index_all(&mut fresh, self.fetch(connection, &entries).await?);
            if cursor == 0 {
                break;
            }
        }
        let mut index = self.index.write();
        // This instance's own inserts during the load may have been missed by it; the stream would
        // bring them back, but a moment later than their caller may look for them.
        fresh.adopt_newer(&index, mark, SystemClock.now_ms());
        let entries = fresh.len();
        *index = fresh;
        drop(index);
        tracing::debug!(entries, "semantic cache index loaded from Redis");
        Ok(position)
    }

    /// The vector, prompt and partition of `(id, expiry)` entries, for those still in Redis.
    async fn fetch(
        &self,
        connection: &mut MultiplexedConnection,
        entries: &[(EntryId, u64)],
    ) -> RedisResult<Vec<Fetched>> {
        let mut fetched = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for (id, _) in chunk {
                pipe.cmd("HMGET").arg(entry_key(*id)).arg("p").arg("v").arg("q");
            }
            let rows: Vec<StoredRow> = pipe.query_async(connection).await?;
            for (&(id, expires_ms), row) in chunk.iter().zip(rows) {
                // Expired or evicted since it was listed: skipped.
                let (Some(partition), Some(vector), Some(prompt)) = row else { continue };
                let Some(vector) = decode_vector(&vector) else { continue };
                fetched.push(Fetched { partition, id, vector, prompt, expires_ms });
            }
        }
        Ok(fetched)
    }

    /// Applies the stream's events from `position` on, until Redis fails.
    async fn follow(&self, connection: &mut MultiplexedConnection, mut position: String) -> RedisResult<Infallible> {
        let mut next_prune_ms = 0;
        loop {
            let reply: Option<Vec<(String, Vec<StreamEntry>)>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(&position)
                .query_async(connection)
                .await?;
            let batch: Vec<StreamEntry> = reply.into_iter().flatten().flat_map(|(_, entries)| entries).collect();
            if batch.len() >= BATCH && self.trimmed_past(connection, &position).await? {
                tracing::info!("semantic cache fell behind the Redis stream; reloading its index");
                position = self.reload(connection).await?;
                continue;
            }
            if let Some((last, _)) = batch.last() {
                position = last.clone();
            }
            self.apply(connection, batch).await?;
            let now_ms = SystemClock.now_ms();
            if now_ms >= next_prune_ms {
                self.index.write().prune(now_ms);
                next_prune_ms = now_ms + PRUNE_EVERY_MS;
            }
        }
    }

    /// Whether events after `position` were trimmed away unread (only possible when this instance
    /// fell [`STREAM_LEN`] events behind).
    async fn trimmed_past(&self, connection: &mut MultiplexedConnection, position: &str) -> RedisResult<bool> {
        let info: HashMap<String, redis::Value> =
            redis::cmd("XINFO").arg("STREAM").arg(STREAM).query_async(connection).await?;
        let deleted: Option<String> =
            info.get("max-deleted-entry-id").and_then(|v| redis::from_redis_value_ref(v).ok());
        Ok(deleted.and_then(|d| stream_position(&d)) > stream_position(position))
    }

    async fn apply(&self, connection: &mut MultiplexedConnection, batch: Vec<StreamEntry>) -> RedisResult<()> {
        let events: Vec<Event> = batch.iter().filter_map(|(_, fields)| Event::parse(fields)).collect();
        let unknown: Vec<(EntryId, u64)> = {
            let index = self.index.read();
            events
                .iter()
                .filter_map(|event| match event {
                    Event::Add { id, partition, expires_ms } if !index.contains(partition, *id) => {
                        Some((*id, *expires_ms))
                    }
                    _ => None,
                })
                .collect()
        };
        let added = self.fetch(connection, &unknown).await?;
        let mut index = self.index.write();
        index_all(&mut index, added);
        for event in events {
            if let Event::Del { id, partition } = event {
                index.remove(&partition, id);
            }
        }
        Ok(())
    }
}

/// An entry read back from Redis, without its answer.
struct Fetched {
    partition: String,
    id: EntryId,
    vector: Vec<f32>,
    prompt: String,
    expires_ms: u64,
}

fn index_all(index: &mut Index<()>, entries: Vec<Fetched>) {
    let now_ms = SystemClock.now_ms();
    for entry in entries {
        let row = IndexEntry {
            id: entry.id,
            vector: &entry.vector,
            prompt: entry.prompt.into(),
            expires_ms: entry.expires_ms,
            payload: (),
        };
        if let Err(error) = index.insert(&entry.partition, row, now_ms) {
            tracing::debug!(%error, id = entry.id, "semantic cache entry not indexed");
        }
    }
}
