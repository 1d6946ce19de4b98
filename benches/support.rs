//! What `stack`, `alloc` and `http` share: the no-op services, the request
//! every contender gets, and the stacks under test, built one way only so
//! that every bench measures the same thing.

// Each bench binary includes this module and uses a different part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apiguard::{CircuitBreaker, GuardLayer, RetryPolicy};
use apiguard_core::BoxError;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tower::retry::Policy;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;
use tower::{Layer, Service, ServiceExt};

pub type Req = Request<Full<Bytes>>;
pub type Res = Response<()>;

/// A GET with an authority (the stack keys its breakers and buckets by
/// host) and an empty body. The URI is static, so building the request
/// allocates nothing and `bare` is close to zero: what is left is the
/// layers' own cost.
#[inline]
pub fn request() -> Req {
    request_for("http://api.example/v1/items")
}

/// The same request, to `uri`.
#[inline]
pub fn request_for(uri: &'static str) -> Req {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = http::Uri::from_static(uri);
    req
}

/// The inner service: answers 200 at once.
#[derive(Clone, Copy, Debug)]
pub struct Noop;

impl Service<Req> for Noop {
    type Response = Res;
    type Error = BoxError;
    type Future = Ready<Result<Res, BoxError>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        std::hint::black_box(&req);
        ready(Ok(Response::new(())))
    }
}

/// The same, for tower-resilience, whose retry needs a `Clone` request.
#[derive(Clone, Copy, Debug)]
pub struct NoopArc;

impl Service<Arc<Req>> for NoopArc {
    type Response = Res;
    type Error = BoxError;
    type Future = Ready<Result<Res, BoxError>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Arc<Req>) -> Self::Future {
        std::hint::black_box(&req);
        ready(Ok(Response::new(())))
    }
}

/// Polls a future that is ready (or soon ready) with a no-op waker.
#[inline]
pub fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// `ready()` + `call` + the response, without an executor.
#[inline]
pub fn one<S, R>(svc: &mut S, req: R)
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    let ready = now(svc.ready()).unwrap();
    let res = now(ready.call(req)).unwrap();
    std::hint::black_box(res);
}

/// No contender refuses or waits during a run: a burst of 10⁹ refilled at
/// 10⁹ a second.
pub const BURST: u32 = 1_000_000_000;

fn retry_policy_builder() -> apiguard::retry::RetryPolicyBuilder {
    // The defaults: 3 retries, exponential backoff with jitter, the default
    // retry budget (one deposit per request).
    RetryPolicy::builder()
}

fn breaker() -> apiguard::breaker::CircuitBreakerBuilder {
    CircuitBreaker::builder()
        .failure_threshold(5)
        .recovery_timeout(Duration::from_secs(30))
}

/// The full client stack: retry → per-host breaker → per-host limit.
pub fn guard() -> GuardLayer {
    GuardLayer::builder()
        .retry(retry_policy_builder())
        .circuit_breaker(breaker())
        .rate_limit(apiguard::Quota::from_rate(BURST, BURST as f64))
        .build()
        .unwrap()
}

/// The full stack with one breaker and one bucket for all hosts (no
/// per-host keying), as tower-resilience's stack has.
pub fn guard_global() -> GuardLayer {
    GuardLayer::builder()
        .retry(retry_policy_builder())
        .circuit_breaker(breaker())
        .rate_limit(apiguard::Quota::from_rate(BURST, BURST as f64))
        .per_host(false)
        .build()
        .unwrap()
}

/// The same with both timeouts on (what `GuardedClient` builds).
pub fn guard_with_timeouts() -> GuardLayer {
    GuardLayer::builder()
        .total_timeout(Duration::from_secs(60))
        .retry(retry_policy_builder())
        .circuit_breaker(breaker())
        .rate_limit(apiguard::Quota::from_rate(BURST, BURST as f64))
        .attempt_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The stack's parts one at a time, as the stack builds them.
pub fn guard_rate_limit_only() -> GuardLayer {
    GuardLayer::builder()
        .rate_limit(apiguard::Quota::from_rate(BURST, BURST as f64))
        .build()
        .unwrap()
}

pub fn guard_breaker_only() -> GuardLayer {
    GuardLayer::builder()
        .circuit_breaker(breaker())
        .build()
        .unwrap()
}

pub fn guard_retry_only() -> GuardLayer {
    GuardLayer::builder()
        .retry(retry_policy_builder())
        .build()
        .unwrap()
}

/// The plain (not per-host) layers of the pattern crates.
pub fn plain_rate_limit() -> apiguard::RateLimitLayer {
    apiguard::RateLimitLayer::new(apiguard::TokenBucket::from_rate(BURST, BURST as f64).unwrap())
}

pub fn plain_breaker() -> apiguard::CircuitBreakerLayer {
    apiguard::CircuitBreakerLayer::new(breaker().build().unwrap())
}

pub fn plain_retry() -> apiguard::RetryLayer {
    apiguard::RetryLayer::new(retry_policy_builder().build().unwrap())
}

// --- tower's own: RateLimit + Retry --------------------------------------

/// The smallest useful tower policy: retry 5xx and errors up to three times,
/// waiting by tower's `ExponentialBackoff`; the request is copied as
/// apiguard's policy copies it.
#[derive(Clone, Debug)]
pub struct TowerPolicy {
    backoff: ExponentialBackoff,
    remaining: u32,
}

impl TowerPolicy {
    pub fn new() -> Self {
        let backoff = ExponentialBackoffMaker::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            1.0,
            HasherRng::default(),
        )
        .unwrap()
        .make_backoff();
        Self {
            backoff,
            remaining: 3,
        }
    }
}

impl Policy<Req, Res, BoxError> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Self::Future> {
        let failed = match result {
            Ok(res) => res.status().is_server_error(),
            Err(_) => true,
        };
        if failed && self.remaining > 0 {
            self.remaining -= 1;
            Some(self.backoff.next_backoff())
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(copy_request(req))
    }
}

/// [`TowerPolicy`] holding an `Arc` as well, as ours holds its settings:
/// what one reference count written and dropped per request costs tower's
/// `Retry` (which clones its policy for every request).
#[derive(Clone)]
pub struct TowerArcPolicy {
    inner: TowerPolicy,
    _shared: Arc<()>,
}

impl TowerArcPolicy {
    pub fn new() -> Self {
        Self {
            inner: TowerPolicy::new(),
            _shared: Arc::new(()),
        }
    }
}

impl Policy<Req, Res, BoxError> for TowerArcPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, req: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Self::Future> {
        self.inner.retry(req, result)
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        self.inner.clone_request(req)
    }
}

/// [`TowerPolicy`] with tower's own retry budget, used the way tower's
/// `Budget` is meant to be: every request deposits, every retry withdraws.
/// The like-for-like contender for apiguard's default policy, which keeps
/// a budget too.
#[derive(Clone)]
pub struct TowerBudgetPolicy {
    policy: TowerPolicy,
    budget: Arc<tower::retry::budget::TpsBudget>,
    started: bool,
}

impl TowerBudgetPolicy {
    /// tower's `TpsBudget` with apiguard's default settings (10 s, 10 retries
    /// a second, 20 % of requests).
    pub fn new() -> Self {
        Self {
            policy: TowerPolicy::new(),
            budget: Arc::new(tower::retry::budget::TpsBudget::new(
                Duration::from_secs(10),
                10,
                0.2,
            )),
            started: false,
        }
    }
}

impl Policy<Req, Res, BoxError> for TowerBudgetPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, req: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Self::Future> {
        use tower::retry::budget::Budget;
        // Only the request's own clone gets here: its later copies are for
        // retries, which withdraw instead of depositing.
        self.started = true;
        let wait = self.policy.retry(req, result)?;
        self.budget.withdraw().then_some(wait)
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        use tower::retry::budget::Budget;
        // tower calls this once per request on the service's policy (and
        // again before each retry on the request's own clone).
        if !self.started {
            self.budget.deposit();
        }
        self.policy.clone_request(req)
    }
}

/// The copy of a request a retry must make, as a tower policy's
/// `clone_request` makes it for a `Clone` body: `Request::clone` (http 1.x),
/// which copies the head field by field.
pub fn copy_request(req: &Req) -> Req {
    req.clone()
}

/// tower's `RateLimit` around tower's `Retry`. tower's `RateLimit` is not
/// `Clone` (and keeps its state per instance), while `Retry` needs a `Clone`
/// inner service, so the limit can only go outside the retry here; it
/// needs a tokio runtime context (it holds a `Sleep`).
pub fn tower_stack<S>(inner: S) -> tower::limit::RateLimit<tower::retry::Retry<TowerPolicy, S>> {
    let retry = tower::retry::RetryLayer::new(TowerPolicy::new()).layer(inner);
    tower::limit::RateLimitLayer::new(u64::MAX, Duration::from_secs(1)).layer(retry)
}

// --- tower-resilience: rate limiter + circuit breaker + retry ------------

/// The boxed future every tower-resilience layer returns.
pub type TrFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;
pub type TrRlErr = tower_resilience::ratelimiter::RateLimiterServiceError<BoxError>;
pub type TrCbErr = tower_resilience::circuitbreaker::CircuitBreakerError<TrRlErr>;

/// tower-resilience's three layers in apiguard's order (retry → breaker →
/// limiter), configured like ours: the limiter never refuses, the breaker
/// opens after 5 consecutive failures, retry makes up to 4 attempts with
/// exponential backoff. Its retry needs a `Clone` request, so it gets an
/// `Arc<Request<_>>` (cheaper than the copy the others make).
pub fn tower_resilience_stack()
-> impl Service<Arc<Req>, Response = Res, Error = TrCbErr, Future = TrFuture<Result<Res, TrCbErr>>>
+ Clone
+ Send
+ 'static {
    use tower_resilience::circuitbreaker::CircuitBreakerLayer;
    use tower_resilience::ratelimiter::RateLimiterLayer;
    use tower_resilience::retry::RetryLayer;
    let rl = RateLimiterLayer::builder()
        .limit_for_period(BURST as usize)
        .refresh_period(Duration::from_secs(1))
        .timeout_duration(Duration::ZERO)
        .build()
        .unwrap();
    let cb = CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .wait_duration_in_open(Duration::from_secs(30))
        .build()
        .unwrap();
    let retry = RetryLayer::<Arc<Req>, Res, TrCbErr>::builder()
        .max_attempts(4)
        .exponential_backoff(Duration::from_millis(100))
        .build();
    retry.layer(cb.layer(rl.layer(NoopArc)))
}

/// tower-resilience's layers one at a time, for the sum of singles.
pub fn tower_resilience_rate_limit()
-> impl Service<Arc<Req>, Response = Res, Error = TrRlErr, Future = TrFuture<Result<Res, TrRlErr>>>
+ Clone
+ Send
+ 'static {
    tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(BURST as usize)
        .refresh_period(Duration::from_secs(1))
        .timeout_duration(Duration::ZERO)
        .build()
        .unwrap()
        .layer(NoopArc)
}

/// Writes `contents` to `target/apiguard-bench/<name>` (next to criterion's
/// own output) for `scripts/bench-table`.
pub fn write_result(name: &str, contents: &str) {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            // target/release/deps/<bench>-<hash>
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| "target".into())
        .join("apiguard-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    println!("wrote {}", path.display());
}

/// A hyper server on loopback answering `ok` at once, on `rt`: the
/// upstream of the client benches (`http`, `reqwest`).
pub fn serve_hyper(rt: &Runtime) -> SocketAddr {
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    })
}
