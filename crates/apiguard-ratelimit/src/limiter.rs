//! The limiter trait: what a rate-limit layer asks of its limiter.
//!
//! Both the in-memory buckets of this crate and the Redis backend of
//! `apiguard-redis` implement [`Limiter`], so [`RateLimitLayer`] and
//! [`KeyedRateLimitLayer`] take either with one code path.
//!
//! [`RateLimitLayer`]: crate::RateLimitLayer
//! [`KeyedRateLimitLayer`]: crate::KeyedRateLimitLayer

use std::future::Future;
use std::time::Duration;

use apiguard_core::{Quota, RateLimited};

/// An admission: `cost` tokens are reserved for the caller, who must wait
/// `wait` before using them (zero when they are there now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// How long the caller must wait before going ahead.
    pub wait: Duration,
    /// Tokens left once this grant is spent (rounded down).
    pub remaining: u64,
    /// The quota that granted it, when known (for the `RateLimit` fields).
    pub quota: Option<Quota>,
}

/// A source of rate-limit decisions for keys of type `K` (`()` for a single
/// bucket).
pub trait Limiter<K: ?Sized> {
    /// The future of one decision. In-memory limiters answer with a
    /// `std::future::Ready`: no allocation, no await point.
    type Future: Future<Output = Result<Grant, RateLimited>>;

    /// Reserves `cost` tokens for `key` if they will be available within
    /// `max_wait` (`Duration::ZERO`: only if available now); otherwise
    /// refuses, reserving nothing, with the wait that would have been needed.
    fn reserve(&self, key: &K, cost: u32, max_wait: Duration) -> Self::Future;
}
