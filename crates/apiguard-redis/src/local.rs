//! The local buckets of [`FailurePolicy::LocalBucket`](crate::FailurePolicy).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use apiguard_core::{Clock, InvalidConfig, Quota};
use apiguard_ratelimit::TokenBucket;

use crate::limiter::{DecidedBy, Decision};

/// The most keys [`FailurePolicy::LocalBucket`](crate::FailurePolicy) keeps
/// a local bucket for. Past it, full buckets (which are the same as no
/// bucket) are dropped first, then all of them: a key that loses its bucket
/// starts again from a full local share.
pub const LOCAL_MAX_KEYS: usize = 10_000;

/// One in-process bucket per key, each holding this instance's share of the
/// limit. Only used while Redis is away, so a mutex is fine here: it is
/// never on the path of a healthy decision.
pub(crate) struct LocalBuckets {
    template: TokenBucket,
    clock: Clock,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl LocalBuckets {
    pub(crate) fn new(
        limit: u64,
        window: Duration,
        burst: u64,
        expected_instances: u32,
        clock: Clock,
    ) -> Result<Self, InvalidConfig> {
        let n = u64::from(expected_instances.max(1));
        let capacity = u32::try_from((burst / n).max(1)).unwrap_or(u32::MAX);
        let per_sec = limit as f64 / window.as_secs_f64() / n as f64;
        let template = TokenBucket::new(capacity, per_sec)
            .map_err(|e| InvalidConfig::new("expected_instances", e.to_string()))?;
        Ok(Self {
            template,
            clock,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn decide(
        &self,
        key: &str,
        cost: u32,
        max_wait: Duration,
        quota: Quota,
    ) -> Decision {
        let bucket = self.bucket(key);
        let capacity = u64::from(bucket.capacity());
        match bucket.reserve(cost, max_wait) {
            Ok(reservation) => {
                let grant = reservation.grant();
                Decision {
                    allowed: true,
                    wait: grant.wait,
                    remaining: grant.remaining,
                    reset: reset(&bucket, capacity),
                    quota,
                    decided_by: DecidedBy::LocalBucket,
                }
            }
            Err(refused) => Decision {
                allowed: false,
                wait: refused.retry_after().unwrap_or(quota.window),
                remaining: bucket.available() as u64,
                reset: reset(&bucket, capacity),
                quota,
                decided_by: DecidedBy::LocalBucket,
            },
        }
    }

    fn bucket(&self, key: &str) -> TokenBucket {
        // A poisoned map only means another thread panicked mid-insert; the
        // buckets in it are still valid.
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(key) {
            return b.clone();
        }
        if map.len() >= LOCAL_MAX_KEYS {
            map.retain(|_, b| b.available() < f64::from(b.capacity()));
            if map.len() >= LOCAL_MAX_KEYS {
                map.clear();
            }
        }
        let b = self.template.clone().with_clock(self.clock.clone());
        map.insert(key.to_owned(), b.clone());
        b
    }

    /// Forgets every local bucket (Redis is back and holds the truth).
    pub(crate) fn clear(&self) {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
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

    fn quota() -> Quota {
        Quota {
            limit: 100,
            window: Duration::from_secs(1),
        }
    }

    #[test]
    fn each_instance_gets_its_share_of_the_burst() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(100, Duration::from_secs(1), 100, 4, clock.clock()).unwrap();
        let admitted = (0..100)
            .filter(|_| local.decide("k", 1, Duration::ZERO, quota()).allowed)
            .count();
        assert_eq!(admitted, 25);
        // The share refills at limit / instances: 25 per second.
        clock.advance(Duration::from_millis(400));
        let admitted = (0..100)
            .filter(|_| local.decide("k", 1, Duration::ZERO, quota()).allowed)
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn keys_have_their_own_local_buckets_and_clear_forgets_them() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(10, Duration::from_secs(1), 10, 10, clock.clock()).unwrap();
        assert!(local.decide("a", 1, Duration::ZERO, quota()).allowed);
        assert!(!local.decide("a", 1, Duration::ZERO, quota()).allowed);
        assert!(local.decide("b", 1, Duration::ZERO, quota()).allowed);
        assert_eq!(local.len(), 2);
        local.clear();
        assert_eq!(local.len(), 0);
        assert!(local.decide("a", 1, Duration::ZERO, quota()).allowed);
    }

    #[test]
    fn the_map_stays_bounded() {
        let clock = ManualClock::new();
        let local = LocalBuckets::new(10, Duration::from_secs(1), 10, 1, clock.clock()).unwrap();
        for i in 0..LOCAL_MAX_KEYS + 10 {
            local.decide(&i.to_string(), 1, Duration::ZERO, quota());
        }
        assert!(local.len() <= LOCAL_MAX_KEYS);
    }
}
