//! Keyed state at scale: apiguard's `KeyedLimiter` against governor's keyed
//! limiter (its default `DashMap` store), and apiguard's per-key breakers,
//! at 1 000, 100 000, 1 000 000 and 10 000 000 keys.
//!
//! - `scale/<who>/<keys>` (criterion): ns per decision on a tracked key,
//!   keys scrambled across the whole set (as real traffic would spread
//!   them over shards and cache lines). Limiters are set so no decision is
//!   refused and no bucket fills up again during the run (a burst of 10⁹,
//!   one token a second), so every decision finds its bucket — the same
//!   work for both crates. Breakers are driven through
//!   `KeyedCircuitBreakerLayer` (`call` + the response), as the stack does.
//! - memory (printed first, and written to `target/apiguard-bench/scale.json`):
//!   resident memory per key (`VmRSS` before and after filling `n` keys,
//!   each case in a fresh child process so the allocator's leftovers of one
//!   case do not count in the next), then a flood of `n` more new keys:
//!   ours is capped with `with_max_keys(n)` and stays at `n` keys, governor's
//!   has no cap and grows (it offers `retain_recent`, which the user must
//!   call). Breakers get `n / 8` new keys (at least 200) into their full
//!   registry, timed: at the cap with no idle breaker, one pass over the
//!   map evicts a sixteenth of it, so that pass is shared by the next
//!   `n / 16` new keys — fewer new keys would charge it to too few.
//!
//! Breakers stop at 1 000 000 keys: each holds cache-padded atomics behind
//! an `Arc` (see the bytes per key), so 10 000 000 would take gigabytes and
//! minutes to fill on a CI-sized machine. `APIGUARD_SCALE_MAX=1000000`
//! caps every size (e.g. on a small machine).
//!
//! Run: `cargo bench -p apiguard-benches --bench scale`.

mod support;

use std::future::{Ready, ready};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::Command;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard::CircuitBreaker;
use apiguard::KeyedLimiter;
use apiguard::breaker::{KeyedBreakers, KeyedCircuitBreakerLayer};
use criterion::{BenchmarkId, Criterion, Throughput};
use governor::{Quota, RateLimiter};
use http::Response;
use tower::{Layer, Service};

const SIZES: [(&str, u64); 4] = [
    ("1k", 1_000),
    ("100k", 100_000),
    ("1M", 1_000_000),
    ("10M", 10_000_000),
];
const BREAKER_MAX: u64 = 1_000_000;
/// New keys sent to a full breaker registry: at least this many, and at
/// least an eighth of the registry (two of its eviction batches).
const BREAKER_FLOOD: u64 = 200;
/// Tokens each of our buckets gives at fill time: a bucket refills one a
/// second, so it is not full again (and not reclaimed) for 11 days — filling
/// 10M keys takes seconds, and a bucket spent by one token would be full,
/// and swept, one second later.
const FILL_COST: u32 = 1_000_000;

fn max_size() -> u64 {
    std::env::var("APIGUARD_SCALE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

fn ours(max_keys: usize) -> KeyedLimiter<u64> {
    KeyedLimiter::from_rate(support::BURST, 1.0)
        .unwrap()
        .with_max_keys(max_keys)
}

type Governor = RateLimiter<
    u64,
    governor::state::keyed::DefaultKeyedStateStore<u64>,
    governor::clock::DefaultClock,
>;

fn governor() -> Governor {
    RateLimiter::keyed(
        Quota::per_second(NonZeroU32::new(1).unwrap())
            .allow_burst(NonZeroU32::new(support::BURST).unwrap()),
    )
}

/// A service keyed by the request itself (a `u64`), answering 200 at once.
#[derive(Clone, Copy)]
struct NoopKey;

impl Service<u64> for NoopKey {
    type Response = Response<()>;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Response<()>, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: u64) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

fn breakers(max_keys: usize) -> KeyedBreakers<u64> {
    let template = CircuitBreaker::builder()
        .failure_threshold(5)
        .recovery_timeout(Duration::from_secs(30));
    KeyedBreakers::new(template, max_keys).unwrap()
}

type KeyedSvc = <KeyedCircuitBreakerLayer<u64, fn(&u64) -> Option<u64>> as Layer<NoopKey>>::Service;

fn breaker_service(b: KeyedBreakers<u64>) -> KeyedSvc {
    let key: fn(&u64) -> Option<u64> = |k| Some(*k);
    KeyedCircuitBreakerLayer::new(b, key).layer(NoopKey)
}

/// Spreads consecutive `i` over `0..n`.
#[inline]
fn scramble(i: u64, n: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// In a child process: fill `n` keys, then flood new ones (`n`, or
/// `BREAKER_FLOOD` for breakers); prints `bytes_per_key len_after_flood
/// growth_bytes ns_per_flooded_key flooded_keys`.
fn child(case: &str) {
    let (who, n) = case.split_once(':').unwrap();
    let n: u64 = n.parse().unwrap();
    let before = rss_bytes();
    let (per_key, len, growth, flood_ns, flood) = match who {
        "apiguard_limiter" => {
            let l = ours(n as usize);
            for k in 0..n {
                l.try_acquire(&k, FILL_COST).unwrap();
            }
            let filled = rss_bytes();
            let tracked = l.len() as u64;
            let t = tokio::time::Instant::now();
            for k in n..2 * n {
                let _ = l.try_acquire(&k, 1);
            }
            let spent = t.elapsed();
            let flooded = rss_bytes();
            black_box(&l);
            (
                (filled - before) as f64 / tracked as f64,
                l.len() as u64,
                flooded.saturating_sub(filled),
                spent.as_nanos() as f64 / n as f64,
                n,
            )
        }
        "governor_keyed" => {
            let l = governor();
            for k in 0..n {
                l.check_key(&k).unwrap();
            }
            let filled = rss_bytes();
            let t = tokio::time::Instant::now();
            for k in n..2 * n {
                let _ = l.check_key(&k);
            }
            let spent = t.elapsed();
            let flooded = rss_bytes();
            black_box(&l);
            (
                (filled - before) as f64 / n as f64,
                l.len() as u64,
                flooded.saturating_sub(filled),
                spent.as_nanos() as f64 / n as f64,
                n,
            )
        }
        "apiguard_breakers" => {
            let b = breakers(n as usize);
            let mut svc = breaker_service(b.clone());
            // A failure keeps a breaker from being idle (idle ones are
            // dropped as the map is used), as a host in trouble would.
            for k in 0..n {
                b.get(k).try_acquire().unwrap().failure();
            }
            let filled = rss_bytes();
            // At the cap with nothing idle, a pass over the whole map
            // evicts a batch of a sixteenth of it (see the crate's
            // `make_room`): flood with two batches' worth of keys, so the
            // time per key includes the passes in their true proportion.
            let flood = n.min(BREAKER_FLOOD.max(n / 8));
            let t = tokio::time::Instant::now();
            for k in n..n + flood {
                support::one(&mut svc, k);
            }
            let spent = t.elapsed();
            let flooded = rss_bytes();
            (
                (filled - before) as f64 / n as f64,
                b.len() as u64,
                flooded.saturating_sub(filled),
                spent.as_nanos() as f64 / flood as f64,
                flood,
            )
        }
        _ => panic!("unknown case {who}"),
    };
    println!("{per_key} {len} {growth} {flood_ns} {flood}");
}

struct Mem {
    who: &'static str,
    size: &'static str,
    n: u64,
    bytes_per_key: f64,
    len_after_flood: u64,
    growth: u64,
    flood_ns: f64,
}

fn memory() -> Vec<Mem> {
    let exe = std::env::current_exe().unwrap();
    let mut out = Vec::new();
    for (size, n) in SIZES {
        if n > max_size() {
            continue;
        }
        for who in ["apiguard_limiter", "governor_keyed", "apiguard_breakers"] {
            if who == "apiguard_breakers" && n > BREAKER_MAX {
                continue;
            }
            let o = Command::new(&exe)
                .env("APIGUARD_SCALE_CHILD", format!("{who}:{n}"))
                .output()
                .unwrap();
            assert!(o.status.success(), "{who} {n}: {o:?}");
            let text = String::from_utf8_lossy(&o.stdout);
            let mut f = text.split_whitespace();
            let bytes_per_key: f64 = f.next().unwrap().parse().unwrap();
            let len_after_flood: u64 = f.next().unwrap().parse().unwrap();
            let growth: u64 = f.next().unwrap().parse().unwrap();
            let flood_ns: f64 = f.next().unwrap().parse().unwrap();
            let flood: u64 = f.next().unwrap().parse().unwrap();
            println!(
                "memory {who:<18} {size:>4}: {bytes_per_key:>6.0} B/key; after {flood} more new keys: {len_after_flood} keys, RSS +{:.1} MiB, {flood_ns:.0} ns per new key",
                growth as f64 / (1 << 20) as f64
            );
            out.push(Mem {
                who,
                size,
                n,
                bytes_per_key,
                len_after_flood,
                growth,
                flood_ns,
            });
        }
    }
    out
}

fn write_memory(mem: &[Mem]) {
    let rows = mem
        .iter()
        .map(|m| {
            format!(
                "{{\"who\":{:?},\"size\":{:?},\"keys\":{},\"bytes_per_key\":{:.1},\"len_after_flood\":{},\"growth_bytes\":{},\"flood_ns_per_key\":{:.1}}}",
                m.who, m.size, m.n, m.bytes_per_key, m.len_after_flood, m.growth, m.flood_ns
            )
        })
        .collect::<Vec<_>>()
        .join(",\n  ");
    let floods = mem
        .iter()
        .filter(|m| m.who == "apiguard_limiter")
        .filter_map(|o| {
            let g = mem
                .iter()
                .find(|m| m.who == "governor_keyed" && m.size == o.size)?;
            Some(format!(
                "{{\"size\":{:?},\"cap\":{},\"ours_len\":{},\"ours_growth_mb\":{:.1},\"ours_flood_ns\":{:.0},\"gov_len\":{},\"gov_growth_mb\":{:.1},\"gov_flood_ns\":{:.0}}}",
                o.size,
                o.n,
                o.len_after_flood,
                o.growth as f64 / (1 << 20) as f64,
                o.flood_ns,
                g.len_after_flood,
                g.growth as f64 / (1 << 20) as f64,
                g.flood_ns
            ))
        })
        .collect::<Vec<_>>()
        .join(",\n  ");
    support::write_result(
        "scale.json",
        &format!("{{\"memory\":[\n  {rows}\n],\"flood\":[\n  {floods}\n]}}\n"),
    );
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("scale");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30)
        .throughput(Throughput::Elements(1));
    for (size, n) in SIZES {
        if n > max_size() {
            continue;
        }
        {
            let l = ours(2 * n as usize);
            for k in 0..n {
                l.try_acquire(&k, FILL_COST).unwrap();
            }
            assert_eq!(l.len() as u64, n, "buckets were reclaimed while filling");
            g.bench_function(BenchmarkId::new("apiguard_limiter", size), |b| {
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    black_box(l.try_acquire(&scramble(i, n), 1)).is_ok()
                })
            });
        }
        {
            let l = governor();
            for k in 0..n {
                l.check_key(&k).unwrap();
            }
            g.bench_function(BenchmarkId::new("governor_keyed", size), |b| {
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    black_box(l.check_key(&scramble(i, n))).is_ok()
                })
            });
        }
        if n <= BREAKER_MAX {
            let b = breakers(2 * n as usize);
            let mut svc = breaker_service(b.clone());
            // One failure each keeps them from being idle (and dropped).
            for k in 0..n {
                b.get(k).try_acquire().unwrap().failure();
            }
            assert_eq!(b.len() as u64, n);
            g.bench_function(BenchmarkId::new("apiguard_breakers", size), |bch| {
                let mut i = 0u64;
                bch.iter(|| {
                    i += 1;
                    support::one(&mut svc, scramble(i, n));
                })
            });
        }
    }
    g.finish();
}

fn main() {
    if let Ok(case) = std::env::var("APIGUARD_SCALE_CHILD") {
        child(&case);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    // `cargo bench --bench scale -- <filter>` skips the memory part unless
    // the filter asks for it.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.as_deref().is_none_or(|f| "memory".contains(f)) {
        write_memory(&memory());
    }
    decisions(&mut c);
    c.final_summary();
}
