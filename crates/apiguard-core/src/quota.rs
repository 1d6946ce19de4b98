//! Quotas: how much a rate limit lets through, and how fast it refills.
//!
//! One [`Quota`] configures every limiter of the workspace: the in-memory
//! `TokenBucket` and `KeyedLimiter` of `apiguard-ratelimit` and the shared
//! `RedisLimiter` of `apiguard-redis`.
//!
//! ```
//! use std::time::Duration;
//! use apiguard_core::Quota;
//!
//! // 100 requests a minute, in bursts of at most 10.
//! let quota = Quota::per_minute(100).with_burst(10);
//! assert_eq!(quota.burst(), 10);
//! assert_eq!(quota.limit(), 100);
//! assert_eq!(quota.window(), Duration::from_secs(60));
//!
//! // APIGuard's terms: a bucket of 10 tokens refilled at 2.5 per second.
//! let quota = Quota::from_rate(10, 2.5);
//! assert_eq!((quota.burst(), quota.refill_per_sec()), (10, 2.5));
//!
//! // Refused when it is checked (every limiter checks it when built).
//! assert!(Quota::per_second(0).validate().is_err());
//! ```

use std::time::Duration;

use crate::error::{InvalidConfig, QuotaPolicy};

/// How much a rate limit lets through: `limit` tokens per `window`,
/// refilled continuously (one token every `window / limit`), in bursts of
/// up to [`burst`](Self::burst) tokens (by default the limit: a limit of
/// 100 a minute may be spent all at once, then refills at 100 a minute).
///
/// The constructors take any value; a limiter built from a quota checks it
/// ([`validate`](Self::validate)) and refuses a zero limit, burst or
/// window, or a rate that is negative, NaN or infinite, with a named
/// [`InvalidConfig`].
///
/// # Exactness
///
/// A quota given as `limit` per `window` is held as those two integers, so
/// a limiter can represent its rate exactly (3 a second is one token every
/// `1e9 / 3` ns, not 333 333 333 ns). [`from_rate`](Self::from_rate) keeps
/// APIGuard's floating-point rate as given; where a limiter needs a limit
/// and a window (the Redis one does), [`limit`](Self::limit) and
/// [`window`](Self::window) give the nearest whole fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    refill: Refill,
    burst: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Refill {
    PerWindow { limit: u64, window: Duration },
    PerSecond(f64),
}

impl Quota {
    /// `limit` tokens per `window`, in bursts of up to `limit`.
    pub const fn new(limit: u64, window: Duration) -> Self {
        Self {
            refill: Refill::PerWindow { limit, window },
            burst: None,
        }
    }

    /// `limit` tokens a second, in bursts of up to `limit`.
    pub const fn per_second(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` tokens a minute, in bursts of up to `limit`.
    pub const fn per_minute(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` tokens an hour, in bursts of up to `limit`.
    pub const fn per_hour(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// APIGuard's bucket: `capacity` tokens, refilled at `refill_per_sec`
    /// tokens a second (fractions allowed: `0.5` is one every 2 s).
    pub const fn from_rate(capacity: u32, refill_per_sec: f64) -> Self {
        Self {
            refill: Refill::PerSecond(refill_per_sec),
            burst: Some(capacity as u64),
        }
    }

    /// Bursts of up to `burst` tokens (also the largest cost one request
    /// may have). The rate stays as it was.
    pub const fn with_burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The largest burst, in tokens.
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or_else(|| self.limit())
    }

    /// The refill rate, tokens a second.
    pub fn refill_per_sec(&self) -> f64 {
        match self.refill {
            Refill::PerWindow { limit, window } => limit as f64 / window.as_secs_f64(),
            Refill::PerSecond(rate) => rate,
        }
    }

    /// Tokens per [`window`](Self::window).
    pub fn limit(&self) -> u64 {
        self.per_window().0
    }

    /// The window [`limit`](Self::limit) tokens refill in.
    pub fn window(&self) -> Duration {
        self.per_window().1
    }

    /// The rate as `limit` per `window`: as given, or for a rate given in
    /// tokens a second, the nearest fraction with a window of 1 to 10⁶
    /// seconds (one token per `1 / rate` when none is close).
    fn per_window(&self) -> (u64, Duration) {
        let rate = match self.refill {
            Refill::PerWindow { limit, window } => return (limit, window),
            Refill::PerSecond(rate) => rate,
        };
        if !rate.is_finite() || rate <= 0.0 {
            return (0, Duration::from_secs(1));
        }
        let mut secs = 1u64;
        while secs <= 1_000_000 {
            let tokens = rate * secs as f64;
            let whole = tokens.round();
            if whole >= 1.0 && whole < u64::MAX as f64 && (tokens - whole).abs() <= 1e-9 * tokens {
                return (whole as u64, Duration::from_secs(secs));
            }
            secs *= 10;
        }
        if rate >= 1.0 {
            (rate.round() as u64, Duration::from_secs(1))
        } else {
            (
                1,
                Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX),
            )
        }
    }

    /// Checks the quota: a limit, burst and window of at least one, a rate
    /// that is finite and above zero. Every limiter calls it when it is
    /// built, so calling it yourself is only needed to check early.
    pub fn validate(&self) -> Result<Self, InvalidConfig> {
        match self.refill {
            Refill::PerWindow { limit, window } => {
                if limit == 0 {
                    return Err(InvalidConfig::new("limit", "must be at least 1"));
                }
                if window.is_zero() {
                    return Err(InvalidConfig::new("window", "must be more than zero"));
                }
            }
            Refill::PerSecond(rate) => {
                if !rate.is_finite() || rate <= 0.0 {
                    return Err(InvalidConfig::new(
                        "refill_per_sec",
                        "must be a finite number above zero",
                    ));
                }
            }
        }
        if self.burst() == 0 {
            let field = match self.refill {
                Refill::PerSecond(_) => "capacity",
                Refill::PerWindow { .. } => "burst",
            };
            return Err(InvalidConfig::new(field, "must be at least 1"));
        }
        Ok(*self)
    }
}

/// The quota a `RateLimit-Policy` field advertised: `limit` per `window`,
/// bursts of up to `limit`.
impl From<QuotaPolicy> for Quota {
    fn from(policy: QuotaPolicy) -> Self {
        Self::new(policy.limit, policy.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_read_as_limit_per_window() {
        assert_eq!(Quota::per_second(5), Quota::new(5, Duration::from_secs(1)));
        assert_eq!(Quota::per_minute(5).window(), Duration::from_secs(60));
        assert_eq!(Quota::per_hour(5).window(), Duration::from_secs(3600));
        assert_eq!(Quota::per_minute(120).refill_per_sec(), 2.0);
    }

    #[test]
    fn the_burst_defaults_to_the_limit() {
        assert_eq!(Quota::per_second(7).burst(), 7);
        assert_eq!(Quota::per_second(7).with_burst(2).burst(), 2);
        assert_eq!(Quota::from_rate(3, 0.5).burst(), 3);
    }

    #[test]
    fn a_rate_in_tokens_a_second_converts_to_the_nearest_whole_fraction() {
        let q = Quota::from_rate(10, 2.5);
        assert_eq!((q.limit(), q.window()), (25, Duration::from_secs(10)));
        let q = Quota::from_rate(10, 0.001);
        assert_eq!((q.limit(), q.window()), (1, Duration::from_secs(1000)));
        let q = Quota::from_rate(10, 5.0);
        assert_eq!((q.limit(), q.window()), (5, Duration::from_secs(1)));
    }

    #[test]
    fn validation_names_the_setting_it_refuses() {
        let field = |q: Quota| q.validate().unwrap_err().field();
        assert_eq!(field(Quota::per_second(0)), "limit");
        assert_eq!(field(Quota::new(1, Duration::ZERO)), "window");
        assert_eq!(field(Quota::per_second(1).with_burst(0)), "burst");
        assert_eq!(field(Quota::from_rate(0, 1.0)), "capacity");
        assert_eq!(field(Quota::from_rate(1, f64::NAN)), "refill_per_sec");
        assert_eq!(field(Quota::from_rate(1, -1.0)), "refill_per_sec");
        assert!(Quota::per_minute(100).with_burst(10).validate().is_ok());
    }

    #[test]
    fn an_advertised_policy_converts_to_a_quota() {
        let policy = QuotaPolicy {
            limit: 100,
            window: Duration::from_secs(60),
        };
        assert_eq!(Quota::from(policy), Quota::per_minute(100));
    }
}
