//! Future types.
//!
//! A decision is one Redis round trip raced against the decision timeout.
//! The race and the fallback are hand-written here; the round trip itself is
//! one boxed future, because the `redis` crate's connection hands out
//! futures that borrow the connection and the command (`RedisFuture<'a, _>`,
//! itself a boxed future), and keeping both alive next to such a borrow in a
//! nameable type takes either a box or `unsafe`. One allocation next to a
//! network round trip is noise (see the `redis` bench).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_core::RateLimited;
use apiguard_ratelimit::Grant;
use pin_project_lite::pin_project;
use redis::RedisError;
use tokio::time::Sleep;

use apiguard_core::Nanos;

use crate::limiter::{Decision, Failure, Inner, Reply, record};

pub(crate) type Call = Pin<Box<dyn Future<Output = Result<Reply, RedisError>> + Send>>;

/// What a decision in flight needs to finish without Redis.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) timeout: Duration,
    pub(crate) cost: u32,
    pub(crate) max_wait: Duration,
    /// The bucket's Redis key.
    pub(crate) key: String,
    /// When it was sent (system clock).
    pub(crate) sent: Nanos,
    /// Tokens admitted without Redis that this call takes from the bucket.
    pub(crate) debit: u64,
    /// On a cluster: the monitor of the master serving the key.
    pub(crate) shard: Option<Arc<crate::health::Monitor>>,
}

impl Pending {
    /// The monitor this decision reports to.
    pub(crate) fn monitor<'a>(&'a self, inner: &'a Inner) -> &'a crate::health::Monitor {
        self.shard.as_deref().unwrap_or(inner.monitor())
    }
}

pin_project! {
    /// The future of [`RedisLimiter::decide`](crate::RedisLimiter::decide).
    ///
    /// Resolves within the decision timeout: to Redis' answer, or to the
    /// failure policy's. The script carries a deadline (half the timeout
    /// after sending, in Redis `TIME`): run later, it refuses without
    /// spending, so a decision answered by the policy never also spends a
    /// token in Redis. Dropping the future abandons the round trip; a
    /// reservation Redis already made stays made (the tokens are spent),
    /// as with any request that leaves the process.
    #[must_use = "futures do nothing unless polled"]
    pub struct DecisionFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Ready {
            decision: Option<Decision>,
        },
        Remote {
            call: Call,
            #[pin]
            deadline: Sleep,
            inner: Arc<Inner>,
            pending: Pending,
        },
    }
}

impl DecisionFuture {
    pub(crate) fn ready(decision: Decision) -> Self {
        Self {
            state: State::Ready {
                decision: Some(decision),
            },
        }
    }

    pub(crate) fn remote(call: Call, inner: Arc<Inner>, pending: Pending) -> Self {
        Self {
            state: State::Remote {
                call,
                deadline: tokio::time::sleep(pending.timeout),
                inner,
                pending,
            },
        }
    }
}

impl Future for DecisionFuture {
    type Output = Decision;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Decision> {
        let mut state = self.project().state;
        let decision = match state.as_mut().project() {
            StateProj::Ready { decision } => decision
                .take()
                .expect("DecisionFuture polled after completion"),
            StateProj::Remote {
                call,
                deadline,
                inner,
                pending,
            } => {
                if let Poll::Ready(reply) = call.as_mut().poll(cx) {
                    inner.on_reply(reply, pending)
                } else if deadline.poll(cx).is_ready() {
                    inner.on_miss(Failure::Timeout, pending)
                } else {
                    return Poll::Pending;
                }
            }
        };
        record(&decision);
        // Drop the round trip and the timer now, and make a second poll panic
        // like any finished future's would.
        state.set(State::Ready { decision: None });
        Poll::Ready(decision)
    }
}

impl fmt::Debug for DecisionFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { decision: Some(_) } => "ready",
            State::Ready { decision: None } => "done",
            State::Remote { .. } => "waiting for redis",
        };
        f.debug_struct("DecisionFuture")
            .field("state", &state)
            .finish()
    }
}

pin_project! {
    /// The future of [`Limiter::reserve`](apiguard_ratelimit::Limiter::reserve)
    /// for [`RedisLimiter`](crate::RedisLimiter): a [`DecisionFuture`] in the
    /// shape rate-limit layers take.
    #[must_use = "futures do nothing unless polled"]
    pub struct ReserveFuture {
        #[pin]
        inner: DecisionFuture,
    }
}

impl ReserveFuture {
    pub(crate) fn new(inner: DecisionFuture) -> Self {
        Self { inner }
    }
}

impl Future for ReserveFuture {
    type Output = Result<Grant, RateLimited>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map(Decision::into_result)
    }
}

impl fmt::Debug for ReserveFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReserveFuture")
            .field("inner", &self.inner)
            .finish()
    }
}
