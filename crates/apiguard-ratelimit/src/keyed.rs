//! The registry of per-key buckets.

use std::fmt;
use std::future::{Ready, ready};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use apiguard_core::map::{BoundedMap, Idle};
use apiguard_core::{Clock, InvalidConfig, Nanos, Quota, QuotaPolicy, RateLimited};
use dashmap::DashMap;

/// foldhash with a per-map random seed: keys are often chosen by clients
/// (addresses, API keys), so the seed keeps collisions unpredictable, and it
/// hashes a key several times faster than std's SipHash (the `scale` bench).
type Hasher = foldhash::fast::RandomState;

use crate::future::Acquire;
use crate::gcra::{self, Rate};
use crate::limiter::{Grant, Limiter, Reservation};
use crate::sync::{AtomicU64, Ordering};

use std::sync::atomic::Ordering as StdOrdering;

/// The default cap on tracked keys.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// One bucket per key, with memory that bounds itself.
///
/// ```
/// use apiguard_core::Quota;
/// use apiguard_ratelimit::KeyedLimiter;
///
/// let users = KeyedLimiter::new(Quota::per_second(1).with_burst(2))?.with_max_keys(10_000);
/// users.try_acquire(&"alice", 2).unwrap();
/// assert!(users.try_acquire(&"alice", 1).is_err());
/// assert!(users.try_acquire(&"bob", 1).is_ok()); // bob has his own bucket
/// # Ok::<(), apiguard_core::InvalidConfig>(())
/// ```
///
/// # Memory
///
/// The buckets live in a [`BoundedMap`], whose one eviction rule this
/// is: a full bucket behaves exactly like a key never seen, so full
/// buckets are the idle entries, dropped as the map is used (when a new
/// key arrives and the map has grown to twice its size after the last
/// sweep, or reached `max_keys`). Sweeps are skipped until the earliest
/// instant a tracked bucket can be full again. There is no background
/// task.
///
/// `len()` never exceeds `max_keys`. When the map is at `max_keys` and no
/// tracked bucket is full, a new key is not tracked: it shares one
/// *overflow bucket* (with the default quota) with every other untracked
/// key, until sweeps make room. So a flood of new keys can neither grow
/// memory nor evict the buckets of keys already tracked — their limits hold
/// — and the flood itself is limited as if it came from one key.
///
/// Keys given a quota of their own ([`set_quota`](Self::set_quota)) are
/// held apart, one bucket each for as long as the override stands; they
/// are neither swept nor counted in `len()`.
///
/// # Clone
///
/// A clone is a handle to the same registry.
pub struct KeyedLimiter<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for KeyedLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K> {
    // DashMap over papaya and scc: measured on the target 2-core VM with a
    // lookup + CAS per decision (ns per op per thread, 1k keys, 1/2/8 threads:
    // dashmap 17.6/37.5/344, papaya 26.1/29.9/165, scc 23.8/42.6/193; 1M keys:
    // dashmap 160/392/1432, papaya 251/274/4340, scc 207/452/3452). DashMap
    // wins the uncontended case that dominates, and is what governor uses.
    // `BoundedMap` is a DashMap with a cap. A bucket of the default quota
    // is its TAT alone: 8 bytes beside the key. The overflow entry is the
    // bucket untracked keys share.
    map: BoundedMap<K, AtomicU64>,
    rate: Rate,
    clock: Clock,
    overrides: DashMap<K, Override, Hasher>,
    override_count: AtomicUsize,
    /// No bucket is full before this instant (a lower bound: lowered as
    /// buckets are created, raised by sweeps).
    first_full: std::sync::atomic::AtomicU64,
}

/// The bucket of a key with a quota of its own.
struct Override {
    tat: AtomicU64,
    rate: Rate,
}

impl<K> fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("capacity", &self.inner.rate.capacity())
            .field("refill_per_sec", &self.inner.rate.refill_per_sec())
            .field("max_keys", &self.inner.map.max_keys())
            .field("tracked", &self.inner.map.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A registry whose buckets each get `quota`, tracking at most
    /// [`DEFAULT_MAX_KEYS`] keys. Refuses what
    /// [`TokenBucket::new`](crate::TokenBucket::new) refuses.
    pub fn new(quota: Quota) -> Result<Self, InvalidConfig> {
        Ok(Self::build(
            Rate::from_quota(quota)?,
            DEFAULT_MAX_KEYS,
            Clock::system(),
        ))
    }

    /// APIGuard's terms: buckets of `capacity` tokens refilled at
    /// `refill_per_sec`; the same as
    /// `new(Quota::from_rate(capacity, refill_per_sec))`.
    pub fn from_rate(capacity: u32, refill_per_sec: f64) -> Result<Self, InvalidConfig> {
        Ok(Self::build(
            Rate::new(capacity, refill_per_sec)?,
            DEFAULT_MAX_KEYS,
            Clock::system(),
        ))
    }

    fn build(rate: Rate, max_keys: usize, clock: Clock) -> Self {
        let overflow = rate.full_at(clock.now());
        Self {
            inner: Arc::new(Inner {
                map: BoundedMap::new(max_keys, AtomicU64::new(overflow)).with_clock(clock.clone()),
                rate,
                clock,
                overrides: DashMap::with_hasher(Hasher::default()),
                override_count: AtomicUsize::new(0),
                first_full: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Tracks at most `max_keys` keys (see *Memory* above; `0` tracks none:
    /// every key shares the overflow bucket). Configure before use: the
    /// returned registry starts empty and shares nothing with `self`.
    pub fn with_max_keys(self, max_keys: usize) -> Self {
        Self::build(self.inner.rate, max_keys, self.inner.clock.clone())
    }

    /// Reads time from `clock` (a [`ManualClock`](apiguard_core::ManualClock)
    /// in tests). Configure before use: the returned registry starts empty.
    pub fn with_clock(self, clock: Clock) -> Self {
        Self::build(self.inner.rate, self.inner.map.max_keys(), clock)
    }

    /// Gives `key` its own quota instead of the default one. The tokens it
    /// has spent stay spent (decisions racing with this call may be lost:
    /// it is meant for configuration, not for every request).
    pub fn set_quota(&self, key: K, quota: Quota) -> Result<(), InvalidConfig> {
        let rate = Rate::from_quota(quota)?;
        let inner = &*self.inner;
        let full_time = if let Some(tat) = inner.map.remove(&key) {
            Some(inner.rate.full_time(tat.load(Ordering::Relaxed)))
        } else {
            inner
                .overrides
                .get(&key)
                .map(|o| o.rate.full_time(o.tat.load(Ordering::Relaxed)))
        };
        // TAT 0 is a full bucket at any time.
        let tat = full_time.map_or(0, |t| rate.units(t));
        let bucket = Override {
            tat: AtomicU64::new(tat),
            rate,
        };
        if inner.overrides.insert(key, bucket).is_none() {
            inner.override_count.fetch_add(1, StdOrdering::Relaxed);
        }
        Ok(())
    }

    /// Returns `key` to the default quota, with a full bucket.
    pub fn remove_quota(&self, key: &K) {
        if self.inner.overrides.remove(key).is_some() {
            self.inner.override_count.fetch_sub(1, StdOrdering::Relaxed);
        }
    }

    /// The quota `key` gets.
    pub fn quota_of(&self, key: &K) -> Quota {
        match self.overridden(key) {
            Some(o) => o.rate.quota(),
            None => self.inner.rate.quota(),
        }
    }

    /// The policy `key`'s refusals advertise (`RateLimit-Policy`).
    pub fn policy_of(&self, key: &K) -> QuotaPolicy {
        match self.overridden(key) {
            Some(o) => o.rate.policy(),
            None => self.inner.rate.policy(),
        }
    }

    #[inline]
    fn overridden(&self, key: &K) -> Option<dashmap::mapref::one::Ref<'_, K, Override>> {
        if self.inner.override_count.load(StdOrdering::Relaxed) == 0 {
            return None;
        }
        self.inner.overrides.get(key)
    }

    /// Takes `tokens` from `key`'s bucket if they are there now.
    #[inline]
    pub fn try_acquire(&self, key: &K, tokens: u32) -> Result<(), RateLimited> {
        self.try_acquire_at(key, tokens, self.inner.clock.now())
    }

    /// [`try_acquire`](Self::try_acquire) at an explicit time.
    #[inline]
    pub fn try_acquire_at(&self, key: &K, tokens: u32, now: Nanos) -> Result<(), RateLimited> {
        self.with_bucket(key, now, |tat, rate| {
            gcra::try_acquire(tat, rate, tokens, now)
        })
        .0
    }

    /// Reserves `tokens` from `key`'s bucket if they will be there within
    /// `max_wait` (see [`TokenBucket::reserve`](crate::TokenBucket::reserve)).
    #[inline]
    pub fn reserve(
        &self,
        key: &K,
        tokens: u32,
        max_wait: Duration,
    ) -> Result<Reservation, RateLimited> {
        self.reserve_at(key, tokens, max_wait, self.inner.clock.now())
    }

    /// [`reserve`](Self::reserve) at an explicit time.
    #[inline]
    pub fn reserve_at(
        &self,
        key: &K,
        tokens: u32,
        max_wait: Duration,
        now: Nanos,
    ) -> Result<Reservation, RateLimited> {
        let (res, shared) = self.with_bucket(key, now, |tat, rate| {
            gcra::reserve(tat, rate, tokens, max_wait, now)
        });
        if shared {
            res.map(Reservation::on_shared_bucket)
        } else {
            res
        }
    }

    /// Gives back a reservation that will not be used, when no later one was
    /// made on the same bucket. Returns whether the tokens went back.
    pub fn cancel(&self, key: &K, reservation: &Reservation) -> bool {
        let inner = &*self.inner;
        if reservation.is_shared() {
            return gcra::cancel(inner.map.overflow(), &inner.rate, reservation);
        }
        if let Some(tat) = inner.map.get(key) {
            return gcra::cancel(&tat, &inner.rate, reservation);
        }
        match self.overridden(key) {
            Some(o) => gcra::cancel(&o.tat, &o.rate, reservation),
            None => false,
        }
    }

    /// Waits until `tokens` are available in `key`'s bucket and takes them
    /// (see [`TokenBucket::acquire`](crate::TokenBucket::acquire)).
    pub fn acquire(&self, key: &K, tokens: u32) -> Acquire<Self, K> {
        match self.reserve(key, tokens, Duration::MAX) {
            Ok(reservation) => Acquire::waiting(self.clone(), key.clone(), reservation),
            Err(err) => Acquire::failed(err),
        }
    }

    /// Tokens available to `key` now.
    pub fn available(&self, key: &K) -> f64 {
        let now = self.inner.clock.now();
        if let Some(tat) = self.inner.map.get(key) {
            return self.inner.rate.available(tat.load(Ordering::Relaxed), now);
        }
        match self.overridden(key) {
            Some(o) => o.rate.available(o.tat.load(Ordering::Relaxed), now),
            None => f64::from(self.inner.rate.capacity()),
        }
    }

    /// Keys tracked now with the default quota (never more than
    /// `max_keys`; keys with a quota of their own are held apart).
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Whether no key is tracked with the default quota.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cap on tracked keys.
    pub fn max_keys(&self) -> usize {
        self.inner.map.max_keys()
    }

    /// Whether `key` has a bucket of its own now (a key whose bucket filled
    /// up may have been forgotten: that changes nothing for it).
    pub fn contains(&self, key: &K) -> bool {
        self.inner.map.contains_key(key) || self.overridden(key).is_some()
    }

    /// Forgets `key`'s spent tokens: its next request finds a full bucket.
    /// Returns whether it had a bucket.
    pub fn remove(&self, key: &K) -> bool {
        let removed = self.inner.map.remove(key).is_some();
        match self.overridden(key) {
            Some(o) => {
                o.tat.store(0, Ordering::Relaxed);
                true
            }
            None => removed,
        }
    }

    /// Forgets every key's spent tokens (quota overrides stay).
    pub fn clear(&self) {
        self.inner.map.clear();
        for o in self.inner.overrides.iter() {
            o.tat.store(0, Ordering::Relaxed);
        }
    }

    /// The default capacity of a bucket.
    pub fn capacity(&self) -> u32 {
        self.inner.rate.capacity()
    }

    /// The default refill rate, tokens per second.
    pub fn refill_per_sec(&self) -> f64 {
        self.inner.rate.refill_per_sec()
    }

    /// Runs `decide` on `key`'s bucket, creating it (full) if needed; the
    /// flag says the overflow bucket was used.
    #[inline]
    fn with_bucket<T>(
        &self,
        key: &K,
        now: Nanos,
        decide: impl Fn(&AtomicU64, &Rate) -> T,
    ) -> (T, bool) {
        let inner = &*self.inner;
        if let Some(tat) = inner.map.get(key) {
            return (decide(&tat, &inner.rate), false);
        }
        self.with_new_bucket(key, now, decide)
    }

    #[cold]
    fn with_new_bucket<T>(
        &self,
        key: &K,
        now: Nanos,
        decide: impl Fn(&AtomicU64, &Rate) -> T,
    ) -> (T, bool) {
        let inner = &*self.inner;
        if let Some(o) = self.overridden(key) {
            return (decide(&o.tat, &o.rate), false);
        }
        let rate = &inner.rate;
        // A sweep drops full buckets, and notes when the first one it
        // keeps will be full; none can be before `first_full`.
        let (mut removed, mut kept, mut earliest_full) = (0usize, 0usize, Nanos::MAX);
        let mut idle = |_: &K, tat: &AtomicU64| {
            let tat = tat.load(Ordering::Relaxed);
            if rate.is_full(tat, now) {
                removed += 1;
                true
            } else {
                kept += 1;
                earliest_full = earliest_full.min(rate.full_time(tat));
                false
            }
        };
        let may_sweep = now >= inner.first_full.load(StdOrdering::Relaxed);
        let slot = inner.map.get_or_insert_with(
            key,
            || AtomicU64::new(rate.full_at(now)),
            may_sweep.then_some(&mut idle as Idle<'_, K, AtomicU64>),
        );
        if removed + kept > 0 {
            // A bucket created while the sweep ran may have lowered the
            // bound; overwriting it only delays reclaiming, never loses a
            // limit.
            inner.first_full.store(earliest_full, StdOrdering::Relaxed);
            tracing::trace!(target: "apiguard::ratelimit", removed, kept, "swept full buckets");
        }
        let decision = decide(&slot, rate);
        if slot.is_overflow() {
            return (decision, true);
        }
        let full = rate.full_time(slot.load(Ordering::Relaxed));
        inner.first_full.fetch_min(full, StdOrdering::Relaxed);
        (decision, false)
    }
}

impl<K: Hash + Eq + Clone> Limiter<K> for KeyedLimiter<K> {
    type Future = Ready<Result<Grant, RateLimited>>;

    fn reserve(&self, key: &K, cost: u32, max_wait: Duration) -> Self::Future {
        ready(KeyedLimiter::reserve(self, key, cost, max_wait).map(|r| r.grant()))
    }

    #[inline]
    fn reserve_now(
        &self,
        key: &K,
        cost: u32,
        max_wait: Duration,
    ) -> Option<Result<Reservation, RateLimited>> {
        Some(KeyedLimiter::reserve(self, key, cost, max_wait))
    }

    /// The admit path without a [`Grant`]: a reservation's wait, tokens
    /// left and policy cost two divisions the admitted request never reads.
    #[inline]
    fn take_now(&self, key: &K, cost: u32) -> bool {
        self.try_acquire(key, cost).is_ok()
    }

    fn cancel(&self, key: &K, reservation: &Reservation) {
        KeyedLimiter::cancel(self, key, reservation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::ManualClock;

    fn limiter(capacity: u32, rate: f64, max_keys: usize) -> (KeyedLimiter<u64>, ManualClock) {
        let manual = ManualClock::new();
        let limiter = KeyedLimiter::from_rate(capacity, rate)
            .unwrap()
            .with_max_keys(max_keys)
            .with_clock(manual.clock());
        (limiter, manual)
    }

    #[test]
    fn take_now_takes_what_is_there_and_a_refusal_takes_nothing() {
        let (l, clock) = limiter(2, 1.0, 100);
        l.set_quota(7, Quota::per_second(1).with_burst(1)).unwrap();
        assert!(Limiter::take_now(&l, &1, 2));
        assert!(!Limiter::take_now(&l, &1, 1));
        // The key with its own quota holds one token, not the default two.
        assert!(Limiter::take_now(&l, &7, 1));
        assert!(!Limiter::take_now(&l, &7, 1));
        assert!(!Limiter::take_now(&l, &2, 3), "more than the capacity");
        clock.advance(Duration::from_secs(1));
        // One token came back; had a refusal taken one, none would be here.
        assert!(Limiter::take_now(&l, &1, 1));
        assert!(!Limiter::take_now(&l, &1, 1));
        assert!(
            Limiter::take_now(&l, &2, 2),
            "a refused key kept its tokens"
        );
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let (l, _clock) = limiter(2, 1.0, 100);
        l.try_acquire(&1, 2).unwrap();
        assert!(l.try_acquire(&1, 1).is_err());
        l.try_acquire(&2, 2).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.contains(&1));
    }

    #[test]
    fn full_buckets_are_reclaimed_as_the_map_is_used() {
        let (l, clock) = limiter(1, 1.0, 1_000_000);
        for k in 0..1000 {
            l.try_acquire(&k, 1).unwrap();
        }
        assert_eq!(l.len(), 1000);
        // Once every bucket has refilled, new keys sweep the old ones out.
        clock.advance(Duration::from_secs(1));
        for k in 1000..1200 {
            l.try_acquire(&k, 1).unwrap();
        }
        assert!(l.len() <= 200, "len {}", l.len());
        assert!(!l.contains(&0));
    }

    #[test]
    fn a_full_map_sends_new_keys_to_the_overflow_bucket_and_keeps_tracked_limits() {
        let (l, _clock) = limiter(3, 1.0, 10);
        l.try_acquire(&0, 2).unwrap();
        for k in 1..10 {
            l.try_acquire(&k, 1).unwrap();
        }
        assert_eq!(l.len(), 10);
        // Untracked keys share one bucket of capacity 3.
        for k in 10..13 {
            l.try_acquire(&k, 1).unwrap();
        }
        assert!(l.try_acquire(&13, 1).is_err());
        assert_eq!(l.len(), 10);
        // Key 0 kept its count: one token left, not a fresh bucket.
        l.try_acquire(&0, 1).unwrap();
        assert!(l.try_acquire(&0, 1).is_err());
    }

    #[test]
    fn zero_max_keys_tracks_nothing() {
        let (l, _clock) = limiter(1, 1.0, 0);
        l.try_acquire(&1, 1).unwrap();
        assert!(l.try_acquire(&2, 1).is_err());
        assert!(l.is_empty());
    }

    #[test]
    fn overridden_keys_are_held_apart_from_the_cap_and_the_sweeps() {
        let (l, clock) = limiter(1, 1.0, 2);
        l.set_quota(9, Quota::from_rate(3, 1.0)).unwrap();
        l.try_acquire(&1, 1).unwrap();
        l.try_acquire(&2, 1).unwrap();
        // The map is at its cap, yet 9 has its own bucket.
        for _ in 0..3 {
            l.try_acquire(&9, 1).unwrap();
        }
        assert!(l.try_acquire(&9, 1).is_err());
        assert_eq!(l.len(), 2);
        assert!(l.contains(&9));
        clock.advance(Duration::from_secs(1));
        l.try_acquire(&9, 1).unwrap();
        l.remove_quota(&9);
        assert_eq!(l.quota_of(&9).burst(), 1);
    }

    #[test]
    fn quota_override_applies_to_its_key_only() {
        let (l, _clock) = limiter(1, 1.0, 100);
        l.set_quota(7, Quota::per_second(1).with_burst(5)).unwrap();
        for _ in 0..5 {
            l.try_acquire(&7, 1).unwrap();
        }
        assert!(l.try_acquire(&7, 1).is_err());
        assert_eq!(l.quota_of(&7).burst(), 5);
        l.try_acquire(&8, 1).unwrap();
        assert!(l.try_acquire(&8, 1).is_err());
        assert!(l.set_quota(9, Quota::per_second(0)).is_err());
    }

    #[test]
    fn override_on_a_tracked_key_keeps_its_spent_tokens() {
        let (l, _clock) = limiter(2, 1.0, 100);
        l.try_acquire(&1, 2).unwrap();
        l.set_quota(1, Quota::from_rate(4, 1.0)).unwrap();
        l.try_acquire(&1, 2).unwrap();
        assert!(l.try_acquire(&1, 1).is_err());
    }

    #[test]
    fn remove_and_clear_forget_buckets() {
        let (l, _clock) = limiter(1, 1.0, 100);
        l.try_acquire(&1, 1).unwrap();
        l.try_acquire(&2, 1).unwrap();
        assert!(l.remove(&1));
        l.try_acquire(&1, 1).unwrap();
        l.clear();
        assert!(l.is_empty());
        l.try_acquire(&2, 1).unwrap();
    }

    #[test]
    fn cancel_gives_back_the_last_reservation_of_a_key() {
        let (l, _clock) = limiter(1, 1.0, 100);
        l.try_acquire(&1, 1).unwrap();
        let r = l.reserve(&1, 1, Duration::from_secs(2)).unwrap();
        assert_eq!(r.grant().wait, Duration::from_secs(1));
        assert!(l.cancel(&1, &r));
        let again = l.reserve(&1, 1, Duration::from_secs(2)).unwrap();
        assert_eq!(again.grant().wait, Duration::from_secs(1));
    }
}
