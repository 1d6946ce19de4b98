//! The clock every apiguard decision reads.
//!
//! Time is a [`Nanos`] count (`u64` nanoseconds since a process-wide origin).
//! Decisions are integer arithmetic on it, which is why rates from one per
//! hour to 10⁹ per second stay exact and never drift.
//!
//! # Why not `Instant::now()`?
//!
//! On the virtual machines these crates are measured on, one
//! `Instant::now()` costs about 24 ns — more than a whole rate-limit
//! decision — and a read of this clock about 10 ns
//! (`cargo bench -p apiguard-benches --bench clock`). Reading the CPU's
//! time-stamp counter is what makes the difference, but the
//! TSC is only safe where it is synchronised across cores; where it is not,
//! time jumps backwards when a thread migrates and a limiter refuses requests
//! it should admit (governor #299). The default clock therefore reads the TSC
//! (through `quanta`) only when the Linux kernel itself has chosen `tsc` as
//! its clocksource, which it does only after checking that the counters are
//! synchronised and invariant; anywhere else it uses the monotonic
//! `Instant`.
//!
//! # Tests
//!
//! With the `test-util` feature the default clock reads tokio's clock
//! instead, so `#[tokio::test(start_paused = true)]` and
//! `tokio::time::advance` drive every bucket, breaker and backoff. For unit
//! tests that want to set time by hand there is [`ManualClock`].

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Nanoseconds since the clock's origin.
pub type Nanos = u64;

/// Converts a duration to [`Nanos`], saturating at `u64::MAX` (584 years).
#[inline]
pub const fn duration_to_nanos(d: Duration) -> Nanos {
    let n = d.as_nanos();
    if n > u64::MAX as u128 {
        u64::MAX
    } else {
        n as u64
    }
}

/// Converts [`Nanos`] back to a duration.
#[inline]
pub const fn nanos_to_duration(n: Nanos) -> Duration {
    Duration::from_nanos(n)
}

/// A source of monotonic time. Cheap to clone: the default is a
/// reference to the process' one system source, a manual clock is one
/// `Arc`.
#[derive(Clone, Debug)]
pub struct Clock {
    source: Source,
}

/// Which time a [`Clock`] reads, resolved when the clock is made, so that a
/// read is one match and the read itself: no check of the process-wide
/// source's initialisation, no second match on which source it is.
#[derive(Clone, Debug)]
enum Source {
    /// tokio's clock (with `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    System,
    #[cfg(not(any(test, feature = "test-util")))]
    Tsc(&'static Tsc),
    // This module is the one place allowed to read `std::time::Instant`.
    #[cfg(not(any(test, feature = "test-util")))]
    #[allow(clippy::disallowed_types)]
    Monotonic(&'static std::time::Instant),
    Manual(Arc<AtomicU64>),
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The default clock (see the module docs for what it reads). Without
    /// `test-util`, the first call in a process detects the source (reads
    /// one file on Linux and calibrates the TSC); later ones copy a
    /// reference.
    #[inline]
    pub fn system() -> Self {
        #[cfg(any(test, feature = "test-util"))]
        let source = Source::System;
        #[cfg(not(any(test, feature = "test-util")))]
        let source = SYSTEM.get_or_init(SystemSource::detect).source();
        Self { source }
    }

    /// The current time.
    #[inline]
    pub fn now(&self) -> Nanos {
        match &self.source {
            #[cfg(any(test, feature = "test-util"))]
            Source::System => system_now(),
            #[cfg(not(any(test, feature = "test-util")))]
            Source::Tsc(tsc) => tsc.now(),
            #[cfg(not(any(test, feature = "test-util")))]
            Source::Monotonic(origin) => monotonic_now(origin),
            Source::Manual(n) => n.load(Ordering::Acquire),
        }
    }

    /// Whether this clock is a [`ManualClock`]'s.
    pub fn is_manual(&self) -> bool {
        matches!(self.source, Source::Manual(_))
    }
}

/// A clock that moves only when told to, for deterministic unit tests.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A [`Clock`] that reads this manual clock.
    pub fn clock(&self) -> Clock {
        Clock {
            source: Source::Manual(self.nanos.clone()),
        }
    }

    /// Moves time forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(duration_to_nanos(d), Ordering::AcqRel);
    }

    /// Sets the time. Moving it backwards is allowed, to test that callers
    /// cope with it.
    pub fn set(&self, now: Nanos) {
        self.nanos.store(now, Ordering::Release);
    }

    /// The current time.
    pub fn now(&self) -> Nanos {
        self.nanos.load(Ordering::Acquire)
    }
}

#[cfg(any(test, feature = "test-util"))]
#[inline]
fn system_now() -> Nanos {
    static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(test_origin);
    duration_to_nanos(tokio::time::Instant::now().saturating_duration_since(origin))
}

/// An origin earlier than any instant a test runtime will read. Taking the
/// first reading instead is wrong: each paused runtime starts from the real
/// time it was built at and may have been advanced far ahead, so a reading
/// from one test can lie in another's future — whose clock then sits at the
/// origin, saturated, and loses the first stretch of every `advance`.
#[cfg(any(test, feature = "test-util"))]
#[allow(clippy::disallowed_types)]
fn test_origin() -> tokio::time::Instant {
    let now = std::time::Instant::now();
    let early = [3_600, 60, 1]
        .into_iter()
        .find_map(|secs| now.checked_sub(Duration::from_secs(secs)))
        .unwrap_or(now);
    tokio::time::Instant::from_std(early)
}

/// The monotonic fallback, out of line: its read costs far more than a
/// call, and a caller that inlines [`Clock::now`] keeps its registers.
#[cfg(not(any(test, feature = "test-util")))]
#[allow(clippy::disallowed_types)]
#[cold]
#[inline(never)]
fn monotonic_now(origin: &std::time::Instant) -> Nanos {
    duration_to_nanos(origin.elapsed())
}

/// quanta's calibration as nanoseconds per tick in 0.64 fixed point, for a
/// counter faster than 1 GHz (every TSC of the last twenty years); `None`
/// for a slower one, which then reads the monotonic clock instead.
///
/// quanta scales `d` ticks to `(d * f) >> s` nanoseconds; over 2^63 ticks
/// that is `2^63 * f / 2^s`, and doubling it leaves `f / 2^s` with 64
/// fractional bits: finer than quanta's own factor. A whole nanosecond per
/// tick would need a 65th bit, hence the limit.
#[cfg_attr(all(feature = "test-util", not(test)), allow(dead_code))]
fn ns_per_tick(clock: &quanta::Clock) -> Option<u64> {
    let per_2_63 = clock.delta_as_nanos(0, 1 << 63);
    (per_2_63 > 0 && per_2_63 < 1 << 63).then_some(per_2_63 << 1)
}

/// `raw` ticks since `origin` in nanoseconds: one multiplication, whose high
/// half is the answer. Between the counter's read and the bucket's
/// compare-and-swap this is the whole conversion, so its length is on every
/// decision's critical path (the 32.32 factor this replaced needed a double
/// shift after the multiplication: 2.5 ns a decision on the 2-core machine).
#[cfg_attr(all(feature = "test-util", not(test)), allow(dead_code))]
#[inline(always)]
fn tsc_nanos(raw: u64, origin: u64, ns_per_tick: u64) -> Nanos {
    let ticks = raw.saturating_sub(origin);
    ((u128::from(ticks) * u128::from(ns_per_tick)) >> 64) as u64
}

#[cfg(not(any(test, feature = "test-util")))]
static SYSTEM: OnceLock<SystemSource> = OnceLock::new();

/// The TSC, as quanta reads it, and how to turn its ticks into
/// [`Nanos`].
#[cfg(not(any(test, feature = "test-util")))]
#[derive(Debug)]
struct Tsc {
    clock: quanta::Clock,
    origin: u64,
    /// Nanoseconds per TSC tick in 0.64 fixed point, from quanta's
    /// calibration: one multiply per read, where quanta's
    /// `delta_as_nanos` also shifts by an amount it loads.
    ns_per_tick: u64,
}

#[cfg(not(any(test, feature = "test-util")))]
impl Tsc {
    #[inline(always)]
    fn now(&self) -> Nanos {
        tsc_nanos(self.clock.raw(), self.origin, self.ns_per_tick)
    }
}

#[cfg(not(any(test, feature = "test-util")))]
enum SystemSource {
    Tsc(Tsc),
    // This module is the one place allowed to read `std::time::Instant`.
    #[allow(clippy::disallowed_types)]
    Monotonic(std::time::Instant),
}

#[cfg(not(any(test, feature = "test-util")))]
impl SystemSource {
    #[allow(clippy::disallowed_types)]
    fn detect() -> Self {
        if kernel_trusts_tsc() {
            let clock = quanta::Clock::new();
            if let Some(ns_per_tick) = ns_per_tick(&clock) {
                let origin = clock.raw();
                return Self::Tsc(Tsc {
                    clock,
                    origin,
                    ns_per_tick,
                });
            }
        }
        Self::Monotonic(std::time::Instant::now())
    }

    #[inline]
    fn source(&'static self) -> Source {
        match self {
            Self::Tsc(tsc) => Source::Tsc(tsc),
            Self::Monotonic(origin) => Source::Monotonic(origin),
        }
    }
}

/// The kernel picks `tsc` as clocksource only once it has verified that the
/// counter is invariant and synchronised across CPUs; that is the one check
/// we trust to make the TSC a monotonic clock.
#[cfg(all(
    not(any(test, feature = "test-util")),
    target_os = "linux",
    any(target_arch = "x86", target_arch = "x86_64")
))]
fn kernel_trusts_tsc() -> bool {
    std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .map(|s| s.trim() == "tsc")
        .unwrap_or(false)
}

#[cfg(all(
    not(any(test, feature = "test-util")),
    not(all(target_os = "linux", any(target_arch = "x86", target_arch = "x86_64")))
))]
fn kernel_trusts_tsc() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        assert_eq!(clock.now(), 0);
        manual.advance(Duration::from_millis(5));
        assert_eq!(clock.now(), 5_000_000);
        manual.set(7);
        assert_eq!(clock.now(), 7);
        assert!(clock.is_manual());
    }

    #[tokio::test(start_paused = true)]
    async fn system_clock_follows_paused_tokio_time() {
        let clock = Clock::system();
        let t0 = clock.now();
        tokio::time::advance(Duration::from_secs(3)).await;
        let t1 = clock.now();
        assert_eq!(t1 - t0, 3_000_000_000);
    }

    #[test]
    fn system_clock_never_goes_backwards() {
        let clock = Clock::system();
        let mut last = clock.now();
        for _ in 0..100_000 {
            let now = clock.now();
            assert!(now >= last);
            last = now;
        }
    }

    #[test]
    fn tsc_conversion_agrees_with_quanta() {
        let clock = quanta::Clock::new();
        let origin = clock.raw();
        let Some(per_tick) = ns_per_tick(&clock) else {
            // No factor only for a counter of a nanosecond a tick or slower
            // (quanta's monotonic fallback counts whole nanoseconds).
            assert!(
                clock.delta_as_nanos(0, 1 << 20) >= 1 << 20,
                "a counter faster than 1 GHz refused"
            );
            return;
        };
        for ticks in [1u64, 1_000, 3_000_000_007, 1 << 40, 1 << 52] {
            let theirs = clock.delta_as_nanos(origin, origin + ticks);
            let ours = tsc_nanos(origin + ticks, origin, per_tick);
            let err = theirs.abs_diff(ours);
            // Rounding of the two fixed-point factors: a nanosecond, plus
            // one part in 10^8 of long spans.
            assert!(
                err <= 1 + theirs / 100_000_000,
                "{ticks} ticks: quanta {theirs} ns, ours {ours} ns"
            );
        }
        assert_eq!(
            tsc_nanos(origin.saturating_sub(5), origin, per_tick),
            0,
            "a reading behind the origin"
        );
    }

    #[test]
    fn duration_conversion_saturates() {
        assert_eq!(duration_to_nanos(Duration::MAX), u64::MAX);
        assert_eq!(duration_to_nanos(Duration::from_secs(2)), 2_000_000_000);
    }
}
