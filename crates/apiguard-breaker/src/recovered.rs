//! Waiting for a breaker to let calls through again.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use apiguard_core::Nanos;
use apiguard_core::clock::nanos_to_duration;
use tokio::time::Sleep;

use crate::breaker::{Inner, Readiness};
use crate::waiters::Key;

/// Completes when a breaker that refused a call is worth asking again: it
/// closed (and, after a close, this waiter's turn in the backlog came — see
/// [`slow_start`](crate::CircuitBreakerBuilder::slow_start)), its open
/// period ended (the next caller becomes the probe), a probe slot freed up,
/// or it was reset or disabled. While a probe is in flight it waits for the
/// probe's outcome: a failed probe reopens the breaker and the waiter then
/// waits for the new probe time.
///
/// Made by [`CircuitBreaker::recovered`](crate::CircuitBreaker::recovered).
/// It never ends on its own while the breaker stays open (forced open, or
/// a probe that neither ends nor times out): bound it by the caller's
/// deadline. Completing grants nothing: ask the breaker again, and wait
/// again if refused.
///
/// # Cancellation
///
/// Dropping it removes the waiter from the breaker's list; it never holds a
/// probe slot or a permit.
pub struct Recovered {
    inner: Arc<Inner>,
    queued_at: Option<Nanos>,
    key: Option<Key>,
    timer: Option<(Nanos, Pin<Box<Sleep>>)>,
    released: bool,
}

impl Recovered {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            queued_at: None,
            key: None,
            timer: None,
            released: false,
        }
    }

    /// Takes this waiter's place in the backlog as of `at` (the breaker's
    /// clock): a caller refused again after a first wait keeps the place it
    /// had, so the release after a close stays oldest first. Default: when
    /// the future is first polled.
    pub fn queued_since(mut self, at: Nanos) -> Self {
        self.queued_at = Some(at);
        self
    }

    /// Sleeps until `at` on the breaker's clock (tokio's timer), reusing
    /// the timer when it is already set for that instant.
    fn arm(&mut self, at: Nanos, now: Nanos) {
        // Loom models the wake-ups by transitions; tokio's timer needs a
        // runtime they do not run.
        if cfg!(loom) {
            return;
        }
        if matches!(&self.timer, Some((t, _)) if *t == at) {
            return;
        }
        let deadline = tokio::time::Instant::now() + nanos_to_duration(at.saturating_sub(now));
        match &mut self.timer {
            Some((t, sleep)) => {
                *t = at;
                sleep.as_mut().reset(deadline);
            }
            None => self.timer = Some((at, Box::pin(tokio::time::sleep_until(deadline)))),
        }
    }

    fn leave(&mut self) {
        if let Some(key) = self.key.take() {
            self.inner.waiters.remove(key);
        }
    }
}

impl Future for Recovered {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if !this.released {
            let now = this.inner.clock.now();
            let released = match this.key {
                Some(key) => this.inner.waiters.poll(key, cx.waker()),
                None => {
                    let at = this.queued_at.unwrap_or(now);
                    this.key = Some(this.inner.waiters.register(at, cx.waker()));
                    None
                }
            };
            match released {
                Some(at) => {
                    this.key = None;
                    this.released = true;
                    if at <= now {
                        return Poll::Ready(());
                    }
                    this.arm(at, now);
                }
                // Read after registering: a change made before is seen here,
                // one made after wakes this waiter.
                None => match this.inner.readiness(now) {
                    Readiness::Now => {
                        this.leave();
                        return Poll::Ready(());
                    }
                    Readiness::At(at) => this.arm(at, now),
                    Readiness::Never => this.timer = None,
                },
            }
        }
        let fired = match &mut this.timer {
            Some((_, sleep)) => sleep.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if !fired {
            return Poll::Pending;
        }
        this.timer = None;
        this.leave();
        Poll::Ready(())
    }
}

impl Drop for Recovered {
    fn drop(&mut self) {
        self.leave();
    }
}

impl fmt::Debug for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovered")
            .field("queued_at", &self.queued_at)
            .field("waiting", &self.key.is_some())
            .field("released", &self.released)
            .finish_non_exhaustive()
    }
}
