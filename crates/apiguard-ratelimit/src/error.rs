//! Error types.
//!
//! A refused request fails with [`RateLimited`] (from `apiguard-core`),
//! which says how long to wait and, for the in-memory limiters, the quota
//! that refused, so [`RejectionResponseLayer`] writes `429` with
//! `Retry-After` and the `RateLimit` fields. The layers return it boxed in a
//! [`BoxError`](apiguard_core::BoxError); match it with
//! `err.downcast_ref::<RateLimited>()`.
//!
//! A request the keyed layer finds no key in fails with [`MissingKey`]
//! (also from `apiguard-core`), unless the layer was told to let such
//! requests share one bucket: see
//! [`KeyedRateLimitLayer`](crate::KeyedRateLimitLayer#a-request-without-a-key).
//!
//! [`RejectionResponseLayer`]: apiguard_core::RejectionResponseLayer

pub use apiguard_core::{MissingKey, RateLimited};
