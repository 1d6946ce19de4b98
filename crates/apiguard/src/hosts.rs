//! [`HostLimits`]: the per-host token buckets of a [`GuardLayer`](crate::GuardLayer).

use std::fmt;
use std::sync::Arc;

use apiguard_core::map::BoundedMap;
use apiguard_core::{Clock, InvalidConfig, Quota};
use apiguard_ratelimit::TokenBucket;

use crate::stack::HostScope;

/// The token buckets of a [`GuardLayer`](crate::GuardLayer), one per host.
///
/// Each host gets a bucket of the layer's capacity and refill rate. At
/// most `max_hosts` are tracked, in an
/// [`apiguard_core::map::BoundedMap`] (the map under every registry of
/// per-key state, with its one eviction rule): buckets that are full
/// again and that no request or service is using are let go when the map
/// sweeps (a full bucket holds nothing worth keeping). A host that still
/// finds no room shares one *overflow bucket* with every other such host
/// until room is made: a flood of new hosts can neither grow memory nor
/// reset the buckets of the hosts already tracked.
///
/// Services of the layer keep a handle on the bucket of the host they
/// called last, so a client that calls one host again and again finds its
/// bucket without a lookup; such a bucket is never let go while held.
/// A service that was given the overflow bucket for its host keeps it
/// while it keeps calling that host, even after room is made.
///
/// Clones share the buckets.
#[derive(Clone)]
pub struct HostLimits {
    inner: Arc<Inner>,
}

struct Inner {
    map: BoundedMap<HostScope, TokenBucket>,
    template: TokenBucket,
    clock: Clock,
}

impl fmt::Debug for HostLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLimits")
            .field("capacity", &self.capacity())
            .field("refill_per_sec", &self.refill_per_sec())
            .field("max_hosts", &self.max_hosts())
            .field("tracked", &self.len())
            .finish()
    }
}

impl HostLimits {
    pub(crate) fn new(quota: Quota, max_hosts: usize) -> Result<Self, InvalidConfig> {
        let template = TokenBucket::new(quota)?;
        let clock = template.clock().clone();
        Self::on_clock(template, max_hosts, clock)
    }

    fn on_clock(
        template: TokenBucket,
        max_hosts: usize,
        clock: Clock,
    ) -> Result<Self, InvalidConfig> {
        let overflow = TokenBucket::new(template.quota())?.with_clock(clock.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                map: BoundedMap::new(max_hosts, overflow).with_clock(clock.clone()),
                template,
                clock,
            }),
        })
    }

    #[cfg(test)]
    fn with_clock(self, clock: Clock) -> Self {
        let template = self.inner.template.clone();
        Self::on_clock(template, self.max_hosts(), clock)
            .unwrap_or_else(|_| unreachable!("the template's settings were checked"))
    }

    /// The bucket of `host`, made if need be (the overflow bucket when
    /// there is no room).
    #[inline]
    pub(crate) fn bucket(&self, host: &HostScope) -> TokenBucket {
        if let Some(b) = self.inner.map.get(host) {
            return b.clone();
        }
        self.new_bucket(host)
    }

    #[cold]
    fn new_bucket(&self, host: &HostScope) -> TokenBucket {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let capacity = f64::from(inner.template.capacity());
        // Idle: held by the map alone, and full again.
        let mut idle =
            |_: &HostScope, b: &TokenBucket| b.handles() == 1 && b.available_at(now) >= capacity;
        inner
            .map
            .get_or_insert_with(
                host,
                || {
                    TokenBucket::new(inner.template.quota())
                        .unwrap_or_else(|_| unreachable!("the template's settings were checked"))
                        .with_clock(inner.clock.clone())
                },
                Some(&mut idle),
            )
            .clone()
    }

    /// Tokens `host` has now (a host without a bucket has a full one).
    pub fn available(&self, host: &HostScope) -> f64 {
        match self.inner.map.get(host) {
            Some(b) => b.available(),
            None => f64::from(self.capacity()),
        }
    }

    /// Whether `host` has a bucket of its own.
    pub fn contains(&self, host: &HostScope) -> bool {
        self.inner.map.contains_key(host)
    }

    /// How many hosts have a bucket of their own.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Whether no host has one.
    pub fn is_empty(&self) -> bool {
        self.inner.map.is_empty()
    }

    /// The cap on hosts with a bucket of their own.
    pub fn max_hosts(&self) -> usize {
        self.inner.map.max_keys()
    }

    /// Each bucket's capacity (burst size).
    pub fn capacity(&self) -> u32 {
        self.inner.template.capacity()
    }

    /// Each bucket's refill rate, tokens per second.
    pub fn refill_per_sec(&self) -> f64 {
        self.inner.template.refill_per_sec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::ManualClock;
    use std::time::Duration;

    fn limits(capacity: u32, max_hosts: usize) -> (HostLimits, ManualClock) {
        let manual = ManualClock::new();
        let l = HostLimits::new(Quota::from_rate(capacity, 1.0), max_hosts)
            .unwrap()
            .with_clock(manual.clock());
        (l, manual)
    }

    fn host(name: &str) -> HostScope {
        Some(name.parse().unwrap())
    }

    #[test]
    fn each_host_has_its_own_bucket() {
        let (l, _clock) = limits(2, 10);
        l.bucket(&host("a")).try_acquire(2).unwrap();
        assert!(l.bucket(&host("a")).try_acquire(1).is_err());
        l.bucket(&host("b")).try_acquire(2).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l.available(&host("c")), 2.0);
    }

    #[test]
    fn a_full_registry_lets_go_of_refilled_buckets_and_keeps_the_rest() {
        let (l, clock) = limits(1, 2);
        l.bucket(&host("a")).try_acquire(1).unwrap();
        l.bucket(&host("b")).try_acquire(1).unwrap();
        // No room and nothing refilled: c shares the overflow bucket.
        l.bucket(&host("c")).try_acquire(1).unwrap();
        assert!(l.bucket(&host("d")).try_acquire(1).is_err());
        assert!(!l.contains(&host("c")));
        // a and b kept their (empty) buckets.
        assert!(l.bucket(&host("a")).try_acquire(1).is_err());
        // Once refilled, they make room for new hosts.
        clock.advance(Duration::from_secs(1));
        l.bucket(&host("e")).try_acquire(1).unwrap();
        assert!(l.contains(&host("e")));
        assert!(l.len() <= 2);
    }

    #[test]
    fn a_bucket_in_use_is_not_let_go() {
        let (l, clock) = limits(1, 1);
        let held = l.bucket(&host("a"));
        clock.advance(Duration::from_secs(1));
        let _ = l.bucket(&host("b"));
        assert!(l.contains(&host("a")));
        assert!(!l.contains(&host("b")));
        drop(held);
        clock.advance(Duration::from_secs(1));
        let _ = l.bucket(&host("b"));
        assert!(l.contains(&host("b")));
    }
}
