//! `RedisLimiter` and `SharedBreakerSignal` on a real Redis Cluster of
//! three masters and three replicas (see `common/cluster.rs`): keys spread
//! over every master, each key's limit holds, a killed master's keys go to
//! the failure policy while the others stay on Redis and come back after
//! the promotion, and the breaker signal reaches every instance.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, State};
use apiguard_redis::{DecidedBy, FailurePolicy, Mode, Quota, RedisLimiter, SharedBreakerSignal};
use common::cluster::{RedisCluster, unix_us};

/// A burst of 5 that takes 30 s to refill: a bucket's key (which expires
/// once it is full again) outlives the test, so counting keys per master
/// at the end counts every key the test used. At 10 a second the first
/// keys expired while the last were asked, and a loaded CI machine left
/// fewer than the count asserts.
fn quota() -> Quota {
    Quota::per_minute(10).with_burst(5)
}

/// Key names whose buckets (`prefix{name}`) fall on each master, `per`
/// of each.
fn keys_per_master(c: &RedisCluster, per: usize) -> HashMap<u16, Vec<String>> {
    let mut out: HashMap<u16, Vec<String>> = HashMap::new();
    let masters = c.master_ports();
    for i in 0.. {
        let name = format!("k{i}");
        let m = c.master_of(&name);
        let v = out.entry(m).or_default();
        if v.len() < per {
            v.push(name);
        }
        if masters
            .iter()
            .all(|m| out.get(m).is_some_and(|v| v.len() == per))
        {
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_master_and_each_key_keeps_its_limit() {
    let c = cluster_or_skip!();
    // A fixed, generous timeout: this test asks where buckets go and
    // whether each keeps its limit, not how the adaptive timeout (20 ms at
    // the least) rides a 2-core machine that also runs a failover; there a
    // single decision out of 1800 missed it and fell to the policy.
    let limiter = RedisLimiter::builder(quota())
        .prefix("spread:")
        .timeout(Duration::from_millis(500))
        .connect_cluster(&c.seeds())
        .await
        .expect("connects to the cluster");
    assert!(limiter.is_cluster());
    assert_eq!(limiter.redis_key("user-1"), "spread:{user-1}");

    // 300 keys, each asked for one more than its burst at once.
    for i in 0..300 {
        let key = format!("user-{i}");
        let mut admitted = 0;
        for _ in 0..6 {
            let d = limiter.decide(key.as_str(), 1, Duration::ZERO).await;
            assert_eq!(d.decided_by, DecidedBy::Redis, "{d:?}");
            admitted += u32::from(d.allowed);
        }
        assert_eq!(admitted, 5, "key {key}: the burst, and no more");
    }
    // Every master holds some of the buckets.
    let mut per_master = Vec::new();
    for m in c.master_ports() {
        let mut con = c.client(m);
        let n: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
        per_master.push(n);
    }
    eprintln!("buckets per master: {per_master:?}");
    assert_eq!(per_master.len(), 3);
    assert!(per_master.iter().all(|&n| n >= 50), "{per_master:?}");
    let h = limiter.health();
    assert_eq!((h.mode, h.shards, h.shards_away), (Mode::Redis, Some(3), 0));
}

#[tokio::test]
async fn a_prefix_with_a_hash_tag_is_refused_on_a_cluster() {
    // Refused before any connection is tried.
    let err = RedisLimiter::builder(quota())
        .prefix("{rl}:")
        .connect_cluster(&["redis://127.0.0.1:1/"])
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err}");
    match err {
        apiguard_redis::BuildError::Config(c) => assert_eq!(c.field(), "prefix"),
        other => panic!("{other}"),
    }
}

/// Kills the master of some keys mid-run: their decisions go to the
/// policy (fail closed: nothing admitted without Redis), the other keys
/// stay on Redis throughout, and the killed master's keys come back to
/// Redis by themselves once its replica is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_sends_only_its_keys_to_the_policy_until_its_replica_is_promoted() {
    let mut c = cluster_or_skip!();
    let keys = keys_per_master(&c, 2);
    let limiter = RedisLimiter::builder(Quota::per_second(1000).with_burst(100))
        .prefix("kill:")
        .on_redis_failure(FailurePolicy::fail_closed())
        .connect_cluster(&c.seeds())
        .await
        .expect("connects to the cluster");
    let victim = *keys.keys().min().unwrap();
    let victim_keys: HashSet<String> = keys[&victim].iter().cloned().collect();
    let slot = c.keyslot(&format!("{{{}}}", keys[&victim][0]));
    let all: Vec<String> = keys.values().flatten().cloned().collect();

    let max_away = Arc::new(AtomicU32::new(0));
    // The run goes on until 3 s after the promotion is seen (and for 9 s
    // at least): however long a loaded machine takes to fail over, the
    // keys' return to Redis is inside the run.
    let end = Arc::new(AtomicU64::new(u64::MAX));
    let run = |limiter: RedisLimiter,
               all: Vec<String>,
               max_away: Arc<AtomicU32>,
               end: Arc<AtomicU64>| async move {
        // (unix µs, key, decided_by, allowed) of every decision.
        let mut seen = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut i = 0;
        while unix_us() < end.load(Ordering::Relaxed) {
            tick.tick().await;
            let k = &all[i % all.len()];
            i += 1;
            let d = limiter.decide(k.as_str(), 1, Duration::ZERO).await;
            seen.push((unix_us(), k.clone(), d.decided_by, d.allowed));
            max_away.fetch_max(limiter.health().shards_away, Ordering::Relaxed);
        }
        seen
    };
    let started = unix_us();
    let task = tokio::spawn(run(
        limiter.clone(),
        all,
        Arc::clone(&max_away),
        Arc::clone(&end),
    ));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed = unix_us();
    c.kill(victim);
    let (promoted, new_master) =
        tokio::task::block_in_place(|| c.wait_promoted(slot, victim, Duration::from_secs(30)));
    end.store(
        (started + 9_000_000).max(promoted + 3_000_000),
        Ordering::Relaxed,
    );
    let seen = task.await.unwrap();
    assert_ne!(new_master, victim);

    let policy_admitted = seen
        .iter()
        .filter(|(_, _, by, ok)| *by != DecidedBy::Redis && *ok)
        .count();
    assert_eq!(
        policy_admitted, 0,
        "fail closed admits nothing without redis"
    );
    // The other masters' keys stayed on Redis: only the killed master ever
    // left it (health), and the others' decisions missed (each refused
    // alone, a single miss under load) fewer than 1% of the time.
    assert_eq!(
        max_away.load(Ordering::Relaxed),
        1,
        "exactly one master away at worst"
    );
    let others: Vec<_> = seen
        .iter()
        .filter(|(_, k, _, _)| !victim_keys.contains(k))
        .collect();
    let others_missed = others
        .iter()
        .filter(|(_, _, by, _)| *by != DecidedBy::Redis)
        .count();
    eprintln!(
        "other masters' keys: {others_missed} of {} decisions missed redis",
        others.len()
    );
    assert!(
        others_missed * 100 < others.len(),
        "{others_missed} of {}",
        others.len()
    );
    // The victim's keys went to the policy after the kill...
    let first_policy = seen
        .iter()
        .find(|(t, k, by, _)| {
            *t > killed && victim_keys.contains(k) && *by == DecidedBy::FailClosed
        })
        .map(|r| r.0)
        .expect("the killed master's keys went to the failure policy");
    // ...and came back to Redis on their own after the promotion.
    let back = seen
        .iter()
        .filter(|(t, k, _, _)| *t > first_policy && victim_keys.contains(k))
        .find(|(_, _, by, _)| *by == DecidedBy::Redis)
        .map(|r| r.0)
        .expect("the killed master's keys came back to redis");
    let last_policy = seen
        .iter()
        .filter(|(_, k, by, _)| victim_keys.contains(k) && *by != DecidedBy::Redis)
        .map(|r| r.0)
        .max()
        .unwrap();
    eprintln!(
        "kill at 0: policy from {:.0} ms, promotion seen at {:.0} ms, back on redis at {:.0} ms \
         ({:+.0} ms after the promotion was seen), last policy decision {:.0} ms",
        (first_policy - killed) as f64 / 1e3,
        (promoted - killed) as f64 / 1e3,
        (back - killed) as f64 / 1e3,
        (back as f64 - promoted as f64) / 1e3,
        (last_policy - killed) as f64 / 1e3,
    );
    assert!(back >= first_policy);
    assert!(
        back <= promoted + 3_000_000,
        "back on redis more than 3 s after the promotion"
    );
    // Health reported the lost master (max_away above), and reports none
    // away once the promoted replica answers.
    let mut h = limiter.health();
    for _ in 0..200 {
        if h.shards_away == 0 {
            break;
        }
        limiter
            .decide(
                victim_keys.iter().next().unwrap().as_str(),
                1,
                Duration::ZERO,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        h = limiter.health();
    }
    assert_eq!((h.mode, h.shards_away), (Mode::Redis, 0), "{h:?}");
}

async fn signal(c: &RedisCluster, poll: Duration) -> SharedBreakerSignal {
    SharedBreakerSignal::builder()
        .poll_every(poll)
        .prefix("sig:")
        .connect_cluster(&c.seeds())
        .await
        .expect("connects to the cluster")
}

fn breaker(open_for: Duration) -> apiguard_breaker::CircuitBreakerBuilder {
    CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(open_for)
        .success_threshold(1)
        .jitter(0.0)
}

fn trip(b: &CircuitBreaker) {
    b.try_acquire().expect("closed").failure();
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_reaches_every_instance_within_the_poll_delay() {
    let c = cluster_or_skip!();
    let poll = Duration::from_millis(50);
    let mut instances = Vec::new();
    for _ in 0..4 {
        let s = signal(&c, poll).await;
        let b = s.bind("payments", breaker(Duration::from_secs(5))).unwrap();
        instances.push((s, b));
    }
    assert_eq!(instances[0].0.redis_key("payments"), "{sig:}payments");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Instance 0 trips.
    let tripped = unix_us();
    trip(&instances[0].1);
    let mut delays = Vec::new();
    for (_, b) in &instances[1..] {
        loop {
            if b.state() == State::Open {
                delays.push((unix_us() - tripped) as f64 / 1e3);
                break;
            }
            assert!(
                unix_us() - tripped < (poll + Duration::from_millis(500)).as_micros() as u64,
                "an instance did not learn of the trip within poll + 500 ms"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    eprintln!("signal delays at a {poll:?} poll: {delays:?} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_does_not_hold_a_breaker_open_past_its_expiry() {
    let mut c = cluster_or_skip!();
    let a = signal(&c, Duration::from_millis(50)).await;
    let b = signal(&c, Duration::from_millis(50)).await;
    let open_for = Duration::from_secs(2);
    let ba = a.bind("search", breaker(open_for)).unwrap();
    let bb = b
        .bind("search", breaker(Duration::from_millis(100)))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    trip(&ba);
    let tripped = unix_us();
    // B learns of it...
    while bb.state() != State::Open {
        assert!(unix_us() - tripped < 1_000_000, "B never held open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let hold = bb.stats().retry_after.expect("held open");
    assert!(hold <= open_for, "held {hold:?}");
    // ...then the master holding the signal dies, and no one can clear
    // or extend it.
    let master = c.master_of(&a.redis_key("search"));
    tokio::task::block_in_place(|| c.kill(master));
    // B still refuses within the published open time...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bb.try_acquire().is_err(), "the hold ended early");
    // ...and lets a probe through once it ends: the lost node holds
    // nothing open past the signal's expiry.
    let expiry = tripped + open_for.as_micros() as u64;
    tokio::time::sleep(Duration::from_micros(
        (expiry + 200_000).saturating_sub(unix_us()),
    ))
    .await;
    bb.try_acquire()
        .expect("a probe is let through after the signal's expiry")
        .success();
    assert_eq!(bb.state(), State::Closed);
    // And no later poll (against a cluster failing over) reopens it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bb.state(), State::Closed);
    eprintln!(
        "B held {hold:?} of a {open_for:?} trip; signal master killed; probe let through {:.0} ms after the expiry",
        (unix_us() - expiry) as f64 / 1e3 - 300.0
    );
}
