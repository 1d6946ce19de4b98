//! Sliding windows of recent call outcomes, kept in atomics.
//!
//! Two shapes, as in resilience4j: the last `n` calls (a ring of one-byte
//! slots plus running totals) or the last `t` of time (a ring of time
//! buckets, each one atomic word). Recording never locks and never
//! allocates; reading the totals is a handful of loads.

use crate::sync::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Totals over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

/// One recorded call: bit 0 = a call, bit 1 = failed, bit 2 = slow.
const CALL: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

pub(crate) const fn encode(failed: bool, slow: bool) -> u8 {
    CALL | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 }
}

/// The largest count window: the running totals are three signed 21-bit
/// fields of one word.
pub(crate) const MAX_COUNT_WINDOW: u32 = (1 << 20) - 1;

const FIELD: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD) - 1;

/// The packed delta that moves the totals from slot `old` to slot `new`.
///
/// Each total is a field of 21 bits; a field may go briefly negative while
/// two threads race over the same slot (one has swapped, the other has not
/// yet added), so the fields are read back as signed digits, which stays
/// exact whatever order the additions land in.
fn delta(old: u8, new: u8) -> u64 {
    let d = |bit: u8| i64::from(new & bit != 0) - i64::from(old & bit != 0);
    let v = d(CALL) + (d(FAILED) << FIELD) + (d(SLOW) << (2 * FIELD));
    v as u64
}

fn decode(mut w: u64) -> Counts {
    let mut out = [0i64; 3];
    for (k, slot) in out.iter_mut().enumerate() {
        let bits = if k == 2 { 64 - 2 * FIELD } else { FIELD };
        let mask = if k == 2 {
            u64::MAX >> (2 * FIELD)
        } else {
            FIELD_MASK
        };
        let low = (w & mask) as i64;
        let v = if low >= 1 << (bits - 1) {
            low - (1 << bits)
        } else {
            low
        };
        *slot = v;
        w = w.wrapping_sub(v as u64) >> FIELD;
    }
    Counts {
        calls: out[0].max(0) as u64,
        failures: out[1].max(0) as u64,
        slow: out[2].max(0) as u64,
    }
}

/// The last `n` calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    /// The ring's cursor: calls recorded so far, mod 2³².
    next: AtomicU32,
    /// `⌈2⁶⁴ / n⌉`, for [`Self::slot_of`].
    magic: u64,
    totals: AtomicU64,
}

impl CountWindow {
    pub(crate) fn new(n: u32) -> Self {
        let n = n.max(1);
        Self {
            slots: (0..n).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicU32::new(0),
            magic: (u64::MAX / u64::from(n)).wrapping_add(1),
            totals: AtomicU64::new(0),
        }
    }

    /// `i mod n` by two multiplications instead of a division (Lemire,
    /// Kaser and Kurz, "Faster remainder by direct computation", 2019),
    /// exact for every 32-bit `i` and `n`. A division is the dearest
    /// instruction on the record path. When the cursor wraps at 2³² (once
    /// every four billion calls) the ring skips ahead by less than `n`
    /// slots once: the totals stay the sum of the slots.
    #[inline]
    fn slot_of(&self, i: u32) -> usize {
        let low = self.magic.wrapping_mul(u64::from(i));
        ((u128::from(low) * self.slots.len() as u128) >> 64) as usize
    }

    /// Records one call in the oldest slot. A slot that already holds the
    /// same outcome (a success over a success, the healthy case) is left
    /// as it is and the totals are not touched: that is a swap of a value
    /// for itself, so the totals stay the sum of the slots whatever other
    /// threads do to the slot around it, and the call costs one write to
    /// shared memory (the ring's cursor) instead of three.
    #[inline]
    pub(crate) fn record(&self, outcome: u8) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[self.slot_of(i)];
        if slot.load(Ordering::Acquire) == outcome {
            return;
        }
        let old = slot.swap(outcome, Ordering::AcqRel);
        if old != outcome {
            self.totals.fetch_add(delta(old, outcome), Ordering::AcqRel);
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        decode(self.totals.load(Ordering::Acquire))
    }

    pub(crate) fn clear(&self) {
        for s in self.slots.iter() {
            let old = s.swap(0, Ordering::AcqRel);
            if old != 0 {
                self.totals.fetch_add(delta(old, 0), Ordering::AcqRel);
            }
        }
    }
}

/// Bucket word: calls in bits 0..14, failures 14..28, slow 28..42, and the
/// bucket's interval number (mod 2²²) in bits 42..64.
const B_FIELD: u32 = 14;
const B_MAX: u64 = (1 << B_FIELD) - 1;
const STAMP_SHIFT: u32 = 3 * B_FIELD;
const STAMP_MASK: u64 = (1 << (64 - STAMP_SHIFT)) - 1;

/// The last `t` of time, in `buckets` buckets of `t / buckets` each.
///
/// A bucket counts at most 16 383 calls; past that it stops counting (all
/// three totals alike), so at very high rates the window samples the first
/// calls of each bucket and the rates stay representative.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Box<[AtomicU64]>,
    width: u64,
}

impl TimeWindow {
    pub(crate) fn new(span: u64, buckets: u32) -> Self {
        Self {
            buckets: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
            width: (span / u64::from(buckets)).max(1),
        }
    }

    fn interval(&self, now: u64) -> u64 {
        // Interval numbers start at 1 so that a zeroed bucket is never
        // mistaken for a current one.
        now / self.width + 1
    }

    pub(crate) fn record(&self, outcome: u8, now: u64) {
        let idx = self.interval(now);
        let stamp = idx & STAMP_MASK;
        let bucket = &self.buckets[(idx % self.buckets.len() as u64) as usize];
        let add = u64::from(outcome & CALL != 0)
            | u64::from(outcome & FAILED != 0) << B_FIELD
            | u64::from(outcome & SLOW != 0) << (2 * B_FIELD);
        let mut cur = bucket.load(Ordering::Acquire);
        loop {
            let next = if cur >> STAMP_SHIFT == stamp {
                if cur & B_MAX == B_MAX {
                    break;
                }
                cur + add
            } else {
                (stamp << STAMP_SHIFT) | add
            };
            match bucket.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    pub(crate) fn counts(&self, now: u64) -> Counts {
        let idx = self.interval(now);
        let n = self.buckets.len() as u64;
        let mut c = Counts::default();
        for b in self.buckets.iter() {
            let w = b.load(Ordering::Acquire);
            let stamp = w >> STAMP_SHIFT;
            if stamp == 0 {
                continue;
            }
            let age = (idx & STAMP_MASK).wrapping_sub(stamp) & STAMP_MASK;
            if age < n {
                c.calls += w & B_MAX;
                c.failures += (w >> B_FIELD) & B_MAX;
                c.slow += (w >> (2 * B_FIELD)) & B_MAX;
            }
        }
        c
    }

    pub(crate) fn clear(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Release);
        }
    }
}

/// Either window.
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    /// Records one call; returns the totals when the call could raise a
    /// rate (a failed or slow one).
    #[inline]
    pub(crate) fn record(&self, outcome: u8, now: u64) -> Option<Counts> {
        match self {
            Window::Count(w) => {
                w.record(outcome);
                (outcome & (FAILED | SLOW) != 0).then(|| w.counts())
            }
            Window::Time(w) => {
                w.record(outcome, now);
                (outcome & (FAILED | SLOW) != 0).then(|| w.counts(now))
            }
        }
    }

    pub(crate) fn counts(&self, now: u64) -> Counts {
        match self {
            Window::Count(w) => w.counts(),
            Window::Time(w) => w.counts(now),
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            Window::Count(w) => w.clear(),
            Window::Time(w) => w.clear(),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn count_window_forgets_the_oldest_call() {
        let w = CountWindow::new(3);
        w.record(encode(true, false));
        w.record(encode(false, true));
        w.record(encode(false, false));
        let c = w.counts();
        assert_eq!(
            c,
            Counts {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(encode(false, false));
        let c = w.counts();
        assert_eq!(
            c,
            Counts {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
        w.clear();
        assert_eq!(w.counts(), Counts::default());
    }

    proptest::proptest! {
        #[test]
        fn slot_of_is_the_remainder(n in 1u32..=MAX_COUNT_WINDOW, i in proptest::num::u32::ANY) {
            let w = CountWindow::new(n);
            proptest::prop_assert_eq!(w.slot_of(i), (i % n) as usize);
        }
    }

    #[test]
    fn slot_of_is_the_remainder_at_the_edges() {
        for n in [1, 2, 3, 7, 100, 1 << 10, MAX_COUNT_WINDOW] {
            let w = CountWindow::new(n);
            for i in [0, 1, n - 1, n, n + 1, u32::MAX - 1, u32::MAX] {
                assert_eq!(w.slot_of(i), (i % n) as usize, "{i} mod {n}");
            }
        }
    }

    #[test]
    fn signed_fields_survive_transient_negatives() {
        // A slot swapped out before its own addition landed: the totals go
        // through a negative count and come back exact.
        let w = delta(encode(true, true), 0).wrapping_add(delta(0, encode(false, false)));
        assert_eq!(
            decode(w),
            Counts {
                calls: 0,
                failures: 0,
                slow: 0
            }
        );
        let w = w.wrapping_add(delta(0, encode(true, true)));
        assert_eq!(
            decode(w),
            Counts {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn count_window_matches_a_model(
            n in 1u32..20,
            calls in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY), 0..200),
        ) {
            let w = CountWindow::new(n);
            let mut model = std::collections::VecDeque::new();
            for (failed, slow) in calls {
                w.record(encode(failed, slow));
                let got = w.counts();
                model.push_back((failed, slow));
                if model.len() > n as usize {
                    model.pop_front();
                }
                let want = Counts {
                    calls: model.len() as u64,
                    failures: model.iter().filter(|c| c.0).count() as u64,
                    slow: model.iter().filter(|c| c.1).count() as u64,
                };
                proptest::prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn time_window_matches_a_model(
            steps in proptest::collection::vec((0u64..3_000, proptest::bool::ANY), 0..200),
        ) {
            // 10 buckets of 1 000 ns: a call counts while its bucket is one
            // of the 10 latest.
            let w = TimeWindow::new(10_000, 10);
            let mut now = 0;
            let mut model: Vec<(u64, bool)> = Vec::new();
            for (dt, failed) in steps {
                now += dt;
                w.record(encode(failed, false), now);
                let got = w.counts(now);
                model.push((now / 1_000, failed));
                let live: Vec<_> = model.iter().filter(|c| now / 1_000 - c.0 < 10).collect();
                proptest::prop_assert_eq!(got.calls, live.len() as u64);
                proptest::prop_assert_eq!(got.failures, live.iter().filter(|c| c.1).count() as u64);
            }
        }
    }

    #[test]
    fn time_window_drops_buckets_older_than_the_span() {
        let w = TimeWindow::new(10_000, 10);
        w.record(encode(true, false), 0);
        w.record(encode(false, false), 5_000);
        assert_eq!(w.counts(9_999).calls, 2);
        assert_eq!(w.counts(10_000).calls, 1);
        assert_eq!(w.counts(10_000).failures, 0);
        assert_eq!(w.counts(15_000).calls, 0);
    }
}
