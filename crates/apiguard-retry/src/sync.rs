//! The atomics of the retry budget: std's, or loom's when the crate is built
//! with `--cfg loom`, so the loom model checks the real code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
