//! [`HostState`]: what the stack knows of one host, by its name.

use http::Uri;
use http::uri::Authority;

use super::layer::GuardLayer;
use super::scope::HostScope;
use apiguard_breaker::State;

/// One host's standing with a [`GuardLayer`] (or the `GuardedClient` or
/// middleware built on it), read at one instant by
/// [`GuardLayer::host`].
///
/// A host the stack has not called yet reads as a fresh one: breaker
/// closed, a full bucket, not paced.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HostState {
    /// The host's breaker (`None` when the stack has no breaker).
    pub breaker: Option<State>,
    /// The tokens in the host's bucket now (`None` without a rate limit).
    /// A host that is paced is admitted by its pace instead.
    pub tokens: Option<f64>,
    /// The pace learned from the host's pushback, in requests per second
    /// (`None` while the host is not paced, or without adaptive pacing).
    pub pace: Option<f64>,
    /// Whether the host asked for a pause (`Retry-After`) that is still on.
    pub paused: bool,
}

/// Why [`GuardLayer::host`] could not name a host: the string it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAHost(String);

impl std::fmt::Display for NotAHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` is not a host (`api.example.com`, `127.0.0.1:8080`) or a URL with one",
            self.0
        )
    }
}

impl std::error::Error for NotAHost {}

impl GuardLayer {
    /// The state of `host`'s breaker, bucket and pace: `host` is the host
    /// as requests name it (`api.example.com`, `127.0.0.1:8080`, the port
    /// included when the URLs have one), or a URL whose host is taken.
    ///
    /// With `per_host(false)` every host shares one breaker and one bucket,
    /// and any name reads their state.
    ///
    /// ```
    /// use apiguard::{CircuitBreaker, GuardLayer, Quota};
    ///
    /// let layer = GuardLayer::builder()
    ///     .circuit_breaker(CircuitBreaker::builder())
    ///     .rate_limit(Quota::from_rate(10, 5.0))
    ///     .build()?;
    /// let api = layer.host("api.example.com")?;
    /// assert_eq!(api.breaker, Some(apiguard::breaker::State::Closed));
    /// assert_eq!(api.tokens, Some(10.0));
    /// assert!(layer.host("not a host").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn host(&self, host: &str) -> Result<HostState, NotAHost> {
        let key = self.scope_of(host)?;
        let paces = self.paces();
        Ok(HostState {
            breaker: self.breakers().map(|b| b.state(&key)),
            tokens: self.limiter().map(|l| l.available(&key)),
            pace: paces.and_then(|p| p.rate(&key)),
            paused: paces.is_some_and(|p| p.is_paused(&key)),
        })
    }

    /// The key `host` is found under.
    fn scope_of(&self, host: &str) -> Result<HostScope, NotAHost> {
        let authority = parse_host(host).ok_or_else(|| NotAHost(host.to_owned()))?;
        Ok(self.per_host().then_some(authority))
    }
}

/// `host` as an authority: a bare `host[:port]`, or a URL's.
fn parse_host(host: &str) -> Option<Authority> {
    let host = host.trim();
    if host.contains("://") {
        return host.parse::<Uri>().ok()?.authority().cloned();
    }
    let authority = host.parse::<Authority>().ok()?;
    // `Authority` takes `user@host`; a host to inspect has no user part.
    (!authority.as_str().contains('@') && !authority.host().is_empty()).then_some(authority)
}

#[cfg(test)]
mod tests {
    use super::parse_host;

    #[test]
    fn a_host_a_host_and_port_and_a_url_name_a_host_and_the_rest_do_not() {
        let host = |s| parse_host(s).map(|a| a.as_str().to_owned());
        assert_eq!(host("api.example.com").as_deref(), Some("api.example.com"));
        assert_eq!(host("127.0.0.1:8080").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(
            host("https://api.example.com/v1/items?x=1").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(host(" [::1]:80 ").as_deref(), Some("[::1]:80"));
        for bad in [
            "",
            "not a host",
            "user@api.example.com",
            "http:///path",
            "a/b",
        ] {
            assert_eq!(host(bad), None, "{bad:?}");
        }
    }
}
