//! Breakers sharing their open signal through a real redis-server.

mod common;

use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, CircuitBreakerBuilder, State};
use apiguard_redis::SharedBreakerSignal;
use tokio::time::{Instant, sleep};

const POLL: Duration = Duration::from_millis(50);
const RECOVERY: Duration = Duration::from_millis(600);
/// Scheduling slack on a busy 2-core CI machine.
const MARGIN: Duration = Duration::from_millis(500);

async fn signal(url: &str) -> SharedBreakerSignal {
    SharedBreakerSignal::builder()
        .poll_every(POLL)
        .connect(url)
        .await
        .expect("signal connects")
}

fn breaker() -> CircuitBreakerBuilder {
    CircuitBreaker::builder()
        .failure_threshold(2)
        .recovery_timeout(RECOVERY)
        .success_threshold(1)
        .jitter(0.0)
}

fn trip(b: &CircuitBreaker) {
    for _ in 0..2 {
        b.try_acquire().expect("closed").failure();
    }
    assert_eq!(b.state(), State::Open);
}

/// Waits until `b` is open; fails past `within`.
async fn opens_within(b: &CircuitBreaker, within: Duration) -> Duration {
    let start = Instant::now();
    while b.state() != State::Open {
        assert!(
            start.elapsed() <= within,
            "not open after {:?}",
            start.elapsed()
        );
        sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_trip_on_one_instance_holds_the_others_open_and_all_close_after_recovery() {
    let server = redis_or_skip!();
    let url = server.url();
    let (sa, sb, sc) = (signal(&url).await, signal(&url).await, signal(&url).await);
    let a = sa.bind("upstream", breaker()).unwrap();
    let b = sb.bind("upstream", breaker()).unwrap();
    // A breaker for another key is not affected.
    let other = sc.bind("elsewhere", breaker()).unwrap();

    trip(&a);
    let tripped = Instant::now();
    opens_within(&b, POLL + MARGIN).await;

    // B refuses without having made (or failed) a single call.
    let refused = b.try_acquire().unwrap_err();
    assert!(refused.retry_after().unwrap() <= RECOVERY);
    assert_eq!(b.stats().consecutive_failures, 0);
    assert_eq!(other.state(), State::Closed);
    let left = sb
        .open_for("upstream")
        .await
        .unwrap()
        .expect("signal in redis");
    assert!(left <= RECOVERY);

    // After the open period both probe, succeed and close. The hold B
    // learned was not published again, so the signal is gone too.
    sleep((RECOVERY + Duration::from_millis(100)).saturating_sub(tripped.elapsed())).await;
    for br in [&a, &b] {
        br.try_acquire().expect("a probe is let through").success();
        assert_eq!(br.state(), State::Closed);
    }
    assert_eq!(sa.open_for("upstream").await.unwrap(), None);
    // And no late poll reopens them.
    sleep(POLL * 3).await;
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test]
async fn an_instance_does_not_hold_itself_open_on_its_own_signal() {
    let server = redis_or_skip!();
    let s = signal(&server.url()).await;
    let a = s.bind("self", breaker()).unwrap();
    trip(&a);
    sleep(RECOVERY + Duration::from_millis(20)).await;
    // Its own signal may outlive its open period by a round trip; it must
    // not keep it from probing.
    a.try_acquire().expect("probe").success();
    sleep(POLL * 3).await;
    assert_eq!(a.state(), State::Closed);
}

#[tokio::test]
async fn a_lingering_signal_holds_at_most_max_hold_once() {
    let server = redis_or_skip!();
    let url = server.url();
    let publisher = signal(&url).await;
    let follower = SharedBreakerSignal::builder()
        .poll_every(POLL)
        .max_hold(Duration::from_millis(200))
        .connect(&url)
        .await
        .unwrap();
    let b = follower.bind("long", breaker()).unwrap();
    // Someone publishes an hour.
    publisher
        .publish("long", Duration::from_secs(3600))
        .await
        .unwrap();
    opens_within(&b, POLL + MARGIN).await;
    let hold = b.stats().retry_after.unwrap();
    assert!(hold <= Duration::from_millis(200), "held {hold:?}");
    // The signal is still there, but it was applied once: B probes.
    sleep(Duration::from_millis(300)).await;
    b.try_acquire().expect("probe after max_hold").success();
    sleep(POLL * 3).await;
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test]
async fn a_dead_redis_stops_neither_local_trips_nor_recovery_and_signals_resume() {
    let mut server = redis_or_skip!();
    let url = server.url();
    let (sa, sb) = (signal(&url).await, signal(&url).await);
    let a = sa.bind("flaky", breaker()).unwrap();
    let b = sb.bind("flaky", breaker()).unwrap();

    server.kill();
    // Tripping, refusing and recovering are all local; the failed publish
    // and polls are only logged.
    trip(&b);
    assert!(b.try_acquire().is_err());
    sleep(RECOVERY + Duration::from_millis(50)).await;
    b.try_acquire().expect("probe").success();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(
        a.state(),
        State::Closed,
        "A learned nothing from a dead Redis"
    );

    server.restart();
    // Reconnection takes a moment; trip once Redis is back for A's publish.
    let start = Instant::now();
    while sa.open_for("flaky").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "no reconnect");
        sleep(Duration::from_millis(20)).await;
    }
    trip(&a);
    opens_within(&b, POLL + MARGIN + Duration::from_secs(1)).await;
}
