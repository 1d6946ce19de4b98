//! The server side: per-client rate limits that answer `429`, and breakers
//! around calls to dependencies that answer `503`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::net::SocketAddr;
//! use apiguard::server::server_layer;
//! use apiguard::ratelimit::{KeyedLimiter, extract::PeerIp};
//! use axum::{Router, routing::get};
//!
//! // 20 requests at once per client IP, then 10 a second.
//! let limiter = KeyedLimiter::from_rate(20, 10.0)?.with_max_keys(100_000);
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(server_layer(limiter, PeerIp));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = axum::serve(
//!     listener,
//!     app.into_make_service_with_connect_info::<SocketAddr>(),
//! );
//! # drop(server);
//! # Ok(()) }
//! ```
//!
//! [`server_layer`] stacks a [`KeyedRateLimitLayer`] (refusing at once, as a
//! server should) under a [`RejectionResponseLayer`] whose other errors
//! become `500`, so the service is infallible and axum's `Router::layer`
//! takes it with no `HandleErrorLayer`. An over-limit client gets
//! `429 Too Many Requests` with `Retry-After` (whole seconds, rounded up),
//! `RateLimit-Policy` and `RateLimit`; other clients are not affected.
//!
//! `PeerIp` reads axum's `ConnectInfo`, which axum records only when served
//! with `into_make_service_with_connect_info::<SocketAddr>()`, and which
//! apiguard sees only with its `axum` feature (on by default). Without
//! either there is no address to key by: every request fails with a
//! [`MissingKey`](crate::MissingKey), answered `500` and logged at `error`
//! with what to fix, so the mistake shows at the first request instead of
//! the limit silently not applying. To choose another outcome for requests
//! without a key (`400`, or one shared bucket), build the pair yourself:
//! `RejectionResponseLayer::new()` over
//! `KeyedRateLimitLayer::new(..).missing_key_as_400()` (see
//! [`apiguard_ratelimit::extract`]).
//!
//! Behind a proxy, key by [`ForwardedFor`](apiguard_ratelimit::extract::ForwardedFor)
//! with the number of proxies you run, so a client cannot spoof its way to
//! a fresh bucket.
//!
//! # Protecting a dependency
//!
//! Wrap the handler's call to a dependency in a
//! [`CircuitBreaker`](apiguard_breaker::CircuitBreaker): when it is open,
//! return its `CircuitOpen` refusal — as the error the rejection layer
//! turns into a response, or as the handler's own response, since it
//! implements axum's `IntoResponse` — and the client gets `503` with
//! `Retry-After`: the dependency is spared, the client told when to come
//! back. `examples/axum_server.rs` shows the whole recipe.

use apiguard_core::RejectionResponseLayer;
use apiguard_core::rejection::InternalServerError;
use apiguard_ratelimit::{KeyedLimiter, KeyedRateLimitLayer};
use tower::layer::util::Stack;

/// The layer [`server_layer`] returns.
pub type ServerLayer<K, E> =
    Stack<KeyedRateLimitLayer<KeyedLimiter<K>, E>, RejectionResponseLayer<InternalServerError>>;

/// A per-client rate limit answering `429`, ready for axum's
/// `Router::layer` (see the [module docs](self)).
pub fn server_layer<K, E>(limiter: KeyedLimiter<K>, extractor: E) -> ServerLayer<K, E> {
    Stack::new(
        KeyedRateLimitLayer::new(limiter, extractor),
        RejectionResponseLayer::new(),
    )
}
