//! [`Guard`], the service [`GuardLayer`](super::GuardLayer) makes:
//! `poll_ready` forwards, `call` admits the first attempt and builds the
//! request's [`GuardFuture`].

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use apiguard_breaker::CircuitBreaker;
use apiguard_core::{BoxError, CircuitOpen, Clock, Nanos};
use apiguard_retry::{RetryState, TryCloneBody};
use http::Request;
use tower_service::Service;

use super::admission::{Admission, Call, Hold, HostCache, Shared};
use super::box_err::BoxErr;
use super::future::{GuardFuture, Slow, Step, copy_for_retry};
use super::timer::Timer;
use crate::recovery::BreakerWait;

/// The service each attempt is sent to: the inner one, its error boxed.
type Attempt<S> = BoxErr<S>;

/// The service [`GuardLayer`](super::GuardLayer) makes: timeouts, retry, breaker and rate
/// limit in one service and one future.
///
/// Stacked as separate tower layers, each part would wrap the next one's
/// future in its own and clone the service below it into every request
/// (tower's `Retry` does): a kilobyte-sized future moved up through each
/// layer, and a dozen reference counts written per call. Here each request
/// carries one future whose waits live on the heap only when it waits, and
/// one timer serves both timeouts.
#[derive(Clone)]
pub struct Guard<S> {
    shared: Arc<Shared>,
    attempt: Attempt<S>,
    /// The breaker and bucket of the host this service called last: most
    /// clients call one host again and again, and this spares them the
    /// registry lookups. Its reference count is this service's (and its
    /// requests'), not shared by every caller of the host like the
    /// breaker's own: a request takes a count on this one instead.
    last_host: Option<Arc<HostCache>>,
}

impl<S> fmt::Debug for Guard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

impl<S> Guard<S> {
    /// Keeps handles on the breaker and bucket of `req`'s host, as if the
    /// service had just called it.
    pub(crate) fn prime<B>(&mut self, req: &Request<B>) {
        if self.shared.breakers.is_some()
            || self.shared.limiter.is_some()
            || self.shared.paces.is_some()
        {
            self.shared.host_of(&mut self.last_host, req);
        }
    }

    pub(super) fn new(shared: Arc<Shared>, inner: S) -> Self {
        Self {
            shared,
            attempt: BoxErr::new(inner),
            last_host: None,
        }
    }
}

impl<S, B, R> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = http::Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = GuardFuture<Attempt<S>, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.attempt.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = &*self.shared;
        let now = shared.one_clock.then(|| Clock::system().now());
        let retry = match (&shared.retry, now) {
            (Some(policy), Some(now)) => policy.start_at(now),
            (Some(policy), None) => policy.start(),
            (None, _) => RetryState::default(),
        };
        let mut permit = None;
        let admission =
            if shared.breakers.is_none() && shared.limiter.is_none() && shared.paces.is_none() {
                Admission::Go
            } else {
                let host = shared.host_of(&mut self.last_host, &req);
                shared.admit(host, now, &mut permit)
            };
        // The slow paths keep what the first attempt was admitted with.
        let first = |req: &Request<B>, permit| First {
            retry,
            // Only a request that may be retried needs the shared state
            // later.
            stored: copy_for_retry(shared, req),
            permit,
        };
        match admission {
            Admission::Go => self.go(req, retry, permit),
            Admission::Wait(wait, hold) => {
                let first = first(&req, permit);
                self.wait_for_token(req, first, wait, hold)
            }
            Admission::Open(open, breaker) => {
                let first = first(&req, permit);
                self.wait_for_breaker(req, first, open, &breaker)
            }
            Admission::Refused(err) => {
                let first = first(&req, permit);
                let timer = Timer::start(&self.shared, false);
                self.refuse(timer, first, err)
            }
        }
    }
}

/// A request's state as its first attempt is admitted.
struct First<B> {
    retry: RetryState,
    /// The copy kept for retries.
    stored: Option<Request<B>>,
    permit: Option<Call>,
}

impl<S> Guard<S> {
    /// The shared state, kept by a request that may be retried.
    #[inline]
    fn later<B>(&self, first: &First<B>) -> Option<Arc<Shared>> {
        first.stored.as_ref().map(|_| self.shared.clone())
    }

    /// This service was made ready for this call: a request that waits
    /// takes it along, and leaves a clone.
    fn take_ready(&mut self) -> Attempt<S>
    where
        S: Clone,
    {
        let clone = self.attempt.clone();
        std::mem::replace(&mut self.attempt, clone)
    }

    /// The success path, built in place: the first attempt's future is made
    /// inside the future's literal, and nothing request-sized passes
    /// through another struct on the way (each such move is a `memcpy`;
    /// `STACK_COUNT` in `benches/stack.rs` counts them).
    #[inline]
    fn go<B, R>(
        &mut self,
        req: Request<B>,
        retry: RetryState,
        permit: Option<Call>,
    ) -> GuardFuture<Attempt<S>, B>
    where
        S: Service<Request<B>, Response = http::Response<R>> + Clone,
        S::Error: Into<BoxError>,
        B: TryCloneBody,
    {
        let stored = copy_for_retry(&self.shared, &req);
        // Only a request that may be retried needs the shared state later,
        // and a clone of the service for the attempts after the first
        // (made ready then).
        let keep = stored.is_some();
        GuardFuture {
            timer: Timer::start(&self.shared, true),
            shared: keep.then(|| self.shared.clone()),
            svc: keep.then(|| self.attempt.clone()),
            stored,
            step: Step::Called {
                fut: self.attempt.call(req),
            },
            retry,
            permit,
            slow: None,
        }
    }

    /// The first attempt waits `wait` for its token.
    fn wait_for_token<B, R>(
        &mut self,
        req: Request<B>,
        first: First<B>,
        wait: std::time::Duration,
        hold: Hold,
    ) -> GuardFuture<Attempt<S>, B>
    where
        S: Service<Request<B>, Response = http::Response<R>> + Clone,
        S::Error: Into<BoxError>,
        B: TryCloneBody,
    {
        let svc = self.take_ready();
        let timer = Timer::start(&self.shared, false);
        GuardFuture {
            timer,
            step: Step::Token,
            shared: Some(self.shared.clone()),
            svc: Some(svc),
            retry: first.retry,
            stored: first.stored,
            permit: first.permit,
            slow: Some(Slow::token(req, hold, wait)),
        }
    }

    /// The host's breaker refused with `open`: the request waits for it,
    /// or is refused when that is not worth it.
    fn wait_for_breaker<B, R>(
        &mut self,
        req: Request<B>,
        first: First<B>,
        open: CircuitOpen,
        breaker: &CircuitBreaker,
    ) -> GuardFuture<Attempt<S>, B>
    where
        S: Service<Request<B>, Response = http::Response<R>> + Clone,
        S::Error: Into<BoxError>,
        B: TryCloneBody,
    {
        let timer = Timer::start(&self.shared, false);
        let mut queued_at: Option<Nanos> = None;
        let Some(wait) = BreakerWait::start(
            breaker,
            open,
            &mut queued_at,
            self.shared.max_wait,
            timer.total_end,
        ) else {
            return self.refuse(timer, first, Box::new(open));
        };
        let svc = self.take_ready();
        GuardFuture {
            timer,
            step: Step::Recovering,
            shared: Some(self.shared.clone()),
            svc: Some(svc),
            retry: first.retry,
            stored: first.stored,
            permit: first.permit,
            slow: Some(Slow::breaker(req, wait, queued_at)),
        }
    }

    /// The first attempt was refused with `err`.
    fn refuse<B, R>(
        &self,
        timer: Timer,
        first: First<B>,
        err: BoxError,
    ) -> GuardFuture<Attempt<S>, B>
    where
        S: Service<Request<B>, Response = http::Response<R>> + Clone,
        S::Error: Into<BoxError>,
        B: TryCloneBody,
    {
        let later = self.later(&first);
        let svc = first.stored.as_ref().map(|_| self.attempt.clone());
        GuardFuture::refused(
            timer,
            later,
            svc,
            first.retry,
            first.stored,
            first.permit,
            err,
        )
    }
}
