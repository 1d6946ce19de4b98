//! Circuit breakers side by side: apiguard's `CircuitBreakerLayer` against
//! tower-resilience's circuit breaker layer, failsafe and recloser, each
//! wrapped around the same no-op tower service and driven through
//! `poll_ready` + `call` + one poll of the response future.
//!
//! failsafe and recloser are not tower layers; each gets the thinnest
//! possible tower wrapper here (no allocation, no boxing), so the figures
//! compare the breakers, not the wrappers.
//!
//! Groups, one question each:
//! - `closed`: what does a healthy call pay for passing a closed breaker?
//! - `open`: what does a refusal cost?
//! - `contended/{2,8}`: the closed path with 2 and 8 threads on one breaker.
//! - `permit`: the breakers alone, no tower service: our permit
//!   (`try_acquire` + `success`) and ticket against recloser's `call` on a
//!   closure that succeeds, both with a 100-call count window.
//!
//! Run: `cargo bench -p apiguard-benches --bench breaker`.

use std::fmt;
use std::future::{Future, Ready, ready};
use std::pin::{Pin, pin};
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, CircuitBreakerLayer, SlidingWindow};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use http::Response;
use tower::{Layer, Service};

type Res = Response<()>;

/// The error of the failing inner service used to trip the breakers.
#[derive(Debug, Clone, Copy)]
struct Boom;

impl fmt::Display for Boom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("boom")
    }
}

impl std::error::Error for Boom {}

/// A service that answers at once: `200` or, when `fail`, an error.
#[derive(Clone, Copy)]
struct Noop {
    fail: bool,
}

impl Service<()> for Noop {
    type Response = Res;
    type Error = Boom;
    type Future = Ready<Result<Res, Boom>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        ready(if self.fail {
            Err(Boom)
        } else {
            Ok(Res::new(()))
        })
    }
}

const OK: Noop = Noop { fail: false };
const FAIL: Noop = Noop { fail: true };

/// One call: `poll_ready`, `call`, and polls of the future until it is
/// ready. Every future here completes on its first poll except
/// tower-resilience's when another thread holds its mutex; then this thread
/// yields, as a tokio worker would park, so the holder can run.
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
        std::thread::yield_now();
    }
}

// --- failsafe: a minimal tower wrapper around its state machine ----------

type Failsafe = failsafe::StateMachine<
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::Constant>,
    (),
>;

#[derive(Clone)]
struct FailsafeService<S> {
    inner: S,
    breaker: Failsafe,
}

struct FailsafeFuture<F> {
    inner: Option<F>,
    breaker: Failsafe,
}

#[derive(Debug)]
enum FailsafeError<E> {
    Rejected,
    Inner(E),
}

impl<F, T, E> Future for FailsafeFuture<F>
where
    F: Future<Output = Result<T, E>> + Unpin,
{
    type Output = Result<T, FailsafeError<E>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(f) = self.inner.as_mut() else {
            return Poll::Ready(Err(FailsafeError::Rejected));
        };
        let r = std::task::ready!(Pin::new(f).poll(cx));
        match &r {
            Ok(_) => self.breaker.on_success(),
            Err(_) => self.breaker.on_error(),
        }
        Poll::Ready(r.map_err(FailsafeError::Inner))
    }
}

impl<S> Service<()> for FailsafeService<S>
where
    S: Service<()>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = FailsafeError<S::Error>;
    type Future = FailsafeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(FailsafeError::Inner)
    }

    fn call(&mut self, req: ()) -> Self::Future {
        let inner = self
            .breaker
            .is_call_permitted()
            .then(|| self.inner.call(req));
        FailsafeFuture {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

fn failsafe<S>(inner: S) -> FailsafeService<S> {
    let policy = failsafe::failure_policy::consecutive_failures(
        5,
        failsafe::backoff::constant(Duration::from_secs(3600)),
    );
    FailsafeService {
        inner,
        breaker: failsafe::Config::new().failure_policy(policy).build(),
    }
}

// --- recloser: its own future adapter, behind a tower `Service` ----------

#[derive(Clone)]
struct RecloserService<S> {
    inner: S,
    breaker: recloser::AsyncRecloser,
}

impl<S> Service<()> for RecloserService<S>
where
    S: Service<()>,
{
    type Response = S::Response;
    type Error = recloser::Error<S::Error>;
    type Future = recloser::RecloserFuture<S::Future, recloser::AnyError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(recloser::Error::Inner)
    }

    fn call(&mut self, req: ()) -> Self::Future {
        self.breaker.call(self.inner.call(req))
    }
}

fn recloser<S>(inner: S) -> RecloserService<S> {
    let breaker = recloser::Recloser::custom()
        .error_rate(0.5)
        .closed_len(100)
        .open_wait(Duration::from_secs(3600))
        .build();
    RecloserService {
        inner,
        breaker: breaker.into(),
    }
}

// --- the contenders ------------------------------------------------------

fn ours_consecutive() -> CircuitBreaker {
    CircuitBreaker::builder()
        .failure_threshold(5)
        .recovery_timeout(Duration::from_secs(3600))
        .build()
        .unwrap()
}

fn ours_window() -> CircuitBreaker {
    CircuitBreaker::builder()
        .failure_threshold(5)
        .failure_rate(0.5)
        .sliding_window(SlidingWindow::Count(100))
        .recovery_timeout(Duration::from_secs(3600))
        .build()
        .unwrap()
}

fn tr_window() -> tower_resilience::circuitbreaker::CircuitBreakerLayer {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap()
}

fn tr_consecutive() -> tower_resilience::circuitbreaker::CircuitBreakerLayer {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap()
}

fn bench_one<S: Service<()>>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut svc: S,
    expect_ok: bool,
) {
    assert_eq!(once(&mut svc), expect_ok, "{name}: wrong state");
    g.bench_function(name, |b| b.iter(|| once(&mut svc)));
}

fn closed(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/closed");
    configure(&mut g);
    g.throughput(Throughput::Elements(1));
    bench_one(&mut g, "no breaker", OK, true);
    bench_one(
        &mut g,
        "apiguard consecutive",
        CircuitBreakerLayer::new(ours_consecutive()).layer(OK),
        true,
    );
    bench_one(
        &mut g,
        "apiguard count window",
        CircuitBreakerLayer::new(ours_window()).layer(OK),
        true,
    );
    bench_one(
        &mut g,
        "tower-resilience consecutive",
        tr_consecutive().layer(OK),
        true,
    );
    bench_one(
        &mut g,
        "tower-resilience count window",
        tr_window().layer(OK),
        true,
    );
    bench_one(&mut g, "failsafe consecutive", failsafe(OK), true);
    bench_one(&mut g, "recloser count window", recloser(OK), true);
    g.finish();
}

fn permit(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/permit");
    configure(&mut g);
    g.throughput(Throughput::Elements(1));
    let ours = ours_window();
    g.bench_function("apiguard permit", |b| {
        b.iter(|| match std::hint::black_box(&ours).try_acquire() {
            Ok(permit) => {
                permit.success();
                true
            }
            Err(_) => false,
        })
    });
    g.bench_function("apiguard ticket", |b| {
        b.iter(|| {
            let ours = std::hint::black_box(&ours);
            match ours.try_acquire_ticket() {
                Ok(ticket) => {
                    ours.record_ticket(ticket, apiguard_core::Outcome::Success);
                    true
                }
                Err(_) => false,
            }
        })
    });
    let theirs = recloser::Recloser::custom()
        .error_rate(0.5)
        .closed_len(100)
        .open_wait(Duration::from_secs(3600))
        .build();
    g.bench_function("recloser call", |b| {
        b.iter(|| {
            std::hint::black_box(&theirs)
                .call(|| Ok::<(), ()>(()))
                .is_ok()
        })
    });
    g.finish();
}

/// Fails calls through `svc` until it refuses one.
fn trip<S: Service<()>>(svc: &mut S) {
    for _ in 0..1_000 {
        once(svc);
    }
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/open");
    configure(&mut g);
    g.throughput(Throughput::Elements(1));
    let mut ours = CircuitBreakerLayer::new(ours_consecutive()).layer(FAIL);
    trip(&mut ours);
    assert!(ours.breaker().try_acquire().is_err());
    bench_one(&mut g, "apiguard", ours, false);
    let mut tr = tr_consecutive().layer(FAIL);
    trip(&mut tr);
    bench_one(&mut g, "tower-resilience", tr, false);
    let mut fs = failsafe(FAIL);
    trip(&mut fs);
    bench_one(&mut g, "failsafe", fs, false);
    let mut rc = recloser(FAIL);
    trip(&mut rc);
    bench_one(&mut g, "recloser", rc, false);
    g.finish();
}

/// `threads` threads, each making calls through its own clone of `svc`
/// (all clones share one breaker). One iteration is one call per thread.
fn contended<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    threads: usize,
    svc: S,
) where
    S: Service<()> + Clone + Send,
{
    g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(threads + 1);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    let mut svc = svc.clone();
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        for _ in 0..iters {
                            assert!(once(&mut svc));
                        }
                        barrier.wait();
                    });
                }
                barrier.wait();
                // Measuring wall time is what a bench is for; no decision
                // reads this clock.
                #[allow(clippy::disallowed_types)]
                let start = std::time::Instant::now();
                barrier.wait();
                start.elapsed()
            })
        });
    });
}

fn threads(c: &mut Criterion) {
    for n in [2usize, 8] {
        let mut g = c.benchmark_group(format!("breaker/contended/{n}"));
        configure(&mut g);
        g.throughput(Throughput::Elements(n as u64));
        contended(
            &mut g,
            "apiguard consecutive",
            n,
            CircuitBreakerLayer::new(ours_consecutive()).layer(OK),
        );
        contended(
            &mut g,
            "apiguard count window",
            n,
            CircuitBreakerLayer::new(ours_window()).layer(OK),
        );
        contended(
            &mut g,
            "tower-resilience consecutive",
            n,
            tr_consecutive().layer(OK),
        );
        contended(&mut g, "failsafe consecutive", n, failsafe(OK));
        contended(&mut g, "recloser count window", n, recloser(OK));
        g.finish();
    }
}

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(40);
}

criterion_group!(benches, closed, open, permit, threads);

fn main() {
    if let Some(who) = std::env::var_os("BREAKER_COUNT") {
        count(&who.to_string_lossy());
        return;
    }
    if std::env::var_os("BREAKER_RATIOS").is_some() {
        ratios();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

// --- instruction counts ---------------------------------------------------
//
// `BREAKER_COUNT=<contender>` makes exactly 1 000 000 closed-path calls of
// one contender and exits, so that `valgrind --tool=callgrind` counts what
// a call executes (instructions repeat on a busy machine; times do not).
// Contenders: `none`, `ours_window`, `ours_consecutive`, `recloser`. Run:
// `BREAKER_COUNT=ours_window valgrind --tool=callgrind <bench binary>`,
// minus the `none` run's total, divided by 1 000 000.

fn count(who: &str) {
    fn run<S: Service<()>>(mut svc: S) {
        for _ in 0..1_000_000 {
            std::hint::black_box(once(&mut svc));
        }
    }
    match who {
        "none" => run(OK),
        "ours_window" => run(CircuitBreakerLayer::new(ours_window()).layer(OK)),
        "ours_consecutive" => run(CircuitBreakerLayer::new(ours_consecutive()).layer(OK)),
        "recloser" => run(recloser(OK)),
        other => panic!("BREAKER_COUNT: no contender {other:?}"),
    }
}

// --- interleaved ratios ---------------------------------------------------
//
// On a shared, loaded machine, criterion's figures for two contenders
// measured a minute apart can differ by 2x from load alone. With
// `BREAKER_RATIOS=1` the bench instead times short batches of every
// contender in turn, round after round, so that each round sees the same
// load, and prints the median of each contender's per-round ratio to
// apiguard's. Run:
// `BREAKER_RATIOS=1 cargo bench -p apiguard-benches --bench breaker`.

/// Times `batch` calls per thread on `threads` threads (each with its own
/// clone of `svc`); returns nanoseconds per call per thread.
fn timed<S>(svc: &S, threads: usize, batch: u64) -> f64
where
    S: Service<()> + Clone + Send,
{
    // Measuring wall time is what a bench is for; no decision reads this.
    #[allow(clippy::disallowed_types)]
    let run = |svc: &mut S| {
        let start = std::time::Instant::now();
        for _ in 0..batch {
            std::hint::black_box(once(svc));
        }
        start.elapsed()
    };
    if threads == 1 {
        let mut svc = svc.clone();
        return run(&mut svc).as_nanos() as f64 / batch as f64;
    }
    let barrier = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let mut svc = svc.clone();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    run(&mut svc)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    });
    total.as_nanos() as f64 / batch as f64
}

type Contender = (&'static str, Box<dyn Fn(usize, u64) -> f64>);

fn contender<S>(name: &'static str, svc: S) -> Contender
where
    S: Service<()> + Clone + Send + 'static,
{
    (
        name,
        Box::new(move |threads, batch| timed(&svc, threads, batch)),
    )
}

fn report(title: &str, threads: usize, contenders: &[Contender]) {
    const ROUNDS: usize = 60;
    let batch = 20_000 / threads as u64;
    let mut samples = vec![Vec::with_capacity(ROUNDS); contenders.len()];
    for c in contenders {
        c.1(threads, batch); // warm up
    }
    for round in 0..ROUNDS {
        // Rotate the order so no contender always runs first.
        for k in 0..contenders.len() {
            let i = (k + round) % contenders.len();
            samples[i].push(contenders[i].1(threads, batch));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("{title} ({threads} thread(s), median of {ROUNDS} interleaved rounds)");
    for (i, c) in contenders.iter().enumerate() {
        let ratios: Vec<f64> = (0..ROUNDS).map(|r| samples[i][r] / samples[0][r]).collect();
        println!(
            "  {:<32} {:>9.1} ns/call   {:>6.2}x apiguard",
            c.0,
            median(samples[i].clone()),
            median(ratios)
        );
    }
}

fn ratios() {
    let closed = || -> Vec<Contender> {
        vec![
            contender(
                "apiguard consecutive",
                CircuitBreakerLayer::new(ours_consecutive()).layer(OK),
            ),
            contender(
                "apiguard count window",
                CircuitBreakerLayer::new(ours_window()).layer(OK),
            ),
            contender("no breaker", OK),
            contender("tower-resilience consecutive", tr_consecutive().layer(OK)),
            contender("tower-resilience count window", tr_window().layer(OK)),
            contender("failsafe consecutive", failsafe(OK)),
            contender("recloser count window", recloser(OK)),
        ]
    };
    report("closed", 1, &closed());
    let mut ours = CircuitBreakerLayer::new(ours_consecutive()).layer(FAIL);
    trip(&mut ours);
    let mut tr = tr_consecutive().layer(FAIL);
    trip(&mut tr);
    let mut fs = failsafe(FAIL);
    trip(&mut fs);
    let mut rc = recloser(FAIL);
    trip(&mut rc);
    report(
        "open (refusal)",
        1,
        &[
            contender("apiguard", ours),
            contender("tower-resilience", tr),
            contender("failsafe", fs),
            contender("recloser", rc),
        ],
    );
    for threads in [2, 8] {
        let mut c = closed();
        c.retain(|c| c.0 != "no breaker");
        report("closed, contended", threads, &c);
    }
}
