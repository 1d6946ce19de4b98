//! What a limiter does when Redis cannot answer in time.

use std::time::Duration;

/// What [`RedisLimiter`](crate::RedisLimiter) decides when Redis is slow
/// (no answer within the decision timeout), down, or answers with an error.
///
/// Whatever the policy, a decision never waits longer than the timeout, and
/// Redis is tried again on its own once the back-off after a failure has
/// passed ([`RedisLimiterBuilder::retry_redis_after`]), so service returns to
/// the shared limit without anyone's help.
///
/// [`RedisLimiterBuilder::retry_redis_after`]: crate::RedisLimiterBuilder::retry_redis_after
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Admit every request. The limit is not enforced while Redis is away:
    /// the choice for limits that protect a budget, not a fragile backend.
    FailOpen,
    /// Refuse every request with [`RateLimited`](apiguard_core::RateLimited)
    /// carrying `retry_after`: the choice when going over the limit costs
    /// more than refusing (a paid upstream quota, say).
    FailClosed {
        /// The wait the refusals ask callers to respect.
        retry_after: Duration,
    },
    /// Enforce a local share of the limit: each key gets an in-process
    /// [`TokenBucket`](apiguard_ratelimit::TokenBucket) with
    /// `burst / expected_instances` tokens (at least one) refilled at
    /// `limit / expected_instances` per window, so all instances together
    /// stay near the shared limit. Local buckets are kept for at most
    /// [`LOCAL_MAX_KEYS`](crate::LOCAL_MAX_KEYS) keys and dropped once Redis
    /// answers again.
    LocalBucket {
        /// How many instances share the limit (at least 1).
        expected_instances: u32,
    },
}

impl FailurePolicy {
    /// [`FailClosed`](Self::FailClosed) asking callers to wait one second.
    pub const fn fail_closed() -> Self {
        Self::FailClosed {
            retry_after: Duration::from_secs(1),
        }
    }

    /// [`LocalBucket`](Self::LocalBucket) for `expected_instances` instances.
    pub const fn local_bucket(expected_instances: u32) -> Self {
        Self::LocalBucket { expected_instances }
    }

    pub(crate) const fn label(&self) -> &'static str {
        match self {
            Self::FailOpen => "fail_open",
            Self::FailClosed { .. } => "fail_closed",
            Self::LocalBucket { .. } => "local_bucket",
        }
    }
}

impl Default for FailurePolicy {
    /// [`FailOpen`](Self::FailOpen): a rate limiter should not take the
    /// service down with Redis.
    fn default() -> Self {
        Self::FailOpen
    }
}
