//! [`GuardLayerBuilder`]: the stack's settings, checked together when the
//! layer is built.
//!
//! The builder sits above the layer it builds: it makes the shared
//! registries ([`admission`](super::admission)) and hands them to
//! [`GuardLayer`].

use std::time::Duration;

use apiguard_breaker::{CircuitBreakerBuilder, KeyedBreakers, SlidingWindow};
use apiguard_core::{InvalidConfig, Quota};
use apiguard_retry::RetryPolicyBuilder;

use super::admission::Shared;
use super::layer::GuardLayer;
use super::scope::{HostScope, Scope};
use crate::hosts::HostLimits;
use crate::pace::HostPaces;

impl GuardLayer {
    /// Starts a builder with every part off.
    pub fn builder() -> GuardLayerBuilder {
        GuardLayerBuilder::default()
    }
}

/// Builds a [`GuardLayer`]; see [`GuardLayer::builder`].
///
/// Each part takes one kind of argument: a builder for the parts that
/// have one ([`retry`](Self::retry), [`circuit_breaker`](Self::circuit_breaker)),
/// a [`Quota`] for the rate limit. Every setter consumes the builder and
/// returns it; nothing is checked until [`build`](Self::build), which
/// checks everything together. Clone the builder to build several layers
/// from one configuration.
#[derive(Debug, Clone)]
pub struct GuardLayerBuilder {
    total_timeout: Option<Duration>,
    retry: Option<RetryPolicyBuilder>,
    breaker: Option<CircuitBreakerBuilder>,
    limit: Option<Quota>,
    max_wait: Duration,
    attempt_timeout: Option<Duration>,
    per_host: bool,
    max_hosts: usize,
    adaptive: bool,
    max_pause: Duration,
    grpc: bool,
}

impl Default for GuardLayerBuilder {
    fn default() -> Self {
        Self {
            total_timeout: None,
            retry: None,
            breaker: None,
            limit: None,
            max_wait: Duration::from_secs(30),
            attempt_timeout: None,
            per_host: true,
            max_hosts: 1024,
            adaptive: true,
            max_pause: crate::pace::DEFAULT_MAX_PAUSE,
            grpc: false,
        }
    }
}

impl GuardLayerBuilder {
    /// Bounds each request, waits and retries included.
    pub fn total_timeout(mut self, d: Duration) -> Self {
        self.total_timeout = Some(d);
        self
    }

    /// Retries by the policy `policy` builds (checked in [`build`](Self::build)).
    pub fn retry(mut self, policy: RetryPolicyBuilder) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Puts a circuit breaker built from `template` in front of each host.
    pub fn circuit_breaker(mut self, template: CircuitBreakerBuilder) -> Self {
        self.breaker = Some(template);
        self
    }

    /// Limits each host to `quota` (its burst at once, then its rate):
    /// `Quota::per_second(50).with_burst(100)`, or APIGuard's
    /// `Quota::from_rate(100, 50.0)`. The quota is checked in
    /// [`build`](Self::build).
    pub fn rate_limit(mut self, quota: Quota) -> Self {
        self.limit = Some(quota);
        self
    }

    /// How long a request may wait for a token before it is refused with
    /// `RateLimited`, and for its host's open breaker to let it through
    /// before it is refused with `CircuitOpen` (default 30 s; the total
    /// timeout bounds both too). A breaker whose next probe comes later is
    /// not waited for, and the retry policy does not wait it out either:
    /// `max_wait` also bounds the policy's
    /// [`max_local_wait`](RetryPolicyBuilder::max_local_wait), so it bounds
    /// a request's waits across all its attempts. Such waits spend no retry
    /// attempt and no budget.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Bounds each attempt's network call (not the wait for a token).
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// One breaker and one bucket per host (default) or one for all hosts.
    pub fn per_host(mut self, yes: bool) -> Self {
        self.per_host = yes;
        self
    }

    /// At most this many hosts are tracked at once (default 1024).
    pub fn max_hosts(mut self, n: usize) -> Self {
        self.max_hosts = n;
        self
    }

    /// Learns each host's pace from its pushback (default on): a `429`,
    /// a `503` with `Retry-After`, or quota fields saying nothing is left
    /// pause every request to that host and slow it down; requests that go
    /// through speed it back up, never above [`rate_limit`](Self::rate_limit).
    /// Works with no rate limit set. See [`pace`](crate::pace).
    ///
    /// On by default, here as in `GuardedClient`: this stack sits in
    /// front of an upstream, and a `429` from it is that upstream's limit
    /// whoever wrote the stack; off, the stack keeps sending at the rate it
    /// was told while the upstream refuses. A host that never pushes back
    /// costs one atomic load per request and a status check per response.
    pub fn adaptive(mut self, yes: bool) -> Self {
        self.adaptive = yes;
        self
    }

    /// The longest a host is paused, whatever it asks (default 60 s).
    pub fn max_pause(mut self, d: Duration) -> Self {
        self.max_pause = d;
        self
    }

    /// Classifies calls as gRPC does (default off): for a stack in front
    /// of a `tonic::transport::Channel` or any gRPC client.
    ///
    /// - The breaker reads the `grpc-status` of each call through
    ///   [`GrpcClassifier`](apiguard_core::grpc::GrpcClassifier):
    ///   `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNKNOWN` and
    ///   `DATA_LOSS` count as failures (see [`apiguard_core::grpc`] for the
    ///   table). A status in the trailers is recorded when the response body
    ///   ends, which needs [`GrpcTrailersLayer`](crate::grpc::GrpcTrailersLayer)
    ///   outside this layer; an `UNAVAILABLE` with `grpc-retry-pushback-ms`
    ///   holds the breaker open that long (at most 5 minutes).
    /// - Retry follows gRPC's rules: a policy built without them gets the
    ///   defaults of `RetryPolicyBuilder::grpc` ([`RetryPolicy::with_grpc`](apiguard_retry::RetryPolicy::with_grpc)).
    /// - Pacing takes a trailers-only `RESOURCE_EXHAUSTED` as the host's
    ///   throttle, and its `grpc-retry-pushback-ms` as the pause.
    ///
    /// Requests that are not gRPC are still retried by HTTP's rules, but
    /// their breaker and pace read the response as gRPC would (a `503` is
    /// `UNAVAILABLE`): use one stack per protocol.
    pub fn grpc(mut self, yes: bool) -> Self {
        self.grpc = yes;
        self
    }

    /// Checks the combination and builds the layer.
    ///
    /// Refused: an attempt timeout longer than the total timeout (no attempt
    /// could use it); a breaker whose time window is shorter than twice the
    /// attempt timeout (one slow attempt would fill the window alone); and
    /// every invalid setting of the parts.
    pub fn build(self) -> Result<GuardLayer, InvalidConfig> {
        self.check_bounds()?;
        let breakers = match self.breaker {
            Some(template) => {
                if let (Some(SlidingWindow::Time { span, .. }), Some(attempt)) =
                    (template.window_config(), self.attempt_timeout)
                    && span < attempt * 2
                {
                    return Err(InvalidConfig::new(
                        "circuit_breaker",
                        format!(
                            "the breaker's time window ({span:?}) is shorter than twice the attempt timeout ({attempt:?}): one slow attempt would fill it"
                        ),
                    ));
                }
                // Each host's breaker logs its host (`*` when all share one).
                let breakers = KeyedBreakers::new(template, self.max_hosts)?.name_breakers(
                    |host: &HostScope| {
                        host.as_ref()
                            .map_or_else(|| "*".into(), |a| a.as_str().into())
                    },
                );
                #[cfg(feature = "metrics")]
                let breakers = {
                    let (hosts, overflow) = crate::metrics::host_transition_hooks();
                    breakers
                        .on_transition(hosts)
                        .on_overflow_transition(overflow)
                };
                Some(breakers)
            }
            None => None,
        };
        #[cfg(feature = "metrics")]
        crate::metrics::describe();
        let limiter = match self.limit {
            Some(quota) => Some(HostLimits::new(quota, self.max_hosts)?),
            None => None,
        };
        let retry = match self.retry {
            // `max_wait` bounds all of a request's waits for its host's
            // bucket or open circuit, across its attempts: a policy may
            // wait less, never more.
            Some(policy) => {
                let bound = policy.local_wait_limit().min(self.max_wait);
                Some(policy.max_local_wait(bound).build()?)
            }
            None => None,
        };
        let paces = if self.adaptive {
            let (capacity, ceiling) = match self.limit {
                // The limiter checked the quota, its burst fits a u32.
                Some(q) => (
                    u32::try_from(q.burst()).unwrap_or(u32::MAX),
                    Some(q.refill_per_sec()),
                ),
                None => (1, None),
            };
            let config =
                apiguard_ratelimit::PaceConfig::new(capacity, ceiling)?.max_pause(self.max_pause);
            Some(HostPaces::new(config, self.max_hosts))
        } else {
            None
        };
        let retry = match retry {
            Some(policy) if self.grpc => Some(policy.with_grpc()),
            other => other,
        };
        let needs_key = per_host_needs_key(self.per_host, &breakers, &limiter)
            || (self.per_host && paces.is_some());
        // The policy and the buckets read the same clock unless a test gave
        // the policy its own: then one reading per request serves both.
        let one_clock = limiter.is_some() && retry.as_ref().is_some_and(|p| !p.clock().is_manual());
        Ok(GuardLayer::from_shared(Shared {
            one_clock,
            total_timeout: self.total_timeout,
            attempt_timeout: self.attempt_timeout,
            retry,
            breakers,
            limiter,
            paces,
            max_wait: self.max_wait,
            scope: Scope::new(needs_key),
            grpc: self.grpc,
        }))
    }
}

impl GuardLayerBuilder {
    /// The timeouts and the host cap on their own.
    fn check_bounds(&self) -> Result<(), InvalidConfig> {
        if let (Some(attempt), Some(total)) = (self.attempt_timeout, self.total_timeout)
            && attempt > total
        {
            return Err(InvalidConfig::new(
                "attempt_timeout",
                format!(
                    "the attempt timeout ({attempt:?}) is longer than the total timeout ({total:?}), so no attempt could use it"
                ),
            ));
        }
        for (field, d) in [
            ("attempt_timeout", self.attempt_timeout),
            ("total_timeout", self.total_timeout),
        ] {
            if d == Some(Duration::ZERO) {
                return Err(InvalidConfig::new(field, "must be longer than zero"));
            }
        }
        if self.max_hosts == 0 {
            return Err(InvalidConfig::new("max_hosts", "must be at least 1"));
        }
        Ok(())
    }
}

/// Keys are only worth extracting when something is kept per host.
fn per_host_needs_key(
    per_host: bool,
    breakers: &Option<KeyedBreakers<HostScope>>,
    limiter: &Option<HostLimits>,
) -> bool {
    per_host && (breakers.is_some() || limiter.is_some())
}
