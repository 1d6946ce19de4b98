//! Warnings about an unreachable Redis, at most one per period.

use std::sync::atomic::{AtomicU64, Ordering};

use apiguard_core::Nanos;

/// Warnings are logged at most this often per gate; the ones in between are
/// counted in the next warning.
pub(crate) const WARN_EVERY: Nanos = 10_000_000_000;

/// Lets one warning through per [`WARN_EVERY`], so a dead Redis under load
/// does not flood the logs.
#[derive(Debug, Default)]
pub(crate) struct WarnGate {
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnGate {
    /// `Some(warnings swallowed since the last one)` when this one may be
    /// logged.
    pub(crate) fn check(&self, now: Nanos) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.saturating_add(WARN_EVERY),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_period_and_the_rest_are_counted() {
        let gate = WarnGate::default();
        assert_eq!(gate.check(0), Some(0));
        assert_eq!(gate.check(1), None);
        assert_eq!(gate.check(WARN_EVERY - 1), None);
        assert_eq!(gate.check(WARN_EVERY), Some(2));
        assert_eq!(gate.check(WARN_EVERY + 1), None);
    }
}
