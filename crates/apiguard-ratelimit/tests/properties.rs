//! Properties of the bucket maths, driven by explicit time.

use std::time::Duration;

use apiguard_core::ManualClock;
use apiguard_ratelimit::{KeyedLimiter, TokenBucket};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// A bucket whose clock stands at zero, driven by the explicit `now` of the
/// `*_at` calls.
fn bucket(capacity: u32, rate: f64) -> TokenBucket {
    TokenBucket::from_rate(capacity, rate)
        .unwrap()
        .with_clock(ManualClock::new().clock())
}

/// One arrival: how long after the previous one, how many tokens, and how
/// long it may wait.
fn arrivals() -> impl Strategy<Value = Vec<(u64, u32, u64)>> {
    prop::collection::vec(
        (
            0u64..50_000_000,
            1u32..6,
            prop_oneof![Just(0u64), 0u64..200_000_000],
        ),
        1..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// Tokens admitted (at the instant they may be used) in any window of
    /// length T never exceed `capacity + refill_per_sec * T`.
    #[test]
    fn admitted_tokens_in_any_window_stay_within_capacity_plus_rate(
        capacity in 1u32..20,
        rate in prop_oneof![1.0f64..1000.0, Just(3.0), Just(1e9), Just(1.0 / 3600.0)],
        arrivals in arrivals(),
    ) {
        let bucket = bucket(capacity, rate);
        let mut now = 0u64;
        let mut used: Vec<(u64, u32)> = Vec::new();
        for (dt, cost, max_wait) in arrivals {
            now += dt;
            if max_wait == 0 {
                if bucket.try_acquire_at(cost, now).is_ok() {
                    used.push((now, cost));
                }
            } else if let Ok(r) = bucket.reserve_at(cost, Duration::from_nanos(max_wait), now) {
                let at = now + r.grant().wait.as_nanos() as u64;
                used.push((at, cost));
            }
        }
        used.sort_unstable();
        for i in 0..used.len() {
            let mut sum = 0u64;
            for j in i..used.len() {
                sum += u64::from(used[j].1);
                let window_s = (used[j].0 - used[i].0) as f64 / 1e9;
                let bound = f64::from(capacity) + rate * window_s;
                prop_assert!(
                    sum as f64 <= bound * (1.0 + 1e-9) + 1e-6,
                    "{} tokens in {} s, bound {}", sum, window_s, bound
                );
            }
        }
    }

    /// A refusal's wait is exact: waiting it admits the same request.
    #[test]
    fn waiting_the_refusals_retry_after_admits(
        capacity in 1u32..20,
        rate in 0.5f64..1000.0,
        first in 1u32..20,
        then in 1u32..20,
    ) {
        let bucket = bucket(capacity, rate);
        let first = first.min(capacity);
        let then = then.min(capacity);
        bucket.try_acquire_at(first, 0).unwrap();
        if let Err(e) = bucket.try_acquire_at(then, 0) {
            let wait = e.retry_after().unwrap().as_nanos() as u64;
            prop_assert!(wait > 0);
            prop_assert!(bucket.try_acquire_at(then, wait - 1).is_err());
            prop_assert!(bucket.try_acquire_at(then, wait).is_ok());
        }
    }

    /// The registry never tracks more than `max_keys`, whatever the keys.
    #[test]
    fn registry_len_never_exceeds_max_keys(
        max_keys in 0usize..50,
        keys in prop::collection::vec((0u16..200, 0u64..10_000_000), 1..400),
    ) {
        let limiter = KeyedLimiter::from_rate(2, 100.0)
            .unwrap()
            .with_max_keys(max_keys)
            .with_clock(ManualClock::new().clock());
        let mut now = 0;
        for (key, dt) in keys {
            now += dt;
            let _ = limiter.try_acquire_at(&key, 1, now);
            prop_assert!(limiter.len() <= max_keys);
        }
    }
}
