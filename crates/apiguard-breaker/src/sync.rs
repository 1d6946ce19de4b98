//! The atomics and the lock the breaker's state lives in: std's, or loom's
//! under `cfg(loom)` so `tests/loom.rs` can explore every interleaving of the
//! half-open permit logic and of the waiters' wake-ups.

#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Keeps a hot atomic on a cache line (pair) of its own, so that writes to
/// its neighbours — above all the `Arc` reference count every permit bumps —
/// do not evict it from the cores that only read it.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}
