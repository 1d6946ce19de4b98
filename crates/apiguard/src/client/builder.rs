//! [`GuardedClientBuilder`]: APIGuard's knobs, turned into a
//! [`GuardLayer`] over the transport.

use std::sync::Arc;
use std::time::Duration;

use apiguard_breaker::CircuitBreakerBuilder;
use apiguard_core::{InvalidConfig, Quota};
use apiguard_retry::{RetryPolicy, RetryPolicyBuilder};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_layer::Layer;

use super::GuardedClient;
use super::stats::Counters;
use super::transport::{Counted, check_scheme, connector};
use crate::stack::{GuardLayer, GuardLayerBuilder};

const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`GuardedClient`]; see [`GuardedClient::builder`].
///
/// As [`GuardLayerBuilder`]: each part takes one kind of argument (a
/// [`Quota`] for the rate limit, a builder for the retry policy and the
/// breaker, or APIGuard's knobs for the common case), every setter consumes
/// the builder, and [`build`](Self::build) checks everything. Clone it to
/// build several clients from one configuration.
#[derive(Debug, Clone)]
pub struct GuardedClientBuilder {
    base_url: Option<String>,
    headers: HeaderMap,
    limit: Option<Quota>,
    max_wait: Duration,
    max_retries: u32,
    base_delay: Duration,
    retry: Option<RetryPolicyBuilder>,
    failure_threshold: u32,
    recovery_timeout: Duration,
    success_threshold: u32,
    breaker: Option<CircuitBreakerBuilder>,
    attempt_timeout: Option<Duration>,
    total_timeout: Duration,
    per_host: bool,
    max_hosts: usize,
    error_for_status: bool,
    adaptive: bool,
}

impl Default for GuardedClientBuilder {
    fn default() -> Self {
        Self {
            base_url: None,
            headers: HeaderMap::new(),
            limit: None,
            max_wait: Duration::from_secs(30),
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            retry: None,
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(30),
            success_threshold: 1,
            breaker: None,
            attempt_timeout: None,
            total_timeout: Duration::from_secs(60),
            per_host: true,
            max_hosts: 1024,
            error_for_status: false,
            adaptive: true,
        }
    }
}

impl GuardedClientBuilder {
    /// Paths given to [`GuardedClient::get`] and friends are joined to this
    /// URL (absolute URLs are used as they are).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// A header sent with every request (unless the request sets it).
    pub fn default_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Token bucket per host, of `quota` (`Quota::per_second(5).with_burst(10)`,
    /// or APIGuard's `Quota::from_rate(10, 5.0)`). Requests wait for their
    /// token (up to `max_wait`). Off by default.
    pub fn rate_limit(mut self, quota: Quota) -> Self {
        self.limit = Some(quota);
        self
    }

    /// The longest a request waits for a token, or for its host's open
    /// circuit to let it through (default 30 s; the total timeout bounds
    /// both too). A circuit whose next probe comes later refuses at once
    /// with `CircuitOpen`, and retry does not wait it out either:
    /// `max_wait` bounds a request's waits across all its attempts, whatever
    /// retry policy is given. Waiting spends no retry attempt and no budget.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Retries after the first attempt (default 3; 0 turns retry off).
    ///
    /// Retries back off exponentially from `base_delay` with jitter, honour
    /// `Retry-After` and an open circuit's wait when it is at most 10 s (and
    /// fits the total timeout), and are bounded by a retry budget (20% of
    /// recent requests plus 10 a second).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// First backoff delay (default 100 ms), doubled on each retry.
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base_delay = d;
        self
    }

    /// A full retry policy, replacing `max_retries` and `base_delay`: the
    /// builder is used as it is (set its `deadline` and `max_retry_after`
    /// yourself) and checked in [`build`](Self::build).
    pub fn retry(mut self, policy: RetryPolicyBuilder) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Consecutive failures that open a host's circuit (default 5).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// Time a circuit stays open before it probes (default 30 s).
    pub fn recovery_timeout(mut self, d: Duration) -> Self {
        self.recovery_timeout = d;
        self
    }

    /// Probe successes that close it again (default 1).
    pub fn success_threshold(mut self, n: u32) -> Self {
        self.success_threshold = n;
        self
    }

    /// A full breaker template, replacing the three knobs above.
    pub fn circuit_breaker(mut self, template: CircuitBreakerBuilder) -> Self {
        self.breaker = Some(template);
        self
    }

    /// Bound on each attempt's network call (default 10 s, or the total
    /// timeout when that is shorter). Longer than the total timeout is
    /// refused.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// Bound on a whole request, waits and retries included (default 60 s).
    pub fn total_timeout(mut self, d: Duration) -> Self {
        self.total_timeout = d;
        self
    }

    /// One breaker and bucket per host (default) or one for all.
    pub fn per_host(mut self, yes: bool) -> Self {
        self.per_host = yes;
        self
    }

    /// At most this many hosts get a breaker, a bucket and a pace of their
    /// own at once (default 1024; see
    /// [`GuardLayerBuilder::max_hosts`]). Zero is refused.
    pub fn max_hosts(mut self, n: usize) -> Self {
        self.max_hosts = n;
        self
    }

    /// Turns a final response with a `4xx` or `5xx` status (after any
    /// retries) into a [`ClientError`](super::ClientError) of kind [`ErrorKind::Status`](super::ErrorKind::Status), as
    /// reqwest's `error_for_status` does. Off by default: such a response is
    /// returned as `Ok`, for the caller to read. Either way a final `429` or
    /// `5xx` counts as failed in [`ClientStats`](super::ClientStats).
    pub fn error_for_status(mut self, yes: bool) -> Self {
        self.error_for_status = yes;
        self
    }

    /// Learns each host's pace from its `429`s, `503`s with `Retry-After`
    /// and quota fields (default on): a throttled host is paused for every
    /// request, then paced below what it let through, speeding back up as
    /// requests succeed and never above [`rate_limit`](Self::rate_limit).
    /// Works without a rate limit too. Pauses last at most the retry
    /// policy's `Retry-After` cap (10 s, or the total timeout when
    /// shorter). See [`pace`](crate::pace).
    pub fn adaptive(mut self, yes: bool) -> Self {
        self.adaptive = yes;
        self
    }

    /// Builds the client. Must be called within a tokio runtime's reach
    /// when requests are sent (the transport spawns its connections).
    pub fn build(self) -> Result<GuardedClient, InvalidConfig> {
        let base = self.checked_base_url()?;
        let layer = self.stack()?.build()?;
        let stats = Arc::new(Counters::default());
        let transport = Counted {
            inner: Client::builder(TokioExecutor::new()).build(connector()),
            stats: stats.clone(),
            #[cfg(feature = "metrics")]
            hosts: Default::default(),
        };
        let mut service = layer.layer(transport);
        if let Some(base) = &base {
            // Every request clones the service, and with it the handles on
            // the base host's breaker and bucket: no registry lookup for the
            // host most requests go to.
            let mut probe = Request::new(());
            *probe.uri_mut() = base.parse().unwrap_or_default();
            service.prime(&probe);
        }
        Ok(GuardedClient {
            base,
            headers: self.headers,
            service,
            layer,
            stats,
            error_for_status: self.error_for_status,
        })
    }
}

impl GuardedClientBuilder {
    /// The stack these settings describe, without the client: the same
    /// retry, breakers, limits, pacing and timeouts, to put over another
    /// transport (`apiguard-reqwest` puts it in a reqwest middleware).
    /// The client's own settings — `base_url`, `default_header` and
    /// `error_for_status` — are not part of it.
    pub fn build_layer(self) -> Result<GuardLayer, InvalidConfig> {
        self.stack()?.build()
    }
}

impl GuardedClientBuilder {
    /// The base URL without its trailing `/`, if it is one this build can
    /// speak to.
    fn checked_base_url(&self) -> Result<Option<String>, InvalidConfig> {
        let Some(url) = &self.base_url else {
            return Ok(None);
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| InvalidConfig::new("base_url", format!("`{url}` is not a URL")))?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(InvalidConfig::new(
                "base_url",
                format!("`{url}` needs a scheme and a host"),
            ));
        }
        if let Err(why) = check_scheme(&uri) {
            return Err(InvalidConfig::new("base_url", why));
        }
        Ok(Some(url.trim_end_matches('/').to_owned()))
    }

    /// The stack these settings describe.
    fn stack(&self) -> Result<GuardLayerBuilder, InvalidConfig> {
        let mut stack: GuardLayerBuilder = GuardLayer::builder()
            .total_timeout(self.total_timeout)
            .attempt_timeout(
                self.attempt_timeout
                    .unwrap_or(DEFAULT_ATTEMPT_TIMEOUT.min(self.total_timeout)),
            )
            .per_host(self.per_host)
            .max_hosts(self.max_hosts)
            .max_wait(self.max_wait)
            .adaptive(self.adaptive)
            .max_pause(Duration::from_secs(10).min(self.total_timeout));
        if let Some(p) = self.retry_policy_or_default()? {
            stack = stack.retry(p);
        }
        let breaker = self.breaker.clone().unwrap_or_else(|| {
            CircuitBreakerBuilder::default()
                .failure_threshold(self.failure_threshold)
                .recovery_timeout(self.recovery_timeout)
                .success_threshold(self.success_threshold)
        });
        stack = stack.circuit_breaker(breaker);
        if let Some(quota) = self.limit {
            stack = stack.rate_limit(quota);
        }
        Ok(stack)
    }

    /// The policy given, or one made of `max_retries` and `base_delay`
    /// (`None` for no retries).
    fn retry_policy_or_default(&self) -> Result<Option<RetryPolicyBuilder>, InvalidConfig> {
        match &self.retry {
            Some(p) => Ok(Some(p.clone())),
            None if self.max_retries == 0 => Ok(None),
            None => Ok(Some(
                RetryPolicy::builder()
                    .max_retries(self.max_retries)
                    .base_delay(self.base_delay)
                    .deadline(self.total_timeout)
                    // Wait out a server's or an open circuit's hint only
                    // when it is short; a longer one comes back at once.
                    .max_retry_after(Duration::from_secs(10).min(self.total_timeout)),
            )),
        }
    }
}
