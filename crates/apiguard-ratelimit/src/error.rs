//! Error types.
//!
//! A refused request fails with [`RateLimited`] (from `apiguard-core`),
//! which says how long to wait and, for the in-memory limiters, the quota
//! that refused, so [`RejectionResponseLayer`] writes `429` with
//! `Retry-After` and the `RateLimit` fields. The layers return it boxed in a
//! [`BoxError`](apiguard_core::BoxError); match it with
//! `err.downcast_ref::<RateLimited>()`.
//!
//! [`RejectionResponseLayer`]: apiguard_core::RejectionResponseLayer

use std::fmt;

pub use apiguard_core::RateLimited;

/// The keyed layer could not find a key in the request (no peer address
/// recorded, no such header…), so it refused it rather than let it past
/// the limit.
///
/// This is a setup problem more than a client's fault: with
/// `RejectionResponseLayer::other_errors_as_500` it becomes a `500`. To let
/// such requests through instead, give the extractor a fallback key (a
/// closure returning `Some(..)` for every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MissingKey {
    _priv: (),
}

impl MissingKey {
    /// The error.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no rate-limit key in request")
    }
}

impl std::error::Error for MissingKey {}
