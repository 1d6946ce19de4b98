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

/// The policy a rate limit advertises in the `RateLimit-Policy` field:
/// `limit` units per `window`.
///
/// This is what a refusal ([`RateLimited::policy`]) and a grant report, for
/// the response headers; a limit is *configured* with a
/// [`Quota`](crate::Quota), which also says how bursts refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotaPolicy {
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
    policy: Option<QuotaPolicy>,
}

impl RateLimited {
    /// A refusal that asks the caller to wait `wait`.
    pub const fn new(wait: Duration) -> Self {
        Self { wait, policy: None }
    }

    /// Attaches the policy that refused, so servers can advertise it.
    pub const fn with_policy(mut self, policy: QuotaPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// How long to wait before the requested tokens are available.
    pub const fn retry_after(&self) -> Option<Duration> {
        Some(self.wait)
    }

    /// The policy that refused, when the limiter knows it.
    pub const fn policy(&self) -> Option<QuotaPolicy> {
        self.policy
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
    /// The last error, so a walk down `source()` reaches the cause.
    ///
    /// `E` carries no `Error` bound (the retry loop of `apiguard-retry`
    /// takes any error, `&str` included), so the last error is found by its
    /// type: a boxed error in any of its three forms (`BoxError`, the
    /// layers' error type, `Box<dyn Error + Send>`, `Box<dyn Error>`), one
    /// of apiguard's refusals, `InvalidConfig` or `std::io::Error`. Any
    /// other `E` has no source; box it to keep the chain.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        as_error(&self.last)
    }
}

/// `value` as an error, when its type is one [`RetriesExhausted::source`]
/// knows.
fn as_error<E: 'static>(value: &E) -> Option<&(dyn std::error::Error + 'static)> {
    use std::error::Error;
    let any: &dyn std::any::Any = value;
    if let Some(b) = any.downcast_ref::<BoxError>() {
        return Some(&**b);
    }
    if let Some(b) = any.downcast_ref::<Box<dyn Error + Send>>() {
        return Some(&**b);
    }
    if let Some(b) = any.downcast_ref::<Box<dyn Error>>() {
        return Some(&**b);
    }
    fn known<T: Error + 'static>(any: &dyn std::any::Any) -> Option<&(dyn Error + 'static)> {
        any.downcast_ref::<T>().map(|e| e as &(dyn Error + 'static))
    }
    known::<RateLimited>(any)
        .or_else(|| known::<CircuitOpen>(any))
        .or_else(|| known::<BudgetExhausted>(any))
        .or_else(|| known::<MissingKey>(any))
        .or_else(|| known::<InvalidConfig>(any))
        .or_else(|| known::<std::io::Error>(any))
}

/// A keyed rate limit found no key in a request (no peer address recorded,
/// no such header…), so it did not let the request past the limit.
///
/// Whether that is the client's fault or the server's set-up is the
/// server's choice, made on the keyed layer: by default it is a set-up
/// problem, which [`RejectionResponseLayer`](crate::RejectionResponseLayer)
/// answers with `500` (and logs, with [`hint`](Self::hint) saying what to
/// fix); [`bad_request`](Self::bad_request) makes it the client's, answered
/// `400 Bad Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MissingKey {
    hint: Option<&'static str>,
    bad_request: bool,
}

impl MissingKey {
    /// The error, as a set-up problem with no hint.
    pub const fn new() -> Self {
        Self {
            hint: None,
            bad_request: false,
        }
    }

    /// Adds what the server should check (shown in `Display`).
    pub const fn with_hint(mut self, hint: &'static str) -> Self {
        self.hint = Some(hint);
        self
    }

    /// Makes it the client's fault: answered `400 Bad Request`.
    pub const fn bad_request(mut self) -> Self {
        self.bad_request = true;
        self
    }

    /// Whether it is answered `400` (the client's fault) rather than `500`.
    pub const fn is_bad_request(&self) -> bool {
        self.bad_request
    }

    /// What the server should check, when the extractor knows.
    pub const fn hint(&self) -> Option<&'static str> {
        self.hint
    }
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no rate-limit key in request")?;
        match self.hint {
            Some(hint) => write!(f, ": {hint}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for MissingKey {}

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
    fn retries_exhausted_chains_to_every_boxed_or_known_last_error() {
        fn source_of<E: fmt::Debug + fmt::Display + 'static>(last: E) -> Option<String> {
            let e = RetriesExhausted::new(2, last);
            std::error::Error::source(&e).map(ToString::to_string)
        }
        let open = CircuitOpen::new(None);
        assert_eq!(
            source_of::<BoxError>(Box::new(open)).as_deref(),
            Some("circuit open")
        );
        let send: Box<dyn std::error::Error + Send> = Box::new(open);
        assert_eq!(source_of(send).as_deref(), Some("circuit open"));
        let plain: Box<dyn std::error::Error> = Box::new(open);
        assert_eq!(source_of(plain).as_deref(), Some("circuit open"));
        assert_eq!(source_of(open).as_deref(), Some("circuit open"));
        let io = std::io::Error::other("reset");
        assert_eq!(source_of(io).as_deref(), Some("reset"));
        // Not an error type: nothing to chain to.
        assert_eq!(source_of("flaky"), None);
    }

    #[test]
    fn missing_key_says_what_to_fix_and_whose_fault_it_is() {
        let e = MissingKey::new();
        assert_eq!(e.to_string(), "no rate-limit key in request");
        assert!(!e.is_bad_request());
        let e = e.with_hint("send `x-api-key`").bad_request();
        assert_eq!(
            e.to_string(),
            "no rate-limit key in request: send `x-api-key`"
        );
        assert!(e.is_bad_request());
        assert_eq!(e.hint(), Some("send `x-api-key`"));
    }

    #[test]
    fn invalid_config_names_field_and_reason() {
        let e = InvalidConfig::new("capacity", "must be at least 1");
        assert_eq!(e.to_string(), "invalid `capacity`: must be at least 1");
        assert_eq!(e.field(), "capacity");
    }
}
