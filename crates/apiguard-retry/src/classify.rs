//! Which errors are worth retrying, and which requests may be repeated.

use std::error::Error;
use std::io;
use std::time::{Duration, SystemTime};

use apiguard_core::headers::{parse_retry_after, ratelimit_reset};
use apiguard_core::{BudgetExhausted, CircuitOpen, RateLimited};
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, Method};

/// `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// What an error says about retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// An apiguard refusal from an inner layer (the request never left),
    /// with the wait it asks for.
    Refused(Option<Duration>),
    /// The request provably never reached the server (connection refused,
    /// connect failure): safe to retry whatever the method.
    NeverSent,
    /// A transient failure after the request may have been sent (reset,
    /// timeout, connection closed early): retry only if repeatable.
    Transient,
    /// Anything else: not retried.
    Other,
}

/// Classifies an error by walking its `source()` chain. See the crate docs
/// ("Which errors are retried") for the list.
pub(crate) fn classify_error(err: &(dyn Error + 'static)) -> ErrorClass {
    let mut transient = false;
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<RateLimited>() {
            return ErrorClass::Refused(r.retry_after());
        }
        if let Some(c) = e.downcast_ref::<CircuitOpen>() {
            return ErrorClass::Refused(c.retry_after());
        }
        if e.is::<BudgetExhausted>() {
            return ErrorClass::Refused(None);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return ErrorClass::NeverSent,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected
                | io::ErrorKind::TimedOut
                | io::ErrorKind::UnexpectedEof => transient = true,
                _ => {}
            }
        }
        if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
            transient = true;
        }
        // hyper and hyper-util errors are opaque and we do not depend on
        // hyper; their messages are stable and name the kind.
        match hyper_kind(e) {
            Some(ErrorClass::NeverSent) => return ErrorClass::NeverSent,
            Some(_) => transient = true,
            None => {}
        }
        cur = e.source();
    }
    if transient {
        ErrorClass::Transient
    } else {
        ErrorClass::Other
    }
}

fn hyper_kind(e: &(dyn Error + 'static)) -> Option<ErrorClass> {
    // Exact matches only: these are the whole messages of hyper's and
    // hyper-util's error kinds, unlikely to be an unrelated error's.
    let msg = e.to_string();
    match msg.as_str() {
        // hyper_util::client::legacy::Error, kind Connect: no connection.
        "client error (Connect)" => Some(ErrorClass::NeverSent),
        // hyper::Error kinds where the connection died under the request.
        "connection closed before message completed"
        | "operation was canceled"
        | "client error (Canceled)"
        | "connection error" => Some(ErrorClass::Transient),
        _ => None,
    }
}

/// Whether RFC 9110 §9.2.2 calls `method` idempotent.
pub(crate) fn is_idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request may be sent twice: an idempotent method, or an
/// `Idempotency-Key` header.
pub(crate) fn is_repeatable(method: &Method, headers: &HeaderMap) -> bool {
    is_idempotent_method(method) || headers.contains_key(IDEMPOTENCY_KEY)
}

/// The wait a response asks for: the longer of `Retry-After` (either form)
/// and the `RateLimit` field's `t` for an exhausted policy.
pub(crate) fn response_hint(headers: &HeaderMap) -> Option<Duration> {
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let reset = if headers.contains_key(apiguard_core::headers::RATELIMIT) {
        ratelimit_reset(headers)
    } else {
        None
    };
    retry_after.max(reset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::BoxError;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] BoxError);

    #[test]
    fn io_kinds_in_the_chain_are_recognised() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(classify_error(&refused), ErrorClass::NeverSent);
        let reset = Wrapped(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert_eq!(classify_error(&reset), ErrorClass::Transient);
        let other = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(classify_error(&other), ErrorClass::Other);
    }

    #[test]
    fn timeouts_are_transient() {
        let e: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(classify_error(&*e), ErrorClass::Transient);
    }

    #[test]
    fn refusals_carry_their_wait() {
        let e = Wrapped(Box::new(RateLimited::new(Duration::from_secs(2))));
        assert_eq!(
            classify_error(&e),
            ErrorClass::Refused(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            classify_error(&CircuitOpen::new(None)),
            ErrorClass::Refused(None)
        );
        assert_eq!(
            classify_error(&BudgetExhausted::new()),
            ErrorClass::Refused(None)
        );
    }

    #[test]
    fn idempotency_rules() {
        let none = HeaderMap::new();
        for m in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(is_repeatable(&m, &none));
        }
        assert!(!is_repeatable(&Method::POST, &none));
        assert!(!is_repeatable(&Method::PATCH, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY, "abc".parse().unwrap());
        assert!(is_repeatable(&Method::POST, &keyed));
    }

    #[test]
    fn hint_takes_the_longer_of_retry_after_and_ratelimit() {
        let mut h = HeaderMap::new();
        assert_eq!(response_hint(&h), None);
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(response_hint(&h), Some(Duration::from_secs(2)));
        h.insert(
            apiguard_core::headers::RATELIMIT,
            "\"default\";r=0;t=5".parse().unwrap(),
        );
        assert_eq!(response_hint(&h), Some(Duration::from_secs(5)));
    }

    proptest::proptest! {
        #[test]
        fn hints_from_any_header_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
                let mut h = HeaderMap::new();
                h.insert(RETRY_AFTER, v.clone());
                h.insert(apiguard_core::headers::RATELIMIT, v);
                let _ = response_hint(&h);
            }
        }
    }
}
