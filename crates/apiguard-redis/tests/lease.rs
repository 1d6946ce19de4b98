//! Leasing: several tokens per round trip for hot keys.

mod common;

use std::time::Duration;

use apiguard_redis::{DecidedBy, FailurePolicy, Quota, RedisLimiter};
use redis::Commands;

async fn leasing(url: &str, lease: u32, max_age: Duration) -> RedisLimiter {
    RedisLimiter::builder(Quota::per_second(1).with_burst(10))
        .timeout(Duration::from_millis(500))
        .on_redis_failure(FailurePolicy::fail_closed())
        .lease(lease, max_age)
        .connect(url)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_lease_serves_several_decisions_per_round_trip_from_the_shared_bucket() {
    let server = redis_or_skip!();
    let url = server.url();
    let l = leasing(&url, 4, Duration::from_secs(10)).await;
    let d = l.decide("hot", 1, Duration::ZERO).await;
    assert_eq!(d.decided_by, DecidedBy::Redis);
    // 1 spent, 4 leased: Redis holds 5; this instance can still use 9.
    assert_eq!(d.remaining, 9);
    for left in (5..=8).rev() {
        let d = l.decide("hot", 1, Duration::ZERO).await;
        assert_eq!(d.decided_by, DecidedBy::Lease);
        assert!(d.allowed);
        assert_eq!(d.remaining, left);
    }
    // The lease is spent: the next one asks Redis again (and leases again).
    let d = l.decide("hot", 1, Duration::ZERO).await;
    assert_eq!(d.decided_by, DecidedBy::Redis);

    // Another instance, without leases, sees what was taken: 5 + 1 + 4.
    let other = RedisLimiter::builder(Quota::per_second(1).with_burst(10))
        .timeout(Duration::from_millis(500))
        .connect(&url)
        .await
        .unwrap();
    assert!(!other.decide("hot", 1, Duration::ZERO).await.allowed);
}

#[tokio::test]
async fn a_lease_takes_only_what_is_there_and_never_delays_the_request() {
    let server = redis_or_skip!();
    let l = leasing(&server.url(), 8, Duration::from_secs(10)).await;
    let mut con = server.client();
    // 7 of 10 gone: the request gets 1, the lease only the 2 left.
    let plain = RedisLimiter::builder(Quota::per_second(1).with_burst(10))
        .timeout(Duration::from_millis(500))
        .connect(&server.url())
        .await
        .unwrap();
    assert!(plain.decide("k", 7, Duration::ZERO).await.allowed);
    let d = l.decide("k", 1, Duration::ZERO).await;
    assert!(d.allowed && d.wait == Duration::ZERO);
    for _ in 0..2 {
        assert_eq!(
            l.decide("k", 1, Duration::ZERO).await.decided_by,
            DecidedBy::Lease
        );
    }
    let d = l.decide("k", 1, Duration::ZERO).await;
    assert_eq!(d.decided_by, DecidedBy::Redis);
    assert!(!d.allowed);
    let exists: bool = con.exists(l.redis_key("k")).unwrap();
    assert!(exists);
}

#[tokio::test]
async fn leased_tokens_are_not_handed_out_after_max_age() {
    let server = redis_or_skip!();
    let l = leasing(&server.url(), 4, Duration::from_millis(100)).await;
    assert_eq!(
        l.decide("old", 1, Duration::ZERO).await.decided_by,
        DecidedBy::Redis
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let d = l.decide("old", 1, Duration::ZERO).await;
    assert_eq!(d.decided_by, DecidedBy::Redis);
    // The expired lease's 4 tokens are lost, not returned: 1 + 4 + 1 + 4.
    assert_eq!(d.remaining, 4);
}

#[tokio::test]
async fn a_lease_as_large_as_the_burst_is_refused() {
    let err = RedisLimiter::builder(Quota::per_second(1).with_burst(4))
        .lease(4, Duration::from_secs(1))
        .connect("redis://127.0.0.1:1/")
        .await
        .unwrap_err();
    assert!(err.is_config());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_leases_stay_within_the_documented_over_admission() {
    const LIMIT: u64 = 100;
    const BURST: u64 = 20;
    const LEASE: u32 = 5;
    const INSTANCES: u64 = 3;
    let server = redis_or_skip!();
    let url = server.url();
    let mut con = server.client();
    let t0 = common::redis_time_us(&mut con);
    let mut tasks = Vec::new();
    for _ in 0..INSTANCES {
        let l = RedisLimiter::builder(Quota::per_second(LIMIT).with_burst(BURST))
            .timeout(Duration::from_millis(500))
            .on_redis_failure(FailurePolicy::fail_closed())
            .lease(LEASE, Duration::from_millis(200))
            .connect(&url)
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut admitted = 0u64;
            while start.elapsed() < Duration::from_millis(1500) {
                admitted += u64::from(l.decide("many", 1, Duration::ZERO).await.allowed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            admitted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let elapsed_us = common::redis_time_us(&mut con) - t0;
    let allowed = BURST + LIMIT * elapsed_us / 1_000_000;
    let bound = allowed + INSTANCES * u64::from(LEASE);
    assert!(total <= bound, "admitted {total}, bound {bound}");
    assert!(total >= LIMIT, "admitted only {total}");
}
