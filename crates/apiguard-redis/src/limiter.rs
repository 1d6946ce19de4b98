//! The Redis-backed GCRA limiter.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiguard_core::clock::{duration_to_nanos, nanos_to_duration};
use apiguard_core::{Clock, InvalidConfig, Nanos, Quota, QuotaPolicy, RateLimited};
use apiguard_ratelimit::Limiter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisError, Script};

use crate::cluster::Shards;
use crate::conn::{Conn, cluster_client};

use crate::debit::Debits;
use crate::error::BuildError;
use crate::future::{Call, DecisionFuture, ReserveFuture};
use crate::health::{
    DEFAULT_PROBE_EVERY, DEFAULT_TIMEOUT_CEILING, DEFAULT_TIMEOUT_FLOOR, Health, Miss, Monitor,
    TimeoutRule,
};
use crate::key::RedisKey;
use crate::lease::Leases;
use crate::local::LocalBuckets;
use crate::policy::FailurePolicy;
use crate::script::{GCRA_LUA, HEARTBEAT_LUA, Units};
use crate::warn::WarnGate;

/// The prefix of every bucket key unless [`RedisLimiterBuilder::prefix`]
/// says otherwise.
pub const DEFAULT_PREFIX: &str = "apiguard:rl:";

/// The register of live instances is the Redis key `prefix` followed by
/// this (so no bucket may be named `~instances`).
pub const INSTANCES_SUFFIX: &str = "~instances";

/// How often each limiter tells Redis' register it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// An instance counts as live for this long after its last heartbeat.
pub const INSTANCE_LIVE_FOR: Duration = Duration::from_secs(3);

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

/// Who made a [`Decision`]. The `decided_by` label of the metric
/// `apiguard_redis_decisions_total` is [`label`](Self::label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecidedBy {
    /// The shared bucket in Redis (`redis`).
    Redis,
    /// [`FailurePolicy::LocalShare`] while Redis is away: this instance's
    /// share, in a local bucket (`fallback`).
    LocalShare,
    /// [`FailurePolicy::AdmitAll`]: admitted without Redis, a single miss
    /// or while away (`open`).
    AdmitAll,
    /// Refused without Redis (`closed`): [`FailurePolicy::FailClosed`]
    /// while Redis is away, or a single miss under any policy but
    /// [`AdmitAll`](FailurePolicy::AdmitAll).
    FailClosed,
    /// The limiter itself: the request costs more than the burst, so no
    /// bucket could ever admit it (`over_burst`).
    OverBurst,
    /// Tokens this instance leased from Redis earlier
    /// ([`RedisLimiterBuilder::lease`]) (`lease`).
    Lease,
}

impl DecidedBy {
    /// The name metrics and traces use.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::LocalShare => "fallback",
            Self::AdmitAll => "open",
            Self::FailClosed => "closed",
            Self::OverBurst => "over_burst",
            Self::Lease => "lease",
        }
    }
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
    /// The policy this limiter enforces, as `RateLimit-Policy` states it.
    pub policy: QuotaPolicy,
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
                policy: Some(self.policy),
            })
        } else {
            Err(RateLimited::new(self.wait).with_policy(self.policy))
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
    con: Conn,
    /// On a cluster: each master's monitor, by slot.
    shards: Option<Arc<Shards>>,
    script: Script,
    units: Units,
    burst: u64,
    quota: Quota,
    advertised: QuotaPolicy,
    prefix: String,
    policy: FailurePolicy,
    /// The injected clock: local buckets, probes, the miss count.
    clock: Clock,
    /// Always the system clock: round trips and deadlines are real time.
    real: Clock,
    monitor: Monitor,
    debits: Debits,
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
            .field("policy", &i.policy)
            .field("health", &i.monitor.health())
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A builder for a limit of `quota` (its [`limit`](Quota::limit) per
    /// [`window`](Quota::window), in bursts of up to its
    /// [`burst`](Quota::burst)), shared through Redis.
    pub fn builder(quota: Quota) -> RedisLimiterBuilder {
        RedisLimiterBuilder {
            quota,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: TimeoutRule::Adaptive {
                floor: duration_to_nanos(DEFAULT_TIMEOUT_FLOOR),
                ceiling: duration_to_nanos(DEFAULT_TIMEOUT_CEILING),
            },
            probe_every: DEFAULT_PROBE_EVERY,
            policy: FailurePolicy::default(),
            clock: Clock::system(),
            lease: None,
            instances: 0,
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
        let redis_key = inner.redis_key(key);

        if let Some(leases) = &inner.leases
            && let Some((remaining, reset)) = leases.take(&redis_key, cost, inner.clock.now())
        {
            return DecisionFuture::ready(Decision {
                allowed: true,
                wait: Duration::ZERO,
                remaining,
                reset,
                policy: inner.advertised,
                decided_by: DecidedBy::Lease,
            });
        }

        let shard = inner
            .shards
            .as_ref()
            .and_then(|s| s.monitor_for(&redis_key));
        let monitor = shard.as_deref().unwrap_or(&inner.monitor);
        if monitor.is_away() {
            if monitor.take_probe(inner.clock.now()) {
                tokio::spawn(probe(Arc::clone(inner), redis_key.clone(), shard));
            }
            return DecisionFuture::ready(inner.fallback(&redis_key, cost, max_wait));
        }
        let debit = inner.debits.take(&redis_key);
        let timeout = monitor.timeout();
        let sent = inner.real.now();
        let cmd = inner.script_cmd(monitor, &redis_key, cost, max_wait, sent, timeout, debit);
        let call: Call = Box::pin(run_script(Arc::clone(inner), cmd));
        DecisionFuture::remote(
            call,
            Arc::clone(inner),
            crate::future::Pending {
                timeout: nanos_to_duration(timeout),
                cost,
                max_wait,
                key: redis_key,
                sent,
                debit,
                shard,
            },
        )
    }

    /// How this limiter sees Redis now: [`Mode`](crate::Mode), the current
    /// timeout and round trip, the instance count the local share uses.
    ///
    /// On a cluster, [`Health::shards`] counts the masters of the slot map
    /// and [`Health::shards_away`] those whose slots the failure policy
    /// decides now; the mode is [`Fallback`](crate::Mode::Fallback) while
    /// any is away, and the round trip and timeout are those of the first
    /// master that answered (or of the limiter before the slot map is
    /// known).
    pub fn health(&self) -> Health {
        let mut h = self.inner.monitor.health();
        if let Some(shards) = &self.inner.shards {
            let (n, away) = shards.summary();
            h.shards = Some(n);
            h.shards_away = away;
            if away > 0 {
                h.mode = crate::Mode::Fallback;
            }
            if let Some(first) = shards.first_answered() {
                let fh = first.health();
                h.rtt = fh.rtt;
                h.timeout = fh.timeout;
            }
        }
        h
    }

    /// Whether this limiter talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.con.is_cluster()
    }

    /// The quota this limiter enforces.
    pub fn quota(&self) -> Quota {
        self.inner.quota
    }

    /// The quota as advertised in `RateLimit-Policy`: `limit` per `window`.
    pub fn policy(&self) -> QuotaPolicy {
        self.inner.advertised
    }

    /// The largest burst (and the largest cost a request may have).
    pub fn burst(&self) -> u64 {
        self.inner.burst
    }

    /// The Redis key holding `key`'s bucket: the prefix and the key's text
    /// on one node; on a cluster the key's text is a hash tag,
    /// `prefix{key}`, so its slot (and master) follows from the key alone.
    pub fn redis_key<K: RedisKey + ?Sized>(&self, key: &K) -> String {
        self.inner.redis_key(key)
    }
}

impl<K: RedisKey + ?Sized> Limiter<K> for RedisLimiter {
    type Future = ReserveFuture;

    fn reserve(&self, key: &K, cost: u32, max_wait: Duration) -> Self::Future {
        ReserveFuture::new(self.decide(key, cost, max_wait))
    }
}

/// The reply of the script: allowed (-1: too late, nothing done),
/// remaining, wait (µs), reset (µs), leased tokens, Redis time (µs).
pub(crate) type Reply = (i64, i64, i64, i64, i64, i64);

/// Runs the decision script once, loading it again if Redis forgot it (a
/// restarted or flushed node; on a cluster, a promoted replica).
async fn run_script(inner: Arc<Inner>, cmd: Cmd) -> Result<Reply, RedisError> {
    let mut con = inner.con.clone();
    crate::conn::eval(&mut con, &inner.script, GCRA_LUA, &cmd).await
}

/// While away: asks Redis, in the background, a decision that costs nothing
/// (it reads `TIME`, writes nothing) on `key`'s bucket; an answer in time
/// brings the limiter back to Redis.
async fn probe(inner: Arc<Inner>, key: String, shard: Option<Arc<Monitor>>) {
    let monitor = shard.as_deref().unwrap_or(&inner.monitor);
    let timeout = monitor.timeout();
    let sent = inner.real.now();
    let cmd = inner.script_cmd(monitor, &key, 0, Duration::ZERO, sent, timeout, 0);
    let reply = tokio::time::timeout(
        nanos_to_duration(timeout),
        run_script(Arc::clone(&inner), cmd),
    )
    .await;
    match reply {
        Ok(Ok(reply)) => {
            monitor.sample(sent, inner.real.now(), reply.5);
            if reply.0 >= 0 && monitor.answered() {
                inner.came_back();
            }
        }
        Ok(Err(err)) => tracing::debug!(error = %err, "redis rate limit: probe failed"),
        Err(_) => tracing::debug!("redis rate limit: probe timed out"),
    }
    monitor.probe_done(inner.clock.now());
}

impl Inner {
    /// The decision script for `key`, with a deadline half the timeout
    /// after `sent`: the script must run within the first half, so an
    /// admission has the other half to reach us; later, it refuses without
    /// spending (the caller has been answered without it).
    #[allow(clippy::too_many_arguments)]
    fn script_cmd(
        &self,
        monitor: &Monitor,
        key: &str,
        cost: u32,
        max_wait: Duration,
        sent: Nanos,
        timeout: Nanos,
        debit: u64,
    ) -> Cmd {
        let deadline = monitor.to_redis_us(sent.saturating_add(timeout / 2));
        let u = self.units;
        let mut cmd = Cmd::with_capacity(12, 128 + key.len());
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(1)
            .arg(key)
            .arg(u.w)
            .arg(u.l)
            .arg(u.tol)
            .arg(cost);
        // The script takes the rest as zero when left off: each one not
        // sent is a string Redis need not make and the script need not
        // read.
        let rest = [
            deadline.unwrap_or(0),
            u.max_wait_us(max_wait),
            self.leases.as_ref().map_or(0, |l| u64::from(l.size())),
            debit,
        ];
        let sent_args = rest.iter().rposition(|&a| a != 0).map_or(0, |i| i + 1);
        for arg in &rest[..sent_args] {
            cmd.arg(*arg);
        }
        cmd
    }

    pub(crate) fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// `key`'s bucket: `prefix` + key on one node, `prefix{key}` on a
    /// cluster.
    fn redis_key<K: RedisKey + ?Sized>(&self, key: &K) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 26);
        out.push_str(&self.prefix);
        if self.shards.is_some() {
            out.push('{');
            key.write_key(&mut out);
            out.push('}');
        } else {
            key.write_key(&mut out);
        }
        out
    }

    fn came_back(&self) {
        metrics::gauge!("apiguard_redis_fallback").set(0.0);
        metrics::counter!("apiguard_redis_mode_changes_total", "to" => "redis").increment(1);
        tracing::info!(
            prefix = %self.prefix,
            "redis answers again; the shared rate limit decides again"
        );
    }

    fn over_burst(&self) -> Decision {
        // No bucket ever holds this many tokens: "never", as the in-memory
        // buckets say it.
        Decision {
            allowed: false,
            wait: Duration::MAX,
            remaining: 0,
            reset: Duration::ZERO,
            policy: self.advertised,
            decided_by: DecidedBy::OverBurst,
        }
    }

    pub(crate) fn on_reply(
        &self,
        reply: Result<Reply, RedisError>,
        pending: &crate::future::Pending,
    ) -> Decision {
        let (allowed, remaining, wait_us, reset_us, leased, now_us) = match reply {
            Ok(reply) => reply,
            Err(err) => return self.on_miss(Failure::Error(&err), pending),
        };
        let monitor = pending.monitor(self);
        monitor.sample(pending.sent, self.real.now(), now_us);
        if allowed < 0 {
            return self.on_miss(Failure::Late, pending);
        }
        if monitor.answered() {
            self.came_back();
        }
        let remaining = u64::try_from(remaining).unwrap_or(0);
        let reset = micros(reset_us);
        if leased > 0
            && let Some(leases) = &self.leases
        {
            leases.add(
                &pending.key,
                leased as u64,
                remaining,
                reset,
                self.clock.now(),
            );
        }
        Decision {
            allowed: allowed == 1,
            wait: micros(wait_us),
            remaining: remaining + u64::try_from(leased).unwrap_or(0),
            reset,
            policy: self.advertised,
            decided_by: DecidedBy::Redis,
        }
    }

    pub(crate) fn on_miss(
        &self,
        failure: Failure<'_>,
        pending: &crate::future::Pending,
    ) -> Decision {
        // The debit did not reach Redis (or a late script dropped it).
        self.debits.add(&pending.key, pending.debit);
        let reason = failure.label();
        metrics::counter!("apiguard_redis_failures_total", "reason" => reason).increment(1);
        let key = pending.key.as_str();
        let now = self.clock.now();
        let monitor = pending.monitor(self);
        match monitor.missed(now) {
            Miss::Left => {
                if let Some(local) = &self.local {
                    local.reset(self.monitor.instances());
                }
                metrics::gauge!("apiguard_redis_fallback").set(1.0);
                metrics::counter!("apiguard_redis_mode_changes_total", "to" => "fallback")
                    .increment(1);
                let mut health = monitor.health();
                health.instances = self.monitor.health().instances;
                match failure {
                    Failure::Error(err) => tracing::warn!(
                        prefix = %self.prefix,
                        error = %err,
                        policy = self.policy.label(),
                        instances = ?health.instances,
                        "redis rate limit: redis failed {} times in a row; the failure policy decides until it answers again",
                        health.failures_in_a_row,
                    ),
                    _ => tracing::warn!(
                        prefix = %self.prefix,
                        reason,
                        timeout_ms = health.timeout.as_millis() as u64,
                        policy = self.policy.label(),
                        instances = ?health.instances,
                        "redis rate limit: no answer in time {} times in a row; the failure policy decides until redis answers again",
                        health.failures_in_a_row,
                    ),
                }
                self.fallback(key, pending.cost, pending.max_wait)
            }
            Miss::Away => self.fallback(key, pending.cost, pending.max_wait),
            Miss::Stay => {
                if let Some(suppressed) = self.warn.check(now) {
                    tracing::warn!(
                        prefix = %self.prefix,
                        reason,
                        timeout_ms = pending.timeout.as_millis() as u64,
                        suppressed,
                        "redis rate limit: one decision missed; decided alone, redis stays in charge"
                    );
                }
                self.single_miss(key, pending.cost, pending.timeout)
            }
        }
    }

    /// A miss while Redis is still in charge: only [`FailurePolicy::AdmitAll`]
    /// admits it (Redis cannot have counted it).
    fn single_miss(&self, key: &str, cost: u32, timeout: Duration) -> Decision {
        match self.policy {
            FailurePolicy::AdmitAll => self.admit_all(key, cost),
            _ => Decision {
                allowed: false,
                wait: timeout,
                remaining: 0,
                reset: timeout,
                policy: self.advertised,
                decided_by: DecidedBy::FailClosed,
            },
        }
    }

    fn admit_all(&self, key: &str, cost: u32) -> Decision {
        self.debits.add(key, u64::from(cost));
        Decision {
            allowed: true,
            wait: Duration::ZERO,
            // What a fresh bucket would say: the real count is unknown.
            remaining: self.burst.saturating_sub(u64::from(cost)),
            reset: Duration::ZERO,
            policy: self.advertised,
            decided_by: DecidedBy::AdmitAll,
        }
    }

    /// The decision while Redis is away.
    fn fallback(&self, key: &str, cost: u32, max_wait: Duration) -> Decision {
        match self.policy {
            FailurePolicy::AdmitAll => self.admit_all(key, cost),
            FailurePolicy::FailClosed { retry_after } => Decision {
                allowed: false,
                wait: retry_after,
                remaining: 0,
                reset: retry_after,
                policy: self.advertised,
                decided_by: DecidedBy::FailClosed,
            },
            FailurePolicy::LocalShare => {
                let d = match &self.local {
                    Some(local) => local.decide(key, cost, max_wait, self.advertised),
                    // `build` always makes the buckets for this policy.
                    None => Decision {
                        allowed: false,
                        wait: self.advertised.window,
                        remaining: 0,
                        reset: self.advertised.window,
                        policy: self.advertised,
                        decided_by: DecidedBy::LocalShare,
                    },
                };
                if d.allowed {
                    self.debits.add(key, u64::from(cost));
                }
                d
            }
        }
    }
}

/// Counts and traces one decision.
pub(crate) fn record(d: &Decision) {
    let outcome = if d.allowed { "admitted" } else { "refused" };
    metrics::counter!(
        "apiguard_redis_decisions_total",
        "decided_by" => d.decided_by.label(),
        "outcome" => outcome,
    )
    .increment(1);
    tracing::trace!(
        decided_by = d.decided_by.label(),
        allowed = d.allowed,
        wait_ms = d.wait.as_millis() as u64,
        remaining = d.remaining,
        "redis rate limit decision"
    );
}

/// Why Redis did not decide.
#[derive(Debug)]
pub(crate) enum Failure<'a> {
    /// No answer within the timeout.
    Timeout,
    /// An answer, but the script ran after the caller's deadline.
    Late,
    Error(&'a RedisError),
}

impl Failure<'_> {
    fn label(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Late => "late",
            Self::Error(_) => "error",
        }
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// Configures a [`RedisLimiter`]; made by [`RedisLimiter::builder`].
#[derive(Debug, Clone)]
pub struct RedisLimiterBuilder {
    quota: Quota,
    prefix: String,
    timeout: TimeoutRule,
    probe_every: Duration,
    policy: FailurePolicy,
    clock: Clock,
    lease: Option<(u32, Duration)>,
    instances: u32,
}

impl RedisLimiterBuilder {
    /// The prefix of every bucket's key (default [`DEFAULT_PREFIX`]). Give
    /// each distinct limit its own prefix: two limiters with different
    /// quotas must not share buckets (nor their register of instances).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// A fixed decision timeout instead of the measured one.
    ///
    /// By default the timeout follows the round trips Redis answers in:
    /// `srtt + 4 × rttvar` (the smoothed round trip and its mean deviation,
    /// as TCP sets its retransmission timeout), within
    /// [`DEFAULT_TIMEOUT_FLOOR`](crate::DEFAULT_TIMEOUT_FLOOR) (20 ms) and
    /// [`DEFAULT_TIMEOUT_CEILING`](crate::DEFAULT_TIMEOUT_CEILING) (200 ms,
    /// also the timeout before the first round trip).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = TimeoutRule::Fixed(duration_to_nanos(timeout));
        self
    }

    /// The measured timeout, within other bounds than the defaults.
    pub fn timeout_bounds(mut self, floor: Duration, ceiling: Duration) -> Self {
        self.timeout = TimeoutRule::Adaptive {
            floor: duration_to_nanos(floor),
            ceiling: duration_to_nanos(ceiling),
        };
        self
    }

    /// What to decide when Redis misses decisions (default
    /// [`FailurePolicy::LocalShare`]).
    pub fn on_redis_failure(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many instances share this limit, at least: the local share of
    /// [`FailurePolicy::LocalShare`] is `1 / n` of it. Optional: every
    /// limiter also registers in Redis (a sorted set at `prefix` +
    /// [`INSTANCES_SUFFIX`], one heartbeat per [`HEARTBEAT_EVERY`]) and the
    /// share uses the larger of this hint and the live count it last read.
    /// Give it when instances may start while Redis is away.
    pub fn instances(mut self, n: u32) -> Self {
        self.instances = n;
        self
    }

    /// While Redis is away, how long after a failed probe the next one goes
    /// (default [`DEFAULT_PROBE_EVERY`](crate::DEFAULT_PROBE_EVERY), 10 ms).
    /// A probe is a decision that costs nothing, sent in the background by
    /// the first request after this wait (requests themselves are decided
    /// by the failure policy at once); its first answer in time brings the
    /// limiter back.
    pub fn probe_every(mut self, every: Duration) -> Self {
        self.probe_every = every;
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
    /// handed out even while Redis is away (they are real tokens). A lease
    /// is only taken by a script that ran within the caller's deadline.
    pub fn lease(mut self, tokens: u32, max_age: Duration) -> Self {
        self.lease = Some((tokens, max_age));
        self
    }

    /// The local clock, which times probes, the misses that make the limiter
    /// leave Redis, the warnings, and the local buckets of
    /// [`FailurePolicy::LocalShare`]. The shared decision never reads it
    /// (it uses Redis `TIME`), nor do round trips and deadlines, which are
    /// real time whatever this says.
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

    /// Builds the limiter on an existing connection, loads the script (so
    /// the first decision does not pay the `NOSCRIPT` round trips) and
    /// reads Redis `TIME` once (so the first decision already carries its
    /// deadline).
    pub async fn build(self, mut con: ConnectionManager) -> Result<RedisLimiter, BuildError> {
        let limiter = self.build_lazy(con.clone())?;
        let inner = &limiter.inner;
        inner.script.load_async(&mut con).await?;
        let sent = inner.real.now();
        let (s, us): (i64, i64) = redis::cmd("TIME").query_async(&mut con).await?;
        inner
            .monitor
            .sample(sent, inner.real.now(), s.saturating_mul(1_000_000) + us);
        Ok(limiter)
    }

    /// Builds the limiter without talking to Redis: for services that must
    /// start while Redis is away (pair it with
    /// `ConnectionManager::new_lazy_with_config`). Until Redis first
    /// answers, decisions carry no deadline, and the local share is only
    /// known from [`instances`](Self::instances).
    ///
    /// Called within a tokio runtime, it starts the heartbeat that keeps
    /// this instance in Redis' register (a task that ends when the last
    /// clone of the limiter is dropped); elsewhere there is none, and only
    /// the hint sizes the local share.
    pub fn build_lazy(self, con: ConnectionManager) -> Result<RedisLimiter, InvalidConfig> {
        self.build_on(Conn::Single(con))
    }

    /// Connects to the Redis Cluster that the seed nodes `seeds`
    /// (`redis://host:port/`, one or more of its nodes) belong to, with
    /// [`cluster_client`](crate::cluster_client)'s settings, reads its slot
    /// map, and builds the limiter. Fails if the configuration is invalid
    /// (a prefix with `{`, see [`build_lazy_cluster`](Self::build_lazy_cluster))
    /// or no seed answers now.
    pub async fn connect_cluster<S: AsRef<str>>(
        self,
        seeds: &[S],
    ) -> Result<RedisLimiter, BuildError> {
        self.validate()?;
        self.validate_cluster()?;
        let con = cluster_client(seeds)?.get_async_connection().await?;
        self.build_cluster(con).await
    }

    /// Builds the limiter on an existing cluster connection, reads the slot
    /// map once (so the first decisions already know their master) and
    /// loads the script on every node (best effort: a node that does not
    /// have it gets it with its first decision).
    pub async fn build_cluster(self, con: ClusterConnection) -> Result<RedisLimiter, BuildError> {
        let limiter = self.build_lazy_cluster(con)?;
        let inner = &limiter.inner;
        let mut con = inner.con.clone();
        let reply: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut con)
            .await?;
        if let (Some(shards), Some(ranges)) = (&inner.shards, crate::cluster::parse_slots(&reply)) {
            shards.update(&ranges);
        }
        if let Err(err) = inner.script.load_async(&mut con).await {
            tracing::debug!(error = %err, "redis cluster: SCRIPT LOAD failed on some node");
        }
        Ok(limiter)
    }

    /// Builds the limiter on a cluster connection without talking to Redis
    /// (pair it with `ClusterClient::get_pending_async_connection_with_config`).
    ///
    /// On a cluster every bucket's key is `prefix{key}`: the key's text is
    /// the hash tag, so each decision touches one slot and keys spread over
    /// every master. A prefix containing `{` would put its own hash tag
    /// first (every key on one master) and is refused (`prefix`).
    ///
    /// Called within a tokio runtime, it starts the heartbeat (as
    /// [`build_lazy`](Self::build_lazy)) and a task that reads the slot map
    /// (`CLUSTER SLOTS`) every [`SLOTS_REFRESH_EVERY`](crate::SLOTS_REFRESH_EVERY):
    /// each master has its own round trip, deadline offset and failure
    /// count, so the keys of a master that stops answering go to the
    /// failure policy while the other masters keep deciding, and come back
    /// to Redis as soon as the slot map names the promoted replica (or a
    /// probe of the old master answers).
    pub fn build_lazy_cluster(self, con: ClusterConnection) -> Result<RedisLimiter, InvalidConfig> {
        self.validate_cluster()?;
        self.build_on(Conn::Cluster(con))
    }

    fn validate_cluster(&self) -> Result<(), InvalidConfig> {
        if self.prefix.contains('{') {
            return Err(InvalidConfig::new(
                "prefix",
                "must not contain '{' on a Redis Cluster: the key's text is the hash tag \
                 (`prefix{key}`), and a tag in the prefix would put every key on one master",
            ));
        }
        Ok(())
    }

    fn build_on(self, con: Conn) -> Result<RedisLimiter, InvalidConfig> {
        let (units, burst) = self.validate()?;
        let local = matches!(self.policy, FailurePolicy::LocalShare)
            .then(|| LocalBuckets::new(self.quota, self.clock.clone()));
        let shards = con
            .is_cluster()
            .then(|| Arc::new(Shards::new(self.timeout, self.probe_every, self.instances)));
        let inner = Arc::new(Inner {
            con,
            shards,
            script: Script::new(GCRA_LUA),
            units,
            burst,
            quota: self.quota,
            advertised: QuotaPolicy {
                limit: self.quota.limit(),
                window: self.quota.window(),
            },
            prefix: self.prefix,
            policy: self.policy,
            clock: self.clock,
            real: Clock::system(),
            monitor: Monitor::new(self.timeout, self.probe_every, self.instances),
            debits: Debits::default(),
            warn: WarnGate::default(),
            local,
            leases: self
                .lease
                .filter(|(n, _)| *n > 0)
                .map(|(n, age)| Leases::new(n, duration_to_nanos(age))),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(heartbeat(Arc::downgrade(&inner)));
            if let Some(shards) = &inner.shards {
                rt.spawn(crate::cluster::refresh(
                    inner.con.clone(),
                    Arc::downgrade(shards),
                ));
            }
        }
        Ok(RedisLimiter { inner })
    }

    fn validate(&self) -> Result<(Units, u64), InvalidConfig> {
        let quota = self.quota.validate()?;
        let burst = quota.burst();
        let units = Units::new(quota.limit(), quota.window(), burst)?;
        match self.timeout {
            TimeoutRule::Fixed(0) => {
                return Err(InvalidConfig::new("timeout", "must be more than zero"));
            }
            TimeoutRule::Adaptive { floor, ceiling } if floor == 0 || ceiling < floor => {
                return Err(InvalidConfig::new(
                    "timeout_bounds",
                    "the floor must be more than zero and the ceiling at least the floor",
                ));
            }
            _ => {}
        }
        if self.probe_every.is_zero() {
            return Err(InvalidConfig::new("probe_every", "must be more than zero"));
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
        Ok((units, burst))
    }
}

/// Keeps this instance in Redis' register of live instances and reads how
/// many there are, until the limiter is dropped.
async fn heartbeat(inner: Weak<Inner>) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let id = format!(
        "{}:{since_epoch}:{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let script = Script::new(HEARTBEAT_LUA);
    let mut register = String::new();
    let live_us = INSTANCE_LIVE_FOR.as_micros() as u64;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let mut con = inner.con.clone();
        register.clear();
        register.push_str(&inner.prefix);
        register.push_str(INSTANCES_SUFFIX);
        let mut cmd = crate::conn::evalsha(&script, &[&register]);
        cmd.arg(&id).arg(live_us);
        let call = crate::conn::eval::<u32>(&mut con, &script, HEARTBEAT_LUA, &cmd);
        let beat = tokio::time::timeout(HEARTBEAT_EVERY, call);
        match beat.await {
            Ok(Ok(n)) => inner.monitor.set_learned_instances(n),
            Ok(Err(err)) => tracing::debug!(error = %err, "redis rate limit: heartbeat failed"),
            Err(_) => tracing::debug!("redis rate limit: heartbeat timed out"),
        }
    }
}
