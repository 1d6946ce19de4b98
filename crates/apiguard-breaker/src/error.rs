//! Error types.
//!
//! The layers refuse with [`CircuitOpen`] (from `apiguard-core`), boxed in
//! a [`BoxError`](apiguard_core::BoxError) like tower's own errors: match it
//! with `err.is::<CircuitOpen>()`. [`CircuitBreaker::call`] keeps the
//! caller's error type and returns a [`CallError`].
//!
//! [`CircuitBreaker::call`]: crate::CircuitBreaker::call

use std::fmt;

pub use apiguard_core::CircuitOpen;

/// The error of [`CircuitBreaker::call`](crate::CircuitBreaker::call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError<E> {
    /// The breaker refused the call; the future was never polled.
    Open(CircuitOpen),
    /// The call ran and failed.
    Inner(E),
}

impl<E> CallError<E> {
    /// The refusal, if the breaker refused.
    pub fn as_open(&self) -> Option<&CircuitOpen> {
        match self {
            CallError::Open(o) => Some(o),
            CallError::Inner(_) => None,
        }
    }

    /// The call's own error, if it ran.
    pub fn into_inner(self) -> Option<E> {
        match self {
            CallError::Open(_) => None,
            CallError::Inner(e) => Some(e),
        }
    }
}

impl<E: fmt::Display> fmt::Display for CallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Open(o) => o.fmt(f),
            CallError::Inner(e) => e.fmt(f),
        }
    }
}

impl<E> std::error::Error for CallError<E>
where
    E: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Open(o) => Some(o),
            CallError::Inner(e) => Some(e),
        }
    }
}
