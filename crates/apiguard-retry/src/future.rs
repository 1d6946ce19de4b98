//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use apiguard_core::BoxError;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::body::TryCloneBody;
use crate::budget::Withdrawal;
use crate::policy::RetryPolicy;

/// The wait before a retry: the [`Future`] of [`RetryPolicy`]'s
/// `tower::retry::Policy` implementation.
///
/// If it is dropped before it completes (the request was cancelled while
/// waiting), the retry it stood for never happens and its withdrawal from
/// the [`RetryBudget`](crate::RetryBudget) is given back.
///
/// A wait that is not zero allocates its timer, so that the futures of
/// requests that never wait stay small.
pub struct Wait {
    sleep: Option<Pin<Box<Sleep>>>,
    withdrawal: Withdrawal,
}

impl Wait {
    pub(crate) fn new(wait: Duration, withdrawal: Withdrawal) -> Self {
        Self {
            // A zero wait needs no timer.
            sleep: (!wait.is_zero()).then(|| Box::pin(tokio::time::sleep(wait))),
            withdrawal,
        }
    }
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(sleep) = &mut this.sleep {
            ready!(sleep.as_mut().poll(cx));
        }
        this.withdrawal.commit();
        Poll::Ready(())
    }
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("deadline", &self.sleep.as_ref().map(|s| s.deadline()))
            .finish()
    }
}

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<B>, Response = Response<R>>,
        S::Error: Into<BoxError>,
        B: TryCloneBody,
    {
        #[pin]
        state: State<S::Future>,
        // The copy for the next attempt (`None`: there will be none).
        request: Option<Request<B>>,
        // For the retries: polled ready before each.
        service: S,
        policy: RetryPolicy,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An attempt is in flight.
        Called { #[pin] future: F },
        // Backing off before the next attempt.
        Waiting { wait: Wait },
        // Waiting for the service to be ready for the next attempt.
        Retrying,
    }
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    /// Sends `req` to `service` (which is ready) and keeps what a retry
    /// needs: a copy of the request, a clone of the service, the policy
    /// started for this request.
    // Out of line: in line, the future was built in temporaries and copied
    // into place (two more request-sized copies per request in the bench's
    // build); its own function writes it where the caller wants it.
    #[inline(never)]
    pub(crate) fn start(service: &mut S, policy: &RetryPolicy, req: Request<B>) -> Self {
        let policy = policy.for_request();
        let copy = policy.copy_request(&req);
        Self {
            state: State::Called {
                future: service.call(req),
            },
            request: copy,
            service: service.clone(),
            policy,
        }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let mut result = ready!(future.poll(cx)).map_err(Into::into);
                    let Some(req) = this.request.as_ref() else {
                        return Poll::Ready(result);
                    };
                    match this.policy.after(req, &mut result) {
                        None => return Poll::Ready(result),
                        Some(wait) => this.state.set(State::Waiting { wait }),
                    }
                }
                StateProj::Waiting { wait } => {
                    ready!(Pin::new(wait).poll(cx));
                    this.state.set(State::Retrying);
                }
                StateProj::Retrying => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(e.into()));
                    }
                    let Some(req) = this.request.take() else {
                        unreachable!("a retry is only scheduled with a copy of the request")
                    };
                    *this.request = this.policy.copy_request(&req);
                    let future = this.service.call(req);
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

impl<S, B, R> fmt::Debug for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Retrying => "retrying",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}
