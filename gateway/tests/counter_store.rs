//! The counter store's behaviour, written once and run against both stores: the in-memory one and
//! Redis (a real `redis-server` of the test's own). Time is an injected clock, so window and
//! period boundaries are stepped across exactly, without sleeping.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aigw::infra::clock::{Clock, ManualClock};
use aigw::limits::memory::MemoryStore;
use aigw::limits::redis::RedisStore;
use aigw::limits::{Admission, CounterStore, Limit, Period, StoreError, Window};
use common::RedisServer;

/// 2024-02-29 23:59:00 UTC, a leap day, in milliseconds.
const LEAP_DAY_LATE: u64 = 1_709_251_140_000;
const MINUTE: u64 = 60_000;

struct Subject {
    name: &'static str,
    store: Box<dyn CounterStore>,
    clock: Arc<ManualClock>,
}

/// Both stores, each with its own clock starting at `start_ms` (only the memory one when
/// `redis-server` is not installed). The Redis server lives as long as the returned handle.
async fn both(start_ms: u64) -> (Option<RedisServer>, Vec<Subject>) {
    let memory_clock = ManualClock::at(start_ms);
    let mut subjects =
        vec![Subject { name: "memory", store: Box::new(MemoryStore::new(memory_clock.clone())), clock: memory_clock }];
    let redis = RedisServer::start_if_installed("counter_store").await;
    if let Some(redis) = &redis {
        let redis_clock = ManualClock::at(start_ms);
        let redis_store = RedisStore::new(
            &redis.url(),
            Duration::from_secs(2),
            Duration::from_millis(200),
            Some(redis_clock.clone()),
        )
        .expect("redis store");
        subjects.push(Subject { name: "redis", store: Box::new(redis_store), clock: redis_clock });
    }
    (redis, subjects)
}

fn sliding(key: &str, max: u64) -> Limit {
    Limit { key: key.to_owned(), window: Window::Sliding { secs: 60 }, max }
}

fn fixed(key: &str, period: Period, max: u64) -> Limit {
    Limit { key: key.to_owned(), window: Window::Fixed(period), max }
}

async fn reserve(s: &Subject, limits: &[Limit], cost: u64) -> Admission {
    s.store.reserve(limits, cost).await.unwrap_or_else(|e| panic!("{}: {e}", s.name))
}

fn granted(admission: &Admission) -> Option<&[u64]> {
    match admission {
        Admission::Granted { remaining, .. } => Some(remaining),
        _ => None,
    }
}

#[tokio::test]
async fn sliding_window_frees_tokens_as_their_second_leaves_the_window() {
    let (_redis, subjects) = both(1_780_000_000_000).await;
    for s in &subjects {
        let limit = [sliding("sw-basic", 100)];
        assert_eq!(granted(&reserve(s, &limit, 60).await), Some(&[40][..]), "{}", s.name);
        s.clock.advance(30_000);
        assert_eq!(granted(&reserve(s, &limit, 30).await), Some(&[10][..]), "{}", s.name);
        // Full: the 60 tokens of second 0 count until second 61 has begun.
        assert_eq!(reserve(s, &limit, 20).await, Admission::Refused { limit: 0, retry_after_secs: 31 }, "{}", s.name);
        s.clock.advance(30_999);
        assert!(granted(&reserve(s, &limit, 20).await).is_none(), "{}: still inside the window", s.name);
        s.clock.advance(1);
        assert_eq!(granted(&reserve(s, &limit, 20).await), Some(&[50][..]), "{}", s.name);
        assert_eq!(reserve(s, &limit, 101).await, Admission::TooLarge { limit: 0 }, "{}", s.name);
    }
}

/// Whatever the pattern of requests, no 60-second span ever holds more than the limit.
#[tokio::test]
async fn no_sixty_second_span_exceeds_the_limit() {
    let (_redis, subjects) = both(1_780_000_000_123).await;
    for s in &subjects {
        let start = s.clock.now_ms();
        let limit = [sliding("sw-property", 1_000)];
        let mut granted_at = Vec::new();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..600 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            s.clock.advance((seed >> 33) % 1_500);
            let cost = 1 + (seed >> 20) % 120;
            if granted(&reserve(s, &limit, cost).await).is_some() {
                granted_at.push((s.clock.now_ms() - start, cost));
            }
        }
        assert!(granted_at.len() > 100, "{}: the pattern must admit a fair amount", s.name);
        for (i, &(from, _)) in granted_at.iter().enumerate() {
            let in_span: u64 = granted_at[i..].iter().take_while(|(t, _)| *t < from + MINUTE).map(|(_, c)| c).sum();
            assert!(in_span <= 1_000, "{}: {in_span} tokens in the minute from {from} ms", s.name);
        }
    }
}

#[tokio::test]
async fn monthly_quota_resets_on_the_first_after_a_leap_day() {
    let (_redis, subjects) = both(LEAP_DAY_LATE).await;
    for s in &subjects {
        let quota = [fixed("q-month", Period::Monthly, 1_000)];
        assert!(granted(&reserve(s, &quota, 900).await).is_some(), "{}", s.name);
        // 23:59:00 on Feb 29: the period ends at midnight, 60 s away.
        assert_eq!(reserve(s, &quota, 200).await, Admission::Refused { limit: 0, retry_after_secs: 60 }, "{}", s.name);
        s.clock.advance(59_999);
        assert!(granted(&reserve(s, &quota, 200).await).is_none(), "{}: still February", s.name);
        s.clock.advance(1);
        assert_eq!(granted(&reserve(s, &quota, 200).await), Some(&[800][..]), "{}: March starts afresh", s.name);
    }
}

#[tokio::test]
async fn calendar_periods_end_where_the_calendar_says() {
    // 2026-11-26 (a Thursday) 10:00:00 UTC.
    let thursday = 1_795_687_200_000;
    let (_redis, subjects) = both(thursday).await;
    for s in &subjects {
        let cases = [
            (Period::Hourly, 3_600),
            (Period::Daily, 14 * 3_600),
            // Monday 2026-11-30 00:00.
            (Period::Weekly, 3 * 86_400 + 14 * 3_600),
            // December 1st.
            (Period::Monthly, 4 * 86_400 + 14 * 3_600),
            // 2027-01-01: 35 days after Nov 26, less 10 hours.
            (Period::Yearly, 35 * 86_400 + 14 * 3_600),
            (Period::Seconds(900), 900),
        ];
        for (period, seconds_left) in cases {
            let key = format!("q-{period:?}");
            let quota = [fixed(&key, period, 10)];
            assert!(granted(&reserve(s, &quota, 10).await).is_some(), "{} {period:?}", s.name);
            assert_eq!(
                reserve(s, &quota, 1).await,
                Admission::Refused { limit: 0, retry_after_secs: seconds_left },
                "{} {period:?}",
                s.name
            );
        }
        // Leap years: 2024 has 366 days, so its yearly period ends 366 days after it began.
        s.clock.set(1_704_067_200_000); // 2024-01-01 00:00
        let quota = [fixed("q-leap-year", Period::Yearly, 1)];
        assert!(granted(&reserve(s, &quota, 1).await).is_some());
        assert_eq!(
            reserve(s, &quota, 1).await,
            Admission::Refused { limit: 0, retry_after_secs: 366 * 86_400 },
            "{}",
            s.name
        );
    }
}

#[tokio::test]
async fn a_reservation_is_recorded_in_every_limit_or_in_none() {
    let (_redis, subjects) = both(1_780_000_000_000).await;
    for s in &subjects {
        let both_limits = [sliding("all-or-none-minute", 100), fixed("all-or-none-quota", Period::Daily, 150)];
        assert_eq!(granted(&reserve(s, &both_limits, 90).await), Some(&[10, 60][..]), "{}", s.name);
        // The minute refuses, so the quota must not be charged either.
        assert!(matches!(reserve(s, &both_limits, 20).await, Admission::Refused { limit: 0, .. }), "{}", s.name);
        s.clock.advance(61_000);
        assert_eq!(granted(&reserve(s, &both_limits, 60).await), Some(&[40, 0][..]), "{}", s.name);
        assert!(
            matches!(reserve(s, &both_limits, 1).await, Admission::Refused { limit: 1, .. }),
            "{}: the quota",
            s.name
        );
    }
}

#[tokio::test]
async fn adjust_replaces_the_reservation_by_the_real_cost() {
    let (_redis, subjects) = both(1_780_000_000_000).await;
    for s in &subjects {
        let limits = [sliding("adjust-minute", 100), fixed("adjust-day", Period::Daily, 1_000)];
        let Admission::Granted { ticket, .. } = reserve(s, &limits, 80).await else { panic!("{}", s.name) };
        s.store.adjust(&ticket, 10).await.expect("adjust");
        // 10 used: 90 more fit in the minute, and the day has 900 left after them.
        assert_eq!(granted(&reserve(s, &limits, 90).await), Some(&[0, 900][..]), "{}", s.name);
        let Admission::Granted { ticket, .. } = reserve(s, &[sliding("adjust-release", 5)], 5).await else { panic!() };
        s.store.adjust(&ticket, 0).await.expect("give back");
        assert_eq!(granted(&reserve(s, &[sliding("adjust-release", 5)], 5).await), Some(&[0][..]), "{}", s.name);
        // A reservation whose window has passed is left alone rather than charged to a new one.
        let Admission::Granted { ticket, .. } = reserve(s, &[sliding("adjust-late", 50)], 10).await else { panic!() };
        s.clock.advance(120_000);
        s.store.adjust(&ticket, 50).await.expect("late adjust");
        assert_eq!(granted(&reserve(s, &[sliding("adjust-late", 50)], 50).await), Some(&[0][..]), "{}", s.name);
    }
}

#[tokio::test]
async fn concurrent_reservations_never_overshoot() {
    let (_redis, subjects) = both(1_780_000_000_000).await;
    for s in &subjects {
        let limits = [sliding("concurrent", 50)];
        let attempts = (0..200).map(|_| s.store.reserve(&limits, 1));
        let results = futures_util::future::join_all(attempts).await;
        let admitted = results.iter().filter(|r| matches!(r, Ok(Admission::Granted { .. }))).count();
        assert_eq!(admitted, 50, "{}", s.name);
    }
}

#[tokio::test]
async fn counters_are_separate_per_key() {
    let (_redis, subjects) = both(1_780_000_000_000).await;
    for s in &subjects {
        assert!(granted(&reserve(s, &[sliding("key-a", 10)], 10).await).is_some());
        assert!(granted(&reserve(s, &[sliding("key-b", 10)], 10).await).is_some(), "{}", s.name);
        assert!(granted(&reserve(s, &[sliding("key-a", 10)], 1).await).is_none(), "{}", s.name);
    }
}

#[tokio::test]
async fn redis_store_times_out_and_recovers_without_a_restart() {
    let Some(redis) = RedisServer::start_if_installed("redis_store_times_out_and_recovers_without_a_restart").await
    else {
        return;
    };
    let port = redis.port;
    let store =
        RedisStore::new(&redis.url(), Duration::from_millis(100), Duration::from_millis(300), None).expect("store");
    let limits = [sliding("outage", 1_000)];
    assert!(matches!(store.reserve(&limits, 1).await, Ok(Admission::Granted { .. })));
    drop(redis);
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert!(store.reserve(&limits, 1).await.is_err(), "Redis is down");
        assert!(started.elapsed() < Duration::from_millis(600), "a call took {:?}", started.elapsed());
    }
    let _back = RedisServer::start_on(port).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if store.reserve(&limits, 1).await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the store never came back");
        // The breaker lets a probe through every 300 ms; wait for the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_cancelled_probe_does_not_keep_redis_switched_off() {
    let Some(redis) = RedisServer::start_if_installed("a_cancelled_probe_does_not_keep_redis_switched_off").await
    else {
        return;
    };
    let store =
        RedisStore::new(&redis.url(), Duration::from_millis(200), Duration::from_millis(300), None).expect("store");
    let limits = [sliding("probe", 1_000)];
    assert!(matches!(store.reserve(&limits, 1).await, Ok(Admission::Granted { .. })));
    // A stopped redis-server keeps its connections open and never answers: calls time out.
    redis.proc.signal("STOP");
    while !matches!(store.reserve(&limits, 1).await, Err(StoreError::Unavailable(why)) if why == "breaker open") {}
    // After the cool-down one call probes; cancel it mid-call, as a client that goes away does.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_millis(50), store.reserve(&limits, 1)).await {
            Err(_) => break,
            Ok(Err(StoreError::Unavailable(why))) if why == "breaker open" => {}
            Ok(other) => panic!("Redis is stopped, yet: {other:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "no probe went out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.proc.signal("CONT");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.reserve(&limits, 1).await {
            Ok(Admission::Granted { .. }) => break,
            Ok(other) => panic!("{other:?}"),
            Err(_) => assert!(std::time::Instant::now() < deadline, "the breaker never probed Redis again"),
        }
        // The breaker lets a probe through every 300 ms; wait for the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
