//! The ledger stores' behaviour, written once and run against both: the embedded journal and
//! Redis (a real `redis-server` of the test's own). Records carry their hour, so bucketing is
//! tested without a clock.

mod common;

use std::time::Duration;

use aigw::ledger::embedded::{EmbeddedLedger, read_journal};
use aigw::ledger::redis::RedisLedger;
use aigw::ledger::{BucketKey, Counts, LedgerStore, UsageRecord};
use common::{RedisServer, fresh_dir};

/// 2026-03-01 00:00:00 UTC.
const MARCH: u64 = 1_772_323_200;
const HOUR: u64 = 3600;

fn record(id: &str, hour: u64, team: &str, prompt: u64, completion: u64) -> UsageRecord {
    UsageRecord {
        request_id: id.to_owned(),
        key: BucketKey {
            hour,
            subscription: format!("sub-{team}"),
            team: team.to_owned(),
            model: "gpt-4o-mini".to_owned(),
            api: "aoai".to_owned(),
        },
        counts: Counts {
            requests: 1,
            prompt,
            completion,
            total: prompt + completion,
            cached: prompt / 10,
            ..Counts::default()
        },
    }
}

/// Totals per team over `[from, to)`.
async fn totals(store: &dyn LedgerStore, from: u64, to: u64) -> Vec<(String, Counts)> {
    let mut by_team: std::collections::BTreeMap<String, Counts> = Default::default();
    for (key, counts) in store.query(from, to).await.expect("query") {
        assert!((from..to).contains(&key.hour), "bucket {key:?} outside [{from}, {to})");
        by_team.entry(key.team).or_default().add(&counts);
    }
    by_team.into_iter().collect()
}

/// The stores to run a test against: the embedded one, and Redis when `redis-server` is installed.
fn both_names(redis: &Option<RedisServer>) -> Vec<&'static str> {
    if redis.is_some() { vec!["embedded", "redis"] } else { vec!["embedded"] }
}

async fn open(name: &str, redis: &Option<RedisServer>, dir: &std::path::Path) -> Box<dyn LedgerStore> {
    match (name, redis) {
        ("redis", Some(redis)) => {
            Box::new(RedisLedger::new(&redis.url(), Duration::from_secs(2), Duration::from_millis(200)).expect("redis"))
        }
        _ => Box::new(EmbeddedLedger::open(&dir.join("ledger.jsonl")).expect("open journal")),
    }
}

#[tokio::test]
async fn appends_count_once_per_request_id_in_their_hour() {
    let redis = RedisServer::start_if_installed("appends_count_once_per_request_id_in_their_hour").await;
    for name in both_names(&redis) {
        let dir = fresh_dir("ledger-dedup");
        let store = open(name, &redis, &dir).await;
        store.append(record("r1", MARCH, "a", 100, 20)).await;
        store.append(record("r1", MARCH, "a", 100, 20)).await; // the same call again
        store.append(record("r2", MARCH + HOUR - 1, "a", 7, 3)).await; // floored by the caller: same hour
        store.append(record("r3", MARCH + HOUR, "a", 1000, 1)).await;
        store.append(record("r4", MARCH, "b", 5, 5)).await;

        let first_hour = totals(&*store, MARCH, MARCH + HOUR).await;
        assert_eq!(first_hour.len(), 2, "{name}");
        assert_eq!(first_hour[0].0, "a");
        let a = first_hour[0].1;
        assert_eq!((a.requests, a.prompt, a.completion, a.total, a.cached), (2, 107, 23, 130, 10), "{name}");
        assert_eq!(first_hour[1].1.requests, 1, "{name}");
        let both_hours = totals(&*store, MARCH, MARCH + 2 * HOUR).await;
        assert_eq!(both_hours[0].1.prompt, 1107, "{name}");
        assert!(totals(&*store, MARCH + 2 * HOUR, MARCH + 3 * HOUR).await.is_empty(), "{name}");
        assert!(totals(&*store, MARCH - HOUR, MARCH).await.is_empty(), "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn embedded_restart_keeps_totals_and_ignores_a_torn_last_line() {
    let dir = fresh_dir("ledger-restart");
    let path = dir.join("data").join("ledger.jsonl");
    let store = EmbeddedLedger::open(&path).expect("open");
    for i in 0..50 {
        store.append(record(&format!("r{i}"), MARCH + (i % 3) * HOUR, if i % 2 == 0 { "a" } else { "b" }, i, 1)).await;
    }
    let before = totals(&store, MARCH, MARCH + 3 * HOUR).await;
    // A second gateway on the same journal is refused while the first holds it.
    let Err(error) = EmbeddedLedger::open(&path) else { panic!("a second open should fail") };
    assert!(error.to_string().contains("in use by another aigw process"), "{error}");
    drop(store);

    // A crash mid-write leaves part of a line at the end.
    let mut text = std::fs::read(&path).expect("journal");
    assert!(!text.is_empty());
    text.extend_from_slice(br#"{"hour":1772323200,"subscription":"sub-a","team":"a","mod"#);
    std::fs::write(&path, &text).expect("write");
    assert!(read_journal(&path).expect("read").torn_last_line);

    let reopened = EmbeddedLedger::open(&path).expect("reopen");
    assert_eq!(totals(&reopened, MARCH, MARCH + 3 * HOUR).await, before);
    // Compacted: one line per bucket (3 hours × 2 teams), no torn line left.
    let journal = std::fs::read_to_string(&path).expect("journal");
    assert_eq!(journal.lines().count(), 6, "{journal}");
    assert!(journal.ends_with('\n'));
    // Appends after a restart add to the replayed totals.
    reopened.append(record("new", MARCH, "a", 1, 1)).await;
    reopened.flush().await.expect("flush");
    drop(reopened);
    let after = read_journal(&path).expect("read");
    let a: u64 = after.buckets.iter().filter(|(k, _)| k.team == "a").map(|(_, c)| c.requests).sum();
    assert_eq!(a, before[0].1.requests + 1);

    // A corrupt line elsewhere is an error that names it.
    std::fs::write(&path, format!("garbage\n{journal}")).expect("write");
    let Err(error) = EmbeddedLedger::open(&path) else { panic!("a corrupt journal should be refused") };
    assert!(error.to_string().contains("line 1 is not a ledger record"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn embedded_flushes_within_a_second_without_a_shutdown() {
    let dir = fresh_dir("ledger-flush");
    let path = dir.join("ledger.jsonl");
    let store = EmbeddedLedger::open(&path).expect("open");
    store.append(record("r1", MARCH, "a", 10, 2)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // What a reader (or a restart after a crash) would see now.
        let seen = read_journal(&path).expect("read").buckets;
        if seen.iter().any(|(_, c)| c.prompt == 10) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the journal did not get the record");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.stats().flush_failures.load(std::sync::atomic::Ordering::Relaxed), 0);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn redis_appends_that_fail_are_retried_until_redis_is_back() {
    if !RedisServer::installed("redis_appends_that_fail_are_retried_until_redis_is_back") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisLedger::new(&url, Duration::from_millis(200), Duration::from_millis(100)).expect("store");
    // Redis is not running: appends return and are kept for retry.
    store.append(record("r1", MARCH, "a", 40, 2)).await;
    store.append(record("r2", MARCH, "a", 60, 3)).await;
    // Both failed; the retrier may hold one of them in hand already.
    assert!(store.stats().append_failures.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert!(store.queued() >= 1);
    assert!(store.query(MARCH, MARCH + HOUR).await.is_err(), "a query with Redis down is an error");

    let _redis = RedisServer::start_on(port).await;
    // Read by another instance once the retries got through.
    let other = RedisLedger::new(&url, Duration::from_secs(2), Duration::from_millis(100)).expect("store");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = totals(&other, MARCH, MARCH + HOUR).await;
        if got.first().is_some_and(|(_, c)| c.requests == 2) {
            assert_eq!((got[0].1.prompt, got[0].1.completion), (100, 5));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the retries never got through: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.queued(), 0);
    // Appending the same call again (a retry racing the first attempt) counts nothing.
    store.append(record("r1", MARCH, "a", 40, 2)).await;
    assert_eq!(totals(&other, MARCH, MARCH + HOUR).await[0].1.requests, 2);
    assert!(store.flush().await.is_ok());
}
