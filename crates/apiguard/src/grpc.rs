//! gRPC: [`GuardLayer`](crate::GuardLayer) in front of a tonic `Channel`
//! (or any gRPC client that is a tower service), and the trailers layer
//! that lets its breaker see a status sent after the body.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), apiguard::BoxError> {
//! use std::time::Duration;
//! use apiguard::grpc::{Code, GrpcTrailersLayer};
//! use apiguard::{CircuitBreaker, GuardLayer};
//! use apiguard::retry::RetryPolicyBuilder;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! let guard = GuardLayer::builder()
//!     .grpc(true)
//!     .retry(RetryPolicyBuilder::grpc().max_retries(0))
//!     .circuit_breaker(CircuitBreaker::builder().failure_threshold(2))
//!     .max_wait(Duration::ZERO) // refuse at once while the breaker is open
//!     .build()?;
//! // A server that is down: trailers-only `UNAVAILABLE` answers.
//! let channel = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let res = Response::builder()
//!         .header("content-type", "application/grpc")
//!         .header("grpc-status", "14")
//!         .body(Full::new(Bytes::new()))?;
//!     Ok::<_, http::Error>(res)
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(GrpcTrailersLayer::new())
//!     .layer(guard.clone())
//!     .service(channel);
//! let call = || {
//!     Request::post("http://svc.local/grpc.health.v1.Health/Check")
//!         .header("content-type", "application/grpc")
//!         .body(Full::new(Bytes::new()))
//! };
//! for _ in 0..2 {
//!     let res = svc.clone().oneshot(call()?).await?;
//!     assert_eq!(Code::from_headers(res.headers()), Some(Code::Unavailable));
//! }
//! // Two failures opened the breaker: the third call is refused here.
//! let refused = svc.oneshot(call()?).await.unwrap_err();
//! assert!(refused.is::<apiguard::CircuitOpen>());
//! # Ok(()) }
//! ```
//!
//! # With tonic
//!
//! A tonic client takes any tower service of `http::Request<tonic::body::Body>`.
//! Retrying needs a request body that can be sent again, so the stack
//! records the body as it is sent ([`ReplayBody`](apiguard_retry::ReplayBody))
//! and hands the `Channel` a tonic body again below the guard:
//!
//! ```text
//! let svc = ServiceBuilder::new()
//!     .layer(GrpcTrailersLayer::new())
//!     .map_request(|r: http::Request<tonic::body::Body>| r.map(|b| ReplayBody::new(b, 64 * 1024)))
//!     .layer(guard)                                   // GuardLayer::builder().grpc(true)…
//!     .map_request(|r: http::Request<ReplayBody<tonic::body::Body>>| r.map(tonic::body::Body::new))
//!     .service(channel);
//! let mut client = HealthClient::new(svc);
//! ```
//!
//! `examples/grpc.rs` runs it against a real tonic server, and
//! `tests/grpc.rs` checks each rule over loopback.
//!
//! # Status in the trailers
//!
//! A gRPC call that fails before any message answers *trailers-only*: the
//! status is in the response headers, and the stack classifies it at once
//! (and may retry it). A call that succeeds, or fails after a message,
//! sends its status in the trailers, after the body — when the response
//! has long left the stack. In gRPC mode the stack then leaves the call's
//! breaker ticket in the response, and [`GrpcTrailersLayer`], put outside
//! it, wraps the body in a [`GrpcBody`] that records the status with the
//! breaker when the trailers arrive (a body that ends without a status, or
//! with an error, is a failure; one dropped early is cancelled and counts
//! for nothing). Responses whose status was classified already pass
//! through with nothing added: the layer allocates nothing for them.
//! Without a breaker nothing is deferred.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use apiguard_core::Outcome;
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use apiguard_core::grpc::{
    APPLICATION_GRPC, Code, GRPC_MESSAGE, GRPC_RETRY_PUSHBACK_MS, GRPC_STATUS, GrpcClassifier,
    Pushback, is_grpc,
};
pub use apiguard_core::rejection::{grpc_refusal_response, grpc_status_response};

use crate::stack::Deferred;

/// Layer that lets a gRPC-mode [`GuardLayer`](crate::GuardLayer) inside
/// it record statuses sent in the trailers (see the [module docs](self)).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTrailersLayer {
    _priv: (),
}

impl GrpcTrailersLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for GrpcTrailersLayer {
    type Service = GrpcTrailers<S>;

    fn layer(&self, inner: S) -> GrpcTrailers<S> {
        GrpcTrailers { inner }
    }
}

/// Service made by [`GrpcTrailersLayer`].
#[derive(Debug, Clone)]
pub struct GrpcTrailers<S> {
    inner: S,
}

impl<S> GrpcTrailers<S> {
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

impl<S, Req, B> Service<Req> for GrpcTrailers<S>
where
    S: Service<Req, Response = Response<B>>,
{
    type Response = Response<GrpcBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`GrpcTrailers`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<GrpcBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.project().inner.poll(cx))?;
        let deferred = res.extensions_mut().remove::<Deferred>();
        Poll::Ready(Ok(res.map(|inner| GrpcBody { inner, deferred })))
    }
}

pin_project! {
    /// A response body that records the call's gRPC status, from its
    /// trailers, with the breaker when it ends (see the
    /// [module docs](self#status-in-the-trailers)).
    pub struct GrpcBody<B> {
        #[pin]
        inner: B,
        deferred: Option<Deferred>,
    }
}

impl<B> GrpcBody<B> {
    /// The body it wraps.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Takes the body it wraps; its status is then recorded by no one (the
    /// call counts as cancelled).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: fmt::Debug> fmt::Debug for GrpcBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcBody")
            .field("inner", &self.inner)
            .field("deferred", &self.deferred.is_some())
            .finish()
    }
}

impl<B: Body> Body for GrpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if this.deferred.is_some() {
            let outcome = match &frame {
                Some(Ok(f)) => f
                    .trailers_ref()
                    .map(|t| GrpcClassifier::new().classify_trailers(t)),
                // The stream broke, or ended with no status: a broken call.
                Some(Err(_)) => Some(Outcome::Failure),
                None => Some(GrpcClassifier::new().classify_trailers(&HeaderMap::new())),
            };
            if let Some(outcome) = outcome
                && let Some(deferred) = this.deferred.take()
            {
                deferred.finish(outcome);
            }
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
