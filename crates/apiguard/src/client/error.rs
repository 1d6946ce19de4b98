//! Error types: [`ClientError`], its [`ErrorKind`], and [`StatusError`].

use std::fmt;
use std::time::Duration;

use apiguard_core::{BoxError, BudgetExhausted, CircuitOpen, RateLimited, RetriesExhausted};
use http::{Response, StatusCode};

/// A status [`error_for_status`](super::GuardedClientBuilder::error_for_status)
/// turns into an error.
pub(super) fn is_error_status(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// A final status the stats count as a failed request.
pub(super) fn fails_request(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// What went wrong, in the terms a caller acts on.
///
/// When retries ran out, the kind is that of the last attempt's error (an
/// open circuit, a timeout, a transport error…);
/// [`ClientError::retries_exhausted`] says that retries ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No token came within `max_wait`; see [`ClientError::retry_after`].
    RateLimited,
    /// The host's circuit is open; see [`ClientError::retry_after`].
    CircuitOpen,
    /// The retry budget refused to retry a failure.
    BudgetExhausted,
    /// The attempt or total timeout elapsed.
    Timeout,
    /// The connection failed (refused, reset, closed early...).
    Transport,
    /// The request could not be built (a bad URL).
    InvalidRequest,
    /// The final response had a `4xx` or `5xx` status, and the client was
    /// built with [`error_for_status`](super::GuardedClientBuilder::error_for_status);
    /// see [`ClientError::status`].
    Status,
}

pub(super) const KINDS: usize = ErrorKind::Status as usize + 1;

/// The error of a [`GuardedClient`](super::GuardedClient) request.
///
/// The questions a caller asks — [`kind`](Self::kind),
/// [`is_circuit_open`](Self::is_circuit_open),
/// [`is_rate_limited`](Self::is_rate_limited),
/// [`retry_after`](Self::retry_after) — are answered from the cause: when
/// retries ran out, from the last attempt's error. `Display` reads
/// `retries exhausted after 3 attempts: circuit open; next probe in 4s`,
/// and [`source`](std::error::Error::source) walks down the same chain.
pub struct ClientError {
    kind: ErrorKind,
    pub(super) source: BoxError,
}

impl ClientError {
    pub(super) fn invalid(msg: String) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            source: msg.into(),
        }
    }

    pub(super) fn from_box(source: BoxError) -> Self {
        Self {
            kind: kind_of(&*source),
            source,
        }
    }

    pub(super) fn from_status<B>(res: &Response<B>) -> Self {
        let retry_after = res.headers().get(http::header::RETRY_AFTER).and_then(|v| {
            apiguard_core::headers::parse_retry_after(v, std::time::SystemTime::now())
        });
        Self {
            kind: ErrorKind::Status,
            source: Box::new(StatusError {
                status: res.status(),
                retry_after,
            }),
        }
    }

    /// What kind of failure this is (of the last attempt, when retries ran
    /// out).
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The error of the last attempt when retries ran out, otherwise the
    /// error itself.
    pub fn cause(&self) -> &(dyn std::error::Error + 'static) {
        cause_of(&*self.source)
    }

    /// The wait the limiter, the breaker or the server asked for, if any:
    /// the last one the server sent when retries ran out, else the last
    /// refusal's.
    pub fn retry_after(&self) -> Option<Duration> {
        let hint = self
            .source
            .downcast_ref::<RetriesExhausted>()
            .and_then(RetriesExhausted::retry_after);
        if hint.is_some() {
            return hint;
        }
        let cause = self.cause();
        if let Some(s) = cause.downcast_ref::<StatusError>() {
            return s.retry_after();
        }
        apiguard_core::error::refusal_retry_after(cause)
    }

    /// Attempts made, when retries ran out.
    pub fn attempts(&self) -> Option<u32> {
        self.source
            .downcast_ref::<RetriesExhausted>()
            .map(RetriesExhausted::attempts)
    }

    /// Whether the request was retried until the retries (or the deadline)
    /// ran out; [`kind`](Self::kind) is then the last attempt's.
    pub fn retries_exhausted(&self) -> bool {
        self.source.is::<RetriesExhausted>()
    }

    /// The status of the final response, for an error of kind
    /// [`ErrorKind::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        self.source.downcast_ref::<StatusError>().map(|s| s.status)
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }

    /// Whether the request was refused for rate limiting (the last attempt
    /// was, when retries ran out).
    pub fn is_rate_limited(&self) -> bool {
        self.kind == ErrorKind::RateLimited
    }

    /// Whether the request was refused by an open circuit (the last attempt
    /// was, when retries ran out).
    pub fn is_circuit_open(&self) -> bool {
        self.kind == ErrorKind::CircuitOpen
    }

    /// Whether a timeout elapsed.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }
}

/// The last attempt's error inside a [`RetriesExhausted`], or `e` itself.
fn cause_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> &'a (dyn std::error::Error + 'static) {
    match e.downcast_ref::<RetriesExhausted>() {
        Some(r) => &**r.last_error(),
        None => e,
    }
}

/// The kind of `e`, read from its cause.
pub(crate) fn kind_of(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let e = cause_of(e);
    if e.is::<RateLimited>() {
        ErrorKind::RateLimited
    } else if e.is::<CircuitOpen>() {
        ErrorKind::CircuitOpen
    } else if e.is::<BudgetExhausted>() {
        ErrorKind::BudgetExhausted
    } else if e.is::<tower::timeout::error::Elapsed>() {
        ErrorKind::Timeout
    } else if e.is::<StatusError>() {
        ErrorKind::Status
    } else {
        ErrorKind::Transport
    }
}

impl fmt::Debug for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A final response whose status is an error, as
/// [`error_for_status`](super::GuardedClientBuilder::error_for_status) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusError {
    status: StatusCode,
    retry_after: Option<Duration>,
}

impl StatusError {
    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's `Retry-After`, if it had one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server answered {}", self.status)
    }
}

impl std::error::Error for StatusError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn exhausted(last: BoxError) -> ClientError {
        let e = RetriesExhausted::new(4, last).with_retry_after(None);
        ClientError::from_box(Box::new(e))
    }

    #[test]
    fn the_last_cause_inside_retries_exhausted_answers() {
        let err = exhausted(Box::new(RateLimited::new(Duration::from_millis(1500))));
        assert_eq!(err.kind(), ErrorKind::RateLimited);
        assert!(err.is_rate_limited() && !err.is_circuit_open());
        assert!(err.retries_exhausted());
        assert_eq!(err.attempts(), Some(4));
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));

        let err = exhausted(Box::new(tower::timeout::error::Elapsed::new()));
        assert!(err.is_timeout());
        assert_eq!(err.retry_after(), None);

        let err = exhausted("connection reset".into());
        assert_eq!(err.kind(), ErrorKind::Transport);
        assert_eq!(
            err.to_string(),
            "retries exhausted after 4 attempts: connection reset"
        );
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.source().unwrap().to_string(), "connection reset");
    }

    #[test]
    fn a_server_hint_kept_by_retry_wins_over_the_last_refusal() {
        let e = RetriesExhausted::new(
            2,
            Box::new(CircuitOpen::new(Some(Duration::from_secs(9)))) as BoxError,
        )
        .with_retry_after(Some(Duration::from_secs(3)));
        let err = ClientError::from_box(Box::new(e));
        assert!(err.is_circuit_open());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn error_status_reads_retry_after_and_says_the_status() {
        let res = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header(http::header::RETRY_AFTER, "12")
            .body(())
            .unwrap();
        let err = ClientError::from_status(&res);
        assert_eq!(err.kind(), ErrorKind::Status);
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(err.retry_after(), Some(Duration::from_secs(12)));
        assert_eq!(
            err.to_string(),
            "the server answered 503 Service Unavailable"
        );
        assert!(fails_request(StatusCode::TOO_MANY_REQUESTS));
        assert!(fails_request(StatusCode::BAD_GATEWAY));
        assert!(!fails_request(StatusCode::NOT_FOUND));
        assert!(is_error_status(StatusCode::NOT_FOUND));
    }
}
