//! The key extractor: which bucket or breaker a request belongs to.
//!
//! The keyed rate limit (`KeyedRateLimitLayer` in `apiguard-ratelimit`) and
//! the keyed breaker (`KeyedCircuitBreakerLayer` in `apiguard-breaker`)
//! take the same trait, so one extractor (the request's host, a header, the
//! peer's address …) keys both.
//!
//! ```
//! use apiguard_core::KeyExtractor;
//! use http::Request;
//!
//! // Any `Fn(&Req) -> Option<K>` is an extractor.
//! let tenant = |req: &Request<()>| {
//!     req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).map(str::to_owned)
//! };
//! let req = Request::builder().header("x-tenant", "acme").body(()).unwrap();
//! assert_eq!(tenant.extract(&req).as_deref(), Some("acme"));
//! assert_eq!(tenant.extract(&Request::new(())), None);
//! ```
//!
//! # A request without a key
//!
//! `None` means "this request names no key". The layers decide what that
//! means, each as its pattern needs:
//!
//! - a keyed **rate limit** refuses it with [`MissingKey`] by default (so
//!   nothing gets past the limit unnoticed), or, as configured, answers
//!   `400` or charges a bucket all keyless requests share;
//! - a keyed **breaker** lets it through unguarded: a breaker protects the
//!   upstream a key names, and a request that names none has no breaker to
//!   trip. An extractor that wants such requests guarded together returns a
//!   key for them (as `HostKey`'s `Option<Authority>` key does, whose
//!   `None` is one shared breaker).

use crate::error::MissingKey;

/// Finds the key of a request (`Req` is the whole request type, usually
/// `http::Request<B>`).
///
/// Closures `Fn(&Req) -> Option<K>` are extractors.
pub trait KeyExtractor<Req: ?Sized> {
    /// The key type.
    type Key;

    /// The key of `req`, or `None` when it names none (see
    /// [the module docs](self#a-request-without-a-key)).
    fn extract(&self, req: &Req) -> Option<Self::Key>;

    /// The error for a request [`extract`](Self::extract) found no key in,
    /// where a layer refuses such requests; extractors that know why give a
    /// [hint](MissingKey::with_hint).
    fn missing_key(&self) -> MissingKey {
        MissingKey::new()
    }
}

impl<Req: ?Sized, K, F> KeyExtractor<Req> for F
where
    F: Fn(&Req) -> Option<K>,
{
    type Key = K;

    #[inline]
    fn extract(&self, req: &Req) -> Option<K> {
        self(req)
    }
}
