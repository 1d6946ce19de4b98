//! Rate limiting for tower services: a lock-free token bucket, a registry
//! of per-key buckets whose memory bounds itself, and the layers that put
//! them in front of a service.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use apiguard_ratelimit::{Quota, RateLimitLayer, TokenBucket};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), apiguard_core::BoxError> {
//! // 10 requests at once, then 5 a second.
//! let bucket = TokenBucket::new(Quota::per_second(5).with_burst(10))?;
//! let svc = ServiceBuilder::new()
//!     // A client waits for its token (here: at most 2 s, then it is refused).
//!     .layer(RateLimitLayer::new(bucket.clone()).max_wait(Duration::from_secs(2)))
//!     .service(service_fn(|name: &'static str| async move {
//!         Ok::<_, Infallible>(format!("hello {name}"))
//!     }));
//!
//! assert_eq!(svc.oneshot("world").await?, "hello world");
//! assert_eq!(bucket.available().floor(), 9.0);
//! # Ok(())
//! # }
//! ```
//!
//! # The pieces
//!
//! - [`Quota`]: how much a limit lets through (`Quota::per_minute(100)
//!   .with_burst(10)`, or APIGuard's `Quota::from_rate(capacity,
//!   refill_per_sec)`); every limiter takes one, the Redis one too.
//! - [`TokenBucket`]: a quota's burst of tokens refilled at its rate, on one
//!   atomic word (GCRA, integer nanoseconds, exact fractions: no drift).
//!   [`try_acquire`](TokenBucket::try_acquire) never waits;
//!   [`acquire`](TokenBucket::acquire) waits its turn.
//! - [`KeyedLimiter`]: one bucket per key (user, IP, API key), per-key quota
//!   overrides, and memory bounded by `max_keys` without a background task.
//! - [`RateLimitLayer`]: one limit for all requests; waits for tokens by
//!   default (a client), refuses at once with `max_wait(Duration::ZERO)`.
//! - [`KeyedRateLimitLayer`]: a limit per key taken from the request
//!   ([`extract`]); refuses at once by default (a server). Put
//!   [`RejectionResponseLayer`](apiguard_core::RejectionResponseLayer) above
//!   it to answer `429` with `Retry-After` and the `RateLimit` fields.
//! - [`Pacer`]: a bucket whose pace adapts to what a server says (`429`,
//!   `Retry-After`, the `RateLimit` and `X-RateLimit-*` fields); the
//!   `apiguard` facade keeps one per host that pushed back ([`pace`]).
//! - [`Limiter`]: what the layers ask of a limiter; the Redis backend of
//!   `apiguard-redis` implements it too.
//!
//! # Decisions, waits and refusals
//!
//! The decision is made in `call`; `poll_ready` only forwards to the inner
//! service. A request that must wait has its tokens reserved on the bucket's
//! timeline at once, so waiters go in the order they came and together never
//! exceed the rate; its future sleeps, then drives the inner service's
//! readiness and calls it (waits use tokio's timer, so a request that has
//! to wait must be polled inside a tokio runtime). A refusal is a
//! [`RateLimited`](error::RateLimited) in the `BoxError`, with the wait
//! until the tokens would be there and the quota that refused.
//!
//! # Clone
//!
//! Limits are shared, never multiplied: a [`TokenBucket`] or
//! [`KeyedLimiter`] clone is a handle to the same state, and so every
//! service a layer makes, and every clone of it (axum clones per request),
//! draws from one limit.
//!
//! # Cancellation
//!
//! A response future dropped while it waits gives its tokens back when no
//! later request has reserved on the same bucket (see [`future`]).

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bucket;
mod cost;
pub mod error;
pub mod extract;
pub mod future;
mod gcra;
mod keyed;
mod layer;
pub mod limiter;
pub mod pace;
mod service;
mod sync;

/// The quota every limiter takes, from `apiguard-core`.
pub use apiguard_core::Quota;
pub use bucket::TokenBucket;
pub use cost::{RequestCost, UnitCost};
pub use extract::{
    ForwardedFor, HeaderKey, KeyExtractor, MissingKeyPolicy, PeerIp, RefuseMissing, SharedKey,
};
pub use keyed::{DEFAULT_MAX_KEYS, KeyedLimiter};
pub use layer::{KeyedRateLimitLayer, RateLimitLayer};
pub use limiter::{Grant, Limiter, Reservation};
pub use pace::{PaceChange, PaceConfig, PaceHint, PaceReason, Pacer};
pub use service::{KeyedRateLimit, RateLimit};
