//! Retry side by side: apiguard's `RetryLayer` against tower's `Retry` (with
//! a minimal policy over its `ExponentialBackoff`, written here) and
//! tower-resilience's retry, around the same no-op service.
//!
//! Groups, one question each:
//! - `success_path`: what a request that succeeds first time pays for being
//!   retryable — `poll_ready` + `call` + polling the response future to
//!   completion; the request is built outside the timed part
//!   (`iter_batched`), and `bare` is the no-op service alone. apiguard is measured with its
//!   default budget (one deposit per request) and without a budget;
//!   tower likewise without a budget (`tower`) and with its own
//!   `TpsBudget`, one deposit per request (`tower_budget`), so each of ours
//!   has a like-for-like contender; `tower_arc` is `tower` with an `Arc`
//!   in its policy, as ours keeps its settings, to show what that
//!   reference count costs per request.
//!   tower-resilience needs a `Clone` request: `tower_resilience` gets an
//!   `Arc<Request<_>>` (its clone is a reference count, less work than the
//!   copy the others make), `tower_resilience_deep_clone` a request whose
//!   `Clone` copies it like the others (like for like);
//! - `request_clone`: the copy kept for a retry — apiguard's
//!   `RetryPolicy::copy_request` of a `Request<Full<Bytes>>` (1 KiB body,
//!   4 headers) against `Request::clone`, the copy a tower policy makes of
//!   a request with a `Clone` body (`tower_request_clone`; ours is that
//!   copy behind one check, so this row shows it adds nothing), plus
//!   wrapping a body in a `ReplayBody` and copying it;
//! - `budget`: one deposit (what every request pays) and one deposit plus
//!   withdrawal (a retry), apiguard's `RetryBudget` against tower's
//!   `TpsBudget`, same settings (10 s, 10/s, 20 %).
//!
//! Every future here is ready on its first poll; they are polled with a
//! no-op waker inside a tokio runtime context.
//!
//! Run: `cargo bench -p apiguard-benches --bench retry`.

use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_core::BoxError;
use apiguard_retry::{ReplayBody, RetryLayer, RetryPolicy, TryCloneBody};
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};

mod support;

use support::{
    Noop, NoopArc, Req, Res, TowerArcPolicy, TowerBudgetPolicy, TowerPolicy, copy_request, one,
};

/// A request whose `Clone` copies it the way a retry must (headers, URI,
/// body), for a like-for-like run of tower-resilience.
#[derive(Debug)]
struct DeepReq(Req);

impl Clone for DeepReq {
    fn clone(&self) -> Self {
        DeepReq(copy_request(&self.0))
    }
}

#[derive(Clone, Copy, Debug)]
struct NoopDeep;

impl Service<DeepReq> for NoopDeep {
    type Response = Res;
    type Error = BoxError;
    type Future = Ready<Result<Res, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: DeepReq) -> Self::Future {
        black_box(&req);
        ready(Ok(Response::new(())))
    }
}

fn small_request() -> Req {
    Request::get("/").body(Full::new(Bytes::new())).unwrap()
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(40)
        .throughput(Throughput::Elements(1));
    g
}

fn success_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = group(c, "success_path");

    g.bench_function("bare", |b| each_request(b, Noop));
    g.bench_function("apiguard", |b| {
        each_request(
            b,
            RetryLayer::new(RetryPolicy::builder().build().unwrap()).layer(Noop),
        )
    });
    g.bench_function("apiguard_no_budget", |b| {
        let policy = RetryPolicy::builder().no_budget().build().unwrap();
        each_request(b, RetryLayer::new(policy).layer(Noop));
    });
    g.bench_function("tower", |b| {
        each_request(
            b,
            tower::retry::RetryLayer::new(TowerPolicy::new()).layer(Noop),
        )
    });
    g.bench_function("tower_arc", |b| {
        each_request(
            b,
            tower::retry::RetryLayer::new(TowerArcPolicy::new()).layer(Noop),
        )
    });
    g.bench_function("tower_budget", |b| {
        each_request(
            b,
            tower::retry::RetryLayer::new(TowerBudgetPolicy::new()).layer(Noop),
        )
    });
    g.bench_function("tower_resilience", |b| {
        let layer = tower_resilience::retry::RetryLayer::<Arc<Req>, Res, BoxError>::builder()
            .max_attempts(4)
            .exponential_backoff(Duration::from_millis(100))
            .build();
        let mut svc = layer.layer(NoopArc);
        b.iter_batched(
            || Arc::new(small_request()),
            |req| one(&mut svc, req),
            BatchSize::SmallInput,
        );
    });
    g.bench_function("tower_resilience_deep_clone", |b| {
        let layer = tower_resilience::retry::RetryLayer::<DeepReq, Res, BoxError>::builder()
            .max_attempts(4)
            .exponential_backoff(Duration::from_millis(100))
            .build();
        let mut svc = layer.layer(NoopDeep);
        b.iter_batched(
            || DeepReq(small_request()),
            |req| one(&mut svc, req),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn big_request() -> Req {
    Request::post("https://api.example.com/v1/orders?page=2")
        .header("host", "api.example.com")
        .header("user-agent", "apiguard-bench/0.1")
        .header("content-type", "application/json")
        .header("idempotency-key", "5b1c7e0e-8c1f-4c52-9d8e-0f1a2b3c4d5e")
        .body(Full::new(Bytes::from(vec![b'x'; 1024])))
        .unwrap()
}

/// Sends a fresh request through `svc` per iteration, the request built
/// outside the timed part.
fn each_request<S>(b: &mut criterion::Bencher<'_>, mut svc: S)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    b.iter_batched(
        small_request,
        |req| one(&mut svc, req),
        BatchSize::SmallInput,
    );
}

fn request_clone(c: &mut Criterion) {
    let mut g = group(c, "request_clone");
    let req = big_request();

    g.bench_function("apiguard_clone_request", |b| {
        let policy = RetryPolicy::builder().no_budget().build().unwrap();
        b.iter(|| black_box(policy.copy_request(black_box(&req))));
    });
    g.bench_function("tower_request_clone", |b| {
        b.iter(|| black_box(copy_request(black_box(&req))));
    });
    g.bench_function("replay_body_wrap_and_copy", |b| {
        b.iter(|| {
            let body = ReplayBody::new(Full::new(Bytes::from_static(&[b'x'; 1024])), 64 * 1024);
            let copy = body.try_clone_body();
            black_box((body, copy))
        });
    });
    g.finish();
}

fn budget(c: &mut Criterion) {
    use tower::retry::budget::{Budget, TpsBudget};
    let mut g = group(c, "budget");
    let ours = apiguard_retry::RetryBudget::new(Duration::from_secs(10), 10, 0.2).unwrap();
    let theirs = TpsBudget::new(Duration::from_secs(10), 10, 0.2);
    g.bench_function("apiguard_deposit", |b| {
        b.iter(|| black_box(&ours).deposit())
    });
    g.bench_function("tower_deposit", |b| b.iter(|| black_box(&theirs).deposit()));
    // Five deposits buy one retry at 20 %: the steady state of a budget
    // that is never spent.
    g.bench_function("apiguard_deposit_withdraw", |b| {
        b.iter(|| {
            for _ in 0..5 {
                ours.deposit();
            }
            black_box(ours.try_withdraw())
        })
    });
    g.bench_function("tower_deposit_withdraw", |b| {
        b.iter(|| {
            for _ in 0..5 {
                theirs.deposit();
            }
            black_box(theirs.withdraw())
        })
    });
    g.finish();
}

criterion_group!(benches, success_path, request_clone, budget);

fn main() {
    if let Some(who) = std::env::var_os("RETRY_COUNT") {
        count(&who.to_string_lossy());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

// --- instruction counts ---------------------------------------------------
//
// `RETRY_COUNT=<contender>` sends exactly 1 000 000 requests (each built in
// the loop, as `bare` does) through one contender of `success_path` and
// exits, so that `valgrind --tool=callgrind` counts what a request executes
// (instructions repeat on a busy machine; times do not). Contenders:
// `bare`, `apiguard`, `apiguard_no_budget`, `tower`, `tower_arc`, `tower_budget`. Run
// `RETRY_COUNT=tower valgrind --tool=callgrind <bench binary>`; the
// difference of two totals divided by 1 000 000 is what one request costs
// more in one than in the other.

fn count(who: &str) {
    fn run<S>(mut svc: S)
    where
        S: Service<Req>,
        S::Error: std::fmt::Debug,
    {
        for _ in 0..1_000_000 {
            one(&mut svc, small_request());
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    match who {
        "bare" => run(Noop),
        "apiguard" => run(RetryLayer::new(RetryPolicy::builder().build().unwrap()).layer(Noop)),
        "apiguard_no_budget" => {
            run(RetryLayer::new(RetryPolicy::builder().no_budget().build().unwrap()).layer(Noop))
        }
        "tower" => run(tower::retry::RetryLayer::new(TowerPolicy::new()).layer(Noop)),
        "tower_arc" => run(tower::retry::RetryLayer::new(TowerArcPolicy::new()).layer(Noop)),
        "tower_budget" => run(tower::retry::RetryLayer::new(TowerBudgetPolicy::new()).layer(Noop)),
        other => panic!("RETRY_COUNT: no contender {other:?}"),
    }
}
