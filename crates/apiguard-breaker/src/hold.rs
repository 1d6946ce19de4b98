//! Holding the breaker open when the server asks for time.

use std::time::{Duration, SystemTime};

use apiguard_core::classify::overload;
use http::{Response, StatusCode};

/// Decides, from a response, whether the breaker should stay open for a
/// while (through [`CircuitBreaker::hold_open_for`]) whatever its counts say.
///
/// [`CircuitBreaker::hold_open_for`]: crate::CircuitBreaker::hold_open_for
pub trait HoldOpen<T> {
    /// How long to hold the breaker open after `response`, if at all.
    fn hold_for(&self, response: &T) -> Option<Duration>;
}

/// Never holds the breaker open; for services whose responses are not HTTP.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHold;

impl<T> HoldOpen<T> for NoHold {
    #[inline]
    fn hold_for(&self, _: &T) -> Option<Duration> {
        None
    }
}

/// Holds the breaker open for as long as a `503 Service Unavailable` with
/// `Retry-After` (either form) asks, capped at a maximum (default 5
/// minutes, so that a wrong header cannot shut a dependency out for days).
///
/// A `429` does not hold the breaker: it says this client went over its
/// quota, not that the server is down.
#[derive(Debug, Clone, Copy)]
pub struct RetryAfterHold {
    max: Duration,
}

impl RetryAfterHold {
    /// The default cap on the hold.
    pub const DEFAULT_MAX: Duration = Duration::from_secs(300);

    /// Holds for at most `max`.
    pub const fn new(max: Duration) -> Self {
        Self { max }
    }

    /// The cap on the hold.
    pub const fn max(&self) -> Duration {
        self.max
    }
}

impl Default for RetryAfterHold {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX)
    }
}

impl<B> HoldOpen<Response<B>> for RetryAfterHold {
    #[inline]
    fn hold_for(&self, response: &Response<B>) -> Option<Duration> {
        // Look at the status first: only a 503 pays for parsing the header
        // and reading the wall clock (needed for the HTTP-date form), and
        // that path stays out of line so the common one stays small.
        if response.status() != StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        self.parse(response)
    }
}

impl RetryAfterHold {
    #[cold]
    #[inline(never)]
    fn parse<B>(&self, response: &Response<B>) -> Option<Duration> {
        overload(response, SystemTime::now())
            .and_then(|o| o.retry_after)
            .filter(|d| !d.is_zero())
            .map(|d| d.min(self.max))
    }
}
