//! Loom models of the GCRA compare-and-swap: every interleaving of a few
//! threads deciding on one bucket.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p apiguard-ratelimit --test loom --release
//! ```
#![cfg(loom)]

use std::time::Duration;

use apiguard_core::ManualClock;
use apiguard_ratelimit::TokenBucket;
use loom::thread;

const SEC: u64 = 1_000_000_000;

/// A bucket at time zero, driven by explicit `now`.
fn bucket(capacity: u32) -> TokenBucket {
    TokenBucket::from_rate(capacity, 1.0)
        .unwrap()
        .with_clock(ManualClock::new().clock())
}

#[test]
fn racing_threads_never_take_more_than_the_capacity() {
    loom::model(|| {
        let b = bucket(2);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.try_acquire_at(1, 0).is_ok())
            })
            .collect();
        let admitted = handles
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum::<usize>();
        assert_eq!(admitted, 2);
        assert_eq!(b.available_at(0), 0.0);
    });
}

#[test]
fn concurrent_reservations_queue_one_behind_the_other() {
    loom::model(|| {
        let b = bucket(1);
        b.try_acquire_at(1, 0).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.reserve_at(1, Duration::from_secs(5), 0).unwrap())
            })
            .collect();
        let mut waits: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap().grant().wait)
            .collect();
        waits.sort();
        assert_eq!(waits, [Duration::from_secs(1), Duration::from_secs(2)]);
    });
}

#[test]
fn a_cancelled_reservation_comes_back_only_when_it_was_the_last() {
    loom::model(|| {
        let b = bucket(1);
        b.try_acquire_at(1, 0).unwrap();
        let a = {
            let b = b.clone();
            thread::spawn(move || {
                let r = b.reserve_at(1, Duration::from_secs(5), 0).unwrap();
                (r.grant().wait, b.cancel(&r))
            })
        };
        let other = {
            let b = b.clone();
            thread::spawn(move || b.reserve_at(1, Duration::from_secs(5), 0).unwrap())
        };
        let (a_wait, cancelled) = a.join().unwrap();
        let other_wait = other.join().unwrap().grant().wait;
        // Cancelling fails exactly when the other thread reserved between
        // A's reservation and A's cancel (A first in line, the other behind);
        // the other may also have come before A, or after the cancel.
        assert_eq!(cancelled, a_wait >= other_wait);
        // Tokens still accounted for: the first one, the other thread's,
        // and A's unless it came back.
        let spent = 2 + u64::from(!cancelled);
        let full_again = spent * SEC;
        assert_eq!(b.available_at(0), 0.0);
        assert!(b.try_acquire_at(1, full_again - 1).is_err());
        assert!(b.try_acquire_at(1, full_again).is_ok());
    });
}

#[test]
fn racing_costs_at_different_times_never_exceed_capacity_plus_refill() {
    loom::model(|| {
        // 2 tokens at once, 1 a second; by 1 s at most 3 can have gone.
        let b = bucket(2);
        let spawn = |asks: &'static [(u32, u64)]| {
            let b = b.clone();
            thread::spawn(move || {
                asks.iter()
                    .filter(|(n, at)| b.try_acquire_at(*n, *at).is_ok())
                    .map(|(n, _)| u64::from(*n))
                    .sum::<u64>()
            })
        };
        let handles = [
            spawn(&[(2, 0)]),
            spawn(&[(1, SEC / 2), (1, SEC)]),
            spawn(&[(1, SEC)]),
        ];
        let taken: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!((1..=3).contains(&taken), "{taken} tokens by 1 s");
        // What is left at 1 s and what was taken never add up to more.
        let left = b.available_at(SEC);
        assert!(taken as f64 + left <= 3.0, "{taken} taken, {left} left");
    });
}
