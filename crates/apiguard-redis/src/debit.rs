//! Tokens admitted without Redis, per key, owed to the shared bucket.
//!
//! Redis never saw them, so when it answers again it would grant its
//! saved-up burst on top of them. Each key's debt goes with that key's next
//! decision Redis runs, which takes the tokens from the bucket (never below
//! empty).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The most keys a debt is kept for; past it, debts are forgotten (the
/// fleet may then get one burst more, as without debts).
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct Debits {
    /// Keys with a debt: lets healthy decisions skip the lock.
    keys: AtomicUsize,
    map: Mutex<HashMap<String, u64>>,
}

impl Debits {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `tokens` more of `key` were admitted without Redis.
    pub(crate) fn add(&self, key: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let mut map = self.lock();
        if let Some(t) = map.get_mut(key) {
            *t += tokens;
            return;
        }
        if map.len() >= MAX_KEYS {
            map.clear();
        }
        map.insert(key.to_owned(), tokens);
        self.keys.store(map.len(), Ordering::Relaxed);
    }

    /// Takes `key`'s debt, to send with its decision.
    pub(crate) fn take(&self, key: &str) -> u64 {
        if self.keys.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let mut map = self.lock();
        let t = map.remove(key).unwrap_or(0);
        self.keys.store(map.len(), Ordering::Relaxed);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debt_is_taken_once_per_key_and_can_be_given_back() {
        let d = Debits::default();
        assert_eq!(d.take("a"), 0);
        d.add("a", 2);
        d.add("a", 3);
        d.add("b", 1);
        assert_eq!(d.take("a"), 5);
        assert_eq!(d.take("a"), 0);
        // A decision that did not reach Redis gives it back.
        d.add("a", 5);
        assert_eq!(d.take("a"), 5);
        assert_eq!(d.take("b"), 1);
        assert_eq!(d.keys.load(Ordering::Relaxed), 0);
    }
}
