//! The limiter trait: what a rate-limit layer asks of its limiter.
//!
//! Both the in-memory buckets of this crate and the Redis backend of
//! `apiguard-redis` implement [`Limiter`], so [`RateLimitLayer`] and
//! [`KeyedRateLimitLayer`] take either with one code path.
//!
//! [`RateLimitLayer`]: crate::RateLimitLayer
//! [`KeyedRateLimitLayer`]: crate::KeyedRateLimitLayer

use std::future::Future;
use std::time::Duration;

use apiguard_core::{QuotaPolicy, RateLimited};

/// An admission: `cost` tokens are reserved for the caller, who must wait
/// `wait` before using them (zero when they are there now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// How long the caller must wait before going ahead.
    pub wait: Duration,
    /// Tokens left once this grant is spent (rounded down).
    pub remaining: u64,
    /// The policy that granted it, when known (for the `RateLimit` fields).
    pub policy: Option<QuotaPolicy>,
}

/// A [`Grant`] together with what the limiter needs to take it back
/// ([`Limiter::cancel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    grant: Grant,
    cost: u32,
    ticket: u64,
    shared: bool,
}

impl Reservation {
    /// A reservation of `cost` tokens; `ticket` is whatever the limiter
    /// needs to recognise it again (the in-memory buckets store the
    /// theoretical arrival time the reservation left behind).
    pub const fn new(grant: Grant, cost: u32, ticket: u64) -> Self {
        Self {
            grant,
            cost,
            ticket,
            shared: false,
        }
    }

    /// The grant.
    pub const fn grant(&self) -> Grant {
        self.grant
    }

    /// The tokens reserved.
    pub const fn cost(&self) -> u32 {
        self.cost
    }

    /// The limiter's own mark of this reservation.
    pub const fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Marks a reservation taken from a keyed limiter's overflow bucket.
    pub(crate) const fn on_shared_bucket(mut self) -> Self {
        self.shared = true;
        self
    }

    pub(crate) const fn is_shared(&self) -> bool {
        self.shared
    }
}

/// A source of rate-limit decisions for keys of type `K` (`()` for a single
/// bucket).
pub trait Limiter<K: ?Sized> {
    /// The future of one decision. In-memory limiters answer with a
    /// `std::future::Ready`: no allocation, no await point.
    type Future: Future<Output = Result<Grant, RateLimited>>;

    /// Reserves `cost` tokens for `key` if they will be available within
    /// `max_wait` (`Duration::ZERO`: only if available now); otherwise
    /// refuses, reserving nothing, with the wait that would have been needed.
    fn reserve(&self, key: &K, cost: u32, max_wait: Duration) -> Self::Future;

    /// The same decision made at once, for limiters that need no I/O to make
    /// it; `None` (the default) means "await [`reserve`](Self::reserve)".
    ///
    /// The layers use it to decide inside `call` without touching the inner
    /// service, and keep the [`Reservation`] to [`cancel`](Self::cancel) it
    /// if the request is dropped while it waits.
    fn reserve_now(
        &self,
        key: &K,
        cost: u32,
        max_wait: Duration,
    ) -> Option<Result<Reservation, RateLimited>> {
        let _ = (key, cost, max_wait);
        None
    }

    /// Takes `cost` tokens for `key` if they are there now, and says
    /// whether it did; `false` takes nothing (the tokens are not there, or
    /// this limiter cannot tell without I/O, as the default).
    ///
    /// The layers try it first in `call`: an admitted request then costs
    /// the decision alone, with no [`Grant`] to compute; on `false` they go
    /// on to [`reserve_now`](Self::reserve_now) and
    /// [`reserve`](Self::reserve) as before.
    #[inline]
    fn take_now(&self, key: &K, cost: u32) -> bool {
        let _ = (key, cost);
        false
    }

    /// Gives back a reservation that will not be used (its request was
    /// dropped while it waited). Best effort: the default does nothing, and
    /// the in-memory buckets give it back only when no later reservation
    /// was made on the same bucket.
    fn cancel(&self, key: &K, reservation: &Reservation) {
        let _ = (key, reservation);
    }
}
