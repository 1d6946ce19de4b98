//! The generic cell rate algorithm on one atomic word.
//!
//! A bucket is its *theoretical arrival time* (TAT): the instant at which it
//! would be full again. Taking `n` tokens moves the TAT `n` emission
//! intervals later; a request is admitted when the new TAT is no more than
//! the burst tolerance (`capacity` intervals) ahead of now. One
//! compare-and-swap per decision, integer arithmetic only.
//!
//! # Units
//!
//! Time is counted in *units* of `1/scale` nanoseconds, and one token is
//! `per_token` units, so the emission interval `per_token / scale` ns is a
//! fraction, not a rounded nanosecond count. `scale` is the smallest
//! denominator (at most [`MAX_SCALE`]) that represents the interval exactly,
//! or the one that represents it best: 1 per hour (`3.6e12 / 1`),
//! 10⁹ per second (`1 / 1`) and 3 per second (`1e9 / 3`) are exact, so a
//! billion decisions never drift; a rate such as 123 456 789/s is within
//! a relative `0.5 / per_token` of what was asked.
//!
//! `now` is read once per decision; a reading older than another thread's
//! (threads interleave, or a clock steps back) only makes the bucket look
//! emptier by that much, never panics.

use std::time::Duration;

use apiguard_core::clock::nanos_to_duration;
use apiguard_core::{InvalidConfig, Nanos, Quota, QuotaPolicy, RateLimited};

use crate::limiter::{Grant, Reservation};
use crate::sync::{AtomicU64, Ordering};

/// The largest denominator used for the emission interval. Units are then
/// `1/32` ns, and a `u64` of them spans 18 years of process uptime.
const MAX_SCALE: u64 = 32;
/// Bound on the burst tolerance and on any wait, in units, so that sums of
/// a time and two of them never overflow within the clock's range.
const MAX_SPAN: u64 = 1 << 62;

/// A validated rate: capacity and emission interval in integer units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    per_token: u64,
    scale: u64,
    tau: u64,
    capacity: u32,
    quota: Quota,
}

impl Rate {
    /// The rate of `quota`, checked: also refused when its burst is beyond
    /// what an in-memory bucket holds (`u32::MAX` tokens).
    pub(crate) fn from_quota(quota: Quota) -> Result<Self, InvalidConfig> {
        let quota = quota.validate()?;
        let capacity = u32::try_from(quota.burst()).map_err(|_| {
            InvalidConfig::new(
                "burst",
                "must be at most 4294967295 for an in-memory bucket",
            )
        })?;
        let mut rate = Self::new(capacity, quota.refill_per_sec())?;
        rate.quota = quota;
        Ok(rate)
    }

    /// APIGuard's terms: `capacity` tokens refilled at `refill_per_sec`.
    pub(crate) fn new(capacity: u32, refill_per_sec: f64) -> Result<Self, InvalidConfig> {
        if capacity == 0 {
            return Err(InvalidConfig::new("capacity", "must be at least 1"));
        }
        if !refill_per_sec.is_finite() || refill_per_sec <= 0.0 {
            return Err(InvalidConfig::new(
                "refill_per_sec",
                "must be a finite number above zero",
            ));
        }
        let interval_ns = 1e9 / refill_per_sec;
        let mut best: Option<(u64, u64, f64)> = None;
        for scale in 1..=MAX_SCALE {
            let exact = interval_ns * scale as f64;
            let per_token = exact.round();
            if per_token < 1.0 || per_token >= MAX_SPAN as f64 {
                continue;
            }
            let err = ((per_token - exact) / exact).abs();
            if best.is_none_or(|(_, _, e)| err < e) {
                best = Some((per_token as u64, scale, err));
            }
            if err <= 1e-12 {
                break;
            }
        }
        let Some((per_token, scale, _)) = best else {
            return Err(InvalidConfig::new(
                "refill_per_sec",
                "must be between one per 146 years and 3.2e10 per second",
            ));
        };
        let tau = u64::from(capacity)
            .checked_mul(per_token)
            .filter(|&t| t <= MAX_SPAN)
            .ok_or_else(|| {
                InvalidConfig::new(
                    "capacity",
                    "a full bucket would take more than 4 years to refill at this rate",
                )
            })?;
        Ok(Self {
            per_token,
            scale,
            tau,
            capacity,
            quota: Quota::from_rate(capacity, refill_per_sec),
        })
    }

    /// A rate of one token per `interval_ns` nanoseconds (whole units), for
    /// the adaptive pacer, whose interval changes and so keeps its time in
    /// plain nanoseconds. `interval_ns` is clamped to `1..=MAX_SPAN /
    /// capacity` so the burst tolerance cannot overflow.
    #[inline]
    pub(crate) fn paced(capacity: u32, interval_ns: u64) -> Self {
        let capacity = capacity.max(1);
        let per_token = interval_ns.clamp(1, MAX_SPAN / u64::from(capacity));
        Self {
            per_token,
            scale: 1,
            tau: u64::from(capacity) * per_token,
            capacity,
            quota: Quota::from_rate(capacity, 1e9 / per_token as f64),
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(crate) fn refill_per_sec(&self) -> f64 {
        self.quota.refill_per_sec()
    }

    /// The quota as configured.
    pub(crate) fn quota(&self) -> Quota {
        self.quota
    }

    /// The emission interval as `(units per token, units per ns)`.
    #[cfg(test)]
    pub(crate) fn interval(&self) -> (u64, u64) {
        (self.per_token, self.scale)
    }

    /// The quota as the `RateLimit-Policy` field states it: `capacity` units
    /// per the time a drained bucket takes to fill.
    pub(crate) fn policy(&self) -> QuotaPolicy {
        QuotaPolicy {
            limit: u64::from(self.capacity),
            window: self.duration(self.tau),
        }
    }

    #[inline]
    pub(crate) fn units(&self, now: Nanos) -> u64 {
        // Most rates are whole nanoseconds a token (scale 1): skipping the
        // multiply takes its latency off the path from the clock read to
        // the compare-and-swap.
        if self.scale == 1 {
            now
        } else {
            now.saturating_mul(self.scale)
        }
    }

    /// A unit count as a duration, rounded up to the nanosecond so a caller
    /// who waits it is never early.
    #[inline]
    fn duration(&self, units: u64) -> Duration {
        nanos_to_duration(units.div_ceil(self.scale))
    }

    #[inline]
    fn wait_units(&self, max_wait: Duration) -> u64 {
        let ns = max_wait.as_nanos().min(u128::from(MAX_SPAN)) as u64;
        ns.saturating_mul(self.scale).min(MAX_SPAN)
    }

    /// A fresh TAT for a bucket that is full at `now`.
    #[inline]
    pub(crate) fn full_at(&self, now: Nanos) -> u64 {
        self.units(now)
    }

    /// Whether a bucket with this TAT is full at `now` (and so may be
    /// forgotten: a full bucket and no bucket behave the same).
    #[inline]
    pub(crate) fn is_full(&self, tat: u64, now: Nanos) -> bool {
        tat <= self.units(now)
    }

    /// The instant (ns) at which a bucket with this TAT will be full.
    #[inline]
    pub(crate) fn full_time(&self, tat: u64) -> Nanos {
        tat.div_ceil(self.scale)
    }

    /// Tokens available at `now`, with the fraction of the next one.
    pub(crate) fn available(&self, tat: u64, now: Nanos) -> f64 {
        let used = tat.saturating_sub(self.units(now));
        self.tau.saturating_sub(used) as f64 / self.per_token as f64
    }

    /// The refusal for a wait of `units`. Cold and out of line, so the
    /// admit path neither builds nor spills a refusal.
    #[cold]
    #[inline(never)]
    fn refuse(&self, units: u64) -> RateLimited {
        RateLimited::new(self.duration(units)).with_policy(self.policy())
    }

    /// The refusal for a cost no bucket of this capacity can ever grant.
    #[cold]
    #[inline(never)]
    fn never(&self) -> RateLimited {
        RateLimited::new(Duration::MAX).with_policy(self.policy())
    }
}

/// Reserves `cost` tokens on `tat` if they are available within `max_wait`.
#[inline]
pub(crate) fn reserve(
    tat: &AtomicU64,
    rate: &Rate,
    cost: u32,
    max_wait: Duration,
    now: Nanos,
) -> Result<Reservation, RateLimited> {
    if cost > rate.capacity {
        return Err(rate.never());
    }
    let now_u = rate.units(now);
    let inc = u64::from(cost) * rate.per_token;
    let allowed = rate.tau + rate.wait_units(max_wait);
    // Relaxed is enough: the TAT is the only state, and every decision is a
    // read-modify-write of it, which all threads see in one total order.
    let mut cur = tat.load(Ordering::Relaxed);
    loop {
        let new = cur.max(now_u).saturating_add(inc);
        let ahead = new - now_u;
        if ahead > allowed {
            return Err(rate.refuse(ahead - rate.tau));
        }
        match tat.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                let grant = Grant {
                    wait: rate.duration(ahead.saturating_sub(rate.tau)),
                    remaining: rate.tau.saturating_sub(ahead) / rate.per_token,
                    policy: Some(rate.policy()),
                };
                return Ok(Reservation::new(grant, cost, new));
            }
            Err(actual) => cur = actual,
        }
    }
}

/// Takes `cost` tokens only if they are there now. The admit path of
/// [`reserve`] without building a grant.
#[inline]
pub(crate) fn try_acquire(
    tat: &AtomicU64,
    rate: &Rate,
    cost: u32,
    now: Nanos,
) -> Result<(), RateLimited> {
    if cost > rate.capacity {
        return Err(rate.never());
    }
    let now_u = rate.units(now);
    let inc = u64::from(cost) * rate.per_token;
    let mut cur = tat.load(Ordering::Relaxed);
    loop {
        let new = cur.max(now_u).saturating_add(inc);
        let ahead = new - now_u;
        if ahead > rate.tau {
            return Err(rate.refuse(ahead - rate.tau));
        }
        match tat.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(actual) => cur = actual,
        }
    }
}

/// Gives back a reservation that will not be used, if nobody has reserved
/// after it (its TAT is still the bucket's). Returns whether it did.
///
/// Only the last reservation can be undone: moving the TAT back under a
/// later one would let a newcomer share that later caller's slot, and the
/// two would together exceed the burst.
#[inline]
pub(crate) fn cancel(tat: &AtomicU64, rate: &Rate, reservation: &Reservation) -> bool {
    let ticket = reservation.ticket();
    let inc = u64::from(reservation.cost()) * rate.per_token;
    tat.compare_exchange(
        ticket,
        ticket.saturating_sub(inc),
        Ordering::Relaxed,
        Ordering::Relaxed,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn rates_are_exact_fractions() {
        assert_eq!(
            Rate::new(1, 1.0 / 3600.0).unwrap().interval(),
            (3_600 * SEC, 1)
        );
        assert_eq!(Rate::new(1, 1e9).unwrap().interval(), (1, 1));
        assert_eq!(Rate::new(1, 3.0).unwrap().interval(), (SEC, 3));
        assert_eq!(Rate::new(1, 7.5).unwrap().interval(), (400_000_000, 3));
        assert_eq!(Rate::new(1, 2e9).unwrap().interval(), (1, 2));
    }

    #[test]
    fn bad_rates_and_capacities_are_refused() {
        assert_eq!(Rate::new(0, 1.0).unwrap_err().field(), "capacity");
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e12] {
            assert_eq!(Rate::new(1, r).unwrap_err().field(), "refill_per_sec");
        }
        assert_eq!(
            Rate::new(u32::MAX, 1.0 / 3600.0).unwrap_err().field(),
            "capacity"
        );
    }

    #[test]
    fn a_billion_decisions_do_not_drift() {
        // (rate, tokens per decision, decisions): 10^9 tokens at 10^9/s and
        // at 3/s; at one per hour 10^6 tokens already span 114 years, the
        // most a u64 of nanoseconds holds.
        for (rate, chunk, decisions) in [
            (1e9, 1_000_000u32, 1000u64),
            (3.0, 3_000_000, 333),
            (1.0 / 3600.0, 1000, 1000),
        ] {
            let r = Rate::new(chunk, rate).unwrap();
            let (per_token, scale) = r.interval();
            let tat = AtomicU64::new(0);
            let mut now = 0u64;
            for _ in 0..decisions {
                reserve(&tat, &r, chunk, Duration::ZERO, now).unwrap();
                now += u64::from(chunk) * per_token / scale;
            }
            let tokens = decisions * u64::from(chunk);
            assert_eq!(tat.load(Ordering::Relaxed), tokens * per_token);
            // Exactly on time the bucket is full again; a nanosecond early
            // the last token is still missing.
            assert!(try_acquire(&tat, &r, chunk, now - 1).is_err());
            assert!(try_acquire(&tat, &r, chunk, now).is_ok());
        }
    }

    #[test]
    fn time_going_backwards_neither_panics_nor_refuses_a_full_bucket_beyond_the_step() {
        let r = Rate::new(10, 1.0).unwrap();
        let tat = AtomicU64::new(0);
        try_acquire(&tat, &r, 1, 100 * SEC).unwrap();
        // A reading 5 s older sees one token taken plus 5 s: still admitted.
        for _ in 0..4 {
            try_acquire(&tat, &r, 1, 95 * SEC).unwrap();
        }
        // Time zero, far behind: refused, with a finite wait, no panic.
        assert!(try_acquire(&tat, &r, 1, 0).is_err());
        assert!(reserve(&tat, &r, 1, Duration::MAX, 0).is_ok());
    }

    #[test]
    fn cancel_undoes_only_the_last_reservation() {
        let r = Rate::new(1, 1.0).unwrap();
        let tat = AtomicU64::new(0);
        reserve(&tat, &r, 1, Duration::ZERO, 0).unwrap();
        let a = reserve(&tat, &r, 1, Duration::from_secs(5), 0).unwrap();
        assert_eq!(a.grant().wait, Duration::from_secs(1));
        let b = reserve(&tat, &r, 1, Duration::from_secs(5), 0).unwrap();
        assert!(!cancel(&tat, &r, &a), "a later reservation holds the TAT");
        assert!(cancel(&tat, &r, &b));
        // Once the later one is gone, the earlier one is last again.
        assert!(cancel(&tat, &r, &a));
        assert_eq!(tat.load(Ordering::Relaxed), SEC);
    }
}
