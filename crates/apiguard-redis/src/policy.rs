//! What a limiter does when Redis cannot answer in time.

use std::time::Duration;

/// What [`RedisLimiter`](crate::RedisLimiter) decides when Redis does not
/// answer a decision in time, fails, or answers after the caller's
/// deadline.
///
/// # One miss, and Redis away
///
/// A limiter leaves Redis only after [`FAILURES_TO_LEAVE`] misses in a row
/// spread over at least one decision timeout (so one stall of a busy
/// process, which times out every decision in flight at once, is one miss).
/// Until then each miss is decided on its own: [`AdmitAll`](Self::AdmitAll)
/// admits it, the other policies refuse it with a wait of one timeout —
/// a refusal costs the caller a retry, an admission Redis did not count
/// could put the fleet over its limit. Once away ([`Mode::Fallback`]), the
/// policy decides every request at once, and a probe in the background
/// (one at a time, [`probe_every`](crate::RedisLimiterBuilder::probe_every)
/// after the last one failed) asks Redis again; its first answer brings the
/// limiter back to Redis.
///
/// # Documented shares while Redis is away
///
/// | policy | one instance admits, over `t` away | the fleet of `n` |
/// |---|---|---|
/// | [`LocalShare`](Self::LocalShare) (default) | at most `limit / n` per window, starting empty, never more than `burst / n` at once | at most `limit` per window |
/// | [`FailClosed`](Self::FailClosed) | nothing | nothing |
/// | [`AdmitAll`](Self::AdmitAll) | everything | everything |
///
/// Tokens admitted without Redis are taken from the shared bucket (never
/// below empty) by the key's next decision Redis runs, so the burst Redis
/// saved up meanwhile is not granted on top of them.
///
/// [`FAILURES_TO_LEAVE`]: crate::FAILURES_TO_LEAVE
/// [`Mode::Fallback`]: crate::Mode::Fallback
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Enforce this instance's share of the limit locally: each key gets an
    /// in-process [`TokenBucket`](apiguard_ratelimit::TokenBucket) of
    /// `burst / n` tokens (at least one), refilled at `limit / n` per
    /// window and starting empty, where `n` is the number of instances
    /// sharing the limit: the larger of
    /// [`instances`](crate::RedisLimiterBuilder::instances) and the count
    /// of live instances Redis' register gave last. While `n` is not known
    /// (Redis never answered and no hint was given), it refuses.
    ///
    /// The default: the fleet together stays within the limit.
    #[default]
    LocalShare,
    /// Refuse every request with [`RateLimited`](apiguard_core::RateLimited)
    /// carrying `retry_after`: the choice when going over the limit costs
    /// more than refusing (a paid upstream quota, say).
    FailClosed {
        /// The wait the refusals ask callers to respect.
        retry_after: Duration,
    },
    /// Fail open: admit every request, so the limit is not enforced at all
    /// while Redis is away (and a single missed answer admits too). For
    /// limits that protect a budget rather than a fragile backend, where an
    /// outage of Redis must never refuse anyone.
    AdmitAll,
}

impl FailurePolicy {
    /// [`FailClosed`](Self::FailClosed) asking callers to wait one second.
    pub const fn fail_closed() -> Self {
        Self::FailClosed {
            retry_after: Duration::from_secs(1),
        }
    }

    /// [`AdmitAll`](Self::AdmitAll): fail open, the limit unenforced while
    /// Redis is away.
    pub const fn admit_all() -> Self {
        Self::AdmitAll
    }

    /// [`LocalShare`](Self::LocalShare), the default.
    pub const fn local_share() -> Self {
        Self::LocalShare
    }

    pub(crate) const fn label(&self) -> &'static str {
        match self {
            Self::AdmitAll => "admit_all",
            Self::FailClosed { .. } => "fail_closed",
            Self::LocalShare => "local_share",
        }
    }
}
