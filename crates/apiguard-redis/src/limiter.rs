//! The Redis-backed GCRA limiter.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use apiguard_core::clock::duration_to_nanos;
use apiguard_core::{Clock, InvalidConfig, Nanos, Quota, RateLimited};
use apiguard_ratelimit::Limiter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind};

use crate::error::BuildError;
use crate::future::{Call, DecisionFuture, ReserveFuture};
use crate::key::RedisKey;
use crate::lease::Leases;
use crate::local::LocalBuckets;
use crate::policy::FailurePolicy;
use crate::script::{GCRA_LUA, Units};
use crate::warn::WarnGate;

/// The prefix of every bucket key unless [`RedisLimiterBuilder::prefix`]
/// says otherwise.
pub const DEFAULT_PREFIX: &str = "apiguard:rl:";

/// The per-decision timeout unless [`RedisLimiterBuilder::timeout`] says
/// otherwise. A loopback or same-zone Redis answers in well under a
/// millisecond; past a few, the fallback policy serves better than waiting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5);

/// How long decisions skip Redis after it failed, unless
/// [`RedisLimiterBuilder::retry_redis_after`] says otherwise.
pub const DEFAULT_RETRY_REDIS_AFTER: Duration = Duration::from_millis(100);

/// The connection settings [`RedisLimiterBuilder::connect`] uses: reconnect
/// attempts back off from 10 ms to at most 1 s, connecting times out after
/// 1 s. Decisions never wait for these: the decision timeout bounds them.
pub fn connection_manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(4)
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
}

/// Who made a [`Decision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecidedBy {
    /// The shared bucket in Redis.
    Redis,
    /// [`FailurePolicy::FailOpen`]: Redis did not answer in time, failed,
    /// or is in the back-off after a failure.
    FailOpen,
    /// [`FailurePolicy::FailClosed`]: Redis did not answer in time, failed,
    /// or is in the back-off after a failure.
    FailClosed,
    /// [`FailurePolicy::LocalBucket`]: Redis did not answer in time, failed,
    /// or is in the back-off after a failure.
    LocalBucket,
    /// The limiter itself: the request costs more than the burst, so no
    /// bucket could ever admit it.
    OverBurst,
    /// Tokens this instance leased from Redis earlier
    /// ([`RedisLimiterBuilder::lease`]).
    Lease,
}

/// One rate-limit decision, with everything the `RateLimit` fields need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the tokens were granted (and reserved).
    pub allowed: bool,
    /// Admitted: how long the caller must wait before using its tokens
    /// (zero when they were there now). Refused: how long until they would
    /// be there (the `Retry-After`).
    pub wait: Duration,
    /// Tokens left in the bucket after this decision (rounded down).
    pub remaining: u64,
    /// Time until the bucket is full again (the `RateLimit` reset).
    pub reset: Duration,
    /// The quota this limiter enforces.
    pub quota: Quota,
    /// Who decided: Redis, or the failure policy.
    pub decided_by: DecidedBy,
}

impl Decision {
    /// The decision as the [`Limiter`] trait returns it.
    pub fn into_result(self) -> Result<apiguard_ratelimit::Grant, RateLimited> {
        if self.allowed {
            Ok(apiguard_ratelimit::Grant {
                wait: self.wait,
                remaining: self.remaining,
                quota: Some(self.quota),
            })
        } else {
            Err(RateLimited::new(self.wait).with_quota(self.quota))
        }
    }
}

/// A rate limit shared by every instance that talks to the same Redis: GCRA
/// in a Lua script, one round trip per decision. See the
/// [crate docs](crate) for the behaviour in full.
///
/// Cloning is cheap and every clone shares one connection and one
/// configuration.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    con: ConnectionManager,
    script: Script,
    units: Units,
    burst: u64,
    quota: Quota,
    prefix: String,
    timeout: Duration,
    retry_redis_after: Nanos,
    policy: FailurePolicy,
    clock: Clock,
    /// Local time until which decisions skip Redis (0: Redis is in use).
    skip_until: AtomicU64,
    /// Set on a failure, cleared (with a log line) on the next answer.
    degraded: AtomicBool,
    warn: WarnGate,
    local: Option<LocalBuckets>,
    leases: Option<Leases>,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisLimiter")
            .field("quota", &i.quota)
            .field("burst", &i.burst)
            .field("prefix", &i.prefix)
            .field("timeout", &i.timeout)
            .field("policy", &i.policy)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A builder for a limit of `limit` tokens per `window` (bursts of up to
    /// `limit` tokens unless [`burst`](RedisLimiterBuilder::burst) says
    /// otherwise).
    pub fn builder(limit: u64, window: Duration) -> RedisLimiterBuilder {
        RedisLimiterBuilder {
            limit,
            window,
            burst: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            retry_redis_after: DEFAULT_RETRY_REDIS_AFTER,
            policy: FailurePolicy::default(),
            clock: Clock::system(),
            lease: None,
        }
    }

    /// Decides whether `cost` tokens of `key`'s bucket are granted within
    /// `max_wait`, with the full [`Decision`]. [`Limiter::reserve`] is the
    /// same decision in the shape rate-limit layers take.
    ///
    /// Must be called within a tokio runtime (the timeout is a tokio timer).
    pub fn decide<K: RedisKey + ?Sized>(
        &self,
        key: &K,
        cost: u32,
        max_wait: Duration,
    ) -> DecisionFuture {
        let inner = &self.inner;
        if u64::from(cost) > inner.burst {
            return DecisionFuture::ready(inner.over_burst());
        }
        let mut redis_key = String::with_capacity(inner.prefix.len() + 24);
        redis_key.push_str(&inner.prefix);
        key.write_key(&mut redis_key);

        if let Some(leases) = &inner.leases
            && let Some((remaining, reset)) = leases.take(&redis_key, cost, inner.clock.now())
        {
            return DecisionFuture::ready(Decision {
                allowed: true,
                wait: Duration::ZERO,
                remaining,
                reset,
                quota: inner.quota,
                decided_by: DecidedBy::Lease,
            });
        }

        let skip_until = inner.skip_until.load(Ordering::Relaxed);
        if skip_until != 0 && inner.clock.now() < skip_until {
            return DecisionFuture::ready(inner.fallback(&redis_key, cost, max_wait));
        }

        let u = inner.units;
        let mut cmd = Cmd::with_capacity(9, 96 + redis_key.len());
        cmd.arg("EVALSHA")
            .arg(inner.script.get_hash())
            .arg(1)
            .arg(&redis_key)
            .arg(u.w)
            .arg(u.l)
            .arg(u.tol)
            .arg(cost)
            .arg(u.max_wait_us(max_wait))
            .arg(inner.leases.as_ref().map_or(0, Leases::size));
        let keep_key = inner.local.is_some() || inner.leases.is_some();
        let fallback_key = keep_key.then_some(redis_key);
        let call_inner = Arc::clone(inner);
        let call: Call = Box::pin(async move {
            let mut con = call_inner.con.clone();
            match cmd.query_async(&mut con).await {
                // A restarted or flushed Redis forgot the script: load it
                // and ask again (what redis-rs' `Script::invoke_async` does,
                // without its per-call argument vectors).
                Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call_inner.script.load_async(&mut con).await?;
                    cmd.query_async(&mut con).await
                }
                reply => reply,
            }
        });
        DecisionFuture::remote(
            call,
            inner.timeout,
            Arc::clone(inner),
            cost,
            max_wait,
            fallback_key,
        )
    }

    /// The quota this limiter enforces (as advertised in `RateLimit-Policy`).
    pub fn quota(&self) -> Quota {
        self.inner.quota
    }

    /// The largest burst (and the largest cost a request may have).
    pub fn burst(&self) -> u64 {
        self.inner.burst
    }

    /// The Redis key holding `key`'s bucket.
    pub fn redis_key<K: RedisKey + ?Sized>(&self, key: &K) -> String {
        let mut out = self.inner.prefix.clone();
        key.write_key(&mut out);
        out
    }
}

impl<K: RedisKey + ?Sized> Limiter<K> for RedisLimiter {
    type Future = ReserveFuture;

    fn reserve(&self, key: &K, cost: u32, max_wait: Duration) -> Self::Future {
        ReserveFuture::new(self.decide(key, cost, max_wait))
    }
}

/// The reply of the script: allowed, remaining, wait (µs), reset (µs),
/// leased tokens.
pub(crate) type Reply = (i64, i64, i64, i64, i64);

impl Inner {
    fn over_burst(&self) -> Decision {
        // No bucket ever holds this many tokens: "never", as the in-memory
        // buckets say it.
        Decision {
            allowed: false,
            wait: Duration::MAX,
            remaining: 0,
            reset: Duration::ZERO,
            quota: self.quota,
            decided_by: DecidedBy::OverBurst,
        }
    }

    pub(crate) fn on_reply(
        &self,
        reply: Result<Reply, RedisError>,
        key: Option<&str>,
        cost: u32,
        max_wait: Duration,
    ) -> Decision {
        match reply {
            Ok((allowed, remaining, wait_us, reset_us, leased)) => {
                if self.degraded.load(Ordering::Relaxed)
                    && self.degraded.swap(false, Ordering::AcqRel)
                {
                    self.skip_until.store(0, Ordering::Relaxed);
                    if let Some(local) = &self.local {
                        local.clear();
                    }
                    tracing::info!(prefix = %self.prefix, "redis answers again; shared rate limit restored");
                }
                let remaining = u64::try_from(remaining).unwrap_or(0);
                let reset = micros(reset_us);
                if leased > 0
                    && let (Some(leases), Some(key)) = (&self.leases, key)
                {
                    leases.add(key, leased as u64, remaining, reset, self.clock.now());
                }
                Decision {
                    allowed: allowed == 1,
                    wait: micros(wait_us),
                    remaining: remaining + u64::try_from(leased).unwrap_or(0),
                    reset,
                    quota: self.quota,
                    decided_by: DecidedBy::Redis,
                }
            }
            Err(err) => self.on_failure(Failure::Error(&err), key, cost, max_wait),
        }
    }

    pub(crate) fn on_failure(
        &self,
        failure: Failure<'_>,
        key: Option<&str>,
        cost: u32,
        max_wait: Duration,
    ) -> Decision {
        let now = self.clock.now();
        if self.retry_redis_after > 0 {
            self.skip_until.store(
                now.saturating_add(self.retry_redis_after).max(1),
                Ordering::Relaxed,
            );
        }
        self.degraded.store(true, Ordering::Relaxed);
        let reason = match failure {
            Failure::Timeout => "timeout",
            Failure::Error(_) => "error",
        };
        metrics::counter!(
            "apiguard_redis_fallback_total",
            "policy" => self.policy.label(),
            "reason" => reason,
        )
        .increment(1);
        if let Some(suppressed) = self.warn.check(now) {
            match failure {
                Failure::Timeout => tracing::warn!(
                    prefix = %self.prefix,
                    timeout = ?self.timeout,
                    policy = self.policy.label(),
                    suppressed,
                    "redis rate limit: no answer in time; applying the failure policy"
                ),
                Failure::Error(err) => tracing::warn!(
                    prefix = %self.prefix,
                    error = %err,
                    policy = self.policy.label(),
                    suppressed,
                    "redis rate limit: redis failed; applying the failure policy"
                ),
            }
        }
        self.fallback(key.unwrap_or(""), cost, max_wait)
    }

    fn fallback(&self, key: &str, cost: u32, max_wait: Duration) -> Decision {
        match self.policy {
            FailurePolicy::FailOpen => Decision {
                allowed: true,
                wait: Duration::ZERO,
                // What a fresh bucket would say: the real count is unknown.
                remaining: self.burst.saturating_sub(u64::from(cost)),
                reset: Duration::ZERO,
                quota: self.quota,
                decided_by: DecidedBy::FailOpen,
            },
            FailurePolicy::FailClosed { retry_after } => Decision {
                allowed: false,
                wait: retry_after,
                remaining: 0,
                reset: retry_after,
                quota: self.quota,
                decided_by: DecidedBy::FailClosed,
            },
            FailurePolicy::LocalBucket { .. } => match &self.local {
                Some(local) => local.decide(key, cost, max_wait, self.quota),
                // `build` always makes the buckets for this policy.
                None => Decision {
                    allowed: true,
                    wait: Duration::ZERO,
                    remaining: 0,
                    reset: Duration::ZERO,
                    quota: self.quota,
                    decided_by: DecidedBy::LocalBucket,
                },
            },
        }
    }
}

/// Why Redis did not decide.
#[derive(Debug)]
pub(crate) enum Failure<'a> {
    Timeout,
    Error(&'a RedisError),
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// Configures a [`RedisLimiter`]; made by [`RedisLimiter::builder`].
#[derive(Debug, Clone)]
pub struct RedisLimiterBuilder {
    limit: u64,
    window: Duration,
    burst: Option<u64>,
    prefix: String,
    timeout: Duration,
    retry_redis_after: Duration,
    policy: FailurePolicy,
    clock: Clock,
    lease: Option<(u32, Duration)>,
}

impl RedisLimiterBuilder {
    /// The largest burst, in tokens (default: the limit). Also the largest
    /// cost one request may have.
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The prefix of every bucket's key (default [`DEFAULT_PREFIX`]). Give
    /// each distinct limit its own prefix: two limiters with different
    /// quotas must not share buckets.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one decision may wait for Redis before the failure policy
    /// decides instead (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to decide when Redis does not answer in time or fails (default
    /// [`FailurePolicy::FailOpen`]).
    pub fn on_redis_failure(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// After a failure, decisions apply the failure policy at once, without
    /// asking Redis, for this long; then Redis is asked again (default
    /// [`DEFAULT_RETRY_REDIS_AFTER`]). This keeps a dead Redis from adding
    /// the full timeout to every request. `Duration::ZERO` asks Redis every
    /// time.
    pub fn retry_redis_after(mut self, after: Duration) -> Self {
        self.retry_redis_after = after;
        self
    }

    /// Batching for hot keys: whenever a request's tokens are there now,
    /// also take up to `tokens` more from Redis in the same round trip and
    /// hand them out locally for up to `max_age`, so most decisions on a
    /// busy key need no round trip at all. Off by default.
    ///
    /// # The cost
    ///
    /// A leased token is taken from the shared bucket when it is leased but
    /// spent up to `max_age` later, so over any period the instances
    /// together may admit up to `tokens × instances` more than the limit
    /// allows (`capacity + rate × t`); tokens not spent within `max_age` are
    /// lost, so the limit may also be under-used by as much. Keep `tokens`
    /// small next to the burst, and `max_age` short. Leased tokens are
    /// handed out even while Redis is away (they are real tokens).
    pub fn lease(mut self, tokens: u32, max_age: Duration) -> Self {
        self.lease = Some((tokens, max_age));
        self
    }

    /// The local clock, which times the back-off after failures, the
    /// warnings, and the local buckets of [`FailurePolicy::LocalBucket`].
    /// The shared decision never reads it: it uses Redis `TIME`.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Connects to `url` (`redis://host:port/db`) with
    /// [`connection_manager_config`], loads the script, and builds the
    /// limiter. Fails if the configuration is invalid or Redis cannot be
    /// reached now; [`build_lazy`](Self::build_lazy) starts without Redis.
    pub async fn connect(self, url: &str) -> Result<RedisLimiter, BuildError> {
        self.validate()?;
        let client = redis::Client::open(url)?;
        let con = ConnectionManager::new_with_config(client, connection_manager_config()).await?;
        self.build(con).await
    }

    /// Builds the limiter on an existing connection and loads the script,
    /// so the first decision does not pay the `NOSCRIPT` round trips.
    pub async fn build(self, mut con: ConnectionManager) -> Result<RedisLimiter, BuildError> {
        let limiter = self.build_lazy(con.clone())?;
        limiter.inner.script.load_async(&mut con).await?;
        Ok(limiter)
    }

    /// Builds the limiter without talking to Redis: for services that must
    /// start while Redis is away (pair it with
    /// `ConnectionManager::new_lazy_with_config`). The first decisions may
    /// fall to the failure policy while the connection is made and the
    /// script loaded.
    pub fn build_lazy(self, con: ConnectionManager) -> Result<RedisLimiter, InvalidConfig> {
        let (units, burst) = self.validate()?;
        let local = match self.policy {
            FailurePolicy::LocalBucket { expected_instances } => Some(LocalBuckets::new(
                self.limit,
                self.window,
                burst,
                expected_instances,
                self.clock.clone(),
            )?),
            _ => None,
        };
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                con,
                script: Script::new(GCRA_LUA),
                units,
                burst,
                quota: Quota {
                    limit: self.limit,
                    window: self.window,
                },
                prefix: self.prefix,
                timeout: self.timeout,
                retry_redis_after: duration_to_nanos(self.retry_redis_after),
                policy: self.policy,
                clock: self.clock,
                skip_until: AtomicU64::new(0),
                degraded: AtomicBool::new(false),
                warn: WarnGate::default(),
                local,
                leases: self
                    .lease
                    .filter(|(n, _)| *n > 0)
                    .map(|(n, age)| Leases::new(n, duration_to_nanos(age))),
            }),
        })
    }

    fn validate(&self) -> Result<(Units, u64), InvalidConfig> {
        let burst = self.burst.unwrap_or(self.limit);
        let units = Units::new(self.limit, self.window, burst)?;
        if self.timeout.is_zero() {
            return Err(InvalidConfig::new("timeout", "must be more than zero"));
        }
        if let Some((tokens, max_age)) = self.lease {
            if u64::from(tokens) >= burst {
                return Err(InvalidConfig::new(
                    "lease",
                    "must be smaller than the burst (one lease would take all of it)",
                ));
            }
            if tokens > 0 && max_age.is_zero() {
                return Err(InvalidConfig::new(
                    "lease",
                    "max_age must be more than zero",
                ));
            }
        }
        if let FailurePolicy::LocalBucket {
            expected_instances: 0,
        } = self.policy
        {
            return Err(InvalidConfig::new(
                "expected_instances",
                "must be at least 1",
            ));
        }
        Ok((units, burst))
    }
}
