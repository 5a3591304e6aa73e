//! The semantic cache store's behaviour, written once and run against both stores: the in-memory
//! one (on a manual clock) and Redis (a real `redis-server` of the test's own, real time). Then
//! what only a shared store does: instances see each other's answers, a late instance loads what
//! is there, and a Redis outage costs misses, not errors or waits.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aigw::cache::store::{CacheError, CacheLimits, CacheStore, Candidate, EntryId, NewEntry};
use aigw::infra::clock::ManualClock;
use common::RedisServer;

const TIMEOUT: Duration = Duration::from_millis(100);
const COOLDOWN: Duration = Duration::from_millis(300);
/// How long anything that should happen "soon" may take before the test fails.
const BOUND: Duration = Duration::from_secs(5);

struct Subject {
    name: &'static str,
    store: Arc<dyn CacheStore>,
    /// The memory store's clock; the Redis store runs on real time.
    clock: Option<Arc<ManualClock>>,
}

impl Subject {
    /// Lets `d` pass: the manual clock steps, real time passes while the caller polls.
    fn pass(&self, d: Duration) {
        if let Some(clock) = &self.clock {
            clock.advance(u64::try_from(d.as_millis()).expect("ms"));
        }
    }

    async fn insert(&self, partition: &str, vector: &[f32], prompt: &str, ttl: Duration) {
        let entry = new_entry(partition, vector, prompt, ttl);
        self.store.insert(entry).await.unwrap_or_else(|e| panic!("{}: insert {prompt}: {e}", self.name));
    }

    async fn search(&self, partition: &str, query: &[f32], min_score: f32, max: usize) -> Vec<Candidate> {
        let found = self.store.search(partition, query, min_score, max).await;
        found.unwrap_or_else(|e| panic!("{}: search: {e}", self.name))
    }

    async fn answer(&self, partition: &str, id: EntryId) -> Option<String> {
        let answer = self.store.answer(partition, id).await.unwrap_or_else(|e| panic!("{}: answer: {e}", self.name));
        answer.map(|a| String::from_utf8(a.to_vec()).expect("utf-8 answer"))
    }

    /// The prompts of the candidates, best first.
    async fn prompts(&self, partition: &str, query: &[f32], min_score: f32, max: usize) -> Vec<String> {
        self.search(partition, query, min_score, max).await.iter().map(|c| c.prompt.to_string()).collect()
    }
}

fn new_entry(partition: &str, vector: &[f32], prompt: &str, ttl: Duration) -> NewEntry {
    NewEntry {
        partition: partition.to_owned(),
        vector: vector.to_vec(),
        prompt: prompt.to_owned(),
        answer: answer_to(prompt).into(),
        ttl,
    }
}

fn answer_to(prompt: &str) -> String {
    format!("the answer to {prompt}")
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// The query, and vectors at decreasing cosine similarity to it: 0.98, 0.89, 0.71, 0.
fn vectors() -> [Vec<f32>; 5] {
    [
        unit(&[1.0, 0.0, 0.0, 0.0]),
        unit(&[1.0, 0.2, 0.0, 0.0]),
        unit(&[1.0, 0.5, 0.0, 0.0]),
        unit(&[1.0, 1.0, 0.0, 0.0]),
        unit(&[0.0, 1.0, 0.0, 0.0]),
    ]
}

const HOUR: Duration = Duration::from_secs(3600);

fn redis_store(redis: &RedisServer, limits: CacheLimits) -> Arc<dyn CacheStore> {
    aigw::cache::store::redis(&redis.url(), TIMEOUT, COOLDOWN, limits).expect("redis cache store")
}

/// Both stores with the same limits (only the memory one when `redis-server` is not installed).
/// The Redis server lives as long as the returned handle.
async fn both(limits: CacheLimits) -> (Option<RedisServer>, Vec<Subject>) {
    let clock = ManualClock::at(1_780_000_000_000);
    let mut subjects = vec![Subject {
        name: "memory",
        store: aigw::cache::store::memory_with_clock(limits, clock.clone()),
        clock: Some(clock),
    }];
    let redis = RedisServer::start_if_installed("cache_store").await;
    if let Some(redis) = &redis {
        subjects.push(Subject { name: "redis", store: redis_store(redis, limits), clock: None });
    }
    (redis, subjects)
}

/// Calls `check` until it returns something (at most every millisecond), and how long that took;
/// fails after `within`.
async fn poll<T>(what: &str, within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(found) = check().await {
            return (found, started.elapsed());
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn the_same_vector_hits_with_a_score_of_one_and_its_answer() {
    let (_redis, subjects) = both(CacheLimits::default()).await;
    let [query, ..] = vectors();
    for s in &subjects {
        s.insert("tenant-a", &query, "what is rust", HOUR).await;
        let found = s.search("tenant-a", &query, 0.99, 5).await;
        assert_eq!(found.len(), 1, "{}: {found:?}", s.name);
        assert!((found[0].score - 1.0).abs() < 1e-5, "{}: score {}", s.name, found[0].score);
        assert_eq!(&*found[0].prompt, "what is rust", "{}", s.name);
        assert_eq!(
            s.answer("tenant-a", found[0].id).await.as_deref(),
            Some("the answer to what is rust"),
            "{}",
            s.name
        );
        assert_eq!(s.store.len(), 1, "{}", s.name);
    }
}

#[tokio::test]
async fn the_threshold_excludes_dissimilar_entries() {
    let (_redis, subjects) = both(CacheLimits::default()).await;
    let [query, _, _, at_071, orthogonal] = vectors();
    for s in &subjects {
        s.insert("t", &at_071, "somewhat alike", HOUR).await;
        s.insert("t", &orthogonal, "unrelated", HOUR).await;
        assert!(s.search("t", &query, 0.85, 5).await.is_empty(), "{}: 0.71 is below 0.85", s.name);
        assert_eq!(s.prompts("t", &query, 0.70, 5).await, ["somewhat alike"], "{}", s.name);
        assert_eq!(s.prompts("t", &query, -1.0, 5).await, ["somewhat alike", "unrelated"], "{}", s.name);
    }
}

#[tokio::test]
async fn partitions_are_isolated() {
    let (_redis, subjects) = both(CacheLimits::default()).await;
    let [query, ..] = vectors();
    for s in &subjects {
        s.insert("tenant-a", &query, "the same prompt", HOUR).await;
        assert!(s.search("tenant-b", &query, 0.0, 5).await.is_empty(), "{}: tenant-b sees tenant-a's entry", s.name);
        let id = s.search("tenant-a", &query, 0.0, 5).await[0].id;
        assert_eq!(s.answer("tenant-b", id).await, None, "{}: tenant-a's answer through tenant-b's partition", s.name);
        assert!(s.answer("tenant-a", id).await.is_some(), "{}", s.name);
    }
}

#[tokio::test]
async fn candidates_come_best_first_and_at_most_max() {
    let (_redis, subjects) = both(CacheLimits::default()).await;
    let [query, at_098, at_089, at_071, _] = vectors();
    for s in &subjects {
        // Inserted out of order.
        s.insert("t", &at_071, "0.71", HOUR).await;
        s.insert("t", &at_098, "0.98", HOUR).await;
        s.insert("t", &at_089, "0.89", HOUR).await;
        assert_eq!(s.prompts("t", &query, 0.5, 10).await, ["0.98", "0.89", "0.71"], "{}", s.name);
        assert_eq!(s.prompts("t", &query, 0.5, 2).await, ["0.98", "0.89"], "{}", s.name);
        assert_eq!(s.prompts("t", &query, 0.85, 10).await, ["0.98", "0.89"], "{}", s.name);
        let scores: Vec<f32> = s.search("t", &query, 0.5, 10).await.iter().map(|c| c.score).collect();
        for (score, expected) in scores.iter().zip([1.04f32, 1.25, 2.0].map(|n| n.sqrt().recip())) {
            assert!((score - expected).abs() < 1e-3, "{}: {scores:?}", s.name);
        }
    }
}

#[tokio::test]
async fn vectors_of_another_dimension_are_refused() {
    let (_redis, subjects) = both(CacheLimits::default()).await;
    let [query, ..] = vectors();
    for s in &subjects {
        s.insert("t", &query, "four dimensions", HOUR).await;
        let refused = s.store.insert(new_entry("t", &[1.0, 0.0], "two dimensions", HOUR)).await;
        assert!(matches!(refused, Err(CacheError::Vector(_))), "{}: {refused:?}", s.name);
        let refused = s.store.insert(new_entry("t", &[], "no dimensions", HOUR)).await;
        assert!(matches!(refused, Err(CacheError::Vector(_))), "{}: {refused:?}", s.name);
        let search = s.store.search("t", &[1.0, 0.0], 0.0, 5).await;
        assert!(matches!(search, Err(CacheError::Vector(_))), "{}: {search:?}", s.name);
        assert_eq!(s.store.len(), 1, "{}", s.name);
    }
}

#[tokio::test]
async fn entries_stop_hitting_once_their_ttl_is_over() {
    let (_redis, subjects) = both(CacheLimits::default()).await;
    let [query, ..] = vectors();
    let ttl = Duration::from_millis(300);
    for s in &subjects {
        s.insert("t", &query, "short-lived", ttl).await;
        let id = s.search("t", &query, 0.9, 5).await[0].id;
        assert!(s.answer("t", id).await.is_some(), "{}: a hit right after the insert", s.name);
        if s.name == "memory" {
            s.pass(ttl - Duration::from_millis(1));
            assert!(s.answer("t", id).await.is_some(), "{}: alive until its last millisecond", s.name);
            s.pass(Duration::from_millis(1));
        }
        let ((), took) = poll(&format!("{}: entry expired", s.name), BOUND, async || {
            (s.answer("t", id).await.is_none() && s.search("t", &query, 0.0, 5).await.is_empty()).then_some(())
        })
        .await;
        eprintln!("{}: expired {took:?} after the check began", s.name);
        assert_eq!(s.store.len(), 0, "{}: expired entries are not counted", s.name);
    }
}

#[tokio::test]
async fn a_partition_keeps_its_bound_by_evicting_the_soonest_to_expire() {
    let (_redis, subjects) = both(CacheLimits { max_entries_per_partition: 3 }).await;
    let [query, ..] = vectors();
    let secs = Duration::from_secs;
    for s in &subjects {
        let mut ids = Vec::new();
        for (prompt, ttl) in [("50 s", 50), ("10 s", 10), ("40 s", 40), ("20 s", 20), ("30 s", 30)] {
            s.insert("t", &query, prompt, secs(ttl)).await;
            let found = s.search("t", &query, 0.0, 10).await;
            ids.push((prompt, found.iter().find(|c| *c.prompt == *prompt).map(|c| c.id)));
        }
        // Another partition's entries do not count against this one's bound.
        s.insert("other", &query, "other", secs(1)).await;
        let mut left = s.prompts("t", &query, 0.0, 10).await;
        left.sort();
        assert_eq!(left, ["30 s", "40 s", "50 s"], "{}", s.name);
        assert_eq!(s.store.len(), 4, "{}", s.name);
        // The evicted entries' answers are gone too, not only their rows.
        for (prompt, id) in ids {
            let id = id.unwrap_or_else(|| panic!("{}: {prompt} was found right after its insert", s.name));
            let expected = left.contains(&prompt.to_owned()).then(|| answer_to(prompt));
            assert_eq!(s.answer("t", id).await, expected, "{}: {prompt}", s.name);
        }
    }
}

/// Two instances on one Redis: what one stores, the other finds within a second; what one evicts
/// or lets expire, the other stops finding; an instance started later loads what is there.
#[tokio::test]
async fn instances_share_entries_through_redis() {
    let Some(redis) = RedisServer::start_if_installed("instances_share_entries_through_redis").await else { return };
    let limits = CacheLimits { max_entries_per_partition: 50 };
    let (a, b) = (redis_store(&redis, limits), redis_store(&redis, limits));
    let mut delays = Vec::new();
    for n in 0..20 {
        let vector = unit(&[1.0, n as f32, 0.5, 0.0]);
        let prompt = format!("prompt {n}");
        a.insert(new_entry("shared", &vector, &prompt, HOUR)).await.expect("insert via a");
        let (id, took) = poll(&format!("{prompt} through b"), Duration::from_secs(1), async || {
            let found = b.search("shared", &vector, 0.999, 1).await.expect("search b");
            found.first().filter(|c| *c.prompt == prompt).map(|c| c.id)
        })
        .await;
        let answer = b.answer("shared", id).await.expect("answer b").expect("b fetches a's answer");
        assert_eq!(answer, answer_to(&prompt).as_bytes());
        delays.push(took);
    }
    delays.sort();
    eprintln!("propagation a -> b over 20 inserts: median {:?}, max {:?}", delays[10], delays[19]);

    // Evictions reach the other instance: a fills the partition past its bound.
    for n in 20..60 {
        a.insert(new_entry("shared", &unit(&[1.0, n as f32, 0.5, 0.0]), &format!("prompt {n}"), HOUR))
            .await
            .expect("insert via a");
    }
    poll("b back to the bound of 50", BOUND, async || (b.len() == 50).then_some(())).await;
    let oldest = unit(&[1.0, 0.0, 0.5, 0.0]);
    assert!(!b.search("shared", &oldest, 0.999, 1).await.expect("search").iter().any(|c| *c.prompt == *"prompt 0"));

    // Short-lived entries stored through b stop hitting through a.
    let brief = unit(&[0.0, 0.0, 0.0, 1.0]);
    b.insert(new_entry("brief", &brief, "brief", Duration::from_millis(300))).await.expect("insert via b");
    poll("brief entry through a", Duration::from_secs(1), async || {
        (!a.search("brief", &brief, 0.99, 1).await.expect("search").is_empty()).then_some(())
    })
    .await;
    poll("brief entry expired through a", BOUND, async || {
        a.search("brief", &brief, 0.99, 1).await.expect("search").is_empty().then_some(())
    })
    .await;

    // A third instance loads the existing entries at start.
    let c = redis_store(&redis, limits);
    let ((), took) = poll("c loads the 50 entries", BOUND, async || (c.len() == 50).then_some(())).await;
    eprintln!("a new instance loaded 50 entries in {took:?}");
    let last = unit(&[1.0, 59.0, 0.5, 0.0]);
    let found = c.search("shared", &last, 0.999, 1).await.expect("search c");
    assert_eq!(found.first().map(|f| &*f.prompt), Some("prompt 59"));
}

/// The number of clients connected to `redis`.
async fn clients(redis: &RedisServer) -> usize {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connect");
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut connection).await.expect("CLIENT LIST");
    // Not counting this connection.
    list.lines().count() - 1
}

#[tokio::test]
async fn dropping_the_store_stops_its_follower() {
    let Some(redis) = RedisServer::start_if_installed("dropping_the_store_stops_its_follower").await else { return };
    let store = redis_store(&redis, CacheLimits::default());
    store.insert(new_entry("t", &vectors()[0], "p", HOUR)).await.expect("insert");
    // The follower's connection and the store's own.
    poll("both connections up", BOUND, async || (clients(&redis).await == 2).then_some(())).await;
    drop(store);
    poll("connections closed after the drop", BOUND, async || (clients(&redis).await == 0).then_some(())).await;
}

/// Redis killed: answers and inserts fail fast (then not at all, breaker open), searches keep
/// working on the local index. Redis back on the same port: inserts work and propagate again, and
/// the indexes are reloaded from what the new server holds.
#[tokio::test]
async fn a_redis_outage_costs_errors_not_waits_and_the_store_recovers() {
    let Some(redis) =
        RedisServer::start_if_installed("a_redis_outage_costs_errors_not_waits_and_the_store_recovers").await
    else {
        return;
    };
    let port = redis.port;
    let limits = CacheLimits::default();
    let (a, b) = (redis_store(&redis, limits), redis_store(&redis, limits));
    let [query, at_098, ..] = vectors();
    a.insert(new_entry("t", &query, "before the outage", HOUR)).await.expect("insert");
    let (id, _) = poll("b finds the entry", BOUND, async || {
        b.search("t", &query, 0.99, 1).await.expect("search").first().map(|c| c.id)
    })
    .await;

    redis.proc.signal("KILL");
    drop(redis);

    // The first calls wait for the timeout at most; once the breaker is open, not at all.
    let (mut slowest, mut slowest_open) = (Duration::ZERO, Duration::ZERO);
    for n in 0..10 {
        let started = Instant::now();
        let answer = b.answer("t", id).await;
        let answer_took = started.elapsed();
        assert!(matches!(answer, Err(CacheError::Unavailable(_))), "answer {n} with Redis down: {answer:?}");
        let started = Instant::now();
        let inserted = a.insert(new_entry("t", &at_098, "during the outage", HOUR)).await;
        let insert_took = started.elapsed();
        assert!(matches!(inserted, Err(CacheError::Unavailable(_))), "insert {n} with Redis down: {inserted:?}");
        slowest = slowest.max(answer_took).max(insert_took);
        if n >= 3 {
            slowest_open = slowest_open.max(answer_took).max(insert_took);
        }
        // Lookups still work on what the index held.
        let found = b.search("t", &query, 0.99, 1).await.expect("search with Redis down");
        assert_eq!(found.first().map(|c| c.id), Some(id), "search {n} with Redis down");
    }
    eprintln!("outage: slowest failing call {slowest:?}, {slowest_open:?} with the breaker open (timeout {TIMEOUT:?})");
    assert!(slowest < TIMEOUT * 2, "a call took {slowest:?} with Redis down");
    assert!(slowest_open < TIMEOUT / 10, "a call took {slowest_open:?} with the breaker open");

    let _redis = RedisServer::start_on(port).await;
    let back = Instant::now();
    poll("an insert succeeds after the restart", BOUND, async || {
        a.insert(new_entry("t", &at_098, "after the outage", HOUR)).await.ok()
    })
    .await;
    eprintln!("outage: inserts work {:?} after the restart", back.elapsed());
    // The restarted server lost everything: the followers reload, the old entry is gone from both
    // indexes, the new one is in both.
    for (name, store) in [("a", &a), ("b", &b)] {
        let ((), took) = poll(&format!("{name} reloaded from the new server"), BOUND, async || {
            let prompts: Vec<String> =
                store.search("t", &query, 0.9, 5).await.expect("search").iter().map(|c| c.prompt.to_string()).collect();
            (prompts == ["after the outage"]).then_some(())
        })
        .await;
        eprintln!("outage: {name} in step with the restarted server {took:?} later");
    }
    // And steady-state propagation is back.
    let fresh = unit(&[0.0, 0.0, 1.0, 0.0]);
    a.insert(new_entry("t", &fresh, "steady again", HOUR)).await.expect("insert");
    let (_, took) = poll("b finds the new entry", Duration::from_secs(1), async || {
        b.search("t", &fresh, 0.99, 1).await.expect("search").first().map(|c| c.id)
    })
    .await;
    eprintln!("outage: propagation after recovery {took:?}");
}
