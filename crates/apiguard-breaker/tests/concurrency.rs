//! Many tasks on a multi-threaded runtime hammering one breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, SlidingWindow, State};
use apiguard_core::ManualClock;

const TASKS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_open_it_exactly_once_at_the_threshold() {
    const PER_TASK: u32 = 2_000;
    let transitions = Arc::new(AtomicU32::new(0));
    let t = transitions.clone();
    let b = CircuitBreaker::builder()
        .failure_threshold(TASKS as u32 * PER_TASK)
        .on_transition(move |_| {
            t.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    b.try_acquire()
                        .expect("closed until the last failure")
                        .failure();
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.stats().consecutive_failures, TASKS as u32 * PER_TASK);
    assert_eq!(transitions.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_window_counts_add_up_exactly() {
    const PER_TASK: u64 = 3_000;
    let b = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .failure_rate(1.0)
        .sliding_window(SlidingWindow::Count(100_000))
        .minimum_calls(1_000_000)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let p = b.try_acquire().unwrap();
                    if i % 3 == 0 {
                        p.failure()
                    } else {
                        p.success()
                    }
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = b.stats();
    assert_eq!(s.window_calls, TASKS as u64 * PER_TASK);
    assert_eq!(s.window_failures, TASKS as u64 * PER_TASK / 3);
    assert_eq!(s.state, State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_in_flight_never_exceed_the_limit() {
    const PROBES: usize = 3;
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .half_open_probes(PROBES as u32)
        .success_threshold(65_535)
        .clock(clock.clock())
        .build()
        .unwrap();
    b.try_acquire().unwrap().failure();
    clock.advance(Duration::from_secs(1));

    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let admitted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|n| {
            let (b, in_flight, peak, admitted) =
                (b.clone(), in_flight.clone(), peak.clone(), admitted.clone());
            tokio::spawn(async move {
                for i in 0..2_000usize {
                    if let Ok(p) = b.try_acquire() {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        admitted.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        // Alternate cancelled and successful probes.
                        if (i + n) % 2 == 0 {
                            drop(p)
                        } else {
                            p.success()
                        }
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= PROBES);
    assert!(
        admitted.load(Ordering::SeqCst) > PROBES,
        "slots were reused"
    );
    let s = b.stats();
    assert_eq!(s.state, State::HalfOpen);
    assert_eq!(s.probes_in_flight, 0, "every slot came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrapping_count_window_stays_exact_under_contention() {
    const WINDOW: u32 = 1_000;
    let b = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .failure_rate(1.0)
        .sliding_window(SlidingWindow::Count(WINDOW))
        .minimum_calls(1_000_000)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                for i in 0..3_000u32 {
                    b.try_acquire().unwrap().failure();
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = b.stats();
    assert_eq!(s.window_calls, u64::from(WINDOW));
    assert_eq!(s.window_failures, u64::from(WINDOW));
}
