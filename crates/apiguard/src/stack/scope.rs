//! Which host a request belongs to: the key its breaker, bucket and pace
//! are found under.

use http::Request;
use http::uri::Authority;

/// The key breakers and buckets are found under: the request's host, or
/// `None` when they are shared by all hosts.
pub type HostScope = Option<Authority>;

/// Picks the [`HostScope`] of a request.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    pub(super) per_host: bool,
}

impl Scope {
    /// One breaker and one bucket per host (`true`) or for all (`false`).
    pub const fn new(per_host: bool) -> Self {
        Self { per_host }
    }

    /// The scope of `req`.
    #[inline]
    pub fn of<B>(&self, req: &Request<B>) -> HostScope {
        if !self.per_host {
            return None;
        }
        apiguard_breaker::KeyExtractor::extract(&apiguard_breaker::HostKey, req).flatten()
    }
}

impl<B> apiguard_core::KeyExtractor<Request<B>> for Scope {
    type Key = HostScope;
    #[inline]
    fn extract(&self, req: &Request<B>) -> Option<HostScope> {
        Some(self.of(req))
    }
}

/// The host part of `req`, as [`HostKey`](apiguard_breaker::HostKey) finds
/// it, unparsed.
#[inline]
pub(super) fn host_str<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok()),
    }
}
