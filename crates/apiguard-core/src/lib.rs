//! The shared vocabulary of apiguard.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use apiguard_core::headers::{format_retry_after, parse_retry_after};
//! use apiguard_core::{BoxError, RateLimited};
//!
//! // Refusals are typed, cheap, and say how long to wait.
//! let err: BoxError = Box::new(RateLimited::new(Duration::from_millis(300)));
//! let wait = err.downcast_ref::<RateLimited>().and_then(|e| e.retry_after());
//! assert_eq!(wait, Some(Duration::from_millis(300)));
//!
//! // `Retry-After` is written rounded up and read in both forms.
//! let value = format_retry_after(Duration::from_millis(300));
//! assert_eq!(value, "1");
//! assert_eq!(parse_retry_after(&value, SystemTime::now()), Some(Duration::from_secs(1)));
//! ```
//!
//! - [`error`]: the refusals every layer returns ([`RateLimited`],
//!   [`CircuitOpen`], [`BudgetExhausted`], [`RetriesExhausted`],
//!   [`MissingKey`]) and [`InvalidConfig`], the error of every builder;
//! - [`quota`]: [`Quota`], how much a rate limit lets through, taken by
//!   every limiter;
//! - [`extract`]: [`KeyExtractor`], which bucket or breaker a request
//!   belongs to, taken by every keyed layer;
//! - [`classify`]: what counts as a failure ([`Outcome`], [`Classify`],
//!   [`HttpClassifier`]);
//! - [`headers`]: `Retry-After` and the IETF `RateLimit` fields;
//! - [`grpc`]: gRPC status codes, `grpc-retry-pushback-ms`, and
//!   [`GrpcClassifier`](grpc::GrpcClassifier);
//! - [`clock`]: the one clock every decision reads;
//! - [`map`]: [`BoundedMap`], the capped keyed map under every per-key
//!   registry, with its one eviction rule;
//! - [`RejectionResponseLayer`]: refusals into `429`/`503` responses (and
//!   into `RESOURCE_EXHAUSTED`/`UNAVAILABLE` for gRPC requests).

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod classify;
pub mod clock;
pub mod error;
pub mod extract;
pub mod grpc;
pub mod headers;
pub mod map;
pub mod quota;
pub mod rejection;

pub use classify::{Classify, HttpClassifier, Outcome};
pub use clock::{Clock, ManualClock, Nanos};
pub use error::{
    BoxError, BudgetExhausted, CircuitOpen, InvalidConfig, MissingKey, QuotaPolicy, RateLimited,
    RetriesExhausted,
};
pub use extract::KeyExtractor;
pub use map::BoundedMap;
pub use quota::Quota;
pub use rejection::RejectionResponseLayer;
