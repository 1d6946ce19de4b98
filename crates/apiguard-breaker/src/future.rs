//! Future types.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::time::Duration;

use apiguard_core::{BoxError, CircuitOpen, Classify, Outcome};
use pin_project_lite::pin_project;

use crate::breaker::{CircuitBreaker, OwnedPermit};
use crate::hold::HoldOpen;

pub use crate::recovered::Recovered;

pin_project! {
    /// Response future of [`CircuitBreakerService`](crate::CircuitBreakerService)
    /// and [`KeyedCircuitBreakerService`](crate::KeyedCircuitBreakerService).
    ///
    /// Dropping it before it completes releases the call's permit without
    /// recording anything, so a cancelled half-open probe frees its slot.
    pub struct ResponseFuture<F, C, H> {
        #[pin]
        kind: Kind<F>,
        permit: Option<OwnedPermit>,
        classifier: C,
        hold: H,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F },
        Refused { open: CircuitOpen },
        // Refused, once the breaker is worth asking again.
        Waiting { wait: Pin<Box<RefusalWait>> },
    }
}

pin_project! {
    /// A refusal held back until the breaker is worth asking again, or
    /// until `give_up`, when `late` is the refusal.
    struct RefusalWait {
        recovered: Recovered,
        #[pin]
        give_up: tokio::time::Sleep,
        late: CircuitOpen,
    }
}

impl<F, C, H> ResponseFuture<F, C, H> {
    /// An admitted call: `call` calls the inner service.
    ///
    /// The inner call is made here, inside the struct literal, rather than
    /// by the caller: the inner future is then written straight into its
    /// place. Passed in by value it went through a temporary, and copying
    /// a response-sized future twice cost a store-forwarding stall per
    /// call (`BREAKER_COUNT` in `benches/breaker.rs`: 20 instructions
    /// fewer, and about 10 ns of a 55 ns call, on a 2-core Xeon VM).
    #[inline]
    pub(crate) fn called(
        call: impl FnOnce() -> F,
        permit: OwnedPermit,
        classifier: C,
        hold: H,
    ) -> Self {
        // Only a probe is worth an event: one per admitted call would put
        // the event's checks on every request's path.
        if permit.is_probe() {
            trace_probe();
        }
        Self {
            kind: Kind::Called { future: call() },
            permit: Some(permit),
            classifier,
            hold,
        }
    }

    /// A call no breaker guards (its request named no key): its outcome
    /// is recorded nowhere.
    pub(crate) fn unguarded(future: F, classifier: C, hold: H) -> Self {
        tracing::trace!(target: "apiguard::breaker", "call without a key: unguarded");
        Self {
            kind: Kind::Called { future },
            permit: None,
            classifier,
            hold,
        }
    }

    pub(crate) fn refused(open: CircuitOpen, classifier: C, hold: H) -> Self {
        tracing::debug!(
            target: "apiguard::breaker",
            retry_after_ms = open.retry_after().map(|d| d.as_millis() as u64),
            "call refused: circuit open"
        );
        Self {
            kind: Kind::Refused { open },
            permit: None,
            classifier,
            hold,
        }
    }
}

impl<F, C, H> ResponseFuture<F, C, H> {
    /// Refused by `breaker` with `open`; held back for up to `max_wait`
    /// when the next probe is no further away.
    pub(crate) fn refused_after_wait(
        open: CircuitOpen,
        breaker: &CircuitBreaker,
        max_wait: Duration,
        classifier: C,
        hold: H,
    ) -> Self {
        match open.retry_after() {
            Some(next) if next <= max_wait => Self {
                kind: Kind::Waiting {
                    wait: Box::pin(RefusalWait {
                        recovered: breaker.recovered(),
                        give_up: tokio::time::sleep(max_wait),
                        late: CircuitOpen::new(Some(next.saturating_sub(max_wait))),
                    }),
                },
                permit: None,
                classifier,
                hold,
            },
            _ => Self::refused(open, classifier, hold),
        }
    }
}

impl<F, C, H, T, E> Future for ResponseFuture<F, C, H>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
    H: HoldOpen<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { future } => {
                let result = ready!(future.poll(cx));
                if let Some(permit) = this.permit.as_mut() {
                    // Recorded in place: moving the permit out would copy
                    // it through the stack on every call. Its handle on the
                    // breaker is let go when the future is dropped.
                    let outcome = this.classifier.classify(&result);
                    match result.as_ref().ok().and_then(|r| this.hold.hold_for(r)) {
                        Some(d) => record_and_hold(permit, outcome, d),
                        None => permit.record_in_place(outcome),
                    }
                }
                Poll::Ready(result.map_err(Into::into))
            }
            KindProj::Refused { open } => Poll::Ready(Err(Box::new(*open))),
            KindProj::Waiting { wait } => {
                let wait = wait.as_mut().project();
                if Pin::new(wait.recovered).poll(cx).is_ready() {
                    // Worth asking again: a retry above should, at once.
                    return Poll::Ready(Err(Box::new(CircuitOpen::new(Some(Duration::ZERO)))));
                }
                ready!(wait.give_up.poll(cx));
                Poll::Ready(Err(Box::new(*wait.late)))
            }
        }
    }
}

#[cold]
#[inline(never)]
fn trace_probe() {
    tracing::trace!(target: "apiguard::breaker", "half-open probe admitted");
}

/// Records the outcome, then holds the breaker open as the server asked.
#[cold]
#[inline(never)]
fn record_and_hold(permit: &mut OwnedPermit, outcome: Outcome, d: Duration) {
    permit.record_in_place(outcome);
    permit.breaker().hold_open_for(d);
}

impl<F, C, H> std::fmt::Debug for ResponseFuture<F, C, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}
