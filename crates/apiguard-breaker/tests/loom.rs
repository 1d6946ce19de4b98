//! Loom models of the half-open permit logic: every interleaving of a few
//! threads racing over probe slots and transitions.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=/work/main/target/loom \
//!     cargo test -p apiguard-breaker --test loom --release
//! ```
#![cfg(loom)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, State};
use apiguard_core::ManualClock;
use loom::thread;

/// A breaker already tripped and past its recovery timeout, so the next
/// call moves it to half-open; plus a count of its transitions from then on.
fn due_for_probing(probes: u32, successes: u32) -> (CircuitBreaker, Arc<AtomicUsize>) {
    let clock = ManualClock::new();
    let transitions = Arc::new(AtomicUsize::new(0));
    let t = transitions.clone();
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .half_open_probes(probes)
        .success_threshold(successes)
        .clock(clock.clock())
        .on_transition(move |_| {
            t.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    b.try_acquire().unwrap().failure();
    clock.advance(Duration::from_secs(1));
    transitions.store(0, Ordering::SeqCst);
    (b, transitions)
}

#[test]
fn racing_callers_get_at_most_the_probe_limit() {
    loom::model(|| {
        let (b, transitions) = due_for_probing(1, 2);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.try_acquire().ok())
            })
            .collect();
        let permits: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(permits.iter().flatten().count(), 1);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.stats().probes_in_flight, 1);
        // Exactly one thread moved it from open to half-open.
        assert_eq!(transitions.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_dropped_probe_gives_its_slot_back_to_a_racing_caller() {
    loom::model(|| {
        let (b, _) = due_for_probing(1, 1);
        let probe = b.try_acquire().unwrap();
        let b2 = b.clone();
        let dropper = thread::spawn(move || drop(probe));
        let racer = thread::spawn(move || b2.try_acquire().ok().map(|p| p.success()));
        dropper.join().unwrap();
        let got = racer.join().unwrap();
        match got {
            // The racer came after the drop: it probed and closed it.
            Some(()) => assert_eq!(b.state(), State::Closed),
            // The racer came first and was refused; the slot is free now.
            None => {
                assert_eq!(b.state(), State::HalfOpen);
                assert_eq!(b.stats().probes_in_flight, 0);
            }
        }
    });
}

#[test]
fn a_success_and_a_failure_racing_make_one_transition_out_of_half_open() {
    loom::model(|| {
        let (b, transitions) = due_for_probing(2, 1);
        let good = b.try_acquire().unwrap();
        let bad = b.try_acquire().unwrap();
        assert_eq!(transitions.load(Ordering::SeqCst), 1);
        let t1 = thread::spawn(move || good.success());
        let t2 = thread::spawn(move || bad.failure());
        t1.join().unwrap();
        t2.join().unwrap();
        // Whichever landed first decided; the other found a new period and
        // recorded nothing.
        assert!(matches!(b.state(), State::Closed | State::Open));
        assert_eq!(transitions.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn stale_probe_cannot_release_a_slot_of_a_later_period() {
    loom::model(|| {
        let clock = ManualClock::new();
        let b = CircuitBreaker::builder()
            .failure_threshold(1)
            .recovery_timeout(Duration::from_secs(1))
            .half_open_probes(2)
            .clock(clock.clock())
            .build()
            .unwrap();
        b.try_acquire().unwrap().failure();
        clock.advance(Duration::from_secs(1));
        let stale = b.try_acquire().unwrap();
        b.try_acquire().unwrap().failure(); // reopens
        clock.advance(Duration::from_secs(1));
        let fresh = b.try_acquire().unwrap(); // a new half-open period
        let t1 = thread::spawn(move || drop(stale));
        let b2 = b.clone();
        let t2 = thread::spawn(move || b2.try_acquire().ok());
        t1.join().unwrap();
        let second = t2.join().unwrap();
        assert!(second.is_some(), "the new period has two slots");
        assert_eq!(b.stats().probes_in_flight, 2);
        drop(fresh);
        drop(second);
        assert_eq!(b.stats().probes_in_flight, 0);
    });
}

#[test]
fn three_racing_callers_share_two_probe_slots_and_one_transition() {
    // Three threads explode the state space (over three minutes unbounded);
    // two preemptions cover every race of interest here in seconds.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let (b, transitions) = due_for_probing(2, 2);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || b.try_acquire().ok())
            })
            .collect();
        let permits: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(permits.iter().flatten().count(), 2);
        assert_eq!(b.stats().probes_in_flight, 2);
        assert_eq!(transitions.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn racing_failures_in_the_closed_state_trip_it_exactly_once() {
    loom::model(|| {
        let transitions = Arc::new(AtomicUsize::new(0));
        let t = transitions.clone();
        let b = CircuitBreaker::builder()
            .failure_threshold(2)
            .recovery_timeout(Duration::from_secs(1))
            .clock(ManualClock::new().clock())
            .on_transition(move |tr| {
                assert_eq!(tr.to, State::Open);
                t.fetch_add(1, Ordering::SeqCst);
            })
            .build()
            .unwrap();
        // Three permits taken while closed, their failures racing: the
        // second to land trips it, the third finds it open already.
        let permits: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        let handles: Vec<_> = permits
            .into_iter()
            .map(|p| thread::spawn(move || p.failure()))
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(transitions.load(Ordering::SeqCst), 1);
    });
}
