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
use crate::service::BoxErrors;

pin_project! {
    /// The wait before a retry: the [`Future`] of
    /// [`RetryPolicy`]'s `tower::retry::Policy` implementation.
    ///
    /// If it is dropped before it completes (the request was cancelled while
    /// waiting), the retry it stood for never happens and its withdrawal from
    /// the [`RetryBudget`](crate::RetryBudget) is given back.
    pub struct Wait {
        #[pin]
        sleep: Option<Sleep>,
        withdrawal: Withdrawal,
    }
}

impl Wait {
    pub(crate) fn new(wait: Duration, withdrawal: Withdrawal) -> Self {
        Self {
            // A zero wait needs no timer.
            sleep: (!wait.is_zero()).then(|| tokio::time::sleep(wait)),
            withdrawal,
        }
    }
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
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
    /// The response future of [`Retry`](crate::Retry): tower's retry future,
    /// driven by [`RetryPolicy`], with errors boxed.
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<B>, Response = Response<R>>,
        S::Error: Into<BoxError>,
        B: TryCloneBody,
    {
        #[pin]
        inner: tower::retry::future::ResponseFuture<RetryPolicy, BoxErrors<S>, Request<B>>,
    }
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    pub(crate) fn new(
        inner: tower::retry::future::ResponseFuture<RetryPolicy, BoxErrors<S>, Request<B>>,
    ) -> Self {
        Self { inner }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Output = Result<Response<R>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, B, R> fmt::Debug for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// Boxes the error of an inner future.
    #[derive(Debug)]
    pub(crate) struct BoxErrorsFuture<F> {
        #[pin]
        pub(crate) inner: F,
    }
}

impl<F, T, E> Future for BoxErrorsFuture<F>
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
