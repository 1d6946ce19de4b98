//! Many threads, one bucket, one breaker: every decision is counted, and
//! the totals must come out exact, not "about right".
//!
//! Time is a `ManualClock` standing still while the threads race (and
//! moved by exactly one second between rounds), so the exact answer is
//! known: a frozen bucket admits its capacity and not one token more; one
//! second later it admits exactly one second of refill.
//!
//! Sizes: 8 tasks on an 8-worker runtime; `BUCKET_TRIES` (2,000,000) and
//! `BREAKER_CALLS` (1,000,000) decisions per round. In a debug build on two
//! cores the file runs in about one second; `STRESS_SCALE=10` multiplies
//! the bucket rounds for a longer run in release.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apiguard::breaker::{CircuitBreaker, SlidingWindow, State};
use apiguard::{KeyedLimiter, TokenBucket};
use apiguard_core::ManualClock;

const TASKS: u64 = 8;
const BUCKET_TRIES: u64 = 2_000_000;
const BREAKER_CALLS: u64 = 1_000_000;

fn scale() -> u64 {
    std::env::var("STRESS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Runs `f(task)` on `TASKS` tasks at once and sums what they return.
async fn race<F>(f: F) -> u64
where
    F: Fn(u64) -> u64 + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let start = Arc::new(tokio::sync::Barrier::new(TASKS as usize));
    let mut set = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (f, start) = (f.clone(), start.clone());
        set.spawn(async move {
            start.wait().await;
            // Tight loops on purpose: a blocking section per worker.
            tokio::task::block_in_place(|| f(task))
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r.expect("no task panicked");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn racing_tasks_take_exactly_the_capacity_then_exactly_the_refill() {
    let scale = scale();
    let tries = BUCKET_TRIES * scale;
    let capacity = 600_000u32;
    let refill = 150_000.0;
    let clock = ManualClock::new();
    let bucket = TokenBucket::from_rate(capacity, refill)
        .unwrap()
        .with_clock(clock.clock());
    for round in 0..3 {
        let now = clock.now();
        let b = bucket.clone();
        let admitted = race(move |_| {
            let mut ok = 0;
            for _ in 0..tries / TASKS {
                ok += u64::from(b.try_acquire_at(1, now).is_ok());
            }
            ok
        })
        .await;
        let expected = if round == 0 { 600_000 } else { 150_000 };
        assert_eq!(admitted, expected, "round {round}: of {tries} tries");
        assert_eq!(bucket.available_at(now), 0.0);
        clock.advance(Duration::from_secs(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn racing_tasks_on_many_keys_take_exactly_each_keys_capacity() {
    let clock = ManualClock::new();
    let limiter = KeyedLimiter::<u64>::from_rate(10, 1.0)
        .unwrap()
        .with_clock(clock.clock());
    let keys = 5_000;
    let l = limiter.clone();
    // Each task walks every key, starting at its own offset, 4 times over.
    let admitted = race(move |task| {
        let mut ok = 0;
        for i in 0..keys * 4 {
            let key = (i + task * 613) % keys;
            ok += u64::from(l.try_acquire_at(&key, 1, 0).is_ok());
        }
        ok
    })
    .await;
    // 8 × 4 = 32 tries per key, 10 admitted per key.
    assert_eq!(admitted, keys * 10);
    assert_eq!(limiter.len() as u64, keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn racing_calls_through_a_closed_breaker_are_all_counted() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder()
        .failure_threshold(u32::MAX)
        .failure_rate(0.5)
        .sliding_window(SlidingWindow::Count(1_048_575))
        .clock(clock.clock())
        .build()
        .unwrap();
    let b = breaker.clone();
    let failures = race(move |task| {
        let mut failed = 0;
        for i in 0..BREAKER_CALLS / TASKS {
            let permit = b.try_acquire().expect("a closed breaker admits");
            // One call in four fails, none twice in a row per task.
            if (i + task) % 4 == 0 {
                permit.failure();
                failed += 1;
            } else {
                permit.success();
            }
        }
        failed
    })
    .await;
    let stats = breaker.stats();
    assert_eq!(stats.window_calls, BREAKER_CALLS);
    assert_eq!(stats.window_failures, failures);
    assert_eq!(failures, BREAKER_CALLS / 4);
    assert_eq!(
        stats.state,
        State::Closed,
        "25 % is under the 50 % trip rate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn racing_failures_trip_the_breaker_exactly_once_and_probes_are_rationed() {
    let clock = ManualClock::new();
    let opened = Arc::new(AtomicU64::new(0));
    let half_opened = Arc::new(AtomicU64::new(0));
    let (o, h) = (opened.clone(), half_opened.clone());
    let breaker = CircuitBreaker::builder()
        .failure_threshold(1_000)
        .recovery_timeout(Duration::from_secs(10))
        .half_open_probes(3)
        .success_threshold(3)
        .clock(clock.clock())
        .on_transition(move |t| match t.to {
            State::Open => {
                o.fetch_add(1, Ordering::SeqCst);
            }
            State::HalfOpen => {
                h.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        })
        .build()
        .unwrap();
    // Everyone fails as fast as they can: one trip, then only refusals.
    let b = breaker.clone();
    let admitted = race(move |_| {
        let mut admitted = 0;
        for _ in 0..100_000 {
            if let Ok(permit) = b.try_acquire() {
                admitted += 1;
                permit.failure();
            }
        }
        admitted
    })
    .await;
    assert_eq!(opened.load(Ordering::SeqCst), 1, "tripped exactly once");
    assert_eq!(breaker.state(), State::Open);
    // Permits taken before the trip may finish after it; at most one per
    // task can be in flight at the trip.
    assert!((1_000..1_000 + TASKS).contains(&admitted), "{admitted}");

    // Past the recovery timeout, racing callers get exactly 3 probes while
    // the probes are held.
    clock.advance(Duration::from_secs(11));
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (b, keep) = (breaker.clone(), held.clone());
    let probes = race(move |_| {
        let mut got = 0;
        for _ in 0..100_000 {
            if let Ok(permit) = b.try_acquire_owned() {
                got += 1;
                keep.lock().unwrap().push(permit);
            }
        }
        got
    })
    .await;
    assert_eq!(probes, 3);
    assert_eq!(half_opened.load(Ordering::SeqCst), 1);
    // Three successes close it.
    for permit in held.lock().unwrap().drain(..) {
        permit.success();
    }
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(opened.load(Ordering::SeqCst), 1);
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `keys` distinct keys, each asking once, while the clock moves from 0 to
/// 2 s; 100 victims spent their 5 tokens at 0. Returns the RSS growth (kB).
async fn flood(keys: u64, max_keys: usize) -> u64 {
    const VICTIMS: u64 = 100;
    let span = 2_000_000_000u64;
    let clock = ManualClock::new();
    let limiter = KeyedLimiter::<u64>::from_rate(5, 1.0)
        .unwrap()
        .with_max_keys(max_keys)
        .with_clock(clock.clock());
    let victim = |v: u64| u64::MAX - v;
    for v in 0..VICTIMS {
        for _ in 0..5 {
            limiter.try_acquire_at(&victim(v), 1, 0).unwrap();
        }
        assert!(limiter.try_acquire_at(&victim(v), 1, 0).is_err());
    }
    let rss_before = rss_kb();
    let l = limiter.clone();
    let peak = Arc::new(AtomicU64::new(0));
    let p = peak.clone();
    race(move |task| {
        let mut i = task;
        while i < keys {
            // Flood keys spend one token and are full again a second later,
            // so sweeps run during the flood and must spare the victims.
            let _ = l.try_acquire_at(&i, 1, i * (span / keys));
            if i % 1024 < TASKS {
                p.fetch_max(l.len() as u64, Ordering::Relaxed);
            }
            i += TASKS;
        }
        0
    })
    .await;
    let grown = rss_kb().saturating_sub(rss_before);
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= max_keys as u64, "{peak} tracked at the peak");
    assert!(
        peak >= max_keys as u64 / 2,
        "the flood did fill the map: {peak}"
    );
    assert!(limiter.len() <= max_keys, "{} tracked", limiter.len());
    // Each victim kept its spent bucket: two seconds of refill is exactly
    // two tokens (a reset bucket would give five).
    for v in 0..VICTIMS {
        for _ in 0..2 {
            limiter
                .try_acquire_at(&victim(v), 1, span)
                .unwrap_or_else(|e| panic!("victim {v} lost its refill: {e}"));
        }
        assert!(
            limiter.try_acquire_at(&victim(v), 1, span).is_err(),
            "victim {v}'s limit was reset by the flood"
        );
    }
    grown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_key_flood_neither_outgrows_the_cap_nor_resets_tracked_keys() {
    flood(300_000, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
#[ignore = "long: 10M keys; cargo test --release --test stress -- --ignored --nocapture"]
async fn a_ten_million_key_flood_stays_within_the_memory_bound() {
    let grown = flood(10_000_000, 100_000).await;
    println!("10M-key flood, max_keys 100000: RSS grew {grown} kB");
    // 100,000 tracked keys are a few MB; 10M untracked would be hundreds.
    assert!(grown < 64 * 1024, "RSS grew {grown} kB");
}
