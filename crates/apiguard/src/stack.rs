//! [`GuardLayer`]: the three patterns composed in the order a client needs.
//!
//! Outermost first:
//!
//! ```text
//! total timeout → retry → circuit breaker → rate limit → attempt timeout → transport
//! ```
//!
//! - **Retry outside the breaker**: every attempt is seen by the breaker, and
//!   an open breaker ends the retries early (its `retry_after` tells retry
//!   whether waiting is worth it).
//! - **Rate limit inside retry**: every request that leaves the process,
//!   retries included, spends a token — the remote's quota counts them all.
//! - **Breaker before the limiter**: a call the breaker refuses spends no
//!   token.
//! - **Attempt timeout innermost**: it covers the network call only, not the
//!   wait for a token.
//! - **Total timeout outermost**: it bounds everything, waits and retries
//!   included.
//!
//! Each part is optional. Breakers and buckets are per host by default (the
//! URI's authority, or the `Host` header): one failing host does not open
//! the circuit for another, and each host's quota is its own.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_breaker::{
    CircuitBreakerBuilder, KeyedBreakers, KeyedCircuitBreakerLayer, KeyedCircuitBreakerService,
    SlidingWindow,
};
use apiguard_core::{BoxError, InvalidConfig};
use apiguard_ratelimit::{KeyedLimiter, KeyedRateLimit, KeyedRateLimitLayer};
use apiguard_retry::{Retry, RetryLayer, RetryPolicy};
use http::Request;
use http::uri::Authority;
use pin_project_lite::pin_project;
use tower::timeout::{Timeout, TimeoutLayer};
use tower::util::Either;
use tower_layer::Layer;
use tower_service::Service;

/// The key breakers and buckets are found under: the request's host, or
/// `None` when they are shared by all hosts.
pub type HostScope = Option<Authority>;

/// Picks the [`HostScope`] of a request.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    per_host: bool,
}

impl Scope {
    /// One breaker and one bucket per host (`true`) or for all (`false`).
    pub const fn new(per_host: bool) -> Self {
        Self { per_host }
    }

    /// The scope of `req`.
    #[inline]
    pub fn of<B>(&self, req: &Request<B>) -> HostScope {
        if !self.per_host {
            return None;
        }
        apiguard_breaker::KeyExtractor::extract(&apiguard_breaker::HostKey, req)
    }
}

impl<B> apiguard_breaker::KeyExtractor<Request<B>> for Scope {
    type Key = HostScope;
    #[inline]
    fn extract(&self, req: &Request<B>) -> HostScope {
        self.of(req)
    }
}

impl<B> apiguard_ratelimit::extract::KeyExtractor<B> for Scope {
    type Key = HostScope;
    #[inline]
    fn extract(&self, req: &Request<B>) -> Option<HostScope> {
        Some(self.of(req))
    }
}

/// Builds a [`GuardLayer`]; see [`GuardLayer::builder`].
#[derive(Debug, Clone)]
pub struct GuardLayerBuilder {
    total_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    breaker: Option<CircuitBreakerBuilder>,
    limit: Option<(u32, f64)>,
    max_wait: Duration,
    attempt_timeout: Option<Duration>,
    per_host: bool,
    max_hosts: usize,
}

impl Default for GuardLayerBuilder {
    fn default() -> Self {
        Self {
            total_timeout: None,
            retry: None,
            breaker: None,
            limit: None,
            max_wait: Duration::from_secs(30),
            attempt_timeout: None,
            per_host: true,
            max_hosts: 1024,
        }
    }
}

impl GuardLayerBuilder {
    /// Bounds each request, waits and retries included.
    pub fn total_timeout(mut self, d: Duration) -> Self {
        self.total_timeout = Some(d);
        self
    }

    /// Retries by `policy`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Puts a circuit breaker built from `template` in front of each host.
    pub fn circuit_breaker(mut self, template: CircuitBreakerBuilder) -> Self {
        self.breaker = Some(template);
        self
    }

    /// Limits each host to `capacity` requests at once and `refill_per_sec`
    /// a second after that.
    pub fn rate_limit(mut self, capacity: u32, refill_per_sec: f64) -> Self {
        self.limit = Some((capacity, refill_per_sec));
        self
    }

    /// How long a request may wait for a token before it is refused with
    /// `RateLimited` (default 30 s; the total timeout bounds it too).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Bounds each attempt's network call (not the wait for a token).
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// One breaker and one bucket per host (default) or one for all hosts.
    pub fn per_host(mut self, yes: bool) -> Self {
        self.per_host = yes;
        self
    }

    /// At most this many hosts are tracked at once (default 1024).
    pub fn max_hosts(mut self, n: usize) -> Self {
        self.max_hosts = n;
        self
    }

    /// Checks the combination and builds the layer.
    ///
    /// Refused: an attempt timeout longer than the total timeout (no attempt
    /// could use it); a breaker whose time window is shorter than twice the
    /// attempt timeout (one slow attempt would fill the window alone); and
    /// every invalid setting of the parts.
    pub fn build(self) -> Result<GuardLayer, InvalidConfig> {
        if let (Some(attempt), Some(total)) = (self.attempt_timeout, self.total_timeout)
            && attempt > total
        {
            return Err(InvalidConfig::new(
                "attempt_timeout",
                format!(
                    "the attempt timeout ({attempt:?}) is longer than the total timeout ({total:?}), so no attempt could use it"
                ),
            ));
        }
        for (field, d) in [
            ("attempt_timeout", self.attempt_timeout),
            ("total_timeout", self.total_timeout),
        ] {
            if d == Some(Duration::ZERO) {
                return Err(InvalidConfig::new(field, "must be longer than zero"));
            }
        }
        if self.max_hosts == 0 {
            return Err(InvalidConfig::new("max_hosts", "must be at least 1"));
        }
        let breakers = match self.breaker {
            Some(template) => {
                if let (Some(SlidingWindow::Time { span, .. }), Some(attempt)) =
                    (template.window_config(), self.attempt_timeout)
                    && span < attempt * 2
                {
                    return Err(InvalidConfig::new(
                        "circuit_breaker",
                        format!(
                            "the breaker's time window ({span:?}) is shorter than twice the attempt timeout ({attempt:?}): one slow attempt would fill it"
                        ),
                    ));
                }
                Some(KeyedBreakers::new(template, self.max_hosts)?)
            }
            None => None,
        };
        let limiter = match self.limit {
            Some((capacity, rate)) => {
                Some(KeyedLimiter::new(capacity, rate)?.with_max_keys(self.max_hosts))
            }
            None => None,
        };
        Ok(GuardLayer {
            total_timeout: self.total_timeout,
            retry: self.retry,
            breakers,
            limiter,
            max_wait: self.max_wait,
            attempt_timeout: self.attempt_timeout,
            scope: Scope::new(self.per_host),
        })
    }
}

/// The composed client stack (see the [module docs](self)).
///
/// Cloning the layer, and every service it makes, shares the breakers, the
/// buckets and the retry budget.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    total_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    breakers: Option<KeyedBreakers<HostScope>>,
    limiter: Option<KeyedLimiter<HostScope>>,
    max_wait: Duration,
    attempt_timeout: Option<Duration>,
    scope: Scope,
}

impl GuardLayer {
    /// Starts a builder with every part off.
    pub fn builder() -> GuardLayerBuilder {
        GuardLayerBuilder::default()
    }

    /// The per-host breakers, for inspection.
    pub fn breakers(&self) -> Option<&KeyedBreakers<HostScope>> {
        self.breakers.as_ref()
    }

    /// The per-host buckets, for inspection.
    pub fn limiter(&self) -> Option<&KeyedLimiter<HostScope>> {
        self.limiter.as_ref()
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.retry.as_ref()
    }
}

type Attempt<S> = Either<Timeout<BoxErr<S>>, BoxErr<S>>;
type Limited<S> = Either<KeyedRateLimit<Attempt<S>, KeyedLimiter<HostScope>, Scope>, Attempt<S>>;
type Broken<S> = Either<KeyedCircuitBreakerService<Limited<S>, HostScope, Scope>, Limited<S>>;
type Retried<S> = Either<Retry<Broken<S>>, Broken<S>>;
type Total<S> = Either<Timeout<Retried<S>>, Retried<S>>;

fn either<L, S>(layer: Option<L>, inner: S) -> Either<L::Service, S>
where
    L: Layer<S>,
{
    match layer {
        Some(l) => Either::Left(l.layer(inner)),
        None => Either::Right(inner),
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        let svc = BoxErr { inner };
        let svc = either(self.attempt_timeout.map(TimeoutLayer::new), svc);
        let svc = either(
            self.limiter
                .clone()
                .map(|l| KeyedRateLimitLayer::new(l, self.scope).max_wait(self.max_wait)),
            svc,
        );
        let svc = either(
            self.breakers
                .clone()
                .map(|b| KeyedCircuitBreakerLayer::new(b, self.scope)),
            svc,
        );
        let svc = either(self.retry.clone().map(RetryLayer::new), svc);
        let svc = either(self.total_timeout.map(TimeoutLayer::new), svc);
        Guard { inner: svc }
    }
}

/// The service [`GuardLayer`] makes.
#[derive(Clone)]
pub struct Guard<S> {
    inner: Total<S>,
}

impl<S> fmt::Debug for Guard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

impl<S, B, R> Service<Request<B>> for Guard<S>
where
    Total<S>: Service<Request<B>, Response = http::Response<R>, Error = BoxError>,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = <Total<S> as Service<Request<B>>>::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.inner.call(req)
    }
}

/// Boxes the transport's error, so every part of the stack speaks
/// [`BoxError`].
#[derive(Debug, Clone)]
pub struct BoxErr<S> {
    inner: S,
}

impl<S, Req> Service<Req> for BoxErr<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxErrFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        BoxErrFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`BoxErr`].
    #[derive(Debug)]
    pub struct BoxErrFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> Future for BoxErrFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(Into::into)
    }
}
