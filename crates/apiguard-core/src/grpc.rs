//! gRPC: status codes, server pushback, and what a gRPC outcome means for
//! a breaker.
//!
//! ```
//! use apiguard_core::grpc::{Code, GrpcClassifier, Pushback, is_grpc};
//! use apiguard_core::{Classify, Outcome};
//! use std::time::Duration;
//!
//! // A trailers-only answer: HTTP 200, the gRPC status in the headers.
//! let res = http::Response::builder()
//!     .header("content-type", "application/grpc")
//!     .header("grpc-status", "14")
//!     .header("grpc-retry-pushback-ms", "250")
//!     .body(())?;
//! assert!(is_grpc(res.headers()));
//! assert_eq!(Code::from_headers(res.headers()), Some(Code::Unavailable));
//! assert_eq!(Pushback::from_headers(res.headers()), Some(Pushback::After(Duration::from_millis(250))));
//! let ok: Result<_, apiguard_core::BoxError> = Ok(res);
//! assert_eq!(GrpcClassifier::new().classify(&ok), Outcome::Failure);
//! # Ok::<(), http::Error>(())
//! ```
//!
//! A gRPC call answers HTTP `200` even when it fails: its outcome is the
//! `grpc-status` field, sent in the response headers when the server fails
//! the call before any message (a *trailers-only* response) and in the
//! trailers, after the body, otherwise. [`GrpcClassifier`] reads it from
//! either.
//!
//! # What each code means
//!
//! The breaker asks whether the server is healthy; the retry layer asks
//! whether a second attempt may succeed. Retry follows gRPC's retry design
//! (gRFC A6): only the codes the policy lists are retried (by default
//! `UNAVAILABLE` alone, see `apiguard_retry::RetryPolicyBuilder::grpc`),
//! `grpc-retry-pushback-ms` replaces the backoff, and a negative or
//! malformed pushback means "do not retry". The breaker's table:
//!
//! | code | [`Outcome`] | why |
//! |---|---|---|
//! | `OK` | `Success` | |
//! | `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS` | `Failure` | the server is down, too slow, or broken |
//! | `RESOURCE_EXHAUSTED` | `Ignored` (configurable) | throttling: the server is healthy and protecting itself, as with HTTP `429`; its pushback paces the host instead |
//! | `CANCELLED` | `Ignored` | usually the caller gave up; says nothing about the server |
//! | `INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`, `PERMISSION_DENIED`, `UNAUTHENTICATED`, `FAILED_PRECONDITION`, `ABORTED`, `OUT_OF_RANGE`, `UNIMPLEMENTED` | `Success` | the server answered the call: the caller's mistake, not the server's |
//!
//! A response that is not HTTP `200` is mapped to a code as gRPC's
//! "HTTP to gRPC status code mapping" says (`429`, `502`, `503`, `504` →
//! `UNAVAILABLE`, `401` → `UNAUTHENTICATED`, `403` → `PERMISSION_DENIED`,
//! `404` → `UNIMPLEMENTED`, `400` → `INTERNAL`, others → `UNKNOWN`);
//! transport errors and timeouts are failures, apiguard's own refusals are
//! ignored, as in [`HttpClassifier`](crate::HttpClassifier).

use std::fmt;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::classify::{Classify, Outcome, classify_error};

/// `grpc-status`: the call's status code, in the headers of a
/// trailers-only response or in the trailers.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`: a status message for a person (percent-encoded).
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-retry-pushback-ms`: gRPC's `Retry-After` (gRFC A6).
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The content type of a gRPC message stream.
pub const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// Whether a request or response with these headers is gRPC: its
/// content type is `application/grpc`, alone or with a `+proto`, `+json`,
/// … suffix or parameters.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// The 17 status codes of gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Code {
    /// `0`: not an error.
    Ok = 0,
    /// `1`: the call was cancelled, typically by the caller.
    Cancelled = 1,
    /// `2`: an unknown error (also the code of any unknown number).
    Unknown = 2,
    /// `3`: the caller sent an invalid argument.
    InvalidArgument = 3,
    /// `4`: the deadline passed before the call completed.
    DeadlineExceeded = 4,
    /// `5`: something requested was not found.
    NotFound = 5,
    /// `6`: something the caller tried to create exists already.
    AlreadyExists = 6,
    /// `7`: the caller may not do this.
    PermissionDenied = 7,
    /// `8`: a resource (a quota, a rate limit) is exhausted.
    ResourceExhausted = 8,
    /// `9`: the system is not in the state the call needs.
    FailedPrecondition = 9,
    /// `10`: the call was aborted (a conflict, typically).
    Aborted = 10,
    /// `11`: an operation past the valid range.
    OutOfRange = 11,
    /// `12`: the server does not implement this method.
    Unimplemented = 12,
    /// `13`: an internal error of the server.
    Internal = 13,
    /// `14`: the service is unavailable for now.
    Unavailable = 14,
    /// `15`: unrecoverable data loss or corruption.
    DataLoss = 15,
    /// `16`: the caller is not authenticated.
    Unauthenticated = 16,
}

impl Code {
    const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code of number `n`; numbers gRPC does not define are
    /// [`Code::Unknown`], as the gRPC specification asks.
    pub const fn from_i32(n: i32) -> Code {
        if n >= 0 && n < 17 {
            Self::ALL[n as usize]
        } else {
            Code::Unknown
        }
    }

    /// The code's number.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// Parses a `grpc-status` value: ASCII digits; anything else, or a
    /// number gRPC does not define, is [`Code::Unknown`].
    pub fn parse(value: &[u8]) -> Code {
        if value.is_empty() || value.len() > 3 || !value.iter().all(u8::is_ascii_digit) {
            return Code::Unknown;
        }
        let n = value.iter().fold(0i32, |n, d| n * 10 + i32::from(d - b'0'));
        Code::from_i32(n)
    }

    /// The `grpc-status` field of `headers` (a trailers-only response's
    /// headers, or trailers), if there is one.
    pub fn from_headers(headers: &HeaderMap) -> Option<Code> {
        headers.get(GRPC_STATUS).map(|v| Code::parse(v.as_bytes()))
    }

    /// The code gRPC gives a response whose HTTP status is not `200`
    /// (gRPC's "HTTP to gRPC status code mapping").
    pub const fn from_http_status(status: StatusCode) -> Code {
        match status.as_u16() {
            200 => Code::Ok,
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }

    /// The status of a response from its headers alone: `grpc-status` when
    /// the headers carry it (trailers-only), the mapped HTTP status when
    /// that is not `200`, and `None` when the status is still to come in
    /// the trailers.
    pub fn of_response<B>(res: &Response<B>) -> Option<Code> {
        match Code::from_headers(res.headers()) {
            Some(code) => Some(code),
            None if res.status() != StatusCode::OK => Some(Code::from_http_status(res.status())),
            None => None,
        }
    }

    /// The code as a `grpc-status` value.
    pub fn to_header_value(self) -> HeaderValue {
        let mut buf = itoa::Buffer::new();
        HeaderValue::from_str(buf.format(self.as_i32()))
            .unwrap_or_else(|_| unreachable!("digits are a valid header value"))
    }

    /// The code's name as gRPC writes it (`UNAVAILABLE`).
    pub const fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_i32())
    }
}

/// What a `grpc-retry-pushback-ms` field asks (gRFC A6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Retry no sooner than this (a non-negative integer of milliseconds).
    After(Duration),
    /// Do not retry: the value was negative or malformed, which A6 reads
    /// as the server asking for no retry at all.
    DoNotRetry,
}

impl Pushback {
    /// Parses a value. A number too large for a `u64` of milliseconds is
    /// read as the longest wait (and bounded by whoever honours it).
    pub fn parse(value: &[u8]) -> Pushback {
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Pushback::DoNotRetry;
        }
        let ms = value.iter().try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        });
        Pushback::After(Duration::from_millis(ms.unwrap_or(u64::MAX)))
    }

    /// The `grpc-retry-pushback-ms` field of `headers`, if there is one.
    pub fn from_headers(headers: &HeaderMap) -> Option<Pushback> {
        headers
            .get(GRPC_RETRY_PUSHBACK_MS)
            .map(|v| Pushback::parse(v.as_bytes()))
    }

    /// The wait, or `None` for [`Pushback::DoNotRetry`].
    pub fn wait(self) -> Option<Duration> {
        match self {
            Pushback::After(d) => Some(d),
            Pushback::DoNotRetry => None,
        }
    }

    /// `wait` as a `grpc-retry-pushback-ms` value, rounded up to whole
    /// milliseconds (never `0` for a wait of a few microseconds).
    pub fn format(wait: Duration) -> HeaderValue {
        let ms = wait.as_nanos().div_ceil(1_000_000);
        let ms = u64::try_from(ms).unwrap_or(u64::MAX);
        let mut buf = itoa::Buffer::new();
        HeaderValue::from_str(buf.format(ms))
            .unwrap_or_else(|_| unreachable!("digits are a valid header value"))
    }
}

/// gRPC's classification for breakers (see the [module docs](self) for
/// the table).
///
/// [`classify`](Classify::classify) sees a response's headers only: a
/// trailers-only response's status, or a mapped HTTP status. A status that
/// arrives in the trailers is not known yet then, and the response counts
/// as a [`Outcome::Success`] (the server answered); to classify the
/// trailers, call [`classify_trailers`](Self::classify_trailers) when the
/// body ends, as apiguard's `GuardLayer` in gRPC mode does.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClassifier {
    resource_exhausted_is_failure: bool,
}

impl GrpcClassifier {
    /// The defaults of the table.
    pub const fn new() -> Self {
        Self {
            resource_exhausted_is_failure: false,
        }
    }

    /// Whether `RESOURCE_EXHAUSTED` counts as a failure (default: no; the
    /// server is healthy, just protecting itself).
    pub const fn resource_exhausted_is_failure(mut self, yes: bool) -> Self {
        self.resource_exhausted_is_failure = yes;
        self
    }

    /// The outcome of a status code.
    pub const fn classify_code(&self, code: Code) -> Outcome {
        match code {
            Code::Ok => Outcome::Success,
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unknown
            | Code::DataLoss => Outcome::Failure,
            Code::ResourceExhausted if self.resource_exhausted_is_failure => Outcome::Failure,
            Code::ResourceExhausted | Code::Cancelled => Outcome::Ignored,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated => Outcome::Success,
        }
    }

    /// The outcome of a response's trailers; trailers without
    /// `grpc-status` (or no trailers at all: pass an empty map) are a
    /// broken response, `UNKNOWN`, a failure.
    pub fn classify_trailers(&self, trailers: &HeaderMap) -> Outcome {
        self.classify_code(Code::from_headers(trailers).unwrap_or(Code::Unknown))
    }
}

impl<B, E: 'static> Classify<Response<B>, E> for GrpcClassifier {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        match result {
            Ok(res) => match Code::of_response(res) {
                Some(code) => self.classify_code(code),
                None => Outcome::Success,
            },
            Err(e) => classify_error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{BoxError, RateLimited};

    fn res(status: u16, grpc: Option<&str>) -> Result<Response<()>, BoxError> {
        let mut b = Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/grpc");
        if let Some(g) = grpc {
            b = b.header(GRPC_STATUS, g);
        }
        Ok(b.body(()).unwrap())
    }

    #[test]
    fn every_code_round_trips_through_its_number_and_header_value() {
        for (n, code) in Code::ALL.iter().enumerate() {
            assert_eq!(code.as_i32(), n as i32);
            assert_eq!(Code::from_i32(n as i32), *code);
            assert_eq!(Code::parse(code.to_header_value().as_bytes()), *code);
        }
        assert_eq!(Code::from_i32(17), Code::Unknown);
        assert_eq!(Code::from_i32(-1), Code::Unknown);
        for bad in ["", "x", "14 ", "-1", "1400", "99"] {
            assert_eq!(Code::parse(bad.as_bytes()), Code::Unknown, "{bad:?}");
        }
        assert_eq!(Code::Unavailable.to_string(), "UNAVAILABLE (14)");
    }

    #[test]
    fn pushback_is_a_non_negative_integer_else_do_not_retry() {
        assert_eq!(
            Pushback::parse(b"1500"),
            Pushback::After(Duration::from_millis(1500))
        );
        assert_eq!(Pushback::parse(b"0"), Pushback::After(Duration::ZERO));
        for bad in ["-1", "", "1.5", "soon", " 10", "+5"] {
            assert_eq!(
                Pushback::parse(bad.as_bytes()),
                Pushback::DoNotRetry,
                "{bad:?}"
            );
        }
        assert_eq!(
            Pushback::parse(b"99999999999999999999999"),
            Pushback::After(Duration::from_millis(u64::MAX))
        );
        assert_eq!(Pushback::format(Duration::from_micros(1)), "1");
        assert_eq!(Pushback::format(Duration::from_millis(250)), "250");
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, yes) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/json", false),
            ("application/grp", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), yes, "{ct}");
        }
    }

    #[test]
    fn the_breaker_table() {
        let c = GrpcClassifier::new();
        assert_eq!(c.classify(&res(200, Some("0"))), Outcome::Success);
        for failure in ["14", "4", "13", "2", "15", "77"] {
            assert_eq!(
                c.classify(&res(200, Some(failure))),
                Outcome::Failure,
                "{failure}"
            );
        }
        for caller in ["3", "5", "6", "7", "9", "10", "11", "12", "16"] {
            assert_eq!(
                c.classify(&res(200, Some(caller))),
                Outcome::Success,
                "{caller}"
            );
        }
        assert_eq!(c.classify(&res(200, Some("8"))), Outcome::Ignored);
        assert_eq!(c.classify(&res(200, Some("1"))), Outcome::Ignored);
        let strict = c.resource_exhausted_is_failure(true);
        assert_eq!(strict.classify(&res(200, Some("8"))), Outcome::Failure);
        // The status is still to come in the trailers.
        assert_eq!(c.classify(&res(200, None)), Outcome::Success);
        // HTTP statuses are mapped.
        assert_eq!(c.classify(&res(503, None)), Outcome::Failure);
        assert_eq!(c.classify(&res(401, None)), Outcome::Success);
        // Errors as in HTTP.
        let refused: Result<Response<()>, BoxError> =
            Err(Box::new(RateLimited::new(Duration::from_secs(1))));
        assert_eq!(c.classify(&refused), Outcome::Ignored);
        let io: Result<Response<()>, BoxError> = Err(Box::new(std::io::Error::other("reset")));
        assert_eq!(c.classify(&io), Outcome::Failure);
    }

    #[test]
    fn trailers_are_classified_and_a_missing_status_is_a_failure() {
        let c = GrpcClassifier::new();
        let mut t = HeaderMap::new();
        assert_eq!(c.classify_trailers(&t), Outcome::Failure);
        t.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(c.classify_trailers(&t), Outcome::Success);
        t.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        assert_eq!(c.classify_trailers(&t), Outcome::Failure);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32)) {
            let _ = Code::parse(&bytes);
            let _ = Pushback::parse(&bytes);
        }
    }
}
