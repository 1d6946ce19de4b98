//! Redis killed, hung, and brought back: each failure policy within its
//! timeout, and the shared limit again once Redis answers.

mod common;

use std::time::Duration;

use apiguard_redis::{DecidedBy, Decision, FailurePolicy, RedisLimiter};
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_millis(50);
/// Scheduling slack on a busy 2-core CI machine.
const MARGIN: Duration = Duration::from_millis(400);

async fn limiter(url: &str, policy: FailurePolicy) -> RedisLimiter {
    // 40 per 10 s: a local share (of 4) refills one token a second, so
    // scheduling delays barely move the local counts.
    RedisLimiter::builder(40, Duration::from_secs(10))
        .timeout(TIMEOUT)
        .retry_redis_after(Duration::from_millis(50))
        .on_redis_failure(policy)
        .connect(url)
        .await
        .expect("limiter connects")
}

/// One decision, checked to come back within the timeout.
async fn timed(l: &RedisLimiter, key: &str) -> Decision {
    let start = Instant::now();
    let d = l.decide(key, 1, Duration::ZERO).await;
    let took = start.elapsed();
    assert!(took <= TIMEOUT + MARGIN, "a decision took {took:?}");
    d
}

/// Decides until Redis answers again; fails after 10 s.
async fn until_redis_answers(l: &RedisLimiter, key: &str) -> Decision {
    let start = Instant::now();
    loop {
        let d = timed(l, key).await;
        if d.decided_by == DecidedBy::Redis {
            return d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "decisions did not come back to Redis after it restarted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fail_open_admits_while_redis_is_down_and_the_shared_limit_resumes() {
    let mut server = redis_or_skip!();
    let l = limiter(&server.url(), FailurePolicy::FailOpen).await;
    assert_eq!(timed(&l, "o").await.decided_by, DecidedBy::Redis);

    server.kill();
    for _ in 0..100 {
        let d = timed(&l, "o").await;
        assert!(d.allowed);
        assert_eq!(d.decided_by, DecidedBy::FailOpen);
    }

    server.restart();
    let d = until_redis_answers(&l, "o").await;
    assert!(d.allowed);
    // A fresh server: the bucket starts full.
    assert_eq!(d.remaining, 39);
}

#[tokio::test]
async fn fail_closed_refuses_while_redis_is_down_and_admits_after_restart() {
    let mut server = redis_or_skip!();
    let policy = FailurePolicy::FailClosed {
        retry_after: Duration::from_secs(2),
    };
    let l = limiter(&server.url(), policy).await;
    assert!(timed(&l, "c").await.allowed);

    server.kill();
    for _ in 0..20 {
        let d = timed(&l, "c").await;
        assert!(!d.allowed);
        assert_eq!(d.decided_by, DecidedBy::FailClosed);
        assert_eq!(d.wait, Duration::from_secs(2));
    }

    server.restart();
    assert!(until_redis_answers(&l, "c").await.allowed);
}

#[tokio::test]
async fn local_bucket_enforces_this_instances_share_while_redis_is_down() {
    let mut server = redis_or_skip!();
    // Four instances expected: the local share is a burst of 10.
    let l = limiter(&server.url(), FailurePolicy::local_bucket(4)).await;
    assert!(timed(&l, "lb").await.allowed);

    server.kill();
    let mut admitted = 0;
    for _ in 0..30 {
        let d = timed(&l, "lb").await;
        if d.decided_by == DecidedBy::LocalBucket && d.allowed {
            admitted += 1;
        }
    }
    // 10 from the burst, plus the one a second the share refills while
    // the 30 decisions run (a few of them wait up to the timeout).
    assert!((10..=12).contains(&admitted), "admitted {admitted}");

    server.restart();
    let d = until_redis_answers(&l, "lb").await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 39);
}

#[tokio::test]
async fn a_hung_redis_times_out_into_the_policy_and_recovers_when_it_continues() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), FailurePolicy::fail_closed()).await;
    assert!(timed(&l, "h").await.allowed);

    // SIGSTOP: the socket stays open, nothing answers. Only the timeout
    // can end these decisions.
    server.signal("STOP");
    for _ in 0..5 {
        let start = Instant::now();
        let d = timed(&l, "h").await;
        assert_eq!(d.decided_by, DecidedBy::FailClosed);
        // After a timeout the back-off answers at once, so either way a
        // decision never waits longer than the timeout.
        assert!(start.elapsed() <= TIMEOUT + MARGIN);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    server.signal("CONT");
    assert!(until_redis_answers(&l, "h").await.allowed);
}

#[tokio::test]
async fn decisions_skip_redis_during_the_back_off_after_a_failure() {
    let server = redis_or_skip!();
    let l = RedisLimiter::builder(100, Duration::from_secs(1))
        .timeout(TIMEOUT)
        .retry_redis_after(Duration::from_secs(30))
        .on_redis_failure(FailurePolicy::FailOpen)
        .connect(&server.url())
        .await
        .unwrap();
    server.signal("STOP");
    let start = Instant::now();
    assert_eq!(timed(&l, "b").await.decided_by, DecidedBy::FailOpen);
    assert!(start.elapsed() >= TIMEOUT);
    // Within the back-off, no decision waits for the hung server.
    let start = Instant::now();
    for _ in 0..50 {
        assert_eq!(
            l.decide("b", 1, Duration::ZERO).await.decided_by,
            DecidedBy::FailOpen
        );
    }
    assert!(start.elapsed() < TIMEOUT, "took {:?}", start.elapsed());
    server.signal("CONT");
}
