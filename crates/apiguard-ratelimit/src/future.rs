//! Future types.
//!
//! # Cancellation
//!
//! A future that is waiting for its tokens holds a reservation on the
//! bucket's timeline. Dropped before it is done, it gives the reservation
//! back ([`Limiter::cancel`]) when that is safe: when no later caller has
//! reserved on the same bucket since. Otherwise the tokens stay spent, as if
//! used; handing them back under a later reservation would let a newcomer
//! and that later caller go together and exceed the burst. Limiters that
//! decide remotely (Redis) do not take reservations back.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use apiguard_core::{BoxError, RateLimited};
use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep};
use tower_service::Service;

use crate::bucket::TokenBucket;
use crate::error::MissingKey;
use crate::limiter::{Limiter, Reservation};

pin_project! {
    /// Future of [`TokenBucket::acquire`] and [`KeyedLimiter::acquire`]:
    /// completes when the tokens are there, or at once with the refusal
    /// when they never will be (more than the capacity).
    ///
    /// [`KeyedLimiter::acquire`]: crate::KeyedLimiter::acquire
    pub struct Acquire<L = TokenBucket, K = ()>
    where
        L: Limiter<K>,
    {
        #[pin]
        sleep: Option<Sleep>,
        held: Option<Hold<L, K>>,
        err: Option<RateLimited>,
    }

    impl<L, K> PinnedDrop for Acquire<L, K>
    where
        L: Limiter<K>,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(hold) = this.project().held.take() {
                hold.limiter.cancel(&hold.key, &hold.reservation);
            }
        }
    }
}

impl<L: Limiter<K>, K> Acquire<L, K> {
    pub(crate) fn waiting(limiter: L, key: K, reservation: Reservation) -> Self {
        let wait = reservation.grant().wait;
        Self {
            sleep: (!wait.is_zero()).then(|| sleep(wait)),
            held: Some(Hold {
                limiter,
                key,
                reservation,
            }),
            err: None,
        }
    }

    pub(crate) fn failed(err: RateLimited) -> Self {
        Self {
            sleep: None,
            held: None,
            err: Some(err),
        }
    }
}

impl<L: Limiter<K>, K> fmt::Debug for Acquire<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("reservation", &self.held.as_ref().map(|h| h.reservation))
            .field("err", &self.err)
            .finish_non_exhaustive()
    }
}

impl<L: Limiter<K>, K> Future for Acquire<L, K> {
    type Output = Result<(), RateLimited>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(err) = this.err.take() {
            return Poll::Ready(Err(err));
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
        }
        // The tokens are due: they are the caller's now, nothing to give back.
        this.held.take();
        Poll::Ready(Ok(()))
    }
}

/// A reservation the response future gives back if it is dropped before
/// calling the inner service.
pub(crate) struct Hold<L, K> {
    pub(crate) limiter: L,
    pub(crate) key: K,
    pub(crate) reservation: Reservation,
}

pin_project! {
    /// Response future of [`RateLimit`](crate::RateLimit) and
    /// [`KeyedRateLimit`](crate::KeyedRateLimit).
    ///
    /// Refusals come out as a [`RateLimited`] in the [`BoxError`]; a request
    /// without a key as [`MissingKey`].
    pub struct ResponseFuture<S, Req, L, K>
    where
        S: Service<Req>,
        L: Limiter<K>,
    {
        #[pin]
        kind: Kind<S::Future, Slow<S, Req, L, K>>,
    }
}

pin_project! {
    /// An admitted request's future alone, or everything else. Kept apart so
    /// that the admitted path polls and drops the inner future with one
    /// branch and no drop glue of its own: the state machine and its
    /// reservation live in [`Slow`], polled out of line.
    #[project = KindProj]
    enum Kind<F, W> {
        Called { #[pin] fut: F },
        Slow { #[pin] slow: W },
    }
}

pin_project! {
    /// A request that was refused, waits for its tokens, or waits for a
    /// remote decision.
    struct Slow<S, Req, L, K>
    where
        S: Service<Req>,
        L: Limiter<K>,
    {
        #[pin]
        state: State<S::Future, L::Future, S, Req>,
        hold: Option<Hold<L, K>>,
    }

    impl<S, Req, L, K> PinnedDrop for Slow<S, Req, L, K>
    where
        S: Service<Req>,
        L: Limiter<K>,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(hold) = this.project().hold.take() {
                hold.limiter.cancel(&hold.key, &hold.reservation);
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R, S, Req> {
        Refused { err: Option<RateLimited> },
        MissingKey { err: Option<MissingKey> },
        Reserving { #[pin] fut: R, svc: Option<(S, Req)> },
        Waiting { #[pin] sleep: Sleep, svc: Option<(S, Req)> },
        Ready { svc: Option<(S, Req)> },
        Called { #[pin] fut: F },
    }
}

impl<S, Req, L, K> ResponseFuture<S, Req, L, K>
where
    S: Service<Req>,
    L: Limiter<K>,
{
    /// An admitted request: `call` calls the inner service. The call is
    /// made inside the literal so that the inner future is written in
    /// place, not copied in from a temporary (see the breaker's
    /// `ResponseFuture::called`).
    #[inline]
    pub(crate) fn called(call: impl FnOnce() -> S::Future) -> Self {
        Self {
            kind: Kind::Called { fut: call() },
        }
    }

    fn slow(state: State<S::Future, L::Future, S, Req>, hold: Option<Hold<L, K>>) -> Self {
        Self {
            kind: Kind::Slow {
                slow: Slow { state, hold },
            },
        }
    }

    pub(crate) fn refused(err: RateLimited) -> Self {
        Self::slow(State::Refused { err: Some(err) }, None)
    }

    pub(crate) fn missing_key(err: MissingKey) -> Self {
        Self::slow(State::MissingKey { err: Some(err) }, None)
    }

    pub(crate) fn waiting(svc: S, req: Req, wait: Duration, hold: Hold<L, K>) -> Self {
        Self::slow(
            State::Waiting {
                sleep: sleep(wait),
                svc: Some((svc, req)),
            },
            Some(hold),
        )
    }

    pub(crate) fn reserving(svc: S, req: Req, fut: L::Future) -> Self {
        Self::slow(
            State::Reserving {
                fut,
                svc: Some((svc, req)),
            },
            None,
        )
    }
}

impl<S, Req, L, K> fmt::Debug for ResponseFuture<S, Req, L, K>
where
    S: Service<Req>,
    L: Limiter<K>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Slow { slow } => match &slow.state {
                State::Refused { .. } | State::MissingKey { .. } => "refused",
                State::Reserving { .. } => "reserving",
                State::Waiting { .. } => "waiting",
                State::Ready { .. } => "ready",
                State::Called { .. } => "called",
            },
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

const TAKEN: &str = "ResponseFuture polled after completion";

impl<S, Req, L, K> Future for ResponseFuture<S, Req, L, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    L: Limiter<K>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            KindProj::Slow { slow } => slow.poll(cx),
        }
    }
}

impl<S, Req, L, K> Future for Slow<S, Req, L, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    L: Limiter<K>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline(never)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Refused { err } => {
                    return Poll::Ready(Err(Box::new(err.take().expect(TAKEN))));
                }
                StateProj::MissingKey { err } => {
                    return Poll::Ready(Err(Box::new(err.take().expect(TAKEN))));
                }
                StateProj::Reserving { fut, svc } => {
                    let grant = match ready!(fut.poll(cx)) {
                        Ok(grant) => grant,
                        Err(err) => {
                            this.state.set(State::Refused { err: Some(err) });
                            continue;
                        }
                    };
                    let svc = svc.take();
                    if grant.wait.is_zero() {
                        this.state.set(State::Ready { svc });
                    } else {
                        this.state.set(State::Waiting {
                            sleep: sleep(grant.wait),
                            svc,
                        });
                    }
                }
                StateProj::Waiting { sleep, svc } => {
                    ready!(sleep.poll(cx));
                    let svc = svc.take();
                    this.state.set(State::Ready { svc });
                }
                StateProj::Ready { svc } => {
                    let (inner, _) = svc.as_mut().expect(TAKEN);
                    if let Err(err) = ready!(inner.poll_ready(cx)) {
                        // The request never went out: the drop gives the
                        // reservation back.
                        return Poll::Ready(Err(err.into()));
                    }
                    let (mut inner, req) = svc.take().expect(TAKEN);
                    let fut = inner.call(req);
                    // The tokens are spent on this call now.
                    this.hold.take();
                    this.state.set(State::Called { fut });
                }
            }
        }
    }
}
