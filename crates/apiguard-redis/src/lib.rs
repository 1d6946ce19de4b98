//! Rate limits shared by many instances through Redis.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use apiguard_core::RejectionResponseLayer;
//! use apiguard_ratelimit::{KeyedRateLimitLayer, extract::HeaderKey};
//! use apiguard_redis::{FailurePolicy, Quota, RedisLimiter};
//! use http::{HeaderName, Request, Response};
//! use tower::{ServiceBuilder, service_fn};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // 100 requests per second per API key, shared by every instance. If
//! // Redis goes away, each instance enforces its share of the limit on its
//! // own (the default policy, spelled out here); `instances(4)` says how
//! // many share it at least, for instances that start while Redis is away.
//! let limiter = RedisLimiter::builder(Quota::per_second(100).with_burst(20))
//!     .prefix("myapp:rl:")
//!     .on_redis_failure(FailurePolicy::local_share())
//!     .instances(4)
//!     .connect("redis://127.0.0.1:6379/")
//!     .await?;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(RejectionResponseLayer::new()) // 429 + Retry-After + RateLimit
//!     .layer(KeyedRateLimitLayer::new(
//!         limiter,
//!         HeaderKey::new(HeaderName::from_static("x-api-key")),
//!     ))
//!     .service(service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("hello")))
//!     }));
//! # let _ = svc;
//! # Ok(())
//! # }
//! ```
//!
//! [`RedisLimiter`] implements [`apiguard_ratelimit::Limiter`], the trait the
//! in-memory buckets implement, so the rate-limit layers take it as they
//! take a `TokenBucket`; keys are anything that implements [`RedisKey`].
//!
//! # The decision
//!
//! Each decision is one `EVALSHA` of a Lua script (the `redis` crate loads
//! it again on `NOSCRIPT`) implementing GCRA, the algorithm of the
//! in-memory buckets:
//!
//! - **Redis' clock, not ours.** The script reads Redis `TIME`, so
//!   instances whose clocks disagree still share one timeline.
//! - **Exact integers.** Time is counted in microseconds and fractions of a
//!   microsecond chosen so one token is a whole number of them (Lua numbers
//!   are doubles, exact to 2^53); a rate of 3 per second is exactly 3 per
//!   second, not 3.000003. Quotas the arithmetic cannot hold exactly are
//!   refused when built.
//! - **One key per bucket, with a TTL.** The key holds the theoretical
//!   arrival time and expires when the bucket is full again (`PX` rounded up
//!   to the millisecond): idle keys cost nothing, and each call touches one
//!   key, so it works on Redis Cluster.
//! - **Weighted costs and reservations.** A request may cost several tokens;
//!   with a `max_wait`, tokens due within it are reserved (the caller waits
//!   [`Decision::wait`]), and a refusal reserves nothing. A cost above the
//!   burst is refused without asking Redis, with a wait of `Duration::MAX`
//!   (it would never fit), as the in-memory buckets do.
//! - **The `RateLimit` fields.** A [`Decision`] carries remaining tokens,
//!   the wait (`Retry-After`) and the reset.
//! - **Leases for hot keys** (opt-in, [`RedisLimiterBuilder::lease`]): take
//!   a few tokens more per round trip and hand them out locally, at a
//!   documented cost in precision.
//!
//! # When Redis is slow or away
//!
//! The defaults keep a fleet within its limit when Redis hiccups:
//!
//! - **A measured timeout.** Each decision waits for Redis at most
//!   `srtt + 4 × rttvar` of the round trips it measures, within 20 ms
//!   ([`DEFAULT_TIMEOUT_FLOOR`]) and 200 ms ([`DEFAULT_TIMEOUT_CEILING`]);
//!   [`RedisLimiterBuilder::timeout`] fixes it instead.
//! - **No late spending.** The script carries the caller's deadline in
//!   Redis `TIME` (half the timeout after sending, through an offset
//!   between our clock and Redis' that is never overestimated); a script
//!   that runs later answers "too late" and spends nothing, leases
//!   included. So a decision the policy answered never also spends a
//!   token in Redis, and a paused Redis does not spend the burst it saved
//!   on the scripts queued meanwhile.
//! - **Hysteresis.** One missed answer does not change who decides: it is
//!   refused (admitted under [`FailurePolicy::AdmitAll`]) and Redis stays
//!   in charge. The limiter leaves Redis for the [`FailurePolicy`] only
//!   after [`FAILURES_TO_LEAVE`] (3) misses in a row spread over at least
//!   one timeout, so a stall of this process, which times out every
//!   decision in flight at once, does not count as an outage. Away, every
//!   decision is the policy's at once, and a probe in the background (one
//!   at a time, [`DEFAULT_PROBE_EVERY`] after the last failed) asks Redis
//!   again; its first answer in time brings the limiter back.
//! - **The local share.** The default policy,
//!   [`FailurePolicy::LocalShare`], enforces `1 / n` of the limit in local
//!   buckets that start empty, `n` being the instances sharing the limit:
//!   each limiter registers in Redis (a heartbeat per second to the sorted
//!   set `prefix` + [`INSTANCES_SUFFIX`]) and reads how many are live;
//!   [`RedisLimiterBuilder::instances`] sets a lower bound. Tokens admitted
//!   without Redis are taken from the shared bucket by the key's next
//!   decision Redis runs. [`FailurePolicy::FailClosed`] refuses and
//!   [`FailurePolicy::AdmitAll`] (fail open) admits; see [`FailurePolicy`]
//!   for each one's documented share.
//! - **Visible.** [`RedisLimiter::health`] reports the [`Mode`], the
//!   timeout, the round trip and the instance count. The `metrics` crate
//!   gets `apiguard_redis_decisions_total` (labels `decided_by` =
//!   `redis`/`fallback`/`open`/`closed`/`lease`/`over_burst`, `outcome` =
//!   `admitted`/`refused`), `apiguard_redis_rtt_seconds` (a histogram of
//!   round trips), `apiguard_redis_failures_total` (`reason` =
//!   `timeout`/`error`/`late`), the gauge `apiguard_redis_fallback` (1
//!   while away) and `apiguard_redis_mode_changes_total` (`to`). `tracing`
//!   logs a warning when the limiter leaves Redis, an info line when it
//!   returns, a warning for single misses at most every ten seconds, and
//!   each decision at `trace` level.
//!
//! The connection manager reconnects in the background; decisions never
//! wait for it beyond the timeout.
//!
//! # Shared breaker signal
//!
//! [`SharedBreakerSignal`] (opt-in) lets circuit breakers of many instances
//! share their trips: a bound breaker that opens publishes "open for `d`"
//! as a key with that TTL, and the others, polling every 100 ms by default,
//! hold their breaker for the same key open until then, without spending
//! failures of their own. [`SharedBreakerSignal::follow_keyed`] does the
//! same for every breaker of a keyed (per-host) registry, finding the open
//! keys in one sorted-set index with one `ZRANGEBYSCORE` per poll. Redis can
//! only add bounded holds (at most the published open time, at most
//! `max_hold`, 60 s by default), never stop a breaker from tripping or
//! recovering by itself; while it is down, holds run out on their own.
//!
//! # Redis Cluster
//!
//! [`RedisLimiterBuilder::connect_cluster`] takes seed nodes instead of a
//! URL (or [`build_cluster`](RedisLimiterBuilder::build_cluster) /
//! [`build_lazy_cluster`](RedisLimiterBuilder::build_lazy_cluster) a
//! `redis::cluster_async::ClusterConnection`), and
//! [`SharedBreakerSignalBuilder::connect_cluster`] likewise:
//!
//! ```no_run
//! use apiguard_redis::{Quota, RedisLimiter};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let limiter = RedisLimiter::builder(Quota::per_second(100).with_burst(20))
//!     .prefix("myapp:rl:")
//!     .connect_cluster(&["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"])
//!     .await?;
//! assert_eq!(limiter.redis_key("user-1"), "myapp:rl:{user-1}");
//! # Ok(())
//! # }
//! ```
//!
//! - **Keys.** A bucket's key is `prefix{key}`: the key's text is its hash
//!   tag, so every decision touches one slot and many keys spread over all
//!   masters (a prefix with `{` is refused: it would pin every key to one
//!   master). On one node the layout stays `prefix` + key. The register of
//!   instances (`prefix~instances`) lives on one master.
//! - **Routing.** The `redis` crate's cluster client routes by slot and
//!   follows `MOVED`/`ASK`; [`cluster_client`] sets 1 s connection and
//!   response timeouts and 3 retries, so commands to a dead master fail
//!   fast. A node that lacks the script (a promoted replica) gets it as
//!   `EVAL` with the decision.
//! - **One health per master.** A task reads `CLUSTER SLOTS` every
//!   [`SLOTS_REFRESH_EVERY`] (1 s); each master has its own round trip,
//!   deadline offset (its own `TIME`) and miss count. When a master stops
//!   answering, only the keys of its slots go to the [`FailurePolicy`]
//!   (after the same three misses); the other masters keep deciding. When
//!   its replica is promoted the slot map names a new master and those
//!   keys go back to Redis by themselves, no restart.
//!   [`Health::shards`] and [`Health::shards_away`] say how many masters
//!   there are and how many are away.
//!
//! ## What a failover costs
//!
//! Replication is asynchronous: a promoted replica may lack the last writes
//! its master acknowledged, so a bucket can look fuller than it was. Over a
//! failover a key can therefore admit, on top of `burst + rate × t`:
//! the failure policy's share for the gap (none under
//! [`FailurePolicy::FailClosed`]; under the default
//! [`FailurePolicy::LocalShare`] at most the rate over the gap in all,
//! taken back from the shared bucket as debts once Redis decides again),
//! and at most one more burst for the writes the replica missed. A key can
//! also admit less: fail closed refuses everything in the gap, and the
//! local share starts empty.
//!
//! Measured by `cargo test -p apiguard-redis --test cluster_fleet --
//! --nocapture` (3 processes, 6 keys over 3 masters, 100/s and a burst of
//! 10 per key, 6 s, one master killed with SIGKILL 1.5 s in, 2-core VM,
//! `cluster-node-timeout 1000`): the killed master's keys admitted
//! 97.9–98.1% of `burst + rate × t` under the local share (never over),
//! the other keys 99.7–99.8%; under fail closed nothing was admitted
//! without Redis. The replica was promoted about 2.4–2.5 s after the kill,
//! and every process decided those keys on Redis again 20–50 ms after
//! the promotion. Without a failover, the same processes admit 99.7% of
//! the bound on every key.
//!
//! # Redis versions
//!
//! Redis 5 or later (the script writes after reading `TIME`, which needs
//! effect replication, the default since Redis 5); tested with 7.0.
//!
//! # Clone
//!
//! A [`RedisLimiter`] is a handle: clones share the connection, the
//! configuration and the failure state.
//!
//! # Cancellation
//!
//! Dropping a decision's future abandons it. If the script already ran, its
//! reservation stands (the tokens are spent), as for a request that already
//! left; if it runs after the deadline it was sent with, it spends nothing.
//!

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cluster;
mod conn;
mod debit;
pub mod error;
pub mod future;
mod health;
mod key;
mod lease;
mod limiter;
mod local;
mod policy;
mod script;
mod signal;
mod warn;

/// The quota every limiter takes, from `apiguard-core`.
pub use apiguard_core::Quota;
pub use cluster::SLOTS_REFRESH_EVERY;
pub use conn::{CLUSTER_RETRIES, CLUSTER_TIMEOUT, cluster_client};
pub use error::BuildError;
pub use health::{
    DEFAULT_PROBE_EVERY, DEFAULT_TIMEOUT_CEILING, DEFAULT_TIMEOUT_FLOOR, FAILURES_TO_LEAVE, Health,
    Mode,
};
pub use key::RedisKey;
pub use limiter::{
    DEFAULT_PREFIX, DecidedBy, Decision, HEARTBEAT_EVERY, INSTANCE_LIVE_FOR, INSTANCES_SUFFIX,
    RedisLimiter, RedisLimiterBuilder, connection_manager_config,
};
pub use local::LOCAL_MAX_KEYS;
pub use policy::FailurePolicy;
pub use signal::{
    DEFAULT_MAX_HOLD, DEFAULT_POLL_EVERY, DEFAULT_SIGNAL_PREFIX, SIGNAL_INDEX_SUFFIX,
    SharedBreakerSignal, SharedBreakerSignalBuilder, SignalKey,
};
