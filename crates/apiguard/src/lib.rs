//! Keep HTTP services and clients working when the other side fails:
//! token-bucket rate limiting, a circuit breaker, and retry with backoff,
//! jitter and `Retry-After`, as tower layers — composed.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), apiguard::BoxError> {
//! use std::time::Duration;
//! use apiguard::{CircuitBreaker, GuardLayer, Quota, RetryPolicy};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! let guard = GuardLayer::builder()
//!     .total_timeout(Duration::from_secs(10))
//!     .retry(RetryPolicy::builder().max_retries(3))
//!     .circuit_breaker(CircuitBreaker::builder().failure_threshold(5))
//!     .rate_limit(Quota::per_second(50).with_burst(100))
//!     .attempt_timeout(Duration::from_secs(2))
//!     .build()?;
//!
//! let svc = ServiceBuilder::new().layer(guard).service(service_fn(
//!     |_req: Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//!     },
//! ));
//! let res = svc.oneshot(Request::get("http://api.example/").body(Full::default())?).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(()) }
//! ```
//!
//! # Crates and features
//!
//! This crate re-exports the pattern crates, so it is the only apiguard
//! dependency you need: [`core`] (refusals, classification, headers, the
//! clock), [`ratelimit`], [`breaker`] and [`retry`], and `redis` with the
//! `redis` feature. The common types are at the root. Features:
//!
//! - `axum` (on by default): `PeerIp` reads axum's `ConnectInfo`, and the
//!   refusals implement axum's `IntoResponse`;
//! - `redis`: `apiguard::redis`, limits shared through Redis;
//! - `metrics`: counters and histograms through the `metrics` facade;
//! - `https`: `GuardedClient` speaks HTTPS (rustls);
//! - `test-util`: for your tests (a dev-dependency feature): every decision
//!   follows tokio's clock, so paused-time tests
//!   (`#[tokio::test(start_paused = true)]`) drive the buckets, breakers and
//!   backoffs without waiting.
//!
//! The names `TokenBucket`, `CircuitBreaker`'s three knobs and the
//! `AsyncRateLimitedClient` that [`GuardedClient`] stands for come from
//! APIGuard, the small Python library this project started from.
//!
//! # The stack
//!
//! [`GuardLayer`] composes them in the order a client needs (see [`stack`]
//! for the reasons), [`GuardedClient`] puts it on a `hyper_util` client, and
//! [`server`] holds the server-side recipe. [`grpc`] puts the stack in
//! front of a tonic `Channel` (`GuardLayerBuilder::grpc`), and the
//! server's refusals answer gRPC requests as gRPC does.
//!
//! # Observability
//!
//! Every decision emits a `tracing` event, under the target of the crate
//! that made it: `apiguard::ratelimit` (admitted at `TRACE` with the tokens
//! left, waiting at `TRACE` with the wait, refused at `DEBUG` with the
//! wait), `apiguard::breaker` (admitted at `TRACE`, refused at `DEBUG` with
//! the wait, every transition at `INFO` with the breaker's name, the states
//! and the reason) and `apiguard::retry` (each retry at `DEBUG` with the
//! attempt number, the reason and the wait). The `metrics` feature adds
//! counters, histograms and a gauge through the `metrics` facade: see
//! `metrics` (the module, behind the feature) for their names.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
pub mod grpc;
pub mod hosts;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod pace;
mod recovery;
pub mod server;
pub mod stack;

pub use apiguard_breaker as breaker;
pub use apiguard_core as core;
pub use apiguard_ratelimit as ratelimit;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use apiguard_redis as redis;
pub use apiguard_retry as retry;

pub use apiguard_breaker::{CircuitBreaker, CircuitBreakerLayer, KeyedCircuitBreakerLayer};
pub use apiguard_core::{
    BoxError, BudgetExhausted, CircuitOpen, InvalidConfig, MissingKey, Quota, RateLimited,
    RejectionResponseLayer, RetriesExhausted,
};
pub use apiguard_ratelimit::{KeyedLimiter, KeyedRateLimitLayer, RateLimitLayer, TokenBucket};
pub use apiguard_retry::{Jitter, RetryBudget, RetryLayer, RetryPolicy};
pub use client::{ClientError, ClientStats, ErrorKind, GuardedClient, StatusError};
pub use hosts::HostLimits;
pub use pace::HostPaces;
pub use stack::{GuardLayer, GuardLayerBuilder, HostState, NotAHost};
