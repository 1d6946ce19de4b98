//! The atomics the breaker's state lives in: std's, or loom's under
//! `cfg(loom)` so `tests/loom.rs` can explore every interleaving of the
//! half-open permit logic.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
