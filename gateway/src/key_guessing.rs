//! Bounds subscription-key guessing. Failed key attempts (a key that matches no subscription) are
//! counted per client address on each instance, in a keyed GCRA limiter: an address may fail
//! `attempts` times in a burst, then once more every `per-secs / attempts` seconds. Past that,
//! its requests with an invalid key are answered 429 with `Retry-After` instead of 401, so a
//! guessing loop learns nothing more until it slows down. Only failures are counted: a valid key
//! is never looked up here, so callers with valid keys are never slowed, whatever their address.
//!
//! IPv6 clients are counted per /64 (one host typically has a whole /64 to rotate through);
//! IPv4-mapped IPv6 addresses count as the IPv4 address.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::InvalidKeyLimitConfig;

/// Every this many failed attempts, addresses whose allowance has refilled are forgotten, so the
/// table holds only the addresses that failed recently.
const FORGET_EVERY: u64 = 4096;

pub struct InvalidKeyLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    failures: AtomicU64,
}

impl InvalidKeyLimiter {
    /// `None` when the limit is switched off.
    pub fn from_config(config: &InvalidKeyLimitConfig) -> Option<Self> {
        let attempts = NonZeroU32::new(config.attempts).filter(|_| config.enabled)?;
        let replenish = Duration::from_secs(config.per_secs.max(1)) / attempts.get();
        let quota = Quota::with_period(replenish.max(Duration::from_millis(1)))?.allow_burst(attempts);
        Some(Self { limiter: RateLimiter::keyed(quota), clock: DefaultClock::default(), failures: AtomicU64::new(0) })
    }

    /// Records a failed attempt from `ip`. `Err` carries the seconds until the address may try
    /// again when it is over its allowance (the attempt is then not counted).
    pub fn failed_attempt(&self, ip: IpAddr) -> Result<(), u64> {
        if self.failures.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&client_block(ip)).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// The unit an address is counted in: the IPv4 address, or the IPv6 /64.
fn client_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(attempts: u32, per_secs: u64) -> InvalidKeyLimiter {
        InvalidKeyLimiter::from_config(&InvalidKeyLimitConfig { enabled: true, attempts, per_secs }).expect("on")
    }

    #[test]
    fn refuses_after_the_burst_per_address() {
        let limiter = limiter(3, 60);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(limiter.failed_attempt(a), Ok(()));
        }
        let retry = limiter.failed_attempt(a).expect_err("over the burst");
        assert!((1..=20).contains(&retry), "one attempt comes back every 20 s: {retry}");
        assert_eq!(limiter.failed_attempt(b), Ok(()), "another address has its own allowance");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter = limiter(1, 60);
        assert_eq!(limiter.failed_attempt("2001:db8::1".parse().expect("ip")), Ok(()));
        assert!(limiter.failed_attempt("2001:db8::ffff:2".parse().expect("ip")).is_err(), "same /64");
        assert_eq!(limiter.failed_attempt("2001:db8:0:1::1".parse().expect("ip")), Ok(()), "another /64");
        assert_eq!(limiter.failed_attempt("198.51.100.7".parse().expect("ip")), Ok(()));
        assert!(limiter.failed_attempt("::ffff:198.51.100.7".parse().expect("ip")).is_err());
    }

    #[test]
    fn off_when_disabled() {
        let config = InvalidKeyLimitConfig { enabled: false, attempts: 3, per_secs: 60 };
        assert!(InvalidKeyLimiter::from_config(&config).is_none());
    }
}
