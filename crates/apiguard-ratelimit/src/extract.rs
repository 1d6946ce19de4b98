//! Key extractors for [`KeyedRateLimitLayer`](crate::KeyedRateLimitLayer).
//!
//! The trait is [`KeyExtractor`] of `apiguard-core` (re-exported here), the
//! one the keyed breaker takes too: any `Fn(&http::Request<B>) -> Option<K>`
//! is an extractor. Ready-made:
//!
//! - [`PeerIp`]: the address of the connection's peer;
//! - [`HeaderKey`]: the value of a header (an API key, a tenant id);
//! - [`ForwardedFor`]: the client address behind a known number of trusted
//!   proxies, from `X-Forwarded-For` or `Forwarded`.
//!
//! # A request without a key
//!
//! What becomes of a request the extractor finds no key in is the server's
//! choice, made on [`KeyedRateLimitLayer`](crate::KeyedRateLimitLayer):
//!
//! - by default it fails with [`MissingKey`], a set-up problem: under
//!   `RejectionResponseLayer` the client gets `500` and the server's log
//!   says what to fix (for [`PeerIp`]: serve with `ConnectInfo`, turn on
//!   the `axum` feature). Nothing gets past the limit unnoticed.
//! - [`missing_key_as_400`](crate::KeyedRateLimitLayer::missing_key_as_400):
//!   it is the client's fault (it did not send its API key), answered
//!   `400 Bad Request`.
//! - [`missing_key_shares`](crate::KeyedRateLimitLayer::missing_key_shares):
//!   it is admitted against one bucket that every keyless request shares.

use std::net::{IpAddr, SocketAddr};

pub use apiguard_core::KeyExtractor;
use apiguard_core::MissingKey;
use http::header::{FORWARDED, HeaderName, HeaderValue};
use http::{HeaderMap, Request};

/// What [`KeyedRateLimitLayer`](crate::KeyedRateLimitLayer) does with a
/// request its extractor found no key in (see [the module docs](self#a-request-without-a-key)).
pub trait MissingKeyPolicy<K> {
    /// The key to charge instead, or the error the request fails with
    /// (`missing` is the extractor's).
    fn resolve(&self, missing: MissingKey) -> Result<K, MissingKey>;
}

/// The default [`MissingKeyPolicy`]: the request fails with [`MissingKey`],
/// answered `500` (a set-up problem) or, after
/// [`missing_key_as_400`](crate::KeyedRateLimitLayer::missing_key_as_400),
/// `400`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseMissing {
    pub(crate) bad_request: bool,
}

impl<K> MissingKeyPolicy<K> for RefuseMissing {
    #[inline]
    fn resolve(&self, missing: MissingKey) -> Result<K, MissingKey> {
        Err(if self.bad_request {
            missing.bad_request()
        } else {
            missing
        })
    }
}

/// The [`MissingKeyPolicy`] of
/// [`missing_key_shares`](crate::KeyedRateLimitLayer::missing_key_shares):
/// keyless requests share the bucket of one key.
#[derive(Debug, Clone, Copy)]
pub struct SharedKey<K>(pub K);

impl<K: Clone> MissingKeyPolicy<K> for SharedKey<K> {
    #[inline]
    fn resolve(&self, _missing: MissingKey) -> Result<K, MissingKey> {
        Ok(self.0.clone())
    }
}

/// What to fix when [`PeerIp`] (or [`ForwardedFor`]'s fallback to it) finds
/// no peer address.
#[cfg(feature = "axum")]
const NO_PEER: &str = "no peer address recorded: serve axum with \
    `into_make_service_with_connect_info::<SocketAddr>()` (axum 0.8), or insert the \
    connection's `SocketAddr` into each request's extensions";
#[cfg(not(feature = "axum"))]
const NO_PEER: &str = "no peer address recorded: axum's `ConnectInfo` is read only with \
    the `axum` feature of `apiguard` (or `apiguard-ratelimit`); turn it on and serve with \
    `into_make_service_with_connect_info::<SocketAddr>()`, or insert the connection's \
    `SocketAddr` into each request's extensions";

/// The peer's IP address.
///
/// Read from axum's `ConnectInfo<SocketAddr>` (with the `axum` feature, on
/// by default in the `apiguard` facade; serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), or from a plain
/// `SocketAddr` request extension, which a hyper server can insert itself.
/// A request with neither fails with a [`MissingKey`] that says which of
/// these is missing. Behind a proxy every request has the proxy's address:
/// use [`ForwardedFor`] there.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerIp;

impl<B> KeyExtractor<Request<B>> for PeerIp {
    type Key = IpAddr;

    #[inline]
    fn extract(&self, req: &Request<B>) -> Option<IpAddr> {
        peer_ip(req)
    }

    fn missing_key(&self) -> MissingKey {
        MissingKey::new().with_hint(NO_PEER)
    }
}

fn peer_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0.ip());
    }
    req.extensions().get::<SocketAddr>().map(SocketAddr::ip)
}

/// The value of one header, copied (so the key does not keep the request's
/// buffer alive). Requests without the header have no key.
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Keys requests by the value of `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl<B> KeyExtractor<Request<B>> for HeaderKey {
    type Key = HeaderValue;

    fn extract(&self, req: &Request<B>) -> Option<HeaderValue> {
        let value = req.headers().get(&self.name)?;
        HeaderValue::from_bytes(value.as_bytes()).ok()
    }

    fn missing_key(&self) -> MissingKey {
        MissingKey::new().with_hint(
            "the request lacks the header `HeaderKey` reads; when clients must send it, \
             answer 400 with `missing_key_as_400()`",
        )
    }
}

/// The client address as seen by the outermost of `trusted_hops` proxies.
///
/// Each proxy appends the address it received the request from, so with
/// `n` trusted proxies in front of the server the `n`-th address from the
/// right was written by the outermost one, and everything to its left was
/// sent by the client and may be forged. Taking it (and nothing further
/// left) means a client cannot pick its own bucket by sending a made-up
/// header. With `0` trusted hops the header is ignored.
///
/// When the chain is shorter than `trusted_hops` (the request skipped a
/// proxy) or the entry is not an IP address (`unknown`, an obfuscated
/// identifier), the peer address is used, as in [`PeerIp`].
#[derive(Debug, Clone, Copy)]
pub struct ForwardedFor {
    trusted_hops: usize,
    standard: bool,
}

impl ForwardedFor {
    /// Reads `X-Forwarded-For` behind `trusted_hops` proxies.
    pub const fn x_forwarded_for(trusted_hops: usize) -> Self {
        Self {
            trusted_hops,
            standard: false,
        }
    }

    /// Reads the `for=` parameters of RFC 7239 `Forwarded` behind
    /// `trusted_hops` proxies.
    pub const fn forwarded(trusted_hops: usize) -> Self {
        Self {
            trusted_hops,
            standard: true,
        }
    }

    /// The address in `headers` (without the peer-address fallback).
    pub fn from_headers(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let n = self.trusted_hops;
        if n == 0 {
            return None;
        }
        let name = if self.standard {
            FORWARDED
        } else {
            HeaderName::from_static("x-forwarded-for")
        };
        let entry = headers
            .get_all(name)
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("").rsplit(','))
            .nth(n - 1)?;
        if self.standard {
            entry
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                .and_then(|(_, v)| parse_node(v))
        } else {
            parse_node(entry)
        }
    }
}

impl<B> KeyExtractor<Request<B>> for ForwardedFor {
    type Key = IpAddr;

    fn extract(&self, req: &Request<B>) -> Option<IpAddr> {
        self.from_headers(req.headers()).or_else(|| peer_ip(req))
    }

    fn missing_key(&self) -> MissingKey {
        MissingKey::new().with_hint(NO_PEER)
    }
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:80`,
/// `2001:db8::1`, `[2001:db8::1]:80`, possibly quoted.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    s.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_takes_the_nth_address_from_the_right() {
        let r = req(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.1")]);
        assert_eq!(
            ForwardedFor::x_forwarded_for(1).extract(&r),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(
            ForwardedFor::x_forwarded_for(2).extract(&r),
            Some(ip("1.2.3.4"))
        );
        // The spoofed left-most entry is never reached with 2 trusted hops.
        assert_eq!(
            ForwardedFor::x_forwarded_for(3).extract(&r),
            Some(ip("6.6.6.6"))
        );
    }

    #[test]
    fn forwarded_for_reads_repeated_headers_in_order() {
        let r = req(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "1.2.3.4, 10.0.0.1"),
        ]);
        assert_eq!(
            ForwardedFor::x_forwarded_for(3).extract(&r),
            Some(ip("6.6.6.6"))
        );
        assert_eq!(
            ForwardedFor::x_forwarded_for(2).extract(&r),
            Some(ip("1.2.3.4"))
        );
    }

    #[test]
    fn short_chain_falls_back_to_the_peer_address() {
        let mut r = req(&[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(ForwardedFor::x_forwarded_for(2).extract(&r), None);
        r.extensions_mut()
            .insert("127.0.0.9:4000".parse::<SocketAddr>().unwrap());
        assert_eq!(
            ForwardedFor::x_forwarded_for(2).extract(&r),
            Some(ip("127.0.0.9"))
        );
        assert_eq!(
            ForwardedFor::x_forwarded_for(0).extract(&r),
            Some(ip("127.0.0.9"))
        );
    }

    #[test]
    fn standard_forwarded_header_is_parsed() {
        let r = req(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, For=192.0.2.60;by=203.0.113.43",
        )]);
        assert_eq!(
            ForwardedFor::forwarded(1).extract(&r),
            Some(ip("192.0.2.60"))
        );
        assert_eq!(
            ForwardedFor::forwarded(2).extract(&r),
            Some(ip("2001:db8:cafe::17"))
        );
        let r = req(&[("forwarded", "for=unknown")]);
        assert_eq!(ForwardedFor::forwarded(1).extract(&r), None);
    }

    #[test]
    fn node_forms_are_parsed() {
        assert_eq!(parse_node(" 192.0.2.1:80"), Some(ip("192.0.2.1")));
        assert_eq!(parse_node("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node("[2001:db8::1]:80"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node("_hidden"), None);
        assert_eq!(parse_node(""), None);
    }

    #[test]
    fn header_key_copies_the_value() {
        let r = req(&[("x-api-key", "abc")]);
        let key = HeaderKey::new(HeaderName::from_static("x-api-key"));
        assert_eq!(key.extract(&r), Some(HeaderValue::from_static("abc")));
        assert_eq!(key.extract(&req(&[])), None);
    }

    #[test]
    fn peer_ip_reads_a_socket_addr_extension() {
        let mut r = req(&[]);
        assert_eq!(PeerIp.extract(&r), None);
        r.extensions_mut()
            .insert("10.1.2.3:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(PeerIp.extract(&r), Some(ip("10.1.2.3")));
    }

    #[test]
    fn peer_ip_says_what_to_fix_when_it_finds_no_address() {
        let hint = KeyExtractor::<Request<()>>::missing_key(&PeerIp)
            .hint()
            .unwrap();
        assert!(
            hint.contains("into_make_service_with_connect_info"),
            "{hint}"
        );
        // Without the feature, the one thing that cannot be seen from outside.
        assert_eq!(
            hint.contains("`axum` feature"),
            !cfg!(feature = "axum"),
            "{hint}"
        );
    }

    #[test]
    fn closures_are_extractors() {
        let by_path = |r: &Request<()>| Some(r.uri().path().to_owned());
        let r = Request::builder().uri("/a").body(()).unwrap();
        assert_eq!(by_path.extract(&r).as_deref(), Some("/a"));
    }
}
