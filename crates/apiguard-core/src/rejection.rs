//! Turning refusals into HTTP responses on servers.
//!
//! ```
//! use std::convert::Infallible;
//! use apiguard_core::RejectionResponseLayer;
//! use tower::{ServiceBuilder, service_fn};
//!
//! let handler = service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, Infallible>(http::Response::new(String::new()))
//! });
//! let svc = ServiceBuilder::new()
//!     // 429 for `RateLimited`, 503 for `CircuitOpen`, both with `Retry-After`;
//!     // other errors become a 500, so axum's `Router::layer` takes the stack.
//!     .layer(RejectionResponseLayer::new())
//!     .service(handler);
//! # let _ = svc;
//! ```
//!
//! A `RateLimited` refusal becomes `429 Too Many Requests` with
//! `Retry-After` (whole seconds, rounded up) and, when the refusal names its
//! quota, the `RateLimit-Policy` and `RateLimit` fields of
//! draft-ietf-httpapi-ratelimit-headers. A `CircuitOpen` refusal becomes
//! `503 Service Unavailable`, with `Retry-After` when the breaker knows when
//! it will probe again. A [`MissingKey`] the keyed layer was told to treat
//! as the client's fault becomes `400 Bad Request`.
//!
//! What happens to other errors is the layer's type parameter: by default
//! ([`InternalServerError`]) they become an empty `500 Internal Server
//! Error`, logged with `tracing` at `error`, and the service's error type is
//! `Infallible`, as axum's `Router::layer` and hyper's servers want; with
//! [`other_errors_pass_through`](RejectionResponseLayer::other_errors_pass_through)
//! ([`PassThrough`]) they stay errors, for an error handler further out.
//!
//! With the `axum` feature, the refusals also implement axum's
//! `IntoResponse` (the same responses), so a handler can return them.
//!
//! # gRPC
//!
//! A gRPC request (content type `application/grpc…`, see
//! [`is_grpc`](crate::grpc::is_grpc)) is answered as gRPC answers: a
//! trailers-only response, HTTP `200` with `content-type: application/grpc`
//! and the status in the headers — `grpc-status: 8` (`RESOURCE_EXHAUSTED`)
//! for `RateLimited`, `14` (`UNAVAILABLE`) for `CircuitOpen`, `3`
//! (`INVALID_ARGUMENT`) for a [`MissingKey`] that is the client's fault,
//! and `13` (`INTERNAL`) for other errors under the default
//! [`InternalServerError`] — with a `grpc-message` and, when the wait is
//! known, `grpc-retry-pushback-ms` (milliseconds, rounded up), which gRPC
//! clients honour as their `Retry-After`. tonic surfaces these as
//! `Status::resource_exhausted` and `Status::unavailable`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Response, StatusCode, header::RETRY_AFTER};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{BoxError, CircuitOpen, MissingKey, RateLimited};
use crate::grpc::{APPLICATION_GRPC, Code, GRPC_MESSAGE, GRPC_RETRY_PUSHBACK_MS, GRPC_STATUS};
use crate::headers::{
    RATELIMIT, RATELIMIT_POLICY, format_ratelimit, format_ratelimit_policy, format_retry_after,
};

/// The name written in the `RateLimit` fields.
const POLICY_NAME: &str = "default";

/// What becomes of errors that are not apiguard refusals.
pub trait OtherErrors: Clone {
    /// The service's error type.
    type Error;
    /// Handles one error that is not a refusal.
    fn handle<B: Default>(&self, err: BoxError) -> Result<Response<B>, Self::Error>;

    /// Handles one error that is not a refusal, of a gRPC request (by
    /// default as [`handle`](Self::handle) does).
    fn handle_grpc<B: Default>(&self, err: BoxError) -> Result<Response<B>, Self::Error> {
        self.handle(err)
    }
}

/// Errors that are not refusals stay errors ([`BoxError`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

impl OtherErrors for PassThrough {
    type Error = BoxError;
    fn handle<B: Default>(&self, err: BoxError) -> Result<Response<B>, BoxError> {
        Err(err)
    }
}

/// Errors that are not refusals become an empty `500`, logged at `error`.
#[derive(Debug, Clone, Copy, Default)]
pub struct InternalServerError;

impl OtherErrors for InternalServerError {
    type Error = Infallible;
    fn handle<B: Default>(&self, err: BoxError) -> Result<Response<B>, Infallible> {
        tracing::error!(target: "apiguard", error = %err, "unhandled error turned into 500");
        let mut res = Response::new(B::default());
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        Ok(res)
    }

    fn handle_grpc<B: Default>(&self, err: BoxError) -> Result<Response<B>, Infallible> {
        tracing::error!(target: "apiguard", error = %err, "unhandled error turned into grpc-status INTERNAL");
        Ok(grpc_status_response(Code::Internal, "internal error", None))
    }
}

/// Layer that turns apiguard refusals into `429`/`503` responses, and other
/// errors into `500` (see the [module docs](self)).
///
/// Its service is infallible, so axum's `Router::layer` takes it as it is:
///
/// ```
/// use apiguard_core::RejectionResponseLayer;
/// # fn app(router: axum::Router) -> axum::Router {
/// router.layer(RejectionResponseLayer::new())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RejectionResponseLayer<M = InternalServerError> {
    other: M,
}

impl RejectionResponseLayer {
    /// Refusals become `429`/`503`; other errors become an empty `500`.
    pub const fn new() -> Self {
        Self {
            other: InternalServerError,
        }
    }
}

impl<M> RejectionResponseLayer<M> {
    /// Other errors become an empty `500`; the service is infallible (the
    /// default).
    pub fn other_errors_as_500(self) -> RejectionResponseLayer<InternalServerError> {
        RejectionResponseLayer {
            other: InternalServerError,
        }
    }

    /// Other errors stay errors ([`BoxError`]), for an error handler further
    /// out (axum's `HandleErrorLayer`, say).
    pub fn other_errors_pass_through(self) -> RejectionResponseLayer<PassThrough> {
        RejectionResponseLayer { other: PassThrough }
    }
}

impl<S, M: Clone> Layer<S> for RejectionResponseLayer<M> {
    type Service = RejectionResponse<S, M>;
    fn layer(&self, inner: S) -> Self::Service {
        RejectionResponse {
            inner,
            other: self.other.clone(),
            broken: None,
        }
    }
}

/// Service made by [`RejectionResponseLayer`].
pub struct RejectionResponse<S, M = InternalServerError> {
    inner: S,
    other: M,
    // An error the inner service reported from `poll_ready`, answered on the
    // next call (the caller was told the service is ready).
    broken: Option<BoxError>,
}

impl<S: fmt::Debug, M: fmt::Debug> fmt::Debug for RejectionResponse<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectionResponse")
            .field("inner", &self.inner)
            .field("other", &self.other)
            .finish()
    }
}

impl<S: Clone, M: Clone> Clone for RejectionResponse<S, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            other: self.other.clone(),
            broken: None,
        }
    }
}

impl<S, M> RejectionResponse<S, M> {
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

impl<S, ReqB, B, M> Service<http::Request<ReqB>> for RejectionResponse<S, M>
where
    S: Service<http::Request<ReqB>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Default,
    M: OtherErrors,
{
    type Response = Response<B>;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.broken.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                self.broken = Some(e.into());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let grpc = crate::grpc::is_grpc(req.headers());
        // Each arm builds the whole future, so that the inner future is
        // written in place rather than copied in from a temporary.
        match self.broken.take() {
            Some(err) => ResponseFuture {
                state: State::Failed { err: Some(err) },
                other: self.other.clone(),
                grpc,
            },
            None => ResponseFuture {
                state: State::Called {
                    fut: self.inner.call(req),
                },
                other: self.other.clone(),
                grpc,
            },
        }
    }
}

pin_project! {
    /// Response future of [`RejectionResponse`].
    pub struct ResponseFuture<F, M> {
        #[pin]
        state: State<F>,
        other: M,
        // The request was gRPC: answer as gRPC does.
        grpc: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F },
        Failed { err: Option<BoxError> },
    }
}

impl<F: fmt::Debug, M: fmt::Debug> fmt::Debug for ResponseFuture<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E, M> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Default,
    M: OtherErrors,
{
    type Output = Result<Response<B>, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let err = match this.state.project() {
            StateProj::Called { fut } => match std::task::ready!(fut.poll(cx)) {
                Ok(res) => return Poll::Ready(Ok(res)),
                Err(e) => e.into(),
            },
            StateProj::Failed { err } => match err.take() {
                Some(e) => e,
                None => panic!("ResponseFuture polled after completion"),
            },
        };
        if *this.grpc {
            return Poll::Ready(match grpc_refusal_response(&*err) {
                Some(res) => Ok(res),
                None => this.other.handle_grpc(err),
            });
        }
        Poll::Ready(match refusal_response(&*err) {
            Some(res) => Ok(res),
            None => this.other.handle(err),
        })
    }
}

/// The response for a refusal, or `None` when `err` is not one.
///
/// Useful on its own in a custom error handler (axum's `HandleErrorLayer`).
pub fn refusal_response<B: Default>(
    err: &(dyn std::error::Error + 'static),
) -> Option<Response<B>> {
    if let Some(limited) = err.downcast_ref::<RateLimited>() {
        return Some(rate_limited_response(limited));
    }
    if let Some(open) = err.downcast_ref::<CircuitOpen>() {
        return Some(circuit_open_response(open));
    }
    match err.downcast_ref::<MissingKey>() {
        Some(missing) if missing.is_bad_request() => Some(bad_request_response()),
        _ => None,
    }
}

/// The trailers-only gRPC response for a refusal of a gRPC request, or
/// `None` when `err` is not one (see the [module docs](self#grpc)).
pub fn grpc_refusal_response<B: Default>(
    err: &(dyn std::error::Error + 'static),
) -> Option<Response<B>> {
    if let Some(limited) = err.downcast_ref::<RateLimited>() {
        return Some(grpc_status_response(
            Code::ResourceExhausted,
            "rate limited",
            limited.retry_after(),
        ));
    }
    if let Some(open) = err.downcast_ref::<CircuitOpen>() {
        return Some(grpc_status_response(
            Code::Unavailable,
            "circuit open",
            open.retry_after(),
        ));
    }
    match err.downcast_ref::<MissingKey>() {
        Some(missing) if missing.is_bad_request() => Some(grpc_status_response(
            Code::InvalidArgument,
            "missing rate limit key",
            None,
        )),
        _ => None,
    }
}

/// A trailers-only gRPC response: HTTP `200`, `content-type:
/// application/grpc`, `grpc-status: code`, `grpc-message: message` (which
/// must be plain ASCII without `%`, so it needs no percent-encoding) and,
/// with a `pushback`, `grpc-retry-pushback-ms`.
pub fn grpc_status_response<B: Default>(
    code: Code,
    message: &'static str,
    pushback: Option<std::time::Duration>,
) -> Response<B> {
    let mut res = Response::new(B::default());
    let headers = res.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, APPLICATION_GRPC);
    headers.insert(GRPC_STATUS, code.to_header_value());
    headers.insert(GRPC_MESSAGE, http::HeaderValue::from_static(message));
    if let Some(wait) = pushback {
        headers.insert(GRPC_RETRY_PUSHBACK_MS, crate::grpc::Pushback::format(wait));
    }
    res
}

/// `400 Bad Request`, for a request without the key the server asks for.
fn bad_request_response<B: Default>() -> Response<B> {
    let mut res = Response::new(B::default());
    *res.status_mut() = StatusCode::BAD_REQUEST;
    res
}

/// `429 Too Many Requests` with `Retry-After` and, when the quota is known,
/// `RateLimit-Policy` and `RateLimit`.
pub fn rate_limited_response<B: Default>(limited: &RateLimited) -> Response<B> {
    let mut res = Response::new(B::default());
    *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let wait = limited.retry_after().unwrap_or_default();
    let headers = res.headers_mut();
    headers.insert(RETRY_AFTER, format_retry_after(wait));
    if let Some(quota) = limited.policy() {
        headers.insert(
            RATELIMIT_POLICY,
            format_ratelimit_policy(POLICY_NAME, quota.limit, quota.window),
        );
        headers.insert(RATELIMIT, format_ratelimit(POLICY_NAME, 0, wait));
    }
    res
}

/// `503 Service Unavailable`, with `Retry-After` when the breaker knows when
/// it will probe again.
pub fn circuit_open_response<B: Default>(open: &CircuitOpen) -> Response<B> {
    let mut res = Response::new(B::default());
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    if let Some(wait) = open.retry_after() {
        res.headers_mut()
            .insert(RETRY_AFTER, format_retry_after(wait));
    }
    res
}

#[cfg(feature = "axum")]
mod axum_impls {
    use axum_core::body::Body;
    use axum_core::response::{IntoResponse, Response};

    use super::{circuit_open_response, rate_limited_response};
    use crate::error::{CircuitOpen, MissingKey, RateLimited};

    /// `429 Too Many Requests` with `Retry-After` and the `RateLimit` fields,
    /// as [`RejectionResponseLayer`](super::RejectionResponseLayer) answers.
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    impl IntoResponse for RateLimited {
        fn into_response(self) -> Response {
            rate_limited_response::<Body>(&self)
        }
    }

    /// `503 Service Unavailable`, with `Retry-After` when the breaker knows
    /// when it will probe again.
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    impl IntoResponse for CircuitOpen {
        fn into_response(self) -> Response {
            circuit_open_response::<Body>(&self)
        }
    }

    /// `400 Bad Request` when the key was the client's to send, else `500`
    /// (logged at `error` with the hint, as the layer does).
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    impl IntoResponse for MissingKey {
        fn into_response(self) -> Response {
            if self.is_bad_request() {
                return super::bad_request_response::<Body>();
            }
            tracing::error!(target: "apiguard", error = %self, "unhandled error turned into 500");
            let mut res = Response::new(Body::empty());
            *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::QuotaPolicy;
    use std::time::Duration;
    use tower::{ServiceExt, service_fn};

    async fn answer(err: Option<BoxError>) -> Result<Response<String>, BoxError> {
        answer_to(http::Request::new(()), err).await
    }

    fn grpc_request() -> http::Request<()> {
        http::Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    }

    async fn answer_to(
        req: http::Request<()>,
        err: Option<BoxError>,
    ) -> Result<Response<String>, BoxError> {
        let svc = service_fn(move |_req: http::Request<()>| {
            let err = err.clone_box();
            async move {
                match err {
                    Some(e) => Err(e),
                    None => Ok(Response::new("ok".to_string())),
                }
            }
        });
        RejectionResponseLayer::new()
            .other_errors_pass_through()
            .layer(svc)
            .oneshot(req)
            .await
    }

    trait CloneBox {
        fn clone_box(&self) -> Option<BoxError>;
    }
    impl CloneBox for Option<BoxError> {
        fn clone_box(&self) -> Option<BoxError> {
            let e = self.as_ref()?;
            if let Some(r) = e.downcast_ref::<RateLimited>() {
                return Some(Box::new(*r));
            }
            if let Some(c) = e.downcast_ref::<CircuitOpen>() {
                return Some(Box::new(*c));
            }
            if let Some(m) = e.downcast_ref::<MissingKey>() {
                return Some(Box::new(*m));
            }
            Some(e.to_string().into())
        }
    }

    #[tokio::test]
    async fn rate_limited_becomes_429_with_headers() {
        let quota = QuotaPolicy {
            limit: 10,
            window: Duration::from_secs(5),
        };
        let err: BoxError =
            Box::new(RateLimited::new(Duration::from_millis(300)).with_policy(quota));
        let res = answer(Some(err)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        assert_eq!(res.headers()[RATELIMIT_POLICY], "\"default\";q=10;w=5");
        assert_eq!(res.headers()[RATELIMIT], "\"default\";r=0;t=1");
    }

    #[tokio::test]
    async fn circuit_open_becomes_503() {
        let err: BoxError = Box::new(CircuitOpen::new(Some(Duration::from_secs(4))));
        let res = answer(Some(err)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[RETRY_AFTER], "4");
        let err: BoxError = Box::new(CircuitOpen::new(None));
        let res = answer(Some(err)).await.unwrap();
        assert!(res.headers().get(RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn other_errors_pass_through_or_become_500() {
        let err = answer(Some("boom".into())).await.unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(answer(None).await.unwrap().body(), "ok");

        let svc = service_fn(|_req: http::Request<()>| async {
            Err::<Response<String>, BoxError>("boom".into())
        });
        // The default: a 500, and the service cannot fail.
        let res: Result<Response<String>, Infallible> = RejectionResponseLayer::new()
            .layer(svc)
            .oneshot(http::Request::new(()))
            .await;
        assert_eq!(res.unwrap().status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn missing_key_is_400_only_when_it_is_the_clients_fault() {
        let err: BoxError = Box::new(MissingKey::new().bad_request());
        let res = answer(Some(err)).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let svc = service_fn(|_req: http::Request<()>| async {
            Err::<Response<String>, BoxError>(Box::new(MissingKey::new()))
        });
        let res = RejectionResponseLayer::new()
            .layer(svc)
            .oneshot(http::Request::new(()))
            .await;
        assert_eq!(res.unwrap().status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn a_grpc_request_gets_resource_exhausted_with_pushback() {
        let err: BoxError = Box::new(RateLimited::new(Duration::from_micros(1500)));
        let res = answer_to(grpc_request(), Some(err)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers();
        assert_eq!(h[http::header::CONTENT_TYPE], "application/grpc");
        assert_eq!(h[GRPC_STATUS], "8");
        assert_eq!(h[GRPC_RETRY_PUSHBACK_MS], "2");
        assert_eq!(h[GRPC_MESSAGE], "rate limited");
        assert!(h.get(RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn a_grpc_request_gets_unavailable_for_an_open_circuit() {
        let err: BoxError = Box::new(CircuitOpen::new(Some(Duration::from_secs(4))));
        let res = answer_to(grpc_request(), Some(err)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[GRPC_STATUS], "14");
        assert_eq!(res.headers()[GRPC_RETRY_PUSHBACK_MS], "4000");
        let err: BoxError = Box::new(CircuitOpen::new(None));
        let res = answer_to(grpc_request(), Some(err)).await.unwrap();
        assert!(res.headers().get(GRPC_RETRY_PUSHBACK_MS).is_none());
    }

    #[tokio::test]
    async fn a_grpc_request_gets_internal_for_other_errors_and_http_still_gets_500() {
        let svc = service_fn(|_req: http::Request<()>| async {
            Err::<Response<String>, BoxError>("boom".into())
        });
        let layer = RejectionResponseLayer::new();
        let res = layer.layer(svc).oneshot(grpc_request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[GRPC_STATUS], "13");
        let res = layer
            .layer(svc)
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
