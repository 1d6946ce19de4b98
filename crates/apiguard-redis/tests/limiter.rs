//! The shared GCRA against a real redis-server.

mod common;

use std::time::Duration;

use apiguard_core::{ManualClock, Quota, RateLimited};
use apiguard_ratelimit::{Grant, Limiter};
use apiguard_redis::{DecidedBy, FailurePolicy, RedisLimiter};
use redis::Commands;

/// Generous: these tests are about the script, not the timeout.
const TIMEOUT: Duration = Duration::from_millis(500);

async fn limiter(url: &str, limit: u64, window: Duration, burst: u64) -> RedisLimiter {
    RedisLimiter::builder(Quota::new(limit, window).with_burst(burst))
        .timeout(TIMEOUT)
        .on_redis_failure(FailurePolicy::fail_closed())
        .connect(url)
        .await
        .expect("limiter connects")
}

#[tokio::test]
async fn burst_is_admitted_then_refused_with_the_wait_for_the_next_token() {
    let server = redis_or_skip!();
    // One token a second, so scheduling delays cannot blur the figures.
    let l = limiter(&server.url(), 1, Duration::from_secs(1), 5).await;
    for left in (0..5).rev() {
        let d = l.decide("burst", 1, Duration::ZERO).await;
        assert_eq!(d.decided_by, DecidedBy::Redis);
        assert!(d.allowed);
        assert_eq!(d.remaining, left);
        assert_eq!(d.wait, Duration::ZERO);
    }
    let d = l.decide("burst", 1, Duration::ZERO).await;
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    // The next token is a second after the first went.
    assert!(d.wait > Duration::from_millis(500) && d.wait <= Duration::from_secs(1));
    // The bucket is full again five seconds after the first token went.
    assert!(d.reset > Duration::from_millis(4500) && d.reset <= Duration::from_secs(5));
}

#[tokio::test]
async fn weighted_costs_spend_several_tokens_and_a_refusal_spends_none() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), 10, Duration::from_secs(10), 10).await;
    let d = l.decide("w", 4, Duration::ZERO).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 6);
    let d = l.decide("w", 7, Duration::ZERO).await;
    assert!(!d.allowed);
    assert_eq!(d.remaining, 6);
    // One token a second: the seventh is about a second away.
    assert!(d.wait > Duration::from_millis(500) && d.wait <= Duration::from_secs(1));
    let d = l.decide("w", 6, Duration::ZERO).await;
    assert!(d.allowed, "the refusal must not have spent tokens");
    assert_eq!(d.remaining, 0);
}

#[tokio::test]
async fn max_wait_reserves_tokens_due_within_it_and_refusals_reserve_nothing() {
    let server = redis_or_skip!();
    // One token a second, burst of one.
    let l = limiter(&server.url(), 1, Duration::from_secs(1), 1).await;
    assert!(l.decide("r", 1, Duration::ZERO).await.allowed);

    // The next token is ~1 s away: too far for 500 ms.
    let d = l.decide("r", 1, Duration::from_millis(500)).await;
    assert!(!d.allowed);

    // Within 3 s it is granted, to be used after the wait.
    let d = l.decide("r", 1, Duration::from_secs(3)).await;
    assert!(d.allowed);
    assert!(d.wait > Duration::from_millis(500) && d.wait <= Duration::from_secs(1));

    // The one after is ~2 s away: refused at 1.5 s, and that refusal left
    // the timeline alone, so the next reservation is still ~2 s out.
    assert!(!l.decide("r", 1, Duration::from_millis(1500)).await.allowed);
    let d = l.decide("r", 1, Duration::from_secs(3)).await;
    assert!(d.allowed);
    assert!(d.wait > Duration::from_millis(1500) && d.wait <= Duration::from_secs(2));
}

#[tokio::test]
async fn a_cost_above_the_burst_is_refused_without_asking_redis() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), 10, Duration::from_secs(1), 5).await;
    let d = l.decide("big", 6, Duration::from_secs(60)).await;
    assert!(!d.allowed);
    assert_eq!(d.decided_by, DecidedBy::OverBurst);
    assert_eq!(d.wait, Duration::MAX);
    let exists: bool = server.client().exists(l.redis_key("big")).unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn the_key_expires_once_the_bucket_has_refilled() {
    let server = redis_or_skip!();
    let mut con = server.client();
    // 50 per second, burst 10: an empty bucket refills in 200 ms.
    let l = limiter(&server.url(), 50, Duration::from_secs(1), 10).await;
    for _ in 0..10 {
        assert!(l.decide("ttl", 1, Duration::ZERO).await.allowed);
    }
    let key = l.redis_key("ttl");
    assert_eq!(key, "apiguard:rl:ttl");
    let pttl: i64 = con.pttl(&key).unwrap();
    assert!(pttl > 0 && pttl <= 200, "PTTL {pttl} ms");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let exists: bool = con.exists(&key).unwrap();
    assert!(!exists, "the key outlived the refill");
    // And a full bucket is what the next caller finds.
    assert_eq!(l.decide("ttl", 1, Duration::ZERO).await.remaining, 9);
}

#[tokio::test]
async fn the_script_is_loaded_again_after_a_script_flush() {
    let server = redis_or_skip!();
    let mut con = server.client();
    let l = limiter(&server.url(), 10, Duration::from_secs(1), 5).await;
    assert_eq!(
        l.decide("s", 1, Duration::ZERO).await.decided_by,
        DecidedBy::Redis
    );
    let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
    let d = l.decide("s", 1, Duration::ZERO).await;
    assert_eq!(d.decided_by, DecidedBy::Redis);
    assert_eq!(d.remaining, 3);
}

#[tokio::test]
async fn a_rate_that_is_not_whole_microseconds_is_stored_exactly() {
    let server = redis_or_skip!();
    let mut con = server.client();
    // Three a second: one token is 333 333⅓ µs, stored as whole
    // microseconds plus thirds.
    let l = limiter(&server.url(), 3, Duration::from_secs(1), 3).await;
    let t0 = common::redis_time_us(&mut con);
    assert!(l.decide("third", 1, Duration::ZERO).await.allowed);
    let t1 = common::redis_time_us(&mut con);
    let stored: String = con.get(l.redis_key("third")).unwrap();
    let (tat, frac) = stored.split_once(':').expect("<tat_us>:<ticks>");
    let tat: u64 = tat.parse().unwrap();
    assert_eq!(frac, "1", "one third of a microsecond past {tat}");
    // Decided at a Redis time between t0 and t1, a token later.
    let decided_at = tat - 333_333;
    assert!(
        (t0..=t1).contains(&decided_at),
        "{t0} <= {decided_at} <= {t1}"
    );
    // The key lives until the bucket is full again: 333 333⅓ µs, rounded
    // up to 334 ms at most.
    let pttl: i64 = con.pttl(l.redis_key("third")).unwrap();
    assert!(pttl > 0 && pttl <= 334, "PTTL {pttl}");
}

#[tokio::test]
async fn prefixes_and_keys_keep_buckets_apart() {
    let server = redis_or_skip!();
    let url = server.url();
    let a = limiter(&url, 10, Duration::from_secs(1), 1).await;
    let b = RedisLimiter::builder(Quota::per_second(10).with_burst(1))
        .timeout(TIMEOUT)
        .prefix("other:")
        .connect(&url)
        .await
        .unwrap();
    assert!(a.decide("k", 1, Duration::ZERO).await.allowed);
    assert!(!a.decide("k", 1, Duration::ZERO).await.allowed);
    assert!(a.decide("k2", 1, Duration::ZERO).await.allowed);
    assert!(b.decide("k", 1, Duration::ZERO).await.allowed);
}

#[tokio::test]
async fn instances_with_skewed_local_clocks_give_the_same_answers() {
    let server = redis_or_skip!();
    let url = server.url();
    // Three instances: one clock at zero, one ten days ahead, one that will
    // jump backwards. Only Redis TIME may matter.
    let clocks = [ManualClock::new(), ManualClock::new(), ManualClock::new()];
    clocks[1].set(10 * 86_400 * 1_000_000_000);
    clocks[2].set(5 * 86_400 * 1_000_000_000);
    let mut limiters = Vec::new();
    for c in &clocks {
        limiters.push(
            RedisLimiter::builder(Quota::per_second(1).with_burst(6))
                .timeout(TIMEOUT)
                .on_redis_failure(FailurePolicy::fail_closed())
                .clock(c.clock())
                .connect(&url)
                .await
                .unwrap(),
        );
    }
    clocks[2].set(0);

    // Round-robin over one key: the burst of 6 is shared, remaining counts
    // down across instances as if there were one.
    for i in 0..6u64 {
        let d = limiters[(i % 3) as usize]
            .decide("skew", 1, Duration::ZERO)
            .await;
        assert!(d.allowed, "token {i}");
        assert_eq!(d.remaining, 5 - i);
    }
    let mut waits = Vec::new();
    for l in &limiters {
        let d = l.decide("skew", 1, Duration::ZERO).await;
        assert!(!d.allowed);
        waits.push(d.wait);
    }
    // Each is told the same wait for the next token (to within the few
    // milliseconds between the calls).
    for w in &waits {
        assert!(*w > Duration::from_millis(500) && *w <= Duration::from_secs(1));
    }
    let spread = waits
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*waits.iter().min().unwrap());
    assert!(spread < Duration::from_millis(300), "waits {waits:?}");

    // The instance ten days ahead does not see the bucket as refilled.
    clocks[1].advance(Duration::from_secs(3600));
    assert!(!limiters[1].decide("skew", 1, Duration::ZERO).await.allowed);
}

async fn via_trait<L: Limiter<str>>(l: &L, key: &str) -> Result<Grant, RateLimited> {
    l.reserve(key, 1, Duration::ZERO).await
}

#[tokio::test]
async fn the_limiter_trait_gives_grants_and_refusals_with_the_quota() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), 2, Duration::from_secs(1), 2).await;
    let grant = via_trait(&l, "t").await.unwrap();
    assert_eq!(grant.remaining, 1);
    assert_eq!(grant.policy, Some(l.policy()));
    via_trait(&l, "t").await.unwrap();
    let refused = via_trait(&l, "t").await.unwrap_err();
    assert!(refused.retry_after().unwrap() <= Duration::from_millis(500));
    assert_eq!(refused.policy(), Some(l.policy()));
}

#[tokio::test]
async fn clones_share_one_limit() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), 10, Duration::from_secs(1), 3).await;
    let clones: Vec<_> = (0..6).map(|_| l.clone()).collect();
    let mut admitted = 0;
    for c in &clones {
        admitted += usize::from(c.decide("c", 1, Duration::ZERO).await.allowed);
    }
    assert_eq!(admitted, 3);
}

#[tokio::test]
async fn bad_configuration_is_refused_before_connecting() {
    // Port 1: nothing listens, and nothing is asked.
    let url = "redis://127.0.0.1:1/";
    let err = RedisLimiter::builder(Quota::per_second(0))
        .connect(url)
        .await
        .unwrap_err();
    assert!(err.is_config());
    let err = RedisLimiter::builder(Quota::per_second(1))
        .timeout(Duration::ZERO)
        .connect(url)
        .await
        .unwrap_err();
    assert!(err.is_config());
    let err = RedisLimiter::builder(Quota::per_second(1))
        .timeout_bounds(Duration::from_millis(5), Duration::from_millis(1))
        .connect(url)
        .await
        .unwrap_err();
    assert!(err.is_config());
    let err = RedisLimiter::builder(Quota::new(1, Duration::ZERO))
        .connect(url)
        .await
        .unwrap_err();
    assert!(err.is_config());
}
