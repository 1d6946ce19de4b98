//! Rate limiting side by side: apiguard's GCRA against governor's, and
//! apiguard's `RateLimitLayer` against tower's `RateLimit`.
//!
//! Every limiter is configured so that no check is refused during the run
//! (a burst of 10⁹), and so that per-key state never fills up again (one
//! token a second): the figures are the cost of an admitted decision on a
//! tracked bucket, for both crates alike.
//!
//! Groups, one question each:
//! - `direct`: one shared bucket, one thread — `TokenBucket::try_acquire`
//!   vs governor's `check`;
//! - `keyed/{1k,1M}`: a tracked key among 1 000 or 1 000 000 —
//!   `KeyedLimiter::try_acquire` vs governor's keyed (DashMap) `check_key`;
//! - `layer`: `poll_ready` + `call` + one poll through `RateLimitLayer` vs
//!   tower's `RateLimit`, both around the same no-op service; with them
//!   `shared_floor`, the least any limit shared between clones does per
//!   request (one read of apiguard's clock, one compare-and-swap on a
//!   shared word, then the call): not a limiter, the floor under ours.
//!   tower's `RateLimit` keeps its count in the service instance (it is
//!   not `Clone`) and does no atomic operation, so its whole cost is one
//!   `Instant::now`;
//! - `server_layer`: an axum-shaped request (peer address in
//!   `ConnectInfo`) through apiguard's `server_layer` (per-IP
//!   `KeyedRateLimitLayer` under `RejectionResponseLayer`) vs
//!   `tower_governor`'s `GovernorLayer`, both keyed by peer IP, around the
//!   same handler; `bare` is the handler alone. The layer's own cost, which
//!   the loopback HTTP bench (`http`) cannot resolve: there a request costs
//!   microseconds of socket and parsing work, and the runs differ by more
//!   than the layers do.
//! - `contended_direct/{2,8}` and `contended_keyed/{2,8}`: the same checks
//!   from 2 and 8 threads at once on one limiter.
//!
//! Run: `cargo bench -p apiguard-benches --bench ratelimit`.

use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apiguard_core::Clock;
use apiguard_ratelimit::{KeyedLimiter, RateLimitLayer, TokenBucket};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use governor::{Quota, RateLimiter};
use tower::{Layer, Service};

const BURST: u32 = 1_000_000_000;

fn governor_quota() -> Quota {
    Quota::per_second(NonZeroU32::new(1).unwrap()).allow_burst(NonZeroU32::new(BURST).unwrap())
}

fn ours_bucket() -> TokenBucket {
    TokenBucket::from_rate(BURST, 1.0).unwrap()
}

fn ours_keyed(max_keys: usize) -> KeyedLimiter<u64> {
    KeyedLimiter::from_rate(BURST, 1.0)
        .unwrap()
        .with_max_keys(max_keys)
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(40);
    g
}

fn direct(c: &mut Criterion) {
    let mut g = group(c, "direct");
    g.throughput(Throughput::Elements(1));
    let ours = ours_bucket();
    g.bench_function("apiguard", |b| {
        b.iter(|| black_box(ours.try_acquire(1)).is_ok())
    });
    let theirs = RateLimiter::direct(governor_quota());
    g.bench_function("governor", |b| b.iter(|| black_box(theirs.check()).is_ok()));
    g.finish();
}

fn keyed(c: &mut Criterion) {
    for (label, n) in [("1k", 1_000u64), ("1M", 1_000_000)] {
        let mut g = group(c, &format!("keyed/{label}"));
        g.throughput(Throughput::Elements(1));
        let ours = ours_keyed(2 * n as usize);
        let theirs = RateLimiter::keyed(governor_quota());
        for k in 0..n {
            ours.try_acquire(&k, 1).unwrap();
            theirs.check_key(&k).unwrap();
        }
        // A cheap scramble so consecutive keys land in different shards and
        // cache lines, as real traffic would.
        let key = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n;
        g.bench_function("apiguard", |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                black_box(ours.try_acquire(&key(i), 1)).is_ok()
            })
        });
        g.bench_function("governor", |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                black_box(theirs.check_key(&key(i))).is_ok()
            })
        });
        g.finish();
    }
}

/// A service that answers at once.
#[derive(Clone, Copy)]
struct Noop;

impl Service<()> for Noop {
    type Response = ();
    type Error = std::convert::Infallible;
    type Future = Ready<Result<(), Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        ready(Ok(()))
    }
}

/// The floor under a limit shared between clones: per call, one read of
/// the clock `TokenBucket` reads and one compare-and-swap that moves a
/// shared word to `max(word, now) + 1`, as a GCRA bucket moves its TAT,
/// with no refusal, no tokens and no configuration. Not a limiter; what
/// `RateLimitLayer` costs above this is its own work.
struct SharedFloor<S> {
    inner: S,
    clock: Clock,
    word: Arc<AtomicU64>,
}

impl<S> SharedFloor<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            clock: Clock::system(),
            word: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<S: Service<()>> Service<()> for SharedFloor<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ()) -> Self::Future {
        let now = self.clock.now();
        let mut cur = self.word.load(Ordering::Relaxed);
        while let Err(actual) = self.word.compare_exchange_weak(
            cur,
            cur.max(now) + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            cur = actual;
        }
        self.inner.call(req)
    }
}

/// `ready().await` + `call` + await, without an executor: every future here
/// completes on its first poll.
#[inline]
fn once<S: Service<()>>(svc: &mut S) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = svc.poll_ready(&mut cx) {
            assert!(r.is_ok(), "poll_ready failed");
            break;
        }
    }
    let mut fut = pin!(svc.call(()));
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r.is_ok();
        }
    }
}

fn layer(c: &mut Criterion) {
    // tower's RateLimit keeps a tokio `Sleep`, which needs a runtime context.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = group(c, "layer");
    g.throughput(Throughput::Elements(1));
    let mut ours = RateLimitLayer::new(ours_bucket()).layer(Noop);
    g.bench_function("apiguard", |b| b.iter(|| once(&mut ours)));
    let mut theirs =
        tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1)).layer(Noop);
    g.bench_function("tower", |b| b.iter(|| once(&mut theirs)));
    let mut floor = SharedFloor::new(Noop);
    g.bench_function("shared_floor", |b| b.iter(|| once(&mut floor)));
    g.finish();
}

/// A request as axum hands it to a middleware served with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
fn server_request() -> http::Request<axum::body::Body> {
    let mut req = http::Request::new(axum::body::Body::empty());
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            40_000,
        ))));
    req
}

/// `ready` + `call` + the response, without an executor; panics unless it
/// is a success.
#[inline]
fn serve<S>(svc: &mut S, req: http::Request<axum::body::Body>)
where
    S: Service<http::Request<axum::body::Body>, Response = http::Response<axum::body::Body>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = svc.poll_ready(&mut cx) {
            r.expect("poll_ready failed");
            break;
        }
    }
    let mut fut = pin!(svc.call(req));
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            let res = r.expect("the layer failed");
            assert!(res.status().is_success(), "refused: {}", res.status());
            black_box(res);
            return;
        }
    }
}

fn server_layer(c: &mut Criterion) {
    use apiguard::ratelimit::PeerIp;
    use criterion::BatchSize;
    let handler = tower::service_fn(|_: http::Request<axum::body::Body>| {
        ready(Ok::<_, std::convert::Infallible>(http::Response::new(
            axum::body::Body::empty(),
        )))
    });
    let mut g = group(c, "server_layer");
    g.throughput(Throughput::Elements(1));
    let mut bare = handler;
    g.bench_function("bare", |b| {
        b.iter_batched(
            server_request,
            |r| serve(&mut bare, r),
            BatchSize::SmallInput,
        )
    });
    let limiter = KeyedLimiter::from_rate(1_000_000_000, 1e9)
        .unwrap()
        .with_max_keys(100_000);
    let mut ours = apiguard::server::server_layer(limiter, PeerIp).layer(handler);
    g.bench_function("apiguard", |b| {
        b.iter_batched(
            server_request,
            |r| serve(&mut ours, r),
            BatchSize::SmallInput,
        )
    });
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(1_000_000_000)
        .finish()
        .unwrap();
    let mut theirs = tower_governor::GovernorLayer::new(config).layer(handler);
    g.bench_function("tower_governor", |b| {
        b.iter_batched(
            server_request,
            |r| serve(&mut theirs, r),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Runs `per_thread` on `threads` threads, `iters` times each, all started
/// together; returns the wall time of the slowest.
fn contended(threads: usize, iters: u64, per_thread: &(impl Fn(u64) + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = tokio::time::Instant::now();
                    for i in 0..iters {
                        per_thread(i.wrapping_add(t as u64 * 7919));
                    }
                    start.elapsed()
                })
            })
            .collect();
        barrier.wait();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn contention(c: &mut Criterion) {
    for threads in [2usize, 8] {
        let mut g = group(c, "contended_direct");
        g.throughput(Throughput::Elements(threads as u64));
        let ours = ours_bucket();
        g.bench_with_input(BenchmarkId::new("apiguard", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                contended(t, iters, &|_| {
                    black_box(ours.try_acquire(1).is_ok());
                })
            })
        });
        let theirs = RateLimiter::direct(governor_quota());
        g.bench_with_input(BenchmarkId::new("governor", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                contended(t, iters, &|_| {
                    black_box(theirs.check().is_ok());
                })
            })
        });
        g.finish();

        let mut g = group(c, "contended_keyed");
        g.throughput(Throughput::Elements(threads as u64));
        let n = 1_000u64;
        let ours = ours_keyed(2 * n as usize);
        let theirs = RateLimiter::keyed(governor_quota());
        for k in 0..n {
            ours.try_acquire(&k, 1).unwrap();
            theirs.check_key(&k).unwrap();
        }
        g.bench_with_input(BenchmarkId::new("apiguard", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                contended(t, iters, &|i| {
                    black_box(ours.try_acquire(&(i % n), 1).is_ok());
                })
            })
        });
        g.bench_with_input(BenchmarkId::new("governor", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                contended(t, iters, &|i| {
                    black_box(theirs.check_key(&(i % n)).is_ok());
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, direct, keyed, layer, server_layer, contention);

fn main() {
    if let Some(who) = std::env::var_os("RATELIMIT_COUNT") {
        count(&who.to_string_lossy());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

// --- instruction counts ---------------------------------------------------
//
// `RATELIMIT_COUNT=<contender>` makes exactly 1 000 000 calls of one
// contender and exits, so that `valgrind --tool=callgrind` counts what a
// call executes (instructions repeat on a busy machine; times do not).
// Contenders: `direct_ours`, `direct_governor`, `layer_none`, `layer_ours`,
// `layer_tower`, `layer_floor`, `server_bare`, `server_ours`, `server_governor`. Run
// `RATELIMIT_COUNT=layer_ours valgrind --tool=callgrind <bench binary>`;
// compare totals within one group (each includes the same setup), and
// divide differences by 1 000 000.

fn count(who: &str) {
    const N: u64 = 1_000_000;
    fn layer_calls<S: Service<()>>(mut svc: S) {
        for _ in 0..N {
            black_box(once(&mut svc));
        }
    }
    fn server_calls<S>(mut svc: S)
    where
        S: Service<http::Request<axum::body::Body>, Response = http::Response<axum::body::Body>>,
        S::Error: std::fmt::Debug,
    {
        for _ in 0..N {
            serve(&mut svc, server_request());
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let handler = tower::service_fn(|_: http::Request<axum::body::Body>| {
        ready(Ok::<_, std::convert::Infallible>(http::Response::new(
            axum::body::Body::empty(),
        )))
    });
    match who {
        "direct_ours" => {
            let ours = ours_bucket();
            for _ in 0..N {
                black_box(black_box(&ours).try_acquire(1).is_ok());
            }
        }
        "direct_governor" => {
            let theirs = RateLimiter::direct(governor_quota());
            for _ in 0..N {
                black_box(black_box(&theirs).check().is_ok());
            }
        }
        "layer_none" => layer_calls(Noop),
        "layer_ours" => layer_calls(RateLimitLayer::new(ours_bucket()).layer(Noop)),
        "layer_tower" => layer_calls(
            tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1)).layer(Noop),
        ),
        "layer_floor" => layer_calls(SharedFloor::new(Noop)),
        "server_bare" => server_calls(handler),
        "server_ours" => {
            let limiter = KeyedLimiter::from_rate(1_000_000_000, 1e9)
                .unwrap()
                .with_max_keys(100_000);
            server_calls(
                apiguard::server::server_layer(limiter, apiguard::ratelimit::PeerIp).layer(handler),
            )
        }
        "server_governor" => {
            let config = tower_governor::governor::GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(1_000_000_000)
                .finish()
                .unwrap();
            server_calls(tower_governor::GovernorLayer::new(config).layer(handler))
        }
        other => panic!("RATELIMIT_COUNT: no contender {other:?}"),
    }
}
