//! Redis killed, hung, and brought back: a single miss, leaving Redis after
//! repeated misses, each failure policy while away, late scripts that must
//! not spend, and the shared limit again once Redis answers.

mod common;

use std::time::Duration;

use apiguard_redis::{DecidedBy, Decision, FailurePolicy, Mode, Quota, RedisLimiter};
use tokio::time::Instant;

/// A fixed timeout, so the tests do not depend on measured round trips.
const TIMEOUT: Duration = Duration::from_millis(50);
/// Scheduling slack on a busy 2-core CI machine.
const MARGIN: Duration = Duration::from_millis(400);

async fn limiter(url: &str, policy: FailurePolicy) -> RedisLimiter {
    RedisLimiter::builder(Quota::new(40, Duration::from_secs(10)))
        .timeout(TIMEOUT)
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

/// Decides until the limiter has left Redis; fails after 10 s.
async fn until_away(l: &RedisLimiter, key: &str) -> Vec<Decision> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while l.health().mode != Mode::Fallback {
        seen.push(timed(l, key).await);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never left redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// Decides until Redis decides again; fails after 10 s.
async fn until_redis_answers(l: &RedisLimiter, key: &str) -> (Decision, Vec<Decision>) {
    let start = Instant::now();
    let mut before = Vec::new();
    loop {
        let d = timed(l, key).await;
        if d.decided_by == DecidedBy::Redis {
            return (d, before);
        }
        before.push(d);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "decisions did not come back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_single_missed_answer_is_refused_and_redis_stays_in_charge() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), FailurePolicy::local_share()).await;
    assert_eq!(timed(&l, "one").await.decided_by, DecidedBy::Redis);
    server.signal("STOP");
    let d = timed(&l, "one").await;
    server.signal("CONT");
    // Redis could not count it, so it is not admitted, and the caller is
    // told to ask again after one timeout.
    assert!(!d.allowed);
    assert_eq!(d.decided_by, DecidedBy::FailClosed);
    assert_eq!(d.wait, TIMEOUT);
    let h = l.health();
    assert_eq!(h.mode, Mode::Redis);
    assert_eq!(h.failures_in_a_row, 1);
    let d = timed(&l, "one").await;
    assert_eq!(d.decided_by, DecidedBy::Redis);
    assert_eq!(l.health().failures_in_a_row, 0);
}

#[tokio::test]
async fn admit_all_admits_while_redis_is_down_and_the_debt_is_paid_on_return() {
    let mut server = redis_or_skip!();
    // One token a second and a large burst: the count below is exact.
    let l = RedisLimiter::builder(Quota::per_second(1).with_burst(1000))
        .timeout(TIMEOUT)
        .on_redis_failure(FailurePolicy::admit_all())
        .connect(&server.url())
        .await
        .unwrap();
    assert_eq!(timed(&l, "o").await.remaining, 999);

    server.kill();
    let mut open = until_away(&l, "o").await;
    for _ in 0..20 {
        open.push(timed(&l, "o").await);
    }
    assert!(
        open.iter()
            .all(|d| d.allowed && d.decided_by == DecidedBy::AdmitAll)
    );

    server.restart();
    let (d, before) = until_redis_answers(&l, "o").await;
    assert!(before.iter().all(|d| d.allowed));
    // A fresh server: the bucket starts full, and every token admitted
    // without Redis is taken from it with the first decision it runs.
    let owed = (open.len() + before.len()) as u64;
    assert!(d.allowed);
    assert_eq!(d.remaining, 1000 - owed - 1, "owed {owed}");
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
    let misses = until_away(&l, "c").await;
    assert!(misses.len() >= apiguard_redis::FAILURES_TO_LEAVE as usize);
    // Single misses ask for a retry after one timeout; the miss that made
    // the limiter leave Redis is the policy's.
    let (leaving, single) = misses.split_last().unwrap();
    assert!(single.iter().all(|d| !d.allowed && d.wait == TIMEOUT));
    assert_eq!(leaving.wait, Duration::from_secs(2));
    for _ in 0..20 {
        let d = timed(&l, "c").await;
        assert!(!d.allowed);
        assert_eq!(d.decided_by, DecidedBy::FailClosed);
        assert_eq!(d.wait, Duration::from_secs(2));
    }

    server.restart();
    assert!(until_redis_answers(&l, "c").await.0.allowed);
    assert_eq!(l.health().mode, Mode::Redis);
}

#[tokio::test]
async fn local_share_enforces_this_instances_share_while_redis_is_down() {
    let mut server = redis_or_skip!();
    // 40 per second, burst 40, four instances: a local share of 10 a
    // second, at most 10 at once, starting empty.
    let l = RedisLimiter::builder(Quota::per_second(40))
        .timeout(TIMEOUT)
        .instances(4)
        .connect(&server.url())
        .await
        .unwrap();
    assert!(timed(&l, "lb").await.allowed);
    assert_eq!(l.health().instances, Some(4));

    server.kill();
    until_away(&l, "lb").await;
    let d = timed(&l, "lb").await;
    assert_eq!(d.decided_by, DecidedBy::LocalShare);
    assert!(!d.allowed, "the local bucket starts empty");
    // Two seconds fill it: ten tokens, and not one more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut admitted = 0;
    for _ in 0..30 {
        let d = timed(&l, "lb").await;
        assert_eq!(d.decided_by, DecidedBy::LocalShare);
        admitted += u64::from(d.allowed);
    }
    // Ten saved up, plus what the share refills (10/s) while the 30
    // decisions run: at most a few on a busy machine.
    assert!((10..=13).contains(&admitted), "admitted {admitted}");

    server.restart();
    let (d, before) = until_redis_answers(&l, "lb").await;
    admitted += before.iter().filter(|d| d.allowed).count() as u64;
    assert!(d.allowed);
    // The fresh server's bucket pays for what the share admitted.
    assert_eq!(d.remaining, 40 - admitted - 1);
}

#[tokio::test]
async fn the_local_share_is_learned_from_the_register_of_instances() {
    let server = redis_or_skip!();
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(
            RedisLimiter::builder(Quota::per_second(40))
                .prefix("reg:")
                .connect(&server.url())
                .await
                .unwrap(),
        );
    }
    // Each registers at once and reads the count once a second.
    let start = Instant::now();
    while fleet.iter().any(|l| l.health().instances != Some(3)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            fleet.iter().map(|l| l.health()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another limit's instances are not counted.
    let other = RedisLimiter::builder(Quota::per_second(40))
        .prefix("other:")
        .connect(&server.url())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(other.health().instances, Some(1));
}

#[tokio::test]
async fn a_hung_redis_times_out_into_the_policy_and_recovers_when_it_continues() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), FailurePolicy::fail_closed()).await;
    assert!(timed(&l, "h").await.allowed);

    // SIGSTOP: the socket stays open, nothing answers. Only the timeout
    // can end these decisions.
    server.signal("STOP");
    until_away(&l, "h").await;
    // Away, decisions no longer wait for Redis: a probe in the background
    // asks it.
    for _ in 0..5 {
        assert_eq!(timed(&l, "h").await.decided_by, DecidedBy::FailClosed);
    }
    server.signal("CONT");
    assert!(until_redis_answers(&l, "h").await.0.allowed);
}

/// Late scripts, queued in a stopped Redis, must not spend when it
/// continues: the first decision after it sees the whole burst.
async fn late_scripts_spend_nothing(lease: bool) {
    let server = redis_or_skip!();
    let mut b = RedisLimiter::builder(Quota::per_second(1).with_burst(10))
        .timeout(TIMEOUT)
        .on_redis_failure(FailurePolicy::fail_closed());
    if lease {
        b = b.lease(3, Duration::from_secs(10));
    }
    let l = b.connect(&server.url()).await.unwrap();
    server.signal("STOP");
    let mut sent = until_away(&l, "late").await.len();
    for _ in 0..20 {
        timed(&l, "late").await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the last probe run out before Redis continues, so every script
    // queued in it is past its deadline.
    tokio::time::sleep(TIMEOUT * 4).await;
    server.signal("CONT");
    let (d, _) = until_redis_answers(&l, "late").await;
    assert!(d.allowed);
    let leased = if lease { 3 } else { 0 };
    assert_eq!(
        d.remaining, 9,
        "{sent} decisions were queued in the stopped redis (lease {leased})"
    );
}

#[tokio::test]
async fn scripts_that_run_after_the_callers_deadline_spend_nothing() {
    late_scripts_spend_nothing(false).await;
}

#[tokio::test]
async fn late_scripts_take_no_lease() {
    late_scripts_spend_nothing(true).await;
}
