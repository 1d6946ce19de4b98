use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_core::BoxError;
use http::Request;
use tower_service::Service;

use crate::bucket::TokenBucket;
use crate::cost::{RequestCost, UnitCost};
use crate::extract::{KeyExtractor, MissingKeyPolicy, RefuseMissing};
use crate::future::{Hold, ResponseFuture};
use crate::limiter::Limiter;

/// Rate-limits requests to `S` with one limiter (see
/// [`RateLimitLayer`](crate::RateLimitLayer)).
#[derive(Clone)]
pub struct RateLimit<S, L = TokenBucket, C = UnitCost> {
    inner: S,
    limiter: L,
    max_wait: Duration,
    cost: C,
}

impl<S, L, C> RateLimit<S, L, C> {
    pub(crate) fn new(inner: S, limiter: L, max_wait: Duration, cost: C) -> Self {
        Self {
            inner,
            limiter,
            max_wait,
            cost,
        }
    }

    /// The limiter.
    pub fn limiter(&self) -> &L {
        &self.limiter
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, L: fmt::Debug, C> fmt::Debug for RateLimit<S, L, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S, Req, L, C> Service<Req> for RateLimit<S, L, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    L: Limiter<()> + Clone,
    C: RequestCost<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, L, ()>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let cost = self.cost.cost(&req);
        decide(&mut self.inner, &self.limiter, (), cost, self.max_wait, req)
    }
}

/// Rate-limits requests to `S` per key (see
/// [`KeyedRateLimitLayer`](crate::KeyedRateLimitLayer)).
#[derive(Clone)]
pub struct KeyedRateLimit<S, L, E, C = UnitCost, M = RefuseMissing> {
    inner: S,
    limiter: L,
    extractor: E,
    max_wait: Duration,
    cost: C,
    missing: M,
}

impl<S, L, E, C, M> KeyedRateLimit<S, L, E, C, M> {
    pub(crate) fn new(
        inner: S,
        limiter: L,
        extractor: E,
        max_wait: Duration,
        cost: C,
        missing: M,
    ) -> Self {
        Self {
            inner,
            limiter,
            extractor,
            max_wait,
            cost,
            missing,
        }
    }

    /// The limiter.
    pub fn limiter(&self) -> &L {
        &self.limiter
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, L: fmt::Debug, E, C, M> fmt::Debug for KeyedRateLimit<S, L, E, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S, B, L, E, C, M> Service<Request<B>> for KeyedRateLimit<S, L, E, C, M>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
    E: KeyExtractor<Request<B>>,
    L: Limiter<E::Key> + Clone,
    C: RequestCost<Request<B>>,
    M: MissingKeyPolicy<E::Key>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<B>, L, E::Key>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    // Out of line: the response future is large (a waiting request keeps
    // its request, a timer and a reservation), and a caller that inlines
    // this call builds it in a temporary and copies it out (448 bytes for
    // an axum request). Called, it writes the future in place.
    #[inline(never)]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = match self.extractor.extract(&req) {
            Some(key) => key,
            None => match self.missing.resolve(self.extractor.missing_key()) {
                Ok(shared) => shared,
                Err(missing) => {
                    tracing::debug!(target: "apiguard::ratelimit", error = %missing, "request without a rate-limit key refused");
                    return ResponseFuture::missing_key(missing);
                }
            },
        };
        let cost = self.cost.cost(&req);
        decide(
            &mut self.inner,
            &self.limiter,
            key,
            cost,
            self.max_wait,
            req,
        )
    }
}

/// The decision both services make in `call`.
#[inline]
fn decide<S, Req, L, K>(
    inner: &mut S,
    limiter: &L,
    key: K,
    cost: u32,
    max_wait: Duration,
    req: Req,
) -> ResponseFuture<S, Req, L, K>
where
    S: Service<Req> + Clone,
    L: Limiter<K> + Clone,
{
    if limiter.take_now(&key, cost) {
        // No event for a plain admission: its checks would sit on every
        // request's path, and the admission says nothing a metric does not.
        return ResponseFuture::called(|| inner.call(req));
    }
    decide_slow(inner, limiter, key, cost, max_wait, req)
}

/// [`decide`] when the tokens are not there now. Out of line, so that the
/// request reaches it by reference to the caller's copy: in line, its
/// several arms that take the request made the admitted path copy the
/// request (240 bytes for an axum one) into a temporary first.
#[inline(never)]
fn decide_slow<S, Req, L, K>(
    inner: &mut S,
    limiter: &L,
    key: K,
    cost: u32,
    max_wait: Duration,
    req: Req,
) -> ResponseFuture<S, Req, L, K>
where
    S: Service<Req> + Clone,
    L: Limiter<K> + Clone,
{
    match limiter.reserve_now(&key, cost, max_wait) {
        Some(Ok(reservation)) => {
            let wait = reservation.grant().wait;
            if wait.is_zero() {
                tracing::trace!(
                    target: "apiguard::ratelimit",
                    remaining = reservation.grant().remaining,
                    "admitted"
                );
                return ResponseFuture::called(|| inner.call(req));
            }
            tracing::trace!(
                target: "apiguard::ratelimit",
                wait_ms = wait.as_millis() as u64,
                "waiting for tokens"
            );
            // `inner` is ready now but will be called later: take the ready
            // one and leave a clone (tower-service's "be careful when cloning
            // inner services"); the future drives its readiness again.
            let clone = inner.clone();
            let ready = std::mem::replace(inner, clone);
            let hold = Hold {
                limiter: limiter.clone(),
                key,
                reservation,
            };
            ResponseFuture::waiting(ready, req, wait, hold)
        }
        Some(Err(refused)) => {
            tracing::debug!(target: "apiguard::ratelimit", retry_after_ms = refused.retry_after().map(|d| d.as_millis() as u64), "rate limited");
            ResponseFuture::refused(refused)
        }
        None => {
            let clone = inner.clone();
            let ready = std::mem::replace(inner, clone);
            let fut = limiter.reserve(&key, cost, max_wait);
            ResponseFuture::reserving(ready, req, fut)
        }
    }
}
