//! Tokens taken from Redis ahead of need and handed out locally
//! ([`RedisLimiterBuilder::lease`](crate::RedisLimiterBuilder::lease)).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use apiguard_core::Nanos;

/// The most keys leases are kept for; past it, expired leases are dropped
/// first, then all of them (their tokens are lost, never duplicated).
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Lease {
    tokens: u64,
    /// Local time after which the tokens are no longer handed out.
    expires: Nanos,
    /// What Redis said was left when the lease was taken.
    remaining: u64,
    /// And when it said the bucket would be full again.
    reset: Duration,
}

/// Leased tokens per key. The mutex is held for a map lookup and an
/// increment, never across an await.
#[derive(Debug)]
pub(crate) struct Leases {
    size: u32,
    max_age: Nanos,
    map: Mutex<HashMap<String, Lease>>,
}

impl Leases {
    pub(crate) fn new(size: u32, max_age: Nanos) -> Self {
        Self {
            size,
            max_age,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The extra tokens to ask Redis for.
    pub(crate) fn size(&self) -> u32 {
        self.size
    }

    /// Takes `cost` leased tokens of `key` if there are enough, unexpired;
    /// returns what is left (leased and, as last seen, in Redis) and the
    /// reset Redis last gave.
    pub(crate) fn take(&self, key: &str, cost: u32, now: Nanos) -> Option<(u64, Duration)> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let lease = map.get_mut(key)?;
        if now >= lease.expires || lease.tokens < u64::from(cost) {
            return None;
        }
        lease.tokens -= u64::from(cost);
        Some((lease.tokens + lease.remaining, lease.reset))
    }

    /// Adds `tokens` Redis granted beyond the request to `key`'s lease.
    pub(crate) fn add(&self, key: &str, tokens: u64, remaining: u64, reset: Duration, now: Nanos) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            map.retain(|_, l| l.expires > now && l.tokens > 0);
            if map.len() >= MAX_KEYS {
                map.clear();
            }
        }
        let expires = now.saturating_add(self.max_age);
        let lease = map.entry(key.to_owned()).or_insert(Lease {
            tokens: 0,
            expires,
            remaining,
            reset,
        });
        if lease.expires <= now {
            lease.tokens = 0;
        }
        lease.tokens += tokens;
        lease.expires = expires;
        lease.remaining = remaining;
        lease.reset = reset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Duration = Duration::from_millis(7);

    #[test]
    fn leased_tokens_are_handed_out_once_and_expire() {
        let leases = Leases::new(4, 100);
        assert_eq!(leases.take("k", 1, 0), None);
        leases.add("k", 4, 10, R, 0);
        assert_eq!(leases.take("k", 3, 10), Some((11, R)));
        assert_eq!(leases.take("k", 2, 10), None, "only one left");
        assert_eq!(leases.take("k", 1, 10), Some((10, R)));
        assert_eq!(leases.take("k", 1, 10), None);
        leases.add("k", 4, 6, R, 20);
        assert_eq!(leases.take("k", 1, 120), None, "expired at 120");
        // A new lease on an expired one does not revive the old tokens.
        leases.add("k", 1, 5, R, 200);
        assert_eq!(leases.take("k", 1, 201), Some((5, R)));
        assert_eq!(leases.take("k", 1, 201), None);
    }

    #[test]
    fn the_map_stays_bounded() {
        let leases = Leases::new(1, 100);
        for i in 0..MAX_KEYS + 10 {
            leases.add(&i.to_string(), 1, 0, R, 0);
        }
        assert!(leases.map.lock().unwrap().len() <= MAX_KEYS);
    }
}
