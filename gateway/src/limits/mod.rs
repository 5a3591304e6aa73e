//! Counters for limits and quotas, behind one trait with two implementations chosen at start-up:
//! [`memory::MemoryStore`] (one instance, no Redis configured) and [`redis::RedisStore`] (shared by
//! every instance, atomic Lua on the server's clock).
//!
//! Two kinds of window, both kept as a hash of `slot -> amount` per counter key:
//! - **sliding**: the window is cut into buckets (1 s for a minute); an admission counts the
//!   buckets of the last `window + one bucket`, so *any* window-long span holds at most the limit;
//! - **fixed**: periods of N seconds from the Unix epoch, or calendar periods in UTC (an hour, a
//!   day, an ISO week from Monday, a month, a year).
//!
//! Admission is reserve-then-reconcile: [`CounterStore::reserve`] checks every limit and records
//! the cost in all of them in one atomic step (one round trip), or records nothing; the returned
//! [`Ticket`] is later [`CounterStore::adjust`]ed to the real cost (or to zero to give it back).

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::config::OnStoreFailure;
use crate::infra::clock::Clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// Fixed periods of this many seconds, counted from the Unix epoch.
    Seconds(u64),
    Hourly,
    Daily,
    /// ISO weeks, from Monday 00:00 UTC.
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    /// The calendar period's name as the Lua script and counter keys spell it; N-second periods
    /// are named by their length.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Seconds(n) => n.to_string().into(),
            Self::Hourly => "hourly".into(),
            Self::Daily => "daily".into(),
            Self::Weekly => "weekly".into(),
            Self::Monthly => "monthly".into(),
            Self::Yearly => "yearly".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Any span of this many seconds holds at most the limit.
    Sliding {
        secs: u64,
    },
    Fixed(Period),
}

/// One limit to check: a counter key (already namespaced), its window and its ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub key: String,
    pub window: Window,
    pub max: u64,
}

/// What a granted reservation recorded, so it can be reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// `(counter key, slot)` for every limit, in the order given.
    pub slots: Vec<(String, i64)>,
    pub reserved: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Recorded in every limit; `remaining[i]` is what limit `i` has left after this reservation.
    Granted { ticket: Ticket, remaining: Vec<u64> },
    /// Limit `limit` would be exceeded; nothing was recorded.
    Refused { limit: usize, retry_after_secs: u64 },
    /// The cost is larger than limit `limit` allows at all; waiting will not help.
    TooLarge { limit: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store did not answer in time, failed, or its breaker is open.
    Unavailable(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "counter store unavailable: {why}"),
        }
    }
}

#[async_trait]
pub trait CounterStore: Send + Sync {
    /// Checks every limit and, if all allow `cost`, records it in all of them, atomically.
    async fn reserve(&self, limits: &[Limit], cost: u64) -> Result<Admission, StoreError>;

    /// Replaces a reservation by the real cost (0 gives it back). Slots that have left their
    /// window, or whose counter expired, are left alone.
    async fn adjust(&self, ticket: &Ticket, actual: u64) -> Result<(), StoreError>;
}

/// Width of one bucket of a sliding window, in seconds: 1 s up to a minute, else 1/60 of it.
pub fn bucket_secs(window_secs: u64) -> u64 {
    window_secs.div_ceil(60).max(1)
}

/// The `[start, end)` of the fixed period that holds `now_secs`, in seconds since the epoch.
/// Mirrored line for line by `period_bounds` in `redis/reserve.lua`.
pub fn period_bounds(period: Period, now_secs: u64) -> (u64, u64) {
    const DAY: u64 = 86_400;
    let days = now_secs / DAY;
    match period {
        Period::Seconds(n) => {
            let start = now_secs / n * n;
            (start, start + n)
        }
        Period::Hourly => (now_secs / 3600 * 3600, now_secs / 3600 * 3600 + 3600),
        Period::Daily => (days * DAY, (days + 1) * DAY),
        Period::Weekly => {
            // 1970-01-01 was a Thursday: three days after a Monday.
            let monday = days - (days + 3) % 7;
            (monday * DAY, (monday + 7) * DAY)
        }
        Period::Monthly => {
            let (year, month, _) = civil_from_days(days);
            let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
            (days_from_civil(year, month, 1) * DAY, days_from_civil(next_year, next_month, 1) * DAY)
        }
        Period::Yearly => {
            let (year, _, _) = civil_from_days(days);
            (days_from_civil(year, 1, 1) * DAY, days_from_civil(year + 1, 1, 1) * DAY)
        }
    }
}

// Howard Hinnant's algorithms (chrono-compatible days since 1970-01-01), for dates from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Counts what the failover does, for `/metrics` and the log.
#[derive(Default)]
pub struct StoreStats {
    pub failures: AtomicU64,
    pub fallback_decisions: AtomicU64,
    pub refused_unavailable: AtomicU64,
}

/// Which store a reservation went to, so its reconcile goes to the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Primary,
    Fallback,
}

/// The store the policies use: the configured one, and for a shared (Redis) store, this
/// instance's in-memory counters to fall back on while it is unavailable.
pub struct Counters {
    primary: Arc<dyn CounterStore>,
    fallback: Option<memory::MemoryStore>,
    pub stats: StoreStats,
    pub shared: bool,
}

impl Counters {
    pub fn in_memory(clock: Arc<dyn Clock>) -> Self {
        Self {
            primary: Arc::new(memory::MemoryStore::new(clock)),
            fallback: None,
            stats: StoreStats::default(),
            shared: false,
        }
    }

    pub fn shared(primary: Arc<dyn CounterStore>, clock: Arc<dyn Clock>) -> Self {
        Self { primary, fallback: Some(memory::MemoryStore::new(clock)), stats: StoreStats::default(), shared: true }
    }

    /// Reserves in the primary store; if it is unavailable, in the fallback (fail-open) or not
    /// at all (fail-closed, the error is returned).
    pub async fn reserve(
        &self,
        limits: &[Limit],
        cost: u64,
        on_failure: OnStoreFailure,
    ) -> Result<(Admission, Source), StoreError> {
        match self.primary.reserve(limits, cost).await {
            Ok(admission) => Ok((admission, Source::Primary)),
            Err(error) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                match (&self.fallback, on_failure) {
                    (Some(fallback), OnStoreFailure::FailOpen) => {
                        self.stats.fallback_decisions.fetch_add(1, Ordering::Relaxed);
                        Ok((fallback.reserve(limits, cost).await?, Source::Fallback))
                    }
                    _ => {
                        self.stats.refused_unavailable.fetch_add(1, Ordering::Relaxed);
                        Err(error)
                    }
                }
            }
        }
    }

    pub async fn adjust(&self, ticket: &Ticket, actual: u64, source: Source) {
        let result = match (source, &self.fallback) {
            (Source::Fallback, Some(fallback)) => fallback.adjust(ticket, actual).await,
            _ => self.primary.adjust(ticket, actual).await,
        };
        if let Err(error) = result {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            // The reservation stays counted until its window passes: limits err on the safe side.
            tracing::debug!(%error, "could not reconcile a reservation");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds since the epoch of a UTC date and time.
    fn at(year: u64, month: u64, day: u64, hour: u64) -> u64 {
        days_from_civil(year, month, day) * 86_400 + hour * 3600
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in (0..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn calendar_periods_follow_month_lengths_and_leap_years() {
        // February of a leap year ends on the 29th, of a common year on the 28th; 2100 is not leap.
        assert_eq!(period_bounds(Period::Monthly, at(2024, 2, 29, 23)), (at(2024, 2, 1, 0), at(2024, 3, 1, 0)));
        assert_eq!(period_bounds(Period::Monthly, at(2026, 2, 28, 12)), (at(2026, 2, 1, 0), at(2026, 3, 1, 0)));
        assert_eq!(period_bounds(Period::Monthly, at(2100, 2, 28, 0)).1 - at(2100, 2, 1, 0), 28 * 86_400);
        assert_eq!(period_bounds(Period::Monthly, at(2000, 2, 10, 0)).1 - at(2000, 2, 1, 0), 29 * 86_400);
        assert_eq!(period_bounds(Period::Monthly, at(2026, 12, 31, 23)), (at(2026, 12, 1, 0), at(2027, 1, 1, 0)));
        assert_eq!(period_bounds(Period::Monthly, at(2026, 4, 30, 0)).1, at(2026, 5, 1, 0));
        assert_eq!(period_bounds(Period::Yearly, at(2024, 7, 1, 0)), (at(2024, 1, 1, 0), at(2025, 1, 1, 0)));
        assert_eq!(period_bounds(Period::Yearly, at(2024, 7, 1, 0)).1 - at(2024, 1, 1, 0), 366 * 86_400);
        // 2026-11-26 is a Thursday: its ISO week started on Monday the 23rd.
        assert_eq!(period_bounds(Period::Weekly, at(2026, 11, 26, 9)), (at(2026, 11, 23, 0), at(2026, 11, 30, 0)));
        assert_eq!(period_bounds(Period::Weekly, at(2026, 11, 23, 0)).0, at(2026, 11, 23, 0));
        assert_eq!(period_bounds(Period::Weekly, at(2026, 11, 22, 23)).0, at(2026, 11, 16, 0));
        assert_eq!(period_bounds(Period::Daily, at(2026, 11, 26, 9) + 59), (at(2026, 11, 26, 0), at(2026, 11, 27, 0)));
        assert_eq!(
            period_bounds(Period::Hourly, at(2026, 11, 26, 9) + 3599),
            (at(2026, 11, 26, 9), at(2026, 11, 26, 10))
        );
        assert_eq!(period_bounds(Period::Seconds(90), 1000), (990, 1080));
    }

    #[test]
    fn bucket_widths() {
        assert_eq!(bucket_secs(1), 1);
        assert_eq!(bucket_secs(60), 1);
        assert_eq!(bucket_secs(61), 2);
        assert_eq!(bucket_secs(3600), 60);
    }
}
