//! [`BoxErr`]: the inner service with its error boxed, so every part of the
//! stack speaks [`BoxError`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use apiguard_core::BoxError;
use pin_project_lite::pin_project;
use tower_service::Service;

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

impl<S> BoxErr<S> {
    pub(super) const fn new(inner: S) -> Self {
        Self { inner }
    }
}
