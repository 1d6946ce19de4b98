//! The state the layer, its services and their futures share, and the
//! decisions made on it: finding a request's host, asking its breaker and
//! its bucket (or pace), and recording how the call ended.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, HoldOpen, KeyedBreakers, RetryAfterHold, Ticket};
use apiguard_core::classify::classify_error;
use apiguard_core::grpc::{Code, GrpcClassifier, Pushback};
use apiguard_core::{BoxError, CircuitOpen, Classify, HttpClassifier, Nanos, Outcome};
use apiguard_ratelimit::{Reservation, TokenBucket};
use apiguard_retry::RetryPolicy;
use http::Request;
use http::uri::Authority;

use super::scope::{HostScope, Scope, host_str};
use crate::hosts::HostLimits;
use crate::pace::{HostPaces, PaceSlot};

/// What the layer, its services and their futures share.
pub(super) struct Shared {
    /// Retry and the buckets share one clock reading per request.
    pub(super) one_clock: bool,
    pub(super) total_timeout: Option<Duration>,
    pub(super) attempt_timeout: Option<Duration>,
    pub(super) retry: Option<RetryPolicy>,
    pub(super) breakers: Option<KeyedBreakers<HostScope>>,
    pub(super) limiter: Option<HostLimits>,
    pub(super) paces: Option<HostPaces>,
    pub(super) max_wait: Duration,
    pub(super) scope: Scope,
    /// Classify by gRPC's status instead of HTTP's.
    pub(super) grpc: bool,
}

/// A host's breaker and bucket, held by a service between calls.
pub(super) struct HostCache {
    key: HostScope,
    breaker: Option<CircuitBreaker>,
    bucket: Option<TokenBucket>,
    pace: Option<PaceSlot>,
    grpc: bool,
}

impl Shared {
    /// The breaker and bucket of `req`'s host: those in `last` if they are
    /// that host's (a breaker held there is in use, so the registry keeps
    /// it), else the
    /// registries' (which then go in `last`). A host that differs only in
    /// case misses here and is found in the registries, whose keys ignore
    /// case.
    #[inline]
    pub(super) fn host_of<'a, B>(
        &self,
        last: &'a mut Option<Arc<HostCache>>,
        req: &Request<B>,
    ) -> &'a Arc<HostCache> {
        let hit = match last {
            Some(c) => {
                !self.scope.per_host || c.key.as_ref().map(Authority::as_str) == host_str(req)
            }
            None => false,
        };
        if !hit {
            *last = Some(Arc::new(self.lookup(req)));
        }
        match last {
            Some(c) => c,
            None => unreachable!("just filled"),
        }
    }

    /// The breaker and bucket of `req`'s host, from the registries.
    pub(super) fn lookup<B>(&self, req: &Request<B>) -> HostCache {
        let key = self.scope.of(req);
        HostCache {
            breaker: self.breakers.as_ref().map(|b| b.get(key.clone())),
            bucket: self.limiter.as_ref().map(|l| l.bucket(&key)),
            pace: self.paces.as_ref().map(|p| PaceSlot::new(p, &key)),
            key,
            grpc: self.grpc,
        }
    }
}

/// An admitted call's standing with its host's breaker: the breaker's
/// [`Ticket`], kept with the host's handles. Dropped unrecorded, the call
/// counts as cancelled (a probe slot is freed).
pub(super) struct Call {
    host: Arc<HostCache>,
    ticket: Option<Ticket>,
    /// When a paced host admitted it (see `PaceSlot::stamp`).
    admitted: Nanos,
}

impl Call {
    fn breaker(&self) -> &CircuitBreaker {
        self.host
            .breaker
            .as_ref()
            .unwrap_or_else(|| unreachable!("a call is made only under a breaker"))
    }

    /// Tells the breaker how the attempt ended; a `503` with `Retry-After`
    /// holds it open as asked. In gRPC mode, a response whose status is
    /// still to come in the trailers takes the call along in its
    /// extensions ([`Deferred`]), to be recorded when the body ends.
    #[inline]
    pub(super) fn record<R>(mut self, result: &mut Result<http::Response<R>, BoxError>) {
        if self.host.grpc {
            return self.record_grpc(result);
        }
        let result = &*result;
        if let Some(pace) = &self.host.pace {
            pace.observe(&self.host.key, self.admitted, result);
        }
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let outcome = HttpClassifier::new().classify(result);
        self.breaker().record_ticket(ticket, outcome);
        if let Some(d) = result
            .as_ref()
            .ok()
            .and_then(|r| RetryAfterHold::default().hold_for(r))
        {
            self.breaker().hold_open_for(d);
        }
    }
}

impl Call {
    /// [`record`](Self::record) in gRPC mode.
    fn record_grpc<R>(mut self, result: &mut Result<http::Response<R>, BoxError>) {
        if let Some(pace) = &self.host.pace {
            pace.observe_grpc(&self.host.key, self.admitted, result);
        }
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        match result {
            Ok(res) => match Code::of_response(res) {
                Some(code) => {
                    let breaker = self.breaker();
                    breaker.record_ticket(ticket, GrpcClassifier::new().classify_code(code));
                    // gRPC's `503 with Retry-After`.
                    if code == Code::Unavailable
                        && let Some(Pushback::After(d)) = Pushback::from_headers(res.headers())
                    {
                        breaker.hold_open_for(d.min(RetryAfterHold::default().max()));
                    }
                }
                None => {
                    self.ticket = Some(ticket);
                    res.extensions_mut()
                        .insert(Deferred(Arc::new(Mutex::new(Some(self)))));
                }
            },
            Err(e) => self.breaker().record_ticket(ticket, classify_error(e)),
        }
    }
}

/// A call whose gRPC status comes in the trailers: left in the response's
/// extensions by the stack, taken by
/// [`GrpcTrailersLayer`](crate::grpc::GrpcTrailersLayer), which records it
/// when the body ends. Dropped unrecorded (the body was dropped early, or
/// no `GrpcTrailersLayer` took it), the call counts as cancelled.
#[derive(Clone)]
pub(crate) struct Deferred(Arc<Mutex<Option<Call>>>);

impl Deferred {
    /// Records the call with `outcome` (once; later calls do nothing).
    pub(crate) fn finish(&self, outcome: Outcome) {
        let call = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(mut call) = call
            && let Some(ticket) = call.ticket.take()
        {
            call.breaker().record_ticket(ticket, outcome);
        }
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred").finish_non_exhaustive()
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker().record_ticket(ticket, Outcome::Ignored);
        }
    }
}

/// What the breaker and the bucket say to an attempt.
pub(super) enum Admission {
    Go,
    Wait(Duration, Hold),
    /// The host's breaker refused: the request may wait for it
    /// ([`BreakerWait`]).
    Open(CircuitOpen, CircuitBreaker),
    Refused(BoxError),
}

impl Shared {
    /// Asks the host's breaker, then its bucket (a call the breaker refuses
    /// spends no token). The breaker's ticket of an admitted call is left
    /// in `permit`.
    #[inline]
    pub(super) fn admit(
        &self,
        host: &Arc<HostCache>,
        now: Option<Nanos>,
        permit: &mut Option<Call>,
    ) -> Admission {
        if let Some(breaker) = &host.breaker {
            match breaker.try_acquire_ticket() {
                Ok(ticket) => {
                    *permit = Some(Call {
                        host: host.clone(),
                        ticket: Some(ticket),
                        admitted: 0,
                    })
                }
                Err(open) => {
                    tracing::debug!(target: "apiguard::breaker", retry_after_ms = open.retry_after().map(|d| d.as_millis() as u64), "call refused: circuit open");
                    return Admission::Open(open, breaker.clone());
                }
            }
        }
        // A host that pushed back is paced instead of bucketed (its pace
        // never exceeds the bucket's rate); its responses are recorded.
        let pacer = host.pace.as_ref().and_then(|p| p.pacer(&host.key));
        if host.pace.is_some() {
            // When a paced host admitted it; zero (before any cut) for a
            // host without a pacer, which spares those a clock reading.
            let admitted = pacer.map_or(0, |p| now.unwrap_or_else(|| p.clock().now()));
            match permit {
                Some(call) => call.admitted = admitted,
                None => {
                    *permit = Some(Call {
                        host: host.clone(),
                        ticket: None,
                        admitted,
                    })
                }
            }
        }
        if pacer.is_some() || host.bucket.is_some() {
            let (mut at, mut cuts) = (0, 0);
            let reserved = match (pacer, &host.bucket, now) {
                // Waiting for the pace is bounded by the total timeout,
                // not by `max_wait`: it is the price of not being refused.
                (Some(p), _, now) => {
                    cuts = p.cuts();
                    at = now.unwrap_or_else(|| p.clock().now());
                    p.reserve_at(1, self.total_timeout.unwrap_or(self.max_wait), at)
                }
                (None, Some(bucket), Some(now)) => bucket.reserve_at(1, self.max_wait, now),
                (None, Some(bucket), None) => bucket.reserve(1, self.max_wait),
                (None, None, _) => unreachable!("checked above"),
            };
            match reserved {
                Ok(r) => {
                    let wait = r.grant().wait;
                    if !wait.is_zero() {
                        let due = at.saturating_add(apiguard_core::clock::duration_to_nanos(wait));
                        return Admission::Wait(wait, Hold::new(host, pacer, r, due, cuts));
                    }
                }
                Err(limited) => {
                    // Released unrecorded: the call was never made.
                    *permit = None;
                    return Admission::Refused(Box::new(limited));
                }
            }
        }
        Admission::Go
    }

    /// The same for a later attempt of `req`, from the registries.
    pub(super) fn admit_again<B>(&self, req: &Request<B>, permit: &mut Option<Call>) -> Admission {
        let host = Arc::new(self.lookup(req));
        self.admit(&host, None, permit)
    }
}

/// A token (or a paced slot) reserved for an attempt that waits for it:
/// given back if the request is dropped before the wait ends.
pub(super) struct Hold {
    host: Arc<HostCache>,
    pacer: Option<apiguard_ratelimit::Pacer>,
    reservation: Reservation,
    /// When a paced slot is due, and the pacer's cut count before it was
    /// reserved.
    due: Nanos,
    cuts: u64,
    pub(super) spent: bool,
}

impl Hold {
    pub(super) fn new(
        host: &Arc<HostCache>,
        pacer: Option<&apiguard_ratelimit::Pacer>,
        reservation: Reservation,
        due: Nanos,
        cuts: u64,
    ) -> Self {
        Self {
            host: host.clone(),
            pacer: pacer.cloned(),
            reservation,
            due,
            cuts,
            spent: false,
        }
    }

    /// Whether the attempt must be admitted again: its host was paused
    /// while it waited, its paced slot was voided by a cut, or (when
    /// `late_counts`) it woke too late for that slot.
    pub(super) fn stale(&self, late_counts: bool) -> bool {
        if let Some(p) = &self.pacer
            && (p.cuts() != self.cuts || (late_counts && p.missed(self.due, p.clock().now())))
        {
            return true;
        }
        self.host
            .pace
            .as_ref()
            .is_some_and(|p| p.is_paused(&self.host.key))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        match (&self.pacer, &self.host.bucket) {
            (Some(p), _) => {
                p.cancel(&self.reservation);
            }
            (None, Some(b)) => {
                b.cancel(&self.reservation);
            }
            (None, None) => {}
        }
    }
}
