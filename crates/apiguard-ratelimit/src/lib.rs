//! apiguard rate limiting (work in progress).

pub mod limiter;

pub use limiter::{Grant, Limiter};
