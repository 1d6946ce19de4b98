//! Retry for tower and plain async code: exponential backoff with jitter,
//! `Retry-After`, a total deadline, retry budgets, idempotency rules and
//! request-body replay.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), apiguard_core::BoxError> {
//! use std::time::Duration;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use apiguard_retry::{Jitter, RetryLayer, RetryPolicy};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let policy = RetryPolicy::builder()
//!     .max_retries(3)
//!     .base_delay(Duration::from_millis(1))
//!     .jitter(Jitter::Full)
//!     .deadline(Duration::from_secs(5))
//!     .build()?;
//!
//! // A flaky server: 503 twice, then 200.
//! static CALLS: AtomicU32 = AtomicU32::new(0);
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policy))
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         let status = if CALLS.fetch_add(1, Ordering::SeqCst) < 2 { 503 } else { 200 };
//!         Ok::<_, std::convert::Infallible>(
//!             Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
//!         )
//!     });
//!
//! let res = svc.oneshot(Request::get("/").body(Full::new(Bytes::new()))?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(CALLS.load(Ordering::SeqCst), 3);
//! # Ok(()) }
//! ```
//!
//! # What is retried
//!
//! A request is retried when its response status is retryable (by default
//! `408`, `429`, `500`, `502`, `503`, `504`) or when it failed with an
//! error recognised as transient. Errors are recognised anywhere in their
//! `source()` chain:
//!
//! | error | retried |
//! |---|---|
//! | `std::io::Error` `ConnectionRefused`; hyper-util's `client error (Connect)` | always: the request never left |
//! | `io::Error` `ConnectionReset`, `ConnectionAborted`, `BrokenPipe`, `NotConnected`, `TimedOut`, `UnexpectedEof` | if repeatable |
//! | tower's and tokio's `Elapsed` (timeouts) | if repeatable |
//! | hyper's "connection closed before message completed", "operation was canceled", "connection error"; hyper-util's `Canceled` | if repeatable |
//! | apiguard's `RateLimited`, `CircuitOpen` from an inner layer | after their `retry_after`, if it fits; else returned at once |
//! | anything else | never |
//!
//! *Repeatable* means an idempotent method of RFC 9110 (`GET`, `HEAD`,
//! `OPTIONS`, `TRACE`, `PUT`, `DELETE`) or an `Idempotency-Key` header;
//! [`retry_non_idempotent(true)`](RetryPolicyBuilder::retry_non_idempotent)
//! makes every request repeatable. Retryable responses also need a
//! repeatable request: a `503` to a `POST` may have done half the work.
//!
//! # gRPC
//!
//! [`RetryPolicyBuilder::grpc`] adds gRPC's retry rules (gRFC A6) for gRPC
//! requests: a trailers-only response is retried by its `grpc-status`
//! (`UNAVAILABLE` by default), `grpc-retry-pushback-ms` is the server's
//! wait (negative or malformed: no retry), and only the methods named
//! idempotent are retried once the request may have reached the server.
//!
//! # How long it waits
//!
//! Before retry `n`: `base_delay · 2^(n-1)`, capped at `max_delay`, spread
//! by a [`Jitter`] mode. When the response carries `Retry-After` (seconds
//! or an HTTP-date) or a `RateLimit` field whose `t` names when an
//! exhausted quota returns, the server's wait is used instead; when that
//! wait is longer than [`max_retry_after`](RetryPolicyBuilder::max_retry_after)
//! or would end past the [`deadline`](RetryPolicyBuilder::deadline), the
//! response is returned at once rather than slept on. The same holds for
//! the `retry_after` of an inner limiter's or breaker's refusal.
//!
//! # Only attempts that reach the upstream count
//!
//! An inner refusal (`RateLimited`, `CircuitOpen`) means the request never
//! left. Waiting it out and trying again spends neither one of
//! `max_retries` nor the budget: a request that waits for an open breaker
//! still has all its attempts when the breaker closes. Such waits are
//! bounded by the [`deadline`](RetryPolicyBuilder::deadline) and by
//! [`max_local_wait`](RetryPolicyBuilder::max_local_wait) (60 s in all by
//! default), and each is at least a millisecond.
//!
//! # Budget
//!
//! Retries are drawn from a [`RetryBudget`] (by default 20 % of recent
//! requests plus 10 per second), so a failing server sees about 1.2 times
//! its normal load rather than `1 + max_retries` times. When the budget is
//! spent the last response is returned, or [`BudgetExhausted`](error::BudgetExhausted)
//! when there is none. Waiting out an inner layer's refusal spends nothing:
//! no request left, so there is no load to cap.
//!
//! # Bodies
//!
//! A retry sends the body again. [`RetryLayer::new`] clones bodies that
//! are `Clone` (`Full<Bytes>`, `Empty<Bytes>`, …);
//! [`RetryLayer::replay_bodies`] wraps streaming bodies in a [`ReplayBody`]
//! that records up to `max_replay_bytes` (64 KiB) as it is sent. A body over
//! the cap is sent once, intact, and that request is not retried. See
//! [`body`].
//!
//! # Clone and cancellation
//!
//! Every service made by one layer, and every clone of it, shares the
//! policy's configuration and budget; the state of one request lives in
//! its own response future. Dropping the future while it waits to retry
//! gives the budget back the retry it had taken.
//!
//! # Outside tower
//!
//! [`RetryPolicy::run`] drives any async closure with the same policy.
//!
//! # Tracing
//!
//! Each retry emits a `DEBUG` event `retrying` with the attempt number, the
//! reason and the wait.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backoff;
pub mod body;
mod budget;
mod classify;
pub mod error;
pub mod future;
mod grpc;
mod layer;
mod policy;
mod service;
mod sync;

pub use backoff::{Backoff, Jitter, Random, SeededRandom, ThreadRandom};
pub use body::{ReplayBody, TryCloneBody};
pub use budget::RetryBudget;
pub use classify::IDEMPOTENCY_KEY;
pub use grpc::DEFAULT_GRPC_RETRYABLE_CODES;
pub use layer::RetryLayer;
pub use policy::{DEFAULT_RETRYABLE_STATUS_CODES, RetryPolicy, RetryPolicyBuilder, RetryState};
pub use service::Retry;
