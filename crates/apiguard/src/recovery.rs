//! Waiting out an open circuit inside [`GuardLayer`](crate::GuardLayer)'s
//! per-request future.
//!
//! A request the breaker refuses because it is open, or because its probe
//! is in flight, does not become a retry attempt: it waits for the breaker
//! to change ([`CircuitBreaker::recovered`]) and asks again. A closed
//! breaker lets it go (at the slow-start pace, oldest first), a reopened one
//! sends it back to wait for the next probe. What bounds the wait:
//!
//! - the request's total timeout (it ends the request as any wait);
//! - the layer's `max_wait`, the same bound as a wait for a token;
//! - the breaker's own word: a next probe later than either bound is not
//!   waited for, and a breaker forced open names no end: refused at once.
//!
//! No retry attempt and no retry budget is spent on such a wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_breaker::CircuitBreaker;
use apiguard_breaker::future::Recovered;
use apiguard_core::{CircuitOpen, Nanos};
use tokio::time::{Instant, Sleep};

/// One request waiting for its host's breaker.
pub(crate) struct BreakerWait {
    recovered: Recovered,
    /// `max_wait`, armed only when it ends before the total deadline.
    give_up: Option<Pin<Box<Sleep>>>,
    open: CircuitOpen,
}

impl BreakerWait {
    /// A wait for `breaker`, which refused with `open`; `None` when it is
    /// not worth waiting: forced open, or the next probe only after the
    /// earlier of `max_wait` and the total deadline. `queued_at` keeps the
    /// request's place in the breaker's backlog across waits.
    pub(crate) fn start(
        breaker: &CircuitBreaker,
        open: CircuitOpen,
        queued_at: &mut Option<Nanos>,
        max_wait: Duration,
        total_end: Option<Instant>,
    ) -> Option<Self> {
        let hint = open.retry_after()?;
        let now = Instant::now();
        let limit = now.checked_add(max_wait);
        let end = match (limit, total_end) {
            (Some(l), Some(t)) => Some(l.min(t)),
            (l, t) => l.or(t),
        };
        if end.is_some_and(|end| now + hint > end) {
            return None;
        }
        let give_up = match (limit, total_end) {
            (Some(l), Some(t)) if l >= t => None,
            (Some(l), _) => Some(Box::pin(tokio::time::sleep_until(l))),
            (None, _) => None,
        };
        let at = *queued_at.get_or_insert_with(|| breaker.clock().now());
        Some(Self {
            recovered: breaker.recovered().queued_since(at),
            give_up,
            open,
        })
    }

    /// `Ready(Ok)` when the breaker is worth asking again, `Ready(Err)`
    /// with the refusal when `max_wait` ran out first.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CircuitOpen>> {
        if Pin::new(&mut self.recovered).poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        match &mut self.give_up {
            Some(sleep) => sleep.as_mut().poll(cx).map(|()| Err(self.open)),
            None => Poll::Pending,
        }
    }
}
