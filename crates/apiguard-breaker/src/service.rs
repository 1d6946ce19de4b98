use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_core::{BoxError, Classify, HttpClassifier, KeyExtractor};
use tower_service::Service;

use crate::breaker::CircuitBreaker;
use crate::future::ResponseFuture;
use crate::hold::{HoldOpen, RetryAfterHold};
use crate::keyed::KeyedBreakers;

/// Guards a service with one [`CircuitBreaker`]; made by
/// [`CircuitBreakerLayer`](crate::CircuitBreakerLayer).
///
/// Clones share the breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, C = HttpClassifier, H = RetryAfterHold> {
    inner: S,
    breaker: CircuitBreaker,
    classifier: C,
    hold: H,
    max_wait: Duration,
}

impl<S, C, H> CircuitBreakerService<S, C, H> {
    pub(crate) fn new(inner: S, breaker: CircuitBreaker, classifier: C, hold: H) -> Self {
        Self {
            inner,
            breaker,
            classifier,
            hold,
            max_wait: Duration::ZERO,
        }
    }

    pub(crate) fn waiting(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
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

impl<S, Req, C, H> Service<Req> for CircuitBreakerService<S, C, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
    H: HoldOpen<S::Response> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, H>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire_owned() {
            Ok(permit) => ResponseFuture::called(
                || self.inner.call(req),
                permit,
                self.classifier.clone(),
                self.hold.clone(),
            ),
            Err(open) if self.max_wait.is_zero() => {
                ResponseFuture::refused(open, self.classifier.clone(), self.hold.clone())
            }
            Err(open) => ResponseFuture::refused_after_wait(
                open,
                &self.breaker,
                self.max_wait,
                self.classifier.clone(),
                self.hold.clone(),
            ),
        }
    }
}

/// Guards a service with one breaker per key (host, route …); made by
/// [`KeyedCircuitBreakerLayer`](crate::KeyedCircuitBreakerLayer).
///
/// Clones share the registry.
#[derive(Debug, Clone)]
pub struct KeyedCircuitBreakerService<S, K, X, C = HttpClassifier, H = RetryAfterHold> {
    inner: S,
    breakers: KeyedBreakers<K>,
    extractor: X,
    classifier: C,
    hold: H,
    max_wait: Duration,
}

impl<S, K, X, C, H> KeyedCircuitBreakerService<S, K, X, C, H> {
    pub(crate) fn new(
        inner: S,
        breakers: KeyedBreakers<K>,
        extractor: X,
        classifier: C,
        hold: H,
    ) -> Self {
        Self {
            inner,
            breakers,
            extractor,
            classifier,
            hold,
            max_wait: Duration::ZERO,
        }
    }

    pub(crate) fn waiting(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The registry of breakers.
    pub fn breakers(&self) -> &KeyedBreakers<K> {
        &self.breakers
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

impl<S, Req, K, X, C, H> Service<Req> for KeyedCircuitBreakerService<S, K, X, C, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: std::hash::Hash + Eq + Clone,
    X: KeyExtractor<Req, Key = K>,
    C: Classify<S::Response, S::Error> + Clone,
    H: HoldOpen<S::Response> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, H>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = self.extractor.extract(&req) else {
            // No key, no breaker to ask (see `apiguard_core::extract`).
            return ResponseFuture::unguarded(
                self.inner.call(req),
                self.classifier.clone(),
                self.hold.clone(),
            );
        };
        let max_wait = self.max_wait;
        let acquired = self.breakers.with(&key, |b| {
            b.try_acquire_owned()
                .map_err(|open| (open, (!max_wait.is_zero()).then(|| b.clone())))
        });
        match acquired {
            Ok(permit) => ResponseFuture::called(
                || self.inner.call(req),
                permit,
                self.classifier.clone(),
                self.hold.clone(),
            ),
            Err((open, None)) => {
                ResponseFuture::refused(open, self.classifier.clone(), self.hold.clone())
            }
            Err((open, Some(breaker))) => ResponseFuture::refused_after_wait(
                open,
                &breaker,
                max_wait,
                self.classifier.clone(),
                self.hold.clone(),
            ),
        }
    }
}
