//! The right to make one call: [`Permit`], [`OwnedPermit`], [`Ticket`].

use super::*;

/// What a [`Permit`] is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// Admitted while closed; carries the closed state word it saw.
    Closed(u64),
    /// A half-open probe of the given epoch.
    Probe(u64),
    /// Admitted while disabled: records nothing.
    Pass,
    /// Already recorded or released.
    Done,
}

/// The right to make one call, from [`CircuitBreaker::try_acquire`]:
/// borrows its breaker, so taking and returning one touches no reference
/// count. [`OwnedPermit`] is the same right for a call that outlives the
/// borrow (a spawned task, a response future).
///
/// Record how the call ended with [`success`](Self::success),
/// [`failure`](Self::failure) or [`record`](Self::record). Dropping the
/// permit unrecorded means the call was cancelled: it counts as neither, and
/// a half-open probe slot is given back.
#[must_use = "a permit records nothing unless told how the call ended"]
pub struct Permit<'a> {
    pub(super) breaker: &'a Inner,
    pub(super) kind: Kind,
    pub(super) started: Nanos,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("kind", &self.kind)
            .field("started", &self.started)
            .finish()
    }
}

impl Permit<'_> {
    /// The call succeeded.
    #[inline]
    pub fn success(mut self) {
        self.breaker
            .finish(&mut self.kind, self.started, Outcome::Success);
    }

    /// The call failed.
    #[inline]
    pub fn failure(mut self) {
        self.breaker
            .finish(&mut self.kind, self.started, Outcome::Failure);
    }

    /// The call ended with `outcome` ([`Outcome::Ignored`] counts as
    /// neither, like a dropped permit).
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.breaker.finish(&mut self.kind, self.started, outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if !matches!(self.kind, Kind::Done) {
            self.breaker
                .finish(&mut self.kind, self.started, Outcome::Ignored);
        }
    }
}

/// The right to make one call, like a [`Permit`], but holding a handle on
/// its breaker rather than a borrow: from
/// [`CircuitBreaker::try_acquire_owned`], for a call that outlives the
/// borrow. The handle is a reference count, which taking and dropping one
/// writes.
///
/// Dropping it unrecorded means the call was cancelled: it counts as
/// neither, and a half-open probe slot is given back.
#[must_use = "a permit records nothing unless told how the call ended"]
pub struct OwnedPermit {
    pub(super) breaker: Arc<Inner>,
    pub(super) kind: Kind,
    pub(super) started: Nanos,
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("kind", &self.kind)
            .field("started", &self.started)
            .finish()
    }
}

impl OwnedPermit {
    /// The call succeeded.
    #[inline]
    pub fn success(mut self) {
        self.record_in_place(Outcome::Success);
    }

    /// The call failed.
    #[inline]
    pub fn failure(mut self) {
        self.record_in_place(Outcome::Failure);
    }

    /// The call ended with `outcome` ([`Outcome::Ignored`] counts as
    /// neither, like a dropped permit).
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.record_in_place(outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }

    /// Records `outcome`; the permit is spent and its drop records nothing.
    #[inline]
    pub(crate) fn record_in_place(&mut self, outcome: Outcome) {
        self.breaker.finish(&mut self.kind, self.started, outcome);
    }

    /// The breaker this permit belongs to.
    pub(crate) fn breaker(&self) -> CircuitBreaker {
        CircuitBreaker {
            inner: self.breaker.clone(),
        }
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        if !matches!(self.kind, Kind::Done) {
            self.record_in_place(Outcome::Ignored);
        }
    }
}

/// The right to make one call, like a [`Permit`], but without a handle on
/// its breaker: from [`CircuitBreaker::try_acquire_ticket`], for a service
/// that keeps the breaker at hand itself. Taking and returning one writes
/// nothing to memory other callers share while the breaker is closed and
/// has nothing to count (a permit's handle is a reference count that every
/// call writes).
///
/// Hand it back to the breaker it came from with
/// [`CircuitBreaker::record_ticket`]; [`Outcome::Ignored`] if the call was
/// cancelled. A ticket dropped instead is a cancelled call whose half-open
/// probe slot, if it held one, stays taken until the half-open timeout
/// gives up on the probes.
#[must_use = "a ticket records nothing unless handed back to its breaker"]
#[derive(Debug)]
pub struct Ticket {
    pub(super) kind: Kind,
    pub(super) started: Nanos,
}

impl Ticket {
    /// Whether this ticket is for a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }
}
