//! apiguard's circuit breaker (work in progress).

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod breaker;
pub mod error;
mod sync;
mod window;

pub use breaker::{
    CircuitBreaker, CircuitBreakerBuilder, Permit, Reason, SlidingWindow, State, Stats, Transition,
};
pub use error::CallError;
