//! Error types.
//!
//! Every refusal apiguard makes is one of the types here. They are small,
//! `Copy` where they can be, and building one allocates nothing, so refusing a
//! request stays as cheap as admitting it. Layers return them boxed in a
//! [`BoxError`]; match them with `err.downcast_ref::<RateLimited>()` (or
//! `err.is::<CircuitOpen>()`) as with tower's own errors.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The boxed error type layers return, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The quota behind a rate limit, as advertised in the `RateLimit-Policy`
/// field: `quota` units per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Units (requests, or tokens for weighted requests) the window allows.
    pub limit: u64,
    /// The window the limit applies to.
    pub window: Duration,
}

/// A request was refused because no token was available in time.
///
/// [`retry_after`](Self::retry_after) is how long the caller should wait
/// before the tokens it asked for will be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    wait: Duration,
    quota: Option<Quota>,
}

impl RateLimited {
    /// A refusal that asks the caller to wait `wait`.
    pub const fn new(wait: Duration) -> Self {
        Self { wait, quota: None }
    }

    /// Attaches the quota that refused, so servers can advertise it.
    pub const fn with_quota(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// How long to wait before the requested tokens are available.
    pub const fn retry_after(&self) -> Option<Duration> {
        Some(self.wait)
    }

    /// The quota that refused, when the limiter knows it.
    pub const fn quota(&self) -> Option<Quota> {
        self.quota
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited; retry after {:?}", self.wait)
    }
}

impl std::error::Error for RateLimited {}

/// A call was refused because the circuit breaker is open (or its half-open
/// probe slots are taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_after: Option<Duration>,
}

impl CircuitOpen {
    /// A refusal whose breaker will probe again after `retry_after`; `None`
    /// when it is held open with no end in sight (forced open).
    pub const fn new(retry_after: Option<Duration>) -> Self {
        Self { retry_after }
    }

    /// Time until the breaker lets a probe through, if known.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(f, "circuit open; next probe in {d:?}"),
            None => f.write_str("circuit open"),
        }
    }
}

impl std::error::Error for CircuitOpen {}

/// A retry was refused because the retry budget is spent.
///
/// Only returned when there is no response to hand back instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetExhausted {
    _priv: (),
}

impl BudgetExhausted {
    /// The refusal.
    pub const fn new() -> Self {
        Self { _priv: () }
    }

    /// Budgets refill continuously, so there is no single instant to name.
    pub const fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl fmt::Display for BudgetExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("retry budget exhausted")
    }
}

impl std::error::Error for BudgetExhausted {}

/// Every attempt failed; carries how many were made and the last error.
pub struct RetriesExhausted<E = BoxError> {
    attempts: u32,
    retry_after: Option<Duration>,
    last: E,
}

impl<E> RetriesExhausted<E> {
    /// `attempts` attempts were made (the first one included) and the last
    /// ended in `last`.
    pub const fn new(attempts: u32, last: E) -> Self {
        Self {
            attempts,
            retry_after: None,
            last,
        }
    }

    /// Records the last wait hint the other side gave.
    pub fn with_retry_after(mut self, hint: Option<Duration>) -> Self {
        self.retry_after = hint;
        self
    }

    /// How many attempts were made, the first one included.
    pub const fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The error of the last attempt.
    pub const fn last_error(&self) -> &E {
        &self.last
    }

    /// Takes the error of the last attempt.
    pub fn into_last_error(self) -> E {
        self.last
    }

    /// The last wait the other side asked for, if any.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl<E: fmt::Debug> fmt::Debug for RetriesExhausted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetriesExhausted")
            .field("attempts", &self.attempts)
            .field("retry_after", &self.retry_after)
            .field("last", &self.last)
            .finish()
    }
}

impl<E: fmt::Display> fmt::Display for RetriesExhausted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "retries exhausted after {} attempts: {}",
            self.attempts, self.last
        )
    }
}

impl<E> std::error::Error for RetriesExhausted<E>
where
    E: fmt::Debug + fmt::Display + 'static,
{
    /// The last error, when it is a [`BoxError`] (the layers' error type).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let last: &dyn std::any::Any = &self.last;
        last.downcast_ref::<BoxError>()
            .map(|b| &**b as &(dyn std::error::Error + 'static))
    }
}

/// A configuration was refused when it was built. Says which setting and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidConfig {
    field: &'static str,
    reason: Cow<'static, str>,
}

impl InvalidConfig {
    /// Refuses `field` for `reason`.
    pub fn new(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }

    /// The setting that was refused.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Looks for one of apiguard's refusals in an error and returns the wait it
/// asks for (`None` when the error is none of them, or names no wait).
pub fn refusal_retry_after(err: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    if let Some(e) = err.downcast_ref::<RateLimited>() {
        return e.retry_after();
    }
    if let Some(e) = err.downcast_ref::<CircuitOpen>() {
        return e.retry_after();
    }
    None
}

/// Whether `err` is one of apiguard's own refusals (rate limited, circuit
/// open, budget spent) rather than a failure of the other side.
pub fn is_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    err.is::<RateLimited>() || err.is::<CircuitOpen>() || err.is::<BudgetExhausted>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_downcast_from_box_error() {
        let e: BoxError = Box::new(RateLimited::new(Duration::from_millis(300)));
        assert_eq!(
            e.downcast_ref::<RateLimited>().unwrap().retry_after(),
            Some(Duration::from_millis(300))
        );
        assert!(is_refusal(&*e));
        assert_eq!(refusal_retry_after(&*e), Some(Duration::from_millis(300)));
        let e: BoxError = Box::new(CircuitOpen::new(None));
        assert!(e.is::<CircuitOpen>());
        assert_eq!(refusal_retry_after(&*e), None);
    }

    #[test]
    fn retries_exhausted_exposes_last_error_as_source() {
        let last: BoxError = Box::new(CircuitOpen::new(Some(Duration::from_secs(1))));
        let e = RetriesExhausted::new(3, last);
        assert_eq!(e.attempts(), 3);
        let src = std::error::Error::source(&e).unwrap();
        assert!(src.is::<CircuitOpen>());
        assert_eq!(
            e.to_string(),
            "retries exhausted after 3 attempts: circuit open; next probe in 1s"
        );
    }

    #[test]
    fn invalid_config_names_field_and_reason() {
        let e = InvalidConfig::new("capacity", "must be at least 1");
        assert_eq!(e.to_string(), "invalid `capacity`: must be at least 1");
        assert_eq!(e.field(), "capacity");
    }
}
