//! Outcome classification: what counts as a failure.
//!
//! What counts as failure is the user's decision; the default,
//! [`HttpClassifier`], follows tower-http's `classify` module:
//!
//! | result | outcome |
//! |---|---|
//! | transport error, timeout | [`Outcome::Failure`] |
//! | `5xx` | [`Outcome::Failure`] |
//! | `429 Too Many Requests` | [`Outcome::Ignored`] (configurable) |
//! | other `4xx` | [`Outcome::Ignored`]: the caller's mistake, not the server's |
//! | `1xx`, `2xx`, `3xx` | [`Outcome::Success`] |
//! | an apiguard refusal from an inner layer | [`Outcome::Ignored`]: the call never left |
//!
//! `429` and `503` with `Retry-After` are also *overload signals*
//! ([`overload`]): the retry layer honours them and a breaker may hold itself
//! open for as long as they ask.

use std::time::{Duration, SystemTime};

use http::{Response, StatusCode, header::RETRY_AFTER};

use std::any::Any;

use crate::error::{BoxError, BudgetExhausted, CircuitOpen, RateLimited};
use crate::headers::parse_retry_after;

/// How one call ended, as far as resilience is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The other side did its job.
    Success,
    /// The other side failed; counts against it.
    Failure,
    /// Neither: says nothing about the other side's health.
    Ignored,
}

/// Decides the [`Outcome`] of a call from its result.
pub trait Classify<T, E> {
    /// The outcome of `result`.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// The outcome of a call that ended in `err`: apiguard's own refusals
/// (from an inner layer: the call never left) are [`Outcome::Ignored`],
/// every other error is a [`Outcome::Failure`].
///
/// Works for [`BoxError`] and for concrete error types alike.
pub fn classify_error<E: 'static>(err: &E) -> Outcome {
    let any: &dyn Any = err;
    let refused = match any.downcast_ref::<BoxError>() {
        Some(boxed) => crate::error::is_refusal(&**boxed),
        None => any.is::<RateLimited>() || any.is::<CircuitOpen>() || any.is::<BudgetExhausted>(),
    };
    if refused {
        Outcome::Ignored
    } else {
        Outcome::Failure
    }
}

/// The default HTTP classification (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier {
    too_many_requests_is_failure: bool,
}

impl HttpClassifier {
    /// The defaults: `429` is ignored.
    pub const fn new() -> Self {
        Self {
            too_many_requests_is_failure: false,
        }
    }

    /// Whether a `429 Too Many Requests` counts as a failure (default: no;
    /// the server is healthy, just protecting itself).
    pub const fn too_many_requests_is_failure(mut self, yes: bool) -> Self {
        self.too_many_requests_is_failure = yes;
        self
    }

    /// The outcome of a status code alone.
    pub const fn classify_status(&self, status: StatusCode) -> Outcome {
        let code = status.as_u16();
        if code == 429 {
            if self.too_many_requests_is_failure {
                Outcome::Failure
            } else {
                Outcome::Ignored
            }
        } else if code >= 500 {
            Outcome::Failure
        } else if code >= 400 {
            Outcome::Ignored
        } else {
            Outcome::Success
        }
    }
}

impl<B, E: 'static> Classify<Response<B>, E> for HttpClassifier {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        match result {
            Ok(res) => self.classify_status(res.status()),
            Err(e) => classify_error(e),
        }
    }
}

/// An overload signal from a response: the server asks to be left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overload {
    /// The status that carried it (`429` or `503`).
    pub status: StatusCode,
    /// The wait the server asked for, if it named one.
    pub retry_after: Option<Duration>,
}

/// Recognises `429` (with or without `Retry-After`) and `503` with
/// `Retry-After` as overload signals.
pub fn overload<B>(res: &Response<B>, now: SystemTime) -> Option<Overload> {
    let status = res.status();
    let retry_after = res
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, now));
    match status {
        StatusCode::TOO_MANY_REQUESTS => Some(Overload {
            status,
            retry_after,
        }),
        StatusCode::SERVICE_UNAVAILABLE if retry_after.is_some() => Some(Overload {
            status,
            retry_after,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(code: u16) -> Result<Response<()>, BoxError> {
        Ok(Response::builder().status(code).body(()).unwrap())
    }

    #[test]
    fn http_defaults() {
        let c = HttpClassifier::new();
        assert_eq!(c.classify(&res(200)), Outcome::Success);
        assert_eq!(c.classify(&res(302)), Outcome::Success);
        assert_eq!(c.classify(&res(404)), Outcome::Ignored);
        assert_eq!(c.classify(&res(429)), Outcome::Ignored);
        assert_eq!(c.classify(&res(500)), Outcome::Failure);
        assert_eq!(c.classify(&res(503)), Outcome::Failure);
        let c = c.too_many_requests_is_failure(true);
        assert_eq!(c.classify(&res(429)), Outcome::Failure);
    }

    #[test]
    fn transport_errors_fail_and_refusals_are_ignored() {
        let c = HttpClassifier::new();
        let io: Result<Response<()>, BoxError> = Err(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(c.classify(&io), Outcome::Failure);
        let refused: Result<Response<()>, BoxError> =
            Err(Box::new(RateLimited::new(Duration::from_secs(1))));
        assert_eq!(c.classify(&refused), Outcome::Ignored);
        let open: Result<Response<()>, std::io::Error> =
            Err(std::io::Error::other(CircuitOpen::new(None).to_string()));
        assert_eq!(c.classify(&open), Outcome::Failure);
    }

    #[test]
    fn overload_signals() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let r = Response::builder().status(429).body(()).unwrap();
        assert_eq!(overload(&r, now).unwrap().retry_after, None);
        let r = Response::builder()
            .status(503)
            .header("retry-after", "7")
            .body(())
            .unwrap();
        assert_eq!(
            overload(&r, now).unwrap().retry_after,
            Some(Duration::from_secs(7))
        );
        let r = Response::builder().status(503).body(()).unwrap();
        assert!(overload(&r, now).is_none());
        let r = Response::builder().status(500).body(()).unwrap();
        assert!(overload(&r, now).is_none());
    }
}
