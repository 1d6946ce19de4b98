//! Exponential backoff, jitter, and the random source jitter draws from.
//!
//! The delay before retry `n` (the first retry is `n = 1`) starts from
//! `base_delay * 2^(n-1)`, capped at `max_delay`, and is then spread by a
//! [`Jitter`] mode so that clients that failed together do not retry
//! together. Every mode keeps the result within `0..=max_delay`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apiguard_core::InvalidConfig;

/// How a backoff delay is spread.
///
/// `d` below is the capped exponential delay `min(base * 2^(n-1), max)` and
/// `u` a uniform draw from `[0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// No spreading: exactly `d`. For tests and for a single client.
    None,
    /// Uniform over `[0, d)`: spreads retries the most (AWS "full jitter").
    Full,
    /// `d/2 + u·d/2`: never shorter than half the delay.
    Equal,
    /// `min(max, base + u·(3·prev − base))`, where `prev` is the previous
    /// delay of the same request (the base delay before the first retry):
    /// AWS "decorrelated jitter". It grows on its own and ignores `d`.
    Decorrelated,
    /// Proportional jitter: `d · (1 ± f·u)`, i.e. uniform over
    /// `[d·(1−f), d·(1+f))`, capped at `max_delay`. `f` must be in `[0, 1]`.
    Proportional(f64),
}

impl Jitter {
    fn validate(self) -> Result<(), InvalidConfig> {
        match self {
            Jitter::Proportional(f) if !(0.0..=1.0).contains(&f) => Err(InvalidConfig::new(
                "jitter",
                "a proportional jitter must be a number in [0, 1]",
            )),
            _ => Ok(()),
        }
    }
}

/// A source of uniform random numbers for jitter.
///
/// Implement it to make jitter reproducible or to share a generator; the
/// default, [`ThreadRandom`], reads a thread-local generator.
pub trait Random: Send + Sync + fmt::Debug + 'static {
    /// A number uniformly drawn from `[0, 1)`.
    fn unit(&self) -> f64;
}

/// The default random source: `fastrand`'s thread-local generator.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadRandom;

impl Random for ThreadRandom {
    #[inline]
    fn unit(&self) -> f64 {
        fastrand::f64()
    }
}

/// A seeded, reproducible random source that many threads can share without
/// a lock (wyrand over one atomic counter).
#[derive(Debug, Default)]
pub struct SeededRandom {
    state: AtomicU64,
}

impl SeededRandom {
    /// A generator whose sequence is fixed by `seed`.
    pub const fn new(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }
}

impl Random for SeededRandom {
    fn unit(&self) -> f64 {
        const INC: u64 = 0xa076_1d64_78bd_642f;
        let s = self
            .state
            .fetch_add(INC, Ordering::Relaxed)
            .wrapping_add(INC);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        let x = ((t >> 64) as u64) ^ (t as u64);
        // 53 random bits into [0, 1).
        (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Exponential backoff with a cap and a jitter mode.
///
/// ```
/// use std::time::Duration;
/// use apiguard_retry::{Backoff, Jitter};
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), Jitter::None)?;
/// assert_eq!(b.delay(1, Duration::ZERO, 0.5), Duration::from_millis(100));
/// assert_eq!(b.delay(3, Duration::ZERO, 0.5), Duration::from_millis(400));
/// assert_eq!(b.delay(9, Duration::ZERO, 0.5), Duration::from_secs(1)); // capped
/// # Ok::<(), apiguard_core::InvalidConfig>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`, spread by `jitter`.
    ///
    /// Refuses `max < base` and a proportional jitter outside `[0, 1]`
    /// (NaN included).
    pub fn new(base: Duration, max: Duration, jitter: Jitter) -> Result<Self, InvalidConfig> {
        if max < base {
            return Err(InvalidConfig::new(
                "max_delay",
                "must not be shorter than base_delay",
            ));
        }
        jitter.validate()?;
        Ok(Self { base, max, jitter })
    }

    /// The base delay (before the first retry, without jitter).
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The cap on every delay.
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// The jitter mode.
    pub const fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The capped exponential delay before retry `n` (`n >= 1`), before
    /// jitter: `min(base * 2^(n-1), max)`.
    pub fn exponential(&self, n: u32) -> Duration {
        let shift = n.saturating_sub(1).min(63);
        let base = self.base.as_nanos();
        let d = base.checked_shl(shift).unwrap_or(u128::MAX);
        // A shift that overflowed u128 is "huge" either way.
        let d = if shift > 0 && d >> shift != base {
            u128::MAX
        } else {
            d
        };
        if d >= self.max.as_nanos() {
            self.max
        } else {
            Duration::from_nanos(d as u64)
        }
    }

    /// The delay before retry `n` (`n >= 1`), where `prev` is the previous
    /// delay of the same request (used by [`Jitter::Decorrelated`]; pass
    /// [`Duration::ZERO`] before the first retry) and `u` a draw from
    /// `[0, 1)`. Never above `max`; values of `u` outside `[0, 1)` are
    /// clamped.
    pub fn delay(&self, n: u32, prev: Duration, u: f64) -> Duration {
        let u = if u.is_nan() { 0.0 } else { u.clamp(0.0, 1.0) };
        let d = self.exponential(n);
        let out = match self.jitter {
            Jitter::None => d,
            Jitter::Full => scale(d, u),
            Jitter::Equal => d / 2 + scale(d / 2, u),
            Jitter::Decorrelated => {
                let prev = prev.max(self.base);
                let hi = prev.saturating_mul(3).min(self.max);
                let span = hi.saturating_sub(self.base);
                self.base.saturating_add(scale(span, u))
            }
            Jitter::Proportional(f) => {
                // d·(1 − f + 2fu): uniform over [d(1−f), d(1+f)).
                let factor = 1.0 - f + 2.0 * f * u;
                let secs = d.as_secs_f64() * factor;
                if secs >= self.max.as_secs_f64() {
                    self.max
                } else {
                    Duration::from_secs_f64(secs.max(0.0))
                }
            }
        };
        out.min(self.max)
    }
}

/// `d·u` for `u` in `[0, 1]`, never above `d` (float rounding near
/// `Duration::MAX` must not panic).
fn scale(d: Duration, u: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * u)
        .unwrap_or(d)
        .min(d)
}

/// The random source of a policy, shared by its clones.
pub(crate) type SharedRandom = Arc<dyn Random>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff::new(100 * MS, 10_000 * MS, jitter).unwrap()
    }

    #[test]
    fn exponential_doubles_then_caps() {
        let b = backoff(Jitter::None);
        let got: Vec<_> = (1..=9).map(|n| b.delay(n, Duration::ZERO, 0.0)).collect();
        let want: Vec<_> = [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
            .map(|ms| ms * MS)
            .to_vec();
        assert_eq!(got, want);
        assert_eq!(b.exponential(u32::MAX), 10_000 * MS);
        assert_eq!(b.exponential(0), 100 * MS);
    }

    #[test]
    fn full_jitter_spans_zero_to_d() {
        let b = backoff(Jitter::Full);
        let r = SeededRandom::new(1);
        let draws: Vec<_> = (0..2000)
            .map(|_| b.delay(3, Duration::ZERO, r.unit()))
            .collect();
        assert!(draws.iter().all(|d| *d < 400 * MS));
        assert!(draws.iter().any(|d| *d < 40 * MS), "reaches the bottom");
        assert!(draws.iter().any(|d| *d > 360 * MS), "reaches the top");
    }

    #[test]
    fn equal_jitter_keeps_half() {
        let b = backoff(Jitter::Equal);
        let r = SeededRandom::new(2);
        let draws: Vec<_> = (0..2000)
            .map(|_| b.delay(3, Duration::ZERO, r.unit()))
            .collect();
        assert!(draws.iter().all(|d| *d >= 200 * MS && *d < 400 * MS));
        assert!(draws.iter().any(|d| *d < 220 * MS));
        assert!(draws.iter().any(|d| *d > 380 * MS));
    }

    #[test]
    fn proportional_jitter_stays_within_plus_minus_f() {
        let b = backoff(Jitter::Proportional(0.25));
        let r = SeededRandom::new(3);
        let draws: Vec<_> = (0..2000)
            .map(|_| b.delay(3, Duration::ZERO, r.unit()))
            .collect();
        assert!(draws.iter().all(|d| *d >= 300 * MS && *d <= 500 * MS));
        assert!(draws.iter().any(|d| *d < 320 * MS));
        assert!(draws.iter().any(|d| *d > 480 * MS));
    }

    #[test]
    fn decorrelated_jitter_grows_from_previous_delay() {
        let b = backoff(Jitter::Decorrelated);
        let r = SeededRandom::new(4);
        for prev in [Duration::ZERO, 100 * MS, 1000 * MS, 5000 * MS] {
            let hi = (prev.max(100 * MS) * 3).min(10_000 * MS);
            for _ in 0..500 {
                let d = b.delay(7, prev, r.unit());
                assert!(d >= 100 * MS && d <= hi, "{d:?} for prev {prev:?}");
            }
        }
    }

    #[test]
    fn bad_configuration_is_refused() {
        let e = Backoff::new(2 * MS, MS, Jitter::None).unwrap_err();
        assert_eq!(e.field(), "max_delay");
        for f in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let e = Backoff::new(MS, MS, Jitter::Proportional(f)).unwrap_err();
            assert_eq!(e.field(), "jitter");
        }
        assert!(Backoff::new(MS, MS, Jitter::Proportional(1.0)).is_ok());
    }

    #[test]
    fn seeded_random_is_reproducible_and_in_range() {
        let a = SeededRandom::new(9);
        let b = SeededRandom::new(9);
        for _ in 0..1000 {
            let x = a.unit();
            assert_eq!(x, b.unit());
            assert!((0.0..1.0).contains(&x));
        }
    }

    fn any_jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated),
            (0.0f64..=1.0).prop_map(Jitter::Proportional),
        ]
    }

    proptest! {
        #[test]
        fn delay_is_never_above_cap_and_never_panics(
            base in 0u64..=u64::MAX / 4,
            extra in 0u64..=u64::MAX / 4,
            n in any::<u32>(),
            prev in any::<u64>(),
            u in proptest::num::f64::ANY,
            jitter in any_jitter(),
        ) {
            let b = Backoff::new(Duration::from_nanos(base), Duration::from_nanos(base + extra), jitter).unwrap();
            let d = b.delay(n, Duration::from_nanos(prev), u);
            prop_assert!(d <= b.max());
        }

        #[test]
        fn no_jitter_is_monotonic_in_n(base in 1u64..1_000_000_000, n in 1u32..200) {
            let b = Backoff::new(Duration::from_nanos(base), Duration::from_secs(3600), Jitter::None).unwrap();
            prop_assert!(b.exponential(n) <= b.exponential(n + 1));
        }
    }
}
