//! The retry budget: retries as a fraction of recent traffic.
//!
//! # Why a budget and not only `max_retries`?
//!
//! `max_retries = 3` looks harmless until the server is down: then every
//! request becomes four, and a struggling server gets four times the load
//! exactly when it can least bear it. A budget caps retries as a share of
//! the requests actually made recently (plus a small floor so that a quiet
//! client can still retry), so under a total outage the load converges to
//! about `1 + retry_ratio` times normal instead of `1 + max_retries` —
//! the approach of Finagle, gRPC and tower's `TpsBudget`.
//!
//! # How it counts
//!
//! Every original request deposits `retry_ratio` of a retry; every retry
//! withdraws one. Deposits and withdrawals are kept in ten time slots
//! covering `ttl`, so they expire on their own. On top of the deposits sits
//! a reserve of `min_per_sec × ttl` retries that never expires. Each slot
//! is one `AtomicU64` (slot epoch and balance packed together), so
//! depositing and withdrawing are a compare-and-swap, without a lock.
//! Concurrent withdrawals may overdraw by the number of racing threads,
//! never more.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apiguard_core::InvalidConfig;

use crate::sync::{AtomicU64, Ordering};
use apiguard_core::clock::{Clock, Nanos, duration_to_nanos};

/// Fixed-point scale: one retry is worth `UNIT` units.
const UNIT: i64 = 1000;
const SLOTS: u64 = 10;
const EPOCH_BITS: u32 = 24;
const VALUE_BITS: u32 = 40;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const VALUE_MASK: u64 = (1 << VALUE_BITS) - 1;
const VALUE_MAX: i64 = (1 << (VALUE_BITS - 1)) - 1;
const VALUE_MIN: i64 = -(1 << (VALUE_BITS - 1));

/// Bounds retries to a ratio of recent requests plus a floor per second.
///
/// Cloning is cheap and every clone shares the same balance, so one budget
/// can guard all calls to a host across many services and policies.
///
/// ```
/// use std::time::Duration;
/// use apiguard_retry::RetryBudget;
///
/// // No floor, one retry per two requests.
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5)?;
/// assert!(!budget.try_withdraw());
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw());
/// # Ok::<(), apiguard_core::InvalidConfig>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Clock,
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
    slot_nanos: u64,
    /// `2⁶⁴ / slot_nanos`, rounded down: the epoch of a reading is found by
    /// a multiplication instead of a division (tens of cycles, on every
    /// request's deposit).
    slot_recip: u64,
    reserve: i64,
    deposit: i64,
    slots: [AtomicU64; SLOTS as usize],
}

impl RetryBudget {
    /// A budget over a window of `ttl`, allowing `min_per_sec` retries per
    /// second regardless of traffic plus `retry_ratio` retries per request
    /// made within the window (`0.2`: one retry per five requests).
    ///
    /// Refuses a `ttl` of zero or over an hour, and a `retry_ratio` that is
    /// negative, NaN, or above 1000.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f64) -> Result<Self, InvalidConfig> {
        Self::with_clock(ttl, min_per_sec, retry_ratio, Clock::system())
    }

    /// As [`new`](Self::new), reading time from `clock`.
    pub fn with_clock(
        ttl: Duration,
        min_per_sec: u32,
        retry_ratio: f64,
        clock: Clock,
    ) -> Result<Self, InvalidConfig> {
        if ttl.is_zero() || ttl > Duration::from_secs(3600) {
            return Err(InvalidConfig::new(
                "ttl",
                "must be more than zero and at most one hour",
            ));
        }
        if !(0.0..=1000.0).contains(&retry_ratio) {
            return Err(InvalidConfig::new(
                "retry_ratio",
                "must be a number in [0, 1000]",
            ));
        }
        let slot_nanos = (duration_to_nanos(ttl) / SLOTS).max(1);
        let reserve_retries = u128::from(min_per_sec) * ttl.as_millis() / 1000;
        let reserve = i64::try_from(reserve_retries.saturating_mul(UNIT as u128))
            .unwrap_or(VALUE_MAX)
            .min(VALUE_MAX);
        Ok(Self {
            inner: Arc::new(Inner {
                clock,
                ttl,
                min_per_sec,
                ratio: retry_ratio,
                slot_nanos,
                slot_recip: recip(slot_nanos),
                reserve,
                deposit: (retry_ratio * UNIT as f64).round() as i64,
                slots: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        })
    }

    /// The window deposits and withdrawals count in.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The floor: retries per second allowed with no traffic at all.
    pub fn min_per_sec(&self) -> u32 {
        self.inner.min_per_sec
    }

    /// Retries allowed per request made.
    pub fn retry_ratio(&self) -> f64 {
        self.inner.ratio
    }

    /// Records an original request (not a retry).
    pub fn deposit(&self) {
        self.deposit_at(self.inner.clock.now());
    }

    /// [`deposit`](Self::deposit) at an explicit time.
    pub fn deposit_at(&self, now: Nanos) {
        self.inner.add(self.inner.deposit, now);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(self.inner.clock.now())
    }

    /// [`try_withdraw`](Self::try_withdraw) at an explicit time.
    pub fn try_withdraw_at(&self, now: Nanos) -> bool {
        if self.inner.balance(now) >= UNIT {
            self.inner.add(-UNIT, now);
            true
        } else {
            false
        }
    }

    /// Gives back one retry taken with `try_withdraw` that never happened.
    /// Whether `other` is this very budget (a clone of it).
    #[cfg(test)]
    pub(crate) fn same_as(&self, other: &RetryBudget) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn refund(&self) {
        self.inner.add(UNIT, self.inner.clock.now());
    }

    /// Retries available now (fractional: deposits are fractions of one).
    pub fn available(&self) -> f64 {
        self.available_at(self.inner.clock.now())
    }

    /// [`available`](Self::available) at an explicit time.
    pub fn available_at(&self, now: Nanos) -> f64 {
        self.inner.balance(now).max(0) as f64 / UNIT as f64
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 retries per second, over 10 seconds.
    fn default() -> Self {
        match Self::new(Duration::from_secs(10), 10, 0.2) {
            Ok(b) => b,
            Err(_) => unreachable!("the default budget is valid"),
        }
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.inner.ttl)
            .field("min_per_sec", &self.inner.min_per_sec)
            .field("retry_ratio", &self.inner.ratio)
            .field("available", &self.available())
            .finish()
    }
}

/// `2⁶⁴ / d` rounded down (`d ≥ 1`; `u64::MAX` for `d = 1`).
fn recip(d: u64) -> u64 {
    (u128::from(u64::MAX) / u128::from(d)) as u64
}

impl Inner {
    /// `now / slot_nanos`, exactly.
    #[inline]
    fn epoch(&self, now: Nanos) -> u64 {
        // The estimate is at most two below the quotient (one for any
        // reading under 2⁶³); a step or two fix it.
        let mut q = ((u128::from(now) * u128::from(self.slot_recip)) >> 64) as u64;
        while let Some(next) = q.checked_add(1)
            && next.checked_mul(self.slot_nanos).is_some_and(|p| p <= now)
        {
            q = next;
        }
        q
    }

    fn add(&self, delta: i64, now: Nanos) {
        if delta == 0 {
            return;
        }
        let epoch = self.epoch(now);
        let tag = epoch & EPOCH_MASK;
        let slot = &self.slots[(epoch % SLOTS) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (e, v) = unpack(cur);
            if e != tag && e.wrapping_sub(tag) & EPOCH_MASK < EPOCH_MASK / 2 {
                // The slot already holds a newer period: this reading is a
                // whole window stale, its own period long expired. Dropping
                // it is what expiry would have done.
                return;
            }
            let v = if e == tag {
                v.saturating_add(delta).clamp(VALUE_MIN, VALUE_MAX)
            } else {
                // The slot holds an expired period: start it afresh.
                delta.clamp(VALUE_MIN, VALUE_MAX)
            };
            match slot.compare_exchange_weak(cur, pack(tag, v), Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn balance(&self, now: Nanos) -> i64 {
        let tag = self.epoch(now) & EPOCH_MASK;
        let mut sum = self.reserve;
        for slot in &self.slots {
            let (e, v) = unpack(slot.load(Ordering::Acquire));
            let age = tag.wrapping_sub(e) & EPOCH_MASK;
            if age < SLOTS {
                sum += v;
            }
        }
        sum
    }
}

#[inline]
fn pack(epoch: u64, value: i64) -> u64 {
    (epoch << VALUE_BITS) | (value as u64 & VALUE_MASK)
}

#[inline]
fn unpack(raw: u64) -> (u64, i64) {
    let epoch = raw >> VALUE_BITS;
    // Sign-extend the low 40 bits.
    let value = ((raw << (64 - VALUE_BITS)) as i64) >> (64 - VALUE_BITS);
    (epoch, value)
}

/// One retry taken from a budget, given back if the retry never happens
/// (the request was dropped while waiting to retry).
#[derive(Debug)]
pub(crate) struct Withdrawal {
    budget: Option<RetryBudget>,
}

impl Withdrawal {
    pub(crate) const fn none() -> Self {
        Self { budget: None }
    }

    pub(crate) fn taken(budget: RetryBudget) -> Self {
        Self {
            budget: Some(budget),
        }
    }

    /// The retry happened: the withdrawal stands.
    pub(crate) fn commit(&mut self) {
        self.budget = None;
    }
}

impl Drop for Withdrawal {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.refund();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::ManualClock;
    use proptest::prelude::*;

    #[test]
    fn the_epoch_is_the_exact_quotient() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for d in [
            1,
            2,
            3,
            7,
            1_000,
            999_999_937,
            1_000_000_000,
            3_600_000_000_000 / 10,
            u64::MAX / 3,
        ] {
            let b = RetryBudget::new(Duration::from_secs(1), 1, 0.1).unwrap();
            let mut inner = Arc::try_unwrap(b.inner).unwrap_or_else(|_| unreachable!());
            inner.slot_nanos = d;
            inner.slot_recip = recip(d);
            let edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, u64::MAX - 1, u64::MAX];
            for n in edges {
                assert_eq!(inner.epoch(n), n / d, "{n} / {d}");
            }
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                assert_eq!(inner.epoch(x), x / d, "{x} / {d}");
            }
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn pack_round_trips_negative_values() {
        for v in [0, 1, -1, VALUE_MAX, VALUE_MIN, -123_456] {
            assert_eq!(unpack(pack(77, v)), (77, v));
        }
    }

    #[test]
    fn floor_allows_min_per_sec_times_ttl() {
        let b = RetryBudget::new(Duration::from_secs(10), 2, 0.0).unwrap();
        let granted = (0..100).filter(|_| b.try_withdraw_at(0)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn deposits_buy_retries_at_the_ratio() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 0.25).unwrap();
        for _ in 0..40 {
            b.deposit_at(SEC);
        }
        let granted = (0..100).filter(|_| b.try_withdraw_at(SEC)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn a_stale_reading_does_not_wipe_a_newer_period() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        for _ in 0..5 {
            b.deposit_at(20 * SEC + SEC / 2);
        }
        // A thread that read the clock a whole window ago lands on the same
        // slot; its deposit belongs to an expired period.
        b.deposit_at(10 * SEC + SEC / 2);
        assert_eq!(b.available_at(20 * SEC + SEC / 2), 5.0);
    }

    #[test]
    fn deposits_expire_after_ttl() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        for _ in 0..5 {
            b.deposit_at(0);
        }
        assert_eq!(b.available_at(9 * SEC), 5.0);
        assert_eq!(b.available_at(10 * SEC), 0.0);
        assert!(!b.try_withdraw_at(11 * SEC));
    }

    #[test]
    fn withdrawals_expire_too() {
        let b = RetryBudget::new(Duration::from_secs(1), 3, 0.0).unwrap();
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(0)).count(), 3);
        assert!(!b.try_withdraw_at(SEC / 2));
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(SEC)).count(), 3);
    }

    #[test]
    fn dropped_withdrawal_is_refunded_and_committed_one_is_not() {
        let manual = ManualClock::new();
        let b = RetryBudget::with_clock(Duration::from_secs(10), 1, 0.0, manual.clock()).unwrap();
        assert!(b.try_withdraw());
        drop(Withdrawal::taken(b.clone()));
        assert_eq!(b.available(), 10.0);
        assert!(b.try_withdraw());
        let mut w = Withdrawal::taken(b.clone());
        w.commit();
        drop(w);
        assert_eq!(b.available(), 9.0);
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert_eq!(
            RetryBudget::new(Duration::ZERO, 1, 0.2)
                .unwrap_err()
                .field(),
            "ttl"
        );
        for r in [-0.1, f64::NAN, f64::INFINITY, 1e6] {
            assert_eq!(
                RetryBudget::new(Duration::from_secs(1), 1, r)
                    .unwrap_err()
                    .field(),
                "retry_ratio"
            );
        }
    }

    #[test]
    fn clones_share_one_balance() {
        let a = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        let b = a.clone();
        a.deposit_at(0);
        assert!(b.try_withdraw_at(0));
        assert!(!a.try_withdraw_at(0));
    }

    proptest! {
        /// Over any run of deposits and withdrawals inside one window, the
        /// retries granted never exceed the floor plus the ratio of requests.
        #[test]
        fn grants_never_exceed_floor_plus_ratio(
            ops in proptest::collection::vec(any::<bool>(), 0..500),
            floor in 0u32..5,
            ratio_pct in 0u32..=200,
        ) {
            let ratio = f64::from(ratio_pct) / 100.0;
            let b = RetryBudget::new(Duration::from_secs(10), floor, ratio).unwrap();
            let (mut deposits, mut granted) = (0u32, 0u32);
            for (i, deposit) in ops.into_iter().enumerate() {
                let now = i as u64 * 1_000_000; // all within 0.5 s
                if deposit {
                    b.deposit_at(now);
                    deposits += 1;
                } else if b.try_withdraw_at(now) {
                    granted += 1;
                }
            }
            let limit = f64::from(floor) * 10.0 + ratio * f64::from(deposits);
            prop_assert!(f64::from(granted) <= limit + 1e-9, "{granted} > {limit}");
        }
    }
}
