//! Loom models of the half-open permit logic: every interleaving of a few
//! threads racing over probe slots and transitions, and of a waiter
//! ([`CircuitBreaker::recovered`]) racing the transition that should wake
//! it.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p apiguard-breaker --test loom --release
//! ```
#![cfg(loom)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, SlidingWindow, State};
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
                thread::spawn(move || b.try_acquire_owned().ok())
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
        let probe = b.try_acquire_owned().unwrap();
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
        let good = b.try_acquire_owned().unwrap();
        let bad = b.try_acquire_owned().unwrap();
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
        let stale = b.try_acquire_owned().unwrap();
        b.try_acquire().unwrap().failure(); // reopens
        clock.advance(Duration::from_secs(1));
        let fresh = b.try_acquire().unwrap(); // a new half-open period
        let t1 = thread::spawn(move || drop(stale));
        let b2 = b.clone();
        let t2 = thread::spawn(move || b2.try_acquire_owned().ok());
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
                thread::spawn(move || b.try_acquire_owned().ok())
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
        let permits: Vec<_> = (0..3).map(|_| b.try_acquire_owned().unwrap()).collect();
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

#[test]
fn racing_records_on_one_window_slot_keep_the_totals_exact() {
    loom::model(|| {
        // A window of one call, so every record lands on the same slot; it
        // never trips (two calls needed, one counted). Two failures and a
        // success race over a slot holding a success: whatever the
        // interleaving, the totals must stay the slot's content (a failure
        // counted twice shows as two failures in a window of one).
        let b = CircuitBreaker::builder()
            .failure_threshold(100)
            .failure_rate(1.0)
            .sliding_window(SlidingWindow::Count(1))
            .minimum_calls(2)
            .clock(ManualClock::new().clock())
            .build()
            .unwrap();
        b.try_acquire().unwrap().success();
        let permits: Vec<_> = (0..3).map(|_| b.try_acquire_owned().unwrap()).collect();
        let handles: Vec<_> = permits
            .into_iter()
            .enumerate()
            .map(|(i, p)| thread::spawn(move || if i < 2 { p.failure() } else { p.success() }))
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = b.stats();
        assert_eq!(s.window_calls, 1);
        assert!(s.window_failures <= 1, "{s:?}");
        // One more success replaces whatever the race left.
        b.try_acquire().unwrap().success();
        let s = b.stats();
        assert_eq!((s.window_calls, s.window_failures), (1, 0), "{s:?}");
    });
}

/// Polls `fut` to completion on this loom thread, parking between polls
/// until its waker is called: a lost wake-up leaves it parked for ever,
/// which loom reports as a deadlock.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};

    struct Unpark(loom::sync::Notify);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.notify();
        }
    }
    let unpark = Arc::new(Unpark(loom::sync::Notify::new()));
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        unpark.0.wait();
    }
}

/// A breaker half-open with its one probe in flight (the permit returned).
fn probing() -> (CircuitBreaker, apiguard_breaker::OwnedPermit) {
    let (b, _) = due_for_probing(1, 1);
    let probe = b.try_acquire_owned().unwrap();
    (b, probe)
}

#[test]
fn a_waiter_is_woken_by_the_probe_that_closes_the_breaker() {
    loom::model(|| {
        let (b, probe) = probing();
        let closer = thread::spawn(move || probe.success());
        // Whether it registers before or after the close, it must end: a
        // lost wake-up would leave this blocked for ever (loom reports it).
        block_on(b.recovered());
        closer.join().unwrap();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.stats().waiters, 0);
    });
}

#[test]
fn a_waiter_dropped_while_the_breaker_closes_leaves_no_entry() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    loom::model(|| {
        let (b, probe) = probing();
        let b2 = b.clone();
        let waiter = thread::spawn(move || {
            let mut fut = b2.recovered();
            let mut cx = Context::from_waker(Waker::noop());
            let first = std::pin::Pin::new(&mut fut).poll(&mut cx);
            drop(fut);
            first
        });
        let closer = thread::spawn(move || probe.success());
        let first = waiter.join().unwrap();
        closer.join().unwrap();
        // Either it saw the close (ready) or was registered and removed.
        assert!(matches!(first, Poll::Ready(()) | Poll::Pending));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.stats().waiters, 0);
    });
}
