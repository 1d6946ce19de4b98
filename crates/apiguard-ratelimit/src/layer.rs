use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use crate::bucket::TokenBucket;
use crate::cost::UnitCost;
use crate::extract::{RefuseMissing, SharedKey};
use crate::service::{KeyedRateLimit, RateLimit};

/// Applies one rate limit to every request: waits for tokens up to
/// `max_wait` (forever by default, as a client wants), refuses beyond it.
///
/// Every service this layer makes, and every clone of them, draws from the
/// same limiter.
#[derive(Clone)]
pub struct RateLimitLayer<L = TokenBucket, C = UnitCost> {
    limiter: L,
    max_wait: Duration,
    cost: C,
}

impl<L> RateLimitLayer<L> {
    /// Limits requests with `limiter` (a [`TokenBucket`], or any
    /// [`Limiter<()>`](crate::Limiter)); each request costs one token and
    /// waits as long as it takes.
    pub const fn new(limiter: L) -> Self {
        Self {
            limiter,
            max_wait: Duration::MAX,
            cost: UnitCost,
        }
    }
}

impl<L, C> RateLimitLayer<L, C> {
    /// Waits at most `max_wait` for tokens; a request that would wait longer
    /// is refused at once with `RateLimited`. `Duration::ZERO` never waits
    /// (a server's reject mode).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Charges each request `cost(&req)` tokens (any `Fn(&Req) -> u32`).
    pub fn cost<C2>(self, cost: C2) -> RateLimitLayer<L, C2> {
        RateLimitLayer {
            limiter: self.limiter,
            max_wait: self.max_wait,
            cost,
        }
    }
}

impl<L: fmt::Debug, C> fmt::Debug for RateLimitLayer<L, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S, L: Clone, C: Clone> Layer<S> for RateLimitLayer<L, C> {
    type Service = RateLimit<S, L, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(
            inner,
            self.limiter.clone(),
            self.max_wait,
            self.cost.clone(),
        )
    }
}

/// Applies one bucket per key: the key of each request comes from an
/// extractor ([`crate::extract`]), and requests over their key's limit are
/// refused at once by default, as a server wants.
///
/// Every service this layer makes, and every clone of them, draws from the
/// same limiter.
///
/// # A request without a key
///
/// By default it fails with a [`MissingKey`](crate::error::MissingKey)
/// that says what to fix — `RejectionResponseLayer` answers it `500` and
/// logs it — since a key that is never there (no `ConnectInfo`, a proxy
/// that drops the header) is a set-up problem that must not go unnoticed.
/// [`missing_key_as_400`](Self::missing_key_as_400) makes it the client's
/// fault (`400 Bad Request`); [`missing_key_shares`](Self::missing_key_shares)
/// admits such requests against one shared bucket instead.
#[derive(Clone)]
pub struct KeyedRateLimitLayer<L, E, C = UnitCost, M = RefuseMissing> {
    limiter: L,
    extractor: E,
    max_wait: Duration,
    cost: C,
    missing: M,
}

impl<L, E> KeyedRateLimitLayer<L, E> {
    /// Limits each key with `limiter` (a [`KeyedLimiter`](crate::KeyedLimiter),
    /// or any [`Limiter<K>`](crate::Limiter)), the key coming from
    /// `extractor`. Over-limit requests are refused at once.
    pub const fn new(limiter: L, extractor: E) -> Self {
        Self {
            limiter,
            extractor,
            max_wait: Duration::ZERO,
            cost: UnitCost,
            missing: RefuseMissing { bad_request: false },
        }
    }
}

impl<L, E, C> KeyedRateLimitLayer<L, E, C> {
    /// A request without a key is the client's fault: it fails with a
    /// [`MissingKey`](crate::error::MissingKey) that
    /// `RejectionResponseLayer` answers `400 Bad Request` (for a key the
    /// client must send, such as an API key header).
    pub fn missing_key_as_400(mut self) -> Self {
        self.missing = RefuseMissing { bad_request: true };
        self
    }

    /// Requests without a key are admitted against the bucket of `key`,
    /// which they all share (and share with requests whose key it is).
    pub fn missing_key_shares<K>(self, key: K) -> KeyedRateLimitLayer<L, E, C, SharedKey<K>> {
        KeyedRateLimitLayer {
            limiter: self.limiter,
            extractor: self.extractor,
            max_wait: self.max_wait,
            cost: self.cost,
            missing: SharedKey(key),
        }
    }
}

impl<L, E, C, M> KeyedRateLimitLayer<L, E, C, M> {
    /// Lets requests wait up to `max_wait` for their key's tokens instead of
    /// being refused at once.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Charges each request `cost(&req)` tokens.
    pub fn cost<C2>(self, cost: C2) -> KeyedRateLimitLayer<L, E, C2, M> {
        KeyedRateLimitLayer {
            limiter: self.limiter,
            extractor: self.extractor,
            max_wait: self.max_wait,
            cost,
            missing: self.missing,
        }
    }
}

impl<L: fmt::Debug, E, C, M: fmt::Debug> fmt::Debug for KeyedRateLimitLayer<L, E, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("limiter", &self.limiter)
            .field("max_wait", &self.max_wait)
            .field("missing_key", &self.missing)
            .finish_non_exhaustive()
    }
}

impl<S, L: Clone, E: Clone, C: Clone, M: Clone> Layer<S> for KeyedRateLimitLayer<L, E, C, M> {
    type Service = KeyedRateLimit<S, L, E, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimit::new(
            inner,
            self.limiter.clone(),
            self.extractor.clone(),
            self.max_wait,
            self.cost.clone(),
            self.missing.clone(),
        )
    }
}
