//! The token bucket.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::Duration;

use apiguard_core::{Clock, InvalidConfig, Nanos, Quota, QuotaPolicy, RateLimited};

use crate::future::Acquire;
use crate::gcra::{self, Rate};
use crate::limiter::{Grant, Limiter, Reservation};
use crate::sync::{AtomicU64, Ordering};

/// A token bucket: [`Quota::burst`] tokens, refilled continuously at the
/// quota's rate, on one atomic word (GCRA).
///
/// ```
/// use apiguard_core::Quota;
/// use apiguard_ratelimit::TokenBucket;
///
/// // Two at once, then one a second.
/// let bucket = TokenBucket::new(Quota::per_second(1).with_burst(2))?;
/// assert!(bucket.try_acquire(2).is_ok());
/// let refused = bucket.try_acquire(1).unwrap_err();
/// assert!(refused.retry_after().unwrap() <= std::time::Duration::from_secs(1));
/// # Ok::<(), apiguard_core::InvalidConfig>(())
/// ```
///
/// # Clone
///
/// A clone is a handle to the same bucket: clones share one limit.
#[derive(Clone)]
pub struct TokenBucket {
    inner: Arc<Inner>,
}

/// Aligned to 128 bytes (two cache lines, which x86 prefetches in pairs),
/// so that the word every decision writes shares its line neither with the
/// `Arc`'s reference counts nor with another bucket: buckets made one after
/// another (one per host, say) would otherwise sit side by side in memory,
/// and cores deciding for different hosts would fight over one line.
#[repr(align(128))]
struct Inner {
    tat: AtomicU64,
    rate: Rate,
    clock: Clock,
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("capacity", &self.capacity())
            .field("refill_per_sec", &self.refill_per_sec())
            .field("available", &self.available())
            .finish()
    }
}

impl TokenBucket {
    /// A full bucket for `quota`.
    ///
    /// Refuses what [`Quota::validate`] refuses, a burst above `u32::MAX`,
    /// and a rate outside one per 146 years .. 3.2·10¹⁰ per second.
    pub fn new(quota: Quota) -> Result<Self, InvalidConfig> {
        Ok(Self::with_rate(Rate::from_quota(quota)?, Clock::system()))
    }

    /// APIGuard's `TokenBucket(capacity, refill_rate)`: a full bucket of
    /// `capacity` tokens refilled at `refill_per_sec`; the same as
    /// `new(Quota::from_rate(capacity, refill_per_sec))`.
    ///
    /// Refuses a zero capacity and a rate that is zero, negative, NaN or
    /// infinite (or outside one per 146 years .. 3.2·10¹⁰ per second).
    pub fn from_rate(capacity: u32, refill_per_sec: f64) -> Result<Self, InvalidConfig> {
        Ok(Self::with_rate(
            Rate::new(capacity, refill_per_sec)?,
            Clock::system(),
        ))
    }

    fn with_rate(rate: Rate, clock: Clock) -> Self {
        let tat = rate.full_at(clock.now());
        Self {
            inner: Arc::new(Inner {
                tat: AtomicU64::new(tat),
                rate,
                clock,
            }),
        }
    }

    /// The same bucket configuration, full, reading time from `clock`
    /// (a [`ManualClock`](apiguard_core::ManualClock) in tests). The new
    /// bucket shares nothing with `self`.
    pub fn with_clock(self, clock: Clock) -> Self {
        Self::with_rate(self.inner.rate, clock)
    }

    /// Takes `tokens` if they are there now; never waits. The refusal says
    /// how long until they will be (`Duration::MAX` when `tokens` exceeds the
    /// capacity: they never will).
    #[inline(always)]
    pub fn try_acquire(&self, tokens: u32) -> Result<(), RateLimited> {
        self.try_acquire_at(tokens, self.inner.clock.now())
    }

    /// [`try_acquire`](Self::try_acquire) at an explicit time, for tests
    /// and simulations that drive the clock themselves.
    #[inline(always)]
    pub fn try_acquire_at(&self, tokens: u32, now: Nanos) -> Result<(), RateLimited> {
        gcra::try_acquire(&self.inner.tat, &self.inner.rate, tokens, now)
    }

    /// Reserves `tokens` if they will be there within `max_wait`: the
    /// returned reservation's grant says how long to wait before using them.
    /// Waiters reserve in turn on one timeline, so together they never
    /// exceed the rate.
    #[inline]
    pub fn reserve(&self, tokens: u32, max_wait: Duration) -> Result<Reservation, RateLimited> {
        self.reserve_at(tokens, max_wait, self.inner.clock.now())
    }

    /// [`reserve`](Self::reserve) at an explicit time.
    #[inline]
    pub fn reserve_at(
        &self,
        tokens: u32,
        max_wait: Duration,
        now: Nanos,
    ) -> Result<Reservation, RateLimited> {
        gcra::reserve(&self.inner.tat, &self.inner.rate, tokens, max_wait, now)
    }

    /// Gives back a reservation that will not be used, if no later
    /// reservation was made since (see [`Limiter::cancel`]). Returns
    /// whether the tokens went back.
    pub fn cancel(&self, reservation: &Reservation) -> bool {
        gcra::cancel(&self.inner.tat, &self.inner.rate, reservation)
    }

    /// Waits until `tokens` are available and takes them.
    ///
    /// The reservation is made when this is called, so concurrent callers
    /// are served in the order they called. Fails at once when `tokens`
    /// exceeds the capacity. Dropping the future before it completes gives
    /// the tokens back when no later reservation was made.
    pub fn acquire(&self, tokens: u32) -> Acquire {
        match self.reserve(tokens, Duration::MAX) {
            Ok(reservation) => Acquire::waiting(self.clone(), (), reservation),
            Err(err) => Acquire::failed(err),
        }
    }

    /// How many handles (clones) of this bucket exist, this one included:
    /// a registry holding the only one may let the bucket go.
    // Hidden: for the registries of apiguard's facade (`HostLimits`,
    // `HostPaces`), which let go of what nobody else holds. Not covered by
    // semver.
    #[doc(hidden)]
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Tokens available now, with the fraction of the next one.
    pub fn available(&self) -> f64 {
        self.available_at(self.inner.clock.now())
    }

    /// [`available`](Self::available) at an explicit time.
    pub fn available_at(&self, now: Nanos) -> f64 {
        self.inner
            .rate
            .available(self.inner.tat.load(Ordering::Relaxed), now)
    }

    /// The capacity (burst size) in tokens.
    pub fn capacity(&self) -> u32 {
        self.inner.rate.capacity()
    }

    /// The refill rate, tokens per second, as configured.
    pub fn refill_per_sec(&self) -> f64 {
        self.inner.rate.refill_per_sec()
    }

    /// The quota as configured.
    pub fn quota(&self) -> Quota {
        self.inner.rate.quota()
    }

    /// The policy advertised in `RateLimit-Policy`: `capacity` tokens per
    /// the time an empty bucket takes to fill.
    pub fn policy(&self) -> QuotaPolicy {
        self.inner.rate.policy()
    }

    /// The clock this bucket reads.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }
}

impl Limiter<()> for TokenBucket {
    type Future = Ready<Result<Grant, RateLimited>>;

    fn reserve(&self, _key: &(), cost: u32, max_wait: Duration) -> Self::Future {
        ready(TokenBucket::reserve(self, cost, max_wait).map(|r| r.grant()))
    }

    #[inline]
    fn reserve_now(
        &self,
        _key: &(),
        cost: u32,
        max_wait: Duration,
    ) -> Option<Result<Reservation, RateLimited>> {
        Some(TokenBucket::reserve(self, cost, max_wait))
    }

    #[inline]
    fn take_now(&self, _key: &(), cost: u32) -> bool {
        self.try_acquire(cost).is_ok()
    }

    fn cancel(&self, _key: &(), reservation: &Reservation) {
        TokenBucket::cancel(self, reservation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::ManualClock;
    use tokio::time::{Instant, advance};

    #[test]
    fn bad_configuration_is_refused() {
        assert_eq!(
            TokenBucket::from_rate(0, 1.0).unwrap_err().field(),
            "capacity"
        );
        assert_eq!(
            TokenBucket::from_rate(1, f64::NAN).unwrap_err().field(),
            "refill_per_sec"
        );
        assert_eq!(
            TokenBucket::from_rate(1, -2.0).unwrap_err().field(),
            "refill_per_sec"
        );
    }

    #[test]
    fn starts_full_and_refills_at_the_rate() {
        let manual = ManualClock::new();
        let bucket = TokenBucket::from_rate(10, 2.0)
            .unwrap()
            .with_clock(manual.clock());
        assert_eq!(bucket.available(), 10.0);
        bucket.try_acquire(10).unwrap();
        let err = bucket.try_acquire(1).unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_millis(500)));
        assert_eq!(err.policy().unwrap().limit, 10);
        manual.advance(Duration::from_millis(250));
        assert_eq!(bucket.available(), 0.5);
        manual.advance(Duration::from_millis(750));
        assert_eq!(bucket.available(), 2.0);
        bucket.try_acquire(2).unwrap();
        assert!(bucket.try_acquire(1).is_err());
        // A long pause refills to capacity, not beyond.
        manual.advance(Duration::from_secs(3600));
        assert_eq!(bucket.available(), 10.0);
    }

    #[test]
    fn a_quota_gives_its_burst_then_its_rate_exactly() {
        let manual = ManualClock::new();
        let bucket = TokenBucket::new(Quota::per_minute(90).with_burst(3))
            .unwrap()
            .with_clock(manual.clock());
        assert_eq!(bucket.quota(), Quota::per_minute(90).with_burst(3));
        assert_eq!(bucket.capacity(), 3);
        bucket.try_acquire(3).unwrap();
        // 90 a minute is one token every 2/3 s: exact, so 3 000 tokens come
        // in exactly 2 000 s, never one early.
        let err = bucket.try_acquire(1).unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_nanos(666_666_667)));
        for _ in 0..1000 {
            manual.advance(Duration::from_secs(2));
            bucket.try_acquire(3).unwrap();
            assert!(bucket.try_acquire(1).is_err());
        }
    }

    #[test]
    fn a_quota_is_checked_when_the_bucket_is_built() {
        let field = |q: Quota| TokenBucket::new(q).unwrap_err().field();
        assert_eq!(field(Quota::per_second(0)), "limit");
        assert_eq!(field(Quota::per_second(1).with_burst(0)), "burst");
        assert_eq!(field(Quota::per_second(1).with_burst(1 << 33)), "burst");
    }

    #[test]
    fn more_than_capacity_is_refused_at_once() {
        let bucket = TokenBucket::from_rate(3, 1.0).unwrap();
        let err = bucket.try_acquire(4).unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::MAX));
        assert!(bucket.reserve(4, Duration::MAX).is_err());
        assert_eq!(bucket.available(), 3.0);
    }

    #[test]
    fn clones_share_one_bucket() {
        let bucket = TokenBucket::from_rate(2, 1.0).unwrap();
        let clone = bucket.clone();
        bucket.try_acquire(1).unwrap();
        clone.try_acquire(1).unwrap();
        assert!(bucket.try_acquire(1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_its_turn_in_order() {
        let bucket = TokenBucket::from_rate(1, 10.0).unwrap();
        let start = Instant::now();
        bucket.acquire(1).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        let a = bucket.acquire(1);
        let b = bucket.acquire(1);
        b.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        a.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_over_capacity_fails_instead_of_hanging() {
        let bucket = TokenBucket::from_rate(2, 1.0).unwrap();
        let err = bucket.acquire(3).await.unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_acquire_gives_its_tokens_back() {
        let bucket = TokenBucket::from_rate(1, 1.0).unwrap();
        bucket.try_acquire(1).unwrap();
        let waiting = bucket.acquire(1);
        assert!(bucket.available() < 0.0 + f64::EPSILON);
        drop(waiting);
        advance(Duration::from_secs(1)).await;
        assert!(
            bucket.try_acquire(1).is_ok(),
            "the dropped waiter's token is back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_drives_the_default_clock() {
        let bucket = TokenBucket::from_rate(5, 5.0).unwrap();
        bucket.try_acquire(5).unwrap();
        assert!(bucket.try_acquire(1).is_err());
        advance(Duration::from_millis(200)).await;
        bucket.try_acquire(1).unwrap();
        assert!(bucket.try_acquire(1).is_err());
    }
}
