//! The breaker's state machine, driven by tokio's paused clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, Reason, SlidingWindow, State, Transition};
use apiguard_core::Outcome;
use tokio::time::advance;

fn breaker(failures: u32, recovery: Duration, successes: u32) -> CircuitBreaker {
    CircuitBreaker::builder()
        .failure_threshold(failures)
        .recovery_timeout(recovery)
        .success_threshold(successes)
        .build()
        .unwrap()
}

fn fail(b: &CircuitBreaker) {
    b.try_acquire().expect("admitted").failure();
}

fn succeed(b: &CircuitBreaker) {
    b.try_acquire().expect("admitted").success();
}

#[tokio::test(start_paused = true)]
async fn opens_after_n_consecutive_failures() {
    let b = breaker(3, Duration::from_secs(10), 1);
    fail(&b);
    fail(&b);
    succeed(&b); // breaks the run
    fail(&b);
    fail(&b);
    assert_eq!(b.state(), State::Closed);
    fail(&b);
    assert_eq!(b.state(), State::Open);
    let refused = b.try_acquire().unwrap_err();
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn open_refuses_until_the_recovery_timeout_then_probes() {
    let b = breaker(1, Duration::from_secs(10), 1);
    fail(&b);
    advance(Duration::from_secs(4)).await;
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(6))
    );
    advance(Duration::from_secs(6)).await;
    let probe = b.try_acquire().expect("probe after the timeout");
    assert!(probe.is_probe());
    assert_eq!(b.state(), State::HalfOpen);
    // One probe at a time by default. The refusal names as long again as
    // the probe has run (at least 10 ms), not a whole recovery timeout.
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_millis(10))
    );
    advance(Duration::from_millis(300)).await;
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_millis(300))
    );
    probe.success();
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_closes_after_m_successes() {
    let b = breaker(1, Duration::from_secs(1), 3);
    fail(&b);
    advance(Duration::from_secs(1)).await;
    succeed(&b);
    succeed(&b);
    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.stats().probe_successes, 2);
    succeed(&b);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.stats().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn one_probe_failure_reopens() {
    let b = breaker(1, Duration::from_secs(1), 3);
    fail(&b);
    advance(Duration::from_secs(1)).await;
    succeed(&b);
    succeed(&b);
    fail(&b);
    assert_eq!(b.state(), State::Open);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(1))
    );
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_count_as_neither() {
    let b = breaker(2, Duration::from_secs(1), 1);
    fail(&b);
    b.try_acquire().unwrap().record(Outcome::Ignored);
    fail(&b);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn dropped_half_open_probe_frees_its_slot() {
    let b = breaker(1, Duration::from_secs(1), 1);
    fail(&b);
    advance(Duration::from_secs(1)).await;
    let probe = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    drop(probe);
    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.stats().probes_in_flight, 0);
    let probe = b.try_acquire().expect("slot given back");
    probe.success();
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropped_owned_probe_frees_its_slot_from_another_task() {
    let b = breaker(1, Duration::from_secs(1), 1);
    fail(&b);
    advance(Duration::from_secs(1)).await;
    let probe = b.try_acquire_owned().unwrap();
    assert!(probe.is_probe());
    assert!(b.try_acquire().is_err());
    tokio::spawn(async move { drop(probe) }).await.unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.stats().probes_in_flight, 0);
    b.try_acquire_owned().expect("slot given back").success();
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn probe_limit_admits_exactly_n() {
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .half_open_probes(3)
        .success_threshold(3)
        .build()
        .unwrap();
    fail(&b);
    advance(Duration::from_secs(1)).await;
    let permits: Vec<_> = (0..4).map(|_| b.try_acquire()).collect();
    assert_eq!(permits.iter().filter(|p| p.is_ok()).count(), 3);
    assert!(permits[3].is_err());
}

#[tokio::test(start_paused = true)]
async fn stale_permits_record_nothing_in_a_later_period() {
    let b = breaker(1, Duration::from_secs(1), 1);
    let old = b.try_acquire().unwrap();
    fail(&b);
    advance(Duration::from_secs(1)).await;
    succeed(&b); // probe closes it
    assert_eq!(b.state(), State::Closed);
    old.failure(); // from the first closed period
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.stats().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn open_time_backs_off_and_resets_after_close() {
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .backoff_multiplier(2.0)
        .max_recovery_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let wait = |b: &CircuitBreaker| b.try_acquire().unwrap_err().retry_after().unwrap();
    fail(&b);
    assert_eq!(wait(&b), Duration::from_secs(1));
    for expected in [2, 4, 5, 5] {
        advance(wait(&b)).await;
        fail(&b); // the probe fails
        assert_eq!(wait(&b), Duration::from_secs(expected));
    }
    advance(wait(&b)).await;
    succeed(&b);
    assert_eq!(b.stats().trips, 0);
    fail(&b);
    assert_eq!(wait(&b), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_the_open_time() {
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(10))
        .jitter(0.5)
        .jitter_source(|| 0.0)
        .build()
        .unwrap();
    fail(&b);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(5))
    );
}

#[tokio::test(start_paused = true)]
async fn failure_rate_trips_once_minimum_calls_are_in() {
    let b = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .failure_rate(0.5)
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(6)
        .build()
        .unwrap();
    for _ in 0..4 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Closed, "4 calls < minimum of 6");
    succeed(&b);
    assert_eq!(b.state(), State::Closed);
    fail(&b); // 5 of 6 failed
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_below_threshold_stays_closed() {
    let b = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .failure_rate(0.5)
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(10)
        .build()
        .unwrap();
    for i in 0..100 {
        if i % 3 == 0 { fail(&b) } else { succeed(&b) }
    }
    assert_eq!(b.state(), State::Closed);
    let s = b.stats();
    assert_eq!(s.window_calls, 10);
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let b = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .failure_rate(0.5)
        .sliding_window(SlidingWindow::Time {
            span: Duration::from_secs(10),
            buckets: 10,
        })
        .minimum_calls(4)
        .build()
        .unwrap();
    fail(&b);
    fail(&b);
    fail(&b);
    advance(Duration::from_secs(11)).await;
    succeed(&b);
    succeed(&b);
    fail(&b);
    assert_eq!(b.stats().window_calls, 3);
    assert_eq!(b.state(), State::Closed);
    fail(&b); // 2 of 4 in the last 10 s
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_call_rate_trips() {
    let b = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .slow_call(Duration::from_millis(500), 0.5)
        .sliding_window(SlidingWindow::Count(4))
        .minimum_calls(4)
        .build()
        .unwrap();
    for slow in [true, false, false] {
        let p = b.try_acquire().unwrap();
        advance(Duration::from_millis(if slow { 600 } else { 10 })).await;
        p.success();
    }
    assert_eq!(b.state(), State::Closed, "minimum calls not reached");
    let p = b.try_acquire().unwrap();
    advance(Duration::from_millis(500)).await;
    p.success(); // 2 slow of 4
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.stats().window_slow_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn hold_open_for_keeps_it_open_at_least_that_long() {
    let b = breaker(5, Duration::from_secs(1), 1);
    b.hold_open_for(Duration::from_secs(30));
    assert_eq!(b.state(), State::Open);
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(30))
    );
    // A shorter hold does not shorten it.
    b.hold_open_for(Duration::from_secs(5));
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(30))
    );
    advance(Duration::from_secs(30)).await;
    succeed(&b);
    assert_eq!(b.state(), State::Closed);
    b.disable();
    b.hold_open_for(Duration::from_secs(5));
    assert_eq!(b.state(), State::Disabled);
}

#[tokio::test(start_paused = true)]
async fn force_open_disable_and_reset() {
    let b = breaker(1, Duration::from_secs(1), 1);
    b.force_open();
    assert_eq!(b.state(), State::ForcedOpen);
    advance(Duration::from_secs(100)).await;
    assert_eq!(b.try_acquire().unwrap_err().retry_after(), None);
    b.disable();
    for _ in 0..10 {
        fail(&b);
    }
    assert_eq!(b.state(), State::Disabled);
    b.reset();
    assert_eq!(b.state(), State::Closed);
    fail(&b);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn every_transition_reaches_the_hook() {
    let seen: Arc<Mutex<Vec<Transition>>> = Arc::default();
    let log = seen.clone();
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(2))
        .on_transition(move |t| log.lock().unwrap().push(*t))
        .build()
        .unwrap();
    fail(&b);
    advance(Duration::from_secs(2)).await;
    succeed(&b);
    b.hold_open_for(Duration::from_secs(7));
    let seen = seen.lock().unwrap();
    let got: Vec<_> = seen
        .iter()
        .map(|t| (t.from, t.to, t.open_for, t.reason))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                State::Closed,
                State::Open,
                Some(Duration::from_secs(2)),
                Reason::ConsecutiveFailures
            ),
            (State::Open, State::HalfOpen, None, Reason::RecoveryTimeout),
            (
                State::HalfOpen,
                State::Closed,
                None,
                Reason::ProbesSucceeded
            ),
            (
                State::Closed,
                State::Open,
                Some(Duration::from_secs(7)),
                Reason::HeldOpen
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn call_wraps_a_future() {
    let b = breaker(1, Duration::from_secs(1), 1);
    let r = b.call(async { Err::<(), _>("boom") }).await;
    assert_eq!(r.unwrap_err().into_inner(), Some("boom"));
    let r = b.call(async { Ok::<_, ()>(1) }).await;
    assert!(r.unwrap_err().as_open().is_some());
}

#[test]
fn bad_configuration_is_refused_at_build() {
    let field = |b: apiguard_breaker::CircuitBreakerBuilder| b.build().unwrap_err().field();
    let b = CircuitBreaker::builder;
    assert_eq!(field(b().failure_threshold(0)), "failure_threshold");
    assert_eq!(
        field(b().recovery_timeout(Duration::ZERO)),
        "recovery_timeout"
    );
    assert_eq!(field(b().success_threshold(0)), "success_threshold");
    assert_eq!(field(b().half_open_probes(0)), "half_open_probes");
    assert_eq!(
        field(b().half_open_timeout(Duration::ZERO)),
        "half_open_timeout"
    );
    assert_eq!(field(b().failure_rate(f64::NAN)), "failure_rate");
    assert_eq!(field(b().failure_rate(1.5)), "failure_rate");
    assert_eq!(field(b().slow_call(Duration::ZERO, 0.5)), "slow_call");
    assert_eq!(
        field(
            b().failure_rate(0.5)
                .sliding_window(SlidingWindow::Count(0))
        ),
        "sliding_window"
    );
    assert_eq!(
        field(b().failure_rate(0.5).minimum_calls(0)),
        "minimum_calls"
    );
    assert_eq!(field(b().backoff_multiplier(0.5)), "backoff_multiplier");
    assert_eq!(field(b().jitter(1.5)), "jitter");
    assert_eq!(
        field(b().max_recovery_timeout(Duration::from_secs(1))),
        "max_recovery_timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_probe_cannot_wedge_it_half_open() {
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .half_open_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    fail(&b);
    advance(Duration::from_secs(1)).await;
    let hung = b.try_acquire().unwrap();
    std::mem::forget(hung); // never finishes, never drops
    advance(Duration::from_secs(4)).await;
    // Probing for 4 s of the 5 allowed: the hint is what is left.
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(1))
    );
    assert_eq!(b.state(), State::HalfOpen);
    advance(Duration::from_secs(1)).await;
    // Given up on: reopened, and probing again after the recovery timeout.
    assert_eq!(
        b.try_acquire().unwrap_err().retry_after(),
        Some(Duration::from_secs(1))
    );
    assert_eq!(b.state(), State::Open);
    advance(Duration::from_secs(1)).await;
    succeed(&b);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn window_config_reports_the_effective_window() {
    let b = CircuitBreaker::builder;
    assert_eq!(b().window_config(), None);
    assert_eq!(
        b().failure_rate(0.5).window_config(),
        Some(SlidingWindow::Count(100))
    );
    let time = SlidingWindow::Time {
        span: Duration::from_secs(10),
        buckets: 10,
    };
    assert_eq!(
        b().slow_call(Duration::from_secs(1), 0.5)
            .sliding_window(time)
            .window_config(),
        Some(time)
    );
}

#[tokio::test(start_paused = true)]
async fn tickets_count_like_permits_and_an_ignored_probe_frees_its_slot() {
    let b = breaker(2, Duration::from_secs(10), 1);
    for _ in 0..2 {
        let t = b.try_acquire_ticket().expect("admitted");
        assert!(!t.is_probe());
        b.record_ticket(t, Outcome::Failure);
    }
    assert_eq!(b.state(), State::Open);
    assert!(b.try_acquire_ticket().is_err());
    advance(Duration::from_secs(10)).await;
    // One probe slot: taken, then handed back unused.
    let probe = b.try_acquire_ticket().expect("probe");
    assert!(probe.is_probe());
    assert!(b.try_acquire_ticket().is_err(), "the only slot is taken");
    b.record_ticket(probe, Outcome::Ignored);
    // Free again: the next probe's success closes the circuit.
    let probe = b.try_acquire_ticket().expect("slot freed");
    b.record_ticket(probe, Outcome::Success);
    assert_eq!(b.state(), State::Closed);
}
