//! The local buckets of [`FailurePolicy::LocalShare`](crate::FailurePolicy).

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use apiguard_core::map::BoundedMap;
use apiguard_core::{Clock, Quota, QuotaPolicy};
use apiguard_ratelimit::TokenBucket;

use crate::limiter::{DecidedBy, Decision};

/// The most keys [`FailurePolicy::LocalShare`](crate::FailurePolicy) keeps
/// a local bucket for. Past it, full buckets are dropped first (a full
/// bucket is the same as a new one); if none is full, new keys share one
/// overflow bucket of the same share until there is room.
pub const LOCAL_MAX_KEYS: usize = 10_000;

/// One in-process bucket per key, each holding this instance's share of the
/// limit. Only used while Redis is away; the lock is written only when the
/// share changes, so decisions only read it.
pub(crate) struct LocalBuckets {
    quota: Quota,
    clock: Clock,
    /// `None`: the share is not known.
    share: RwLock<Option<Share>>,
}

struct Share {
    /// The bucket new keys copy.
    template: TokenBucket,
    buckets: BoundedMap<String, TokenBucket>,
}

impl LocalBuckets {
    pub(crate) fn new(quota: Quota, clock: Clock) -> Self {
        Self {
            quota,
            clock,
            share: RwLock::new(None),
        }
    }

    /// Forgets every local bucket and sizes new ones for `instances`
    /// instances (0: unknown, so the local share refuses everything).
    pub(crate) fn reset(&self, instances: u32) {
        let template = (instances > 0)
            .then(|| {
                let n = u64::from(instances);
                let capacity = u32::try_from((self.quota.burst() / n).max(1)).unwrap_or(u32::MAX);
                let per_sec = self.quota.refill_per_sec() / n as f64;
                // A rate this small or large was refused for the shared
                // quota already; should the division still fall outside
                // what a bucket takes, refusing is the safe answer.
                TokenBucket::from_rate(capacity, per_sec).ok()
            })
            .flatten();
        let share = template.map(|template| {
            let overflow = self.new_bucket(&template);
            Share {
                template,
                buckets: BoundedMap::new(LOCAL_MAX_KEYS, overflow).with_clock(self.clock.clone()),
            }
        });
        // A poisoned lock only means another thread panicked while
        // swapping shares; either share is valid.
        *self.share.write().unwrap_or_else(PoisonError::into_inner) = share;
    }

    /// A bucket of the share, empty: the shared bucket was most likely
    /// being drained when Redis went away, so the share grows from the rate
    /// alone and the fleet's burst is not spent twice.
    fn new_bucket(&self, template: &TokenBucket) -> TokenBucket {
        let b = template.clone().with_clock(self.clock.clone());
        let _ = b.try_acquire(b.capacity());
        b
    }

    pub(crate) fn decide(
        &self,
        key: &str,
        cost: u32,
        max_wait: Duration,
        policy: QuotaPolicy,
    ) -> Decision {
        let share = self.share.read().unwrap_or_else(PoisonError::into_inner);
        let Some(share) = &*share else {
            return Decision {
                allowed: false,
                wait: policy.window,
                remaining: 0,
                reset: policy.window,
                policy,
                decided_by: DecidedBy::LocalShare,
            };
        };
        let bucket = share.buckets.get_or_insert_with(
            key,
            || self.new_bucket(&share.template),
            Some(&mut |_, b: &TokenBucket| b.available() >= f64::from(b.capacity())),
        );
        let capacity = u64::from(bucket.capacity());
        match bucket.reserve(cost, max_wait) {
            Ok(reservation) => {
                let grant = reservation.grant();
                Decision {
                    allowed: true,
                    wait: grant.wait,
                    remaining: grant.remaining,
                    reset: reset(&bucket, capacity),
                    policy,
                    decided_by: DecidedBy::LocalShare,
                }
            }
            Err(refused) => Decision {
                allowed: false,
                wait: refused.retry_after().unwrap_or(policy.window),
                remaining: bucket.available() as u64,
                reset: reset(&bucket, capacity),
                policy,
                decided_by: DecidedBy::LocalShare,
            },
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let share = self.share.read().unwrap_or_else(PoisonError::into_inner);
        share.as_ref().map_or(0, |s| s.buckets.len())
    }
}

fn reset(bucket: &TokenBucket, capacity: u64) -> Duration {
    let missing = (capacity as f64 - bucket.available()).max(0.0);
    Duration::from_secs_f64(missing / bucket.refill_per_sec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::ManualClock;

    fn quota() -> QuotaPolicy {
        QuotaPolicy {
            limit: 100,
            window: Duration::from_secs(1),
        }
    }

    fn admitted(local: &LocalBuckets, key: &str) -> usize {
        (0..100)
            .filter(|_| local.decide(key, 1, Duration::ZERO, quota()).allowed)
            .count()
    }

    #[test]
    fn each_instance_gets_its_share_of_the_rate_starting_empty() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(Quota::per_second(100), clock.clock());
        local.reset(4);
        assert_eq!(admitted(&local, "k"), 0, "a new local bucket starts empty");
        // The share refills at limit / instances: 25 per second.
        clock.advance(Duration::from_millis(400));
        assert_eq!(admitted(&local, "k"), 10);
        // And holds at most burst / instances.
        clock.advance(Duration::from_secs(10));
        assert_eq!(admitted(&local, "k"), 25);
    }

    #[test]
    fn an_unknown_share_refuses() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(Quota::per_second(100), clock.clock());
        assert_eq!(admitted(&local, "k"), 0);
        local.reset(0);
        clock.advance(Duration::from_secs(10));
        assert_eq!(admitted(&local, "k"), 0);
    }

    #[test]
    fn keys_have_their_own_local_buckets_and_reset_forgets_them() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(Quota::per_second(10), clock.clock());
        local.reset(10);
        clock.advance(Duration::from_secs(1));
        // "a" was made before the second passed: one token since.
        local.decide("a", 1, Duration::ZERO, quota());
        clock.advance(Duration::from_secs(1));
        assert!(local.decide("a", 1, Duration::ZERO, quota()).allowed);
        assert!(!local.decide("a", 1, Duration::ZERO, quota()).allowed);
        assert!(!local.decide("b", 1, Duration::ZERO, quota()).allowed);
        assert_eq!(local.len(), 2);
        local.reset(10);
        assert_eq!(local.len(), 0);
    }

    #[test]
    fn the_map_stays_bounded() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(Quota::per_second(10), clock.clock());
        local.reset(1);
        for i in 0..LOCAL_MAX_KEYS + 10 {
            local.decide(&i.to_string(), 1, Duration::ZERO, quota());
        }
        // No bucket refilled, so none was dropped: the last keys share the
        // overflow bucket.
        assert_eq!(local.len(), LOCAL_MAX_KEYS);
        // Once buckets are full again, a new key's sweep makes room.
        clock.advance(Duration::from_secs(10));
        local.decide("new", 1, Duration::ZERO, quota());
        assert_eq!(local.len(), 1);
    }
}
