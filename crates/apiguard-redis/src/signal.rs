//! Breakers that share their open signal through Redis.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiguard_breaker::{
    CircuitBreaker, CircuitBreakerBuilder, KeyedBreakers, Reason, State, Transition,
};
use apiguard_core::{Clock, InvalidConfig};
use http::uri::Authority;
use redis::Script;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use tokio::sync::mpsc;

use crate::conn::{Conn, cluster_client, slot};
use crate::error::BuildError;
use crate::limiter::connection_manager_config;
use crate::warn::WarnGate;

/// The prefix of every signal key unless
/// [`SharedBreakerSignalBuilder::prefix`] says otherwise.
pub const DEFAULT_SIGNAL_PREFIX: &str = "apiguard:cb:";

/// How often bound breakers look for other instances' signals, unless
/// [`SharedBreakerSignalBuilder::poll_every`] says otherwise.
pub const DEFAULT_POLL_EVERY: Duration = Duration::from_millis(100);

/// The longest hold a signal can impose, unless
/// [`SharedBreakerSignalBuilder::max_hold`] says otherwise.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(60);

/// The index of open keys is the Redis key `prefix` followed by this.
pub const SIGNAL_INDEX_SUFFIX: &str = "~open";

/// Publishing waits in a queue of this many signals; past it, signals are
/// dropped (a breaker that trips that often is already being heard).
const QUEUE: usize = 256;

/// Sets the key's value (`KEYS[1]`) to the publisher's id (`ARGV[1]`) with a
/// TTL of the open period (`ARGV[2]`, ms), unless it is already held longer,
/// and records "`ARGV[3]` open until" in the index (`KEYS[2]`), a sorted set
/// scored in Redis' own milliseconds, unless it is already open longer
/// there. Trims expired members and keeps the index no longer than its
/// longest hold. Redis keeps the time (TTLs, `TIME`), so clocks of the
/// instances never meet. Returns {the score this call set or 0, now}.
const PUBLISH_LUA: &str = r#"
local ms = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local open_until = now + ms
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cur = redis.call('ZSCORE', KEYS[2], ARGV[3])
local set = 0
if not cur or tonumber(cur) < open_until then
  redis.call('ZADD', KEYS[2], open_until, ARGV[3])
  set = open_until
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local keep = tonumber(last[2]) - now
if redis.call('PTTL', KEYS[2]) < keep then
  redis.call('PEXPIRE', KEYS[2], keep)
end
return {set, now}
"#;

/// A key of a [`KeyedBreakers`] registry that
/// [`SharedBreakerSignal::follow_keyed`] can share: it has a text form, the
/// signal's key in Redis, and can be read back from it.
///
/// Implemented for `String`, `Arc<str>`, `Box<str>`, HTTP authorities
/// (`host[:port]`, written in lower case as they compare without regard to
/// case) and `Option<Authority>`, the facade's per-host scope, where `None`
/// (the breaker shared by every host, or by requests without one) is the
/// empty text. Two keys that must not share a signal must write different
/// text, and `from_signal_key` must invert `write_signal_key`.
pub trait SignalKey: Sized {
    /// Appends this key's text to `out`.
    fn write_signal_key(&self, out: &mut String);
    /// The key whose text is `text`; `None` for text that names no key
    /// (such signals are ignored).
    fn from_signal_key(text: &str) -> Option<Self>;
}

impl SignalKey for String {
    fn write_signal_key(&self, out: &mut String) {
        out.push_str(self);
    }
    fn from_signal_key(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
}

impl SignalKey for Arc<str> {
    fn write_signal_key(&self, out: &mut String) {
        out.push_str(self);
    }
    fn from_signal_key(text: &str) -> Option<Self> {
        Some(Arc::from(text))
    }
}

impl SignalKey for Box<str> {
    fn write_signal_key(&self, out: &mut String) {
        out.push_str(self);
    }
    fn from_signal_key(text: &str) -> Option<Self> {
        Some(Box::from(text))
    }
}

impl SignalKey for Authority {
    fn write_signal_key(&self, out: &mut String) {
        let start = out.len();
        out.push_str(self.as_str());
        out[start..].make_ascii_lowercase();
    }
    fn from_signal_key(text: &str) -> Option<Self> {
        Authority::try_from(text).ok()
    }
}

impl SignalKey for Option<Authority> {
    fn write_signal_key(&self, out: &mut String) {
        if let Some(a) = self {
            a.write_signal_key(out);
        }
    }
    fn from_signal_key(text: &str) -> Option<Self> {
        if text.is_empty() {
            return Some(None);
        }
        Authority::from_signal_key(text).map(Some)
    }
}

/// Shares circuit breakers' open signal between instances through Redis.
///
/// ```no_run
/// use std::time::Duration;
/// use apiguard_breaker::CircuitBreaker;
/// use apiguard_redis::SharedBreakerSignal;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let signal = SharedBreakerSignal::builder()
///     .poll_every(Duration::from_millis(100))
///     .connect("redis://127.0.0.1:6379/")
///     .await?;
/// // This instance's breaker for the payments API, sharing its trips with
/// // every instance bound to the same key.
/// let breaker = signal.bind(
///     "payments.example.com",
///     CircuitBreaker::builder()
///         .failure_threshold(5)
///         .recovery_timeout(Duration::from_secs(10)),
/// )?;
/// # let _ = breaker;
/// # Ok(())
/// # }
/// ```
///
/// # How it works
///
/// - **Publishing.** When a bound breaker trips on its own (failures, failure
///   or slow-call rate, a failed probe), it publishes "open for `d`": the key
///   `prefix + key` is set with a TTL of `d` (kept if already longer). The
///   breaker's call never waits for Redis: the signal goes through a small
///   queue to a background task.
/// - **Learning.** A background task asks Redis every
///   [`poll_every`](SharedBreakerSignalBuilder::poll_every) for the bound
///   keys, and holds a breaker whose key was published by another instance
///   open ([`CircuitBreaker::hold_open_for`]) for the key's remaining TTL.
///   So an instance learns of a trip within `poll_every` plus one round
///   trip, refuses with [`CircuitOpen`](apiguard_core::CircuitOpen) without
///   spending its own failures, and probes when the hold ends, as after any
///   trip.
/// - **No echo.** A hold learned from Redis is not published again, and an
///   instance ignores its own signals, so holds never feed each other.
///
/// # Keyed breakers
///
/// [`follow_keyed`](Self::follow_keyed) shares every breaker of a
/// [`KeyedBreakers`] registry — the per-host breakers of a
/// `KeyedCircuitBreakerLayer`, or of the facade's `GuardLayer` through its
/// `breakers()` — without naming the keys in advance:
///
/// ```no_run
/// use std::time::Duration;
/// use apiguard_breaker::{CircuitBreaker, HostKey, KeyedBreakers, KeyedCircuitBreakerLayer};
/// use apiguard_redis::SharedBreakerSignal;
/// use http::uri::Authority;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let signal = SharedBreakerSignal::builder()
///     .connect("redis://127.0.0.1:6379/")
///     .await?;
/// let per_host: KeyedBreakers<Option<Authority>> = KeyedBreakers::new(
///     CircuitBreaker::builder().recovery_timeout(Duration::from_secs(10)),
///     10_000,
/// )?;
/// // A host that trips here is refused by every instance within ~100 ms.
/// signal.follow_keyed(&per_host);
/// let layer = KeyedCircuitBreakerLayer::new(per_host, HostKey);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// Besides the key, every publish records "`key` open until `t`" in one
/// sorted set, the index (`prefix` + [`SIGNAL_INDEX_SUFFIX`]), scored in
/// Redis' own milliseconds, in the same script. Each poll reads the members
/// still open with one `ZRANGEBYSCORE` (and Redis `TIME`, in the same round
/// trip), so it costs one round trip whatever the number of keys, and
/// never scans Redis. A signal for a key the registry has no breaker for
/// makes one, held open, so that key is refused too. The index stays small:
/// each publish trims its expired members, and it expires with its longest
/// hold. Keyed and bound breakers of the same key text share one signal.
/// On a Redis Cluster ([`SharedBreakerSignalBuilder::connect_cluster`])
/// every key of the signal shares one slot: the prefix becomes a hash tag
/// unless it has one.
///
/// # Delay and bounds
///
/// - An instance learns of another's trip within `poll_every` (default
///   100 ms) plus one round trip, and the publishing side's queue (a few
///   ms); the tests allow `poll_every` plus 500 ms.
/// - A hold lasts at most what the tripping breaker published (its own open
///   time) and at most [`max_hold`](SharedBreakerSignalBuilder::max_hold)
///   (default 60 s), and each published signal is applied once.
///
/// # When Redis misbehaves
///
/// Redis only ever *adds* holds, each bounded: by the key's TTL (Redis
/// deletes it when the open period ends) or its score in the index, and by
/// [`max_hold`](SharedBreakerSignalBuilder::max_hold), and each signal is
/// applied once. A partitioned or flapping Redis therefore cannot keep a
/// breaker open beyond the signals other instances really published, and
/// never stops a breaker from tripping,
/// probing or closing on its own: publishing and polling failures are only
/// logged (a `tracing` warning at most every ten seconds). While Redis is
/// down no signal comes in or goes out; the holds already applied run out on
/// their own, and sharing resumes once the connection manager reconnects
/// (signals published meanwhile are lost, not replayed).
///
/// # Clone
///
/// Clones share the connection, the background tasks and the bound
/// breakers and registries. The tasks end when the last clone is dropped.
#[derive(Clone)]
pub struct SharedBreakerSignal {
    inner: Arc<SignalInner>,
}

struct SignalInner {
    con: Conn,
    script: Script,
    prefix: String,
    id: Arc<str>,
    timeout: Duration,
    max_hold: Duration,
    clock: Clock,
    bound: Mutex<HashMap<String, Bound>>,
    /// The sorted set of open keys (`prefix` + [`SIGNAL_INDEX_SUFFIX`]).
    index: String,
    /// The registries of [`SharedBreakerSignal::follow_keyed`].
    keyed: Mutex<Vec<Arc<dyn Follower>>>,
    /// The index scores this instance set, by key, so it ignores its own.
    published: Mutex<HashMap<String, Published>>,
    /// The index scores already applied, by key, so each is applied once.
    applied: Mutex<HashMap<String, i64>>,
    /// Redis' time (ms) at the last look at the index: members scored
    /// below it had expired then and are not read again.
    index_seen: AtomicI64,
    /// Numbers this instance's signals, so each is applied once.
    seq: AtomicU64,
    tx: mpsc::Sender<(Arc<str>, Duration)>,
    warn: WarnGate,
}

impl fmt::Debug for SharedBreakerSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBreakerSignal")
            .field("prefix", &self.inner.prefix)
            .field("id", &self.inner.id)
            .field("max_hold", &self.inner.max_hold)
            .finish_non_exhaustive()
    }
}

impl SharedBreakerSignal {
    /// A builder with the defaults.
    pub fn builder() -> SharedBreakerSignalBuilder {
        SharedBreakerSignalBuilder {
            prefix: DEFAULT_SIGNAL_PREFIX.to_owned(),
            poll_every: DEFAULT_POLL_EVERY,
            timeout: Duration::from_millis(100),
            max_hold: DEFAULT_MAX_HOLD,
            clock: Clock::system(),
        }
    }

    /// Builds the breaker `builder` describes, bound to `key`: its trips are
    /// published, and other instances' trips for `key` hold it open.
    ///
    /// Installs the builder's transition hook; to observe transitions as
    /// well, build with [`publisher`](Self::publisher) inside your own hook
    /// and [`follow`](Self::follow) the breaker instead.
    pub fn bind(
        &self,
        key: &str,
        builder: CircuitBreakerBuilder,
    ) -> Result<CircuitBreaker, InvalidConfig> {
        let publish = self.publisher(key);
        let breaker = builder.on_transition(publish).build()?;
        self.follow(key, breaker.clone());
        Ok(breaker)
    }

    /// A transition hook that publishes `key`'s own trips. Never blocks: a
    /// full queue drops the signal.
    pub fn publisher(&self, key: &str) -> impl Fn(&Transition) + Send + Sync + 'static {
        let tx = self.inner.tx.clone();
        let key: Arc<str> = Arc::from(key);
        move |t: &Transition| {
            if t.to == State::Open
                && t.reason != Reason::HeldOpen
                && let Some(open_for) = t.open_for
            {
                let _ = tx.try_send((Arc::clone(&key), open_for));
            }
        }
    }

    /// Holds `breaker` open whenever another instance has published an open
    /// signal for `key`. The breaker stays followed as long as this signal
    /// lives.
    pub fn follow(&self, key: &str, breaker: CircuitBreaker) {
        lock(&self.inner.bound)
            .entry(key.to_owned())
            .or_default()
            .breakers
            .push(breaker);
    }

    /// Shares the signals of every breaker of `breakers`, each under the
    /// text of its key ([`SignalKey`]): a breaker of the registry that trips
    /// publishes its key's signal, and another instance's signal for a key
    /// holds the registry's breaker for that key open, making it if the
    /// registry has none, so it refuses as well.
    ///
    /// Adds a key-aware hook to the registry
    /// ([`KeyedBreakers::on_transition`]), which its clones share: the
    /// breakers of a [`KeyedCircuitBreakerLayer`] or of the facade's
    /// per-host stack are followed by passing its registry. Call it before
    /// the registry serves calls, or trips made before are not published.
    /// The registry stays followed as long as this signal lives.
    ///
    /// Keys that no instance has published cost nothing: each poll reads
    /// only the keys open now, from the index, in one round trip, however
    /// many keys the registries hold.
    ///
    /// [`KeyedCircuitBreakerLayer`]: apiguard_breaker::KeyedCircuitBreakerLayer
    pub fn follow_keyed<K>(&self, breakers: &KeyedBreakers<K>)
    where
        K: SignalKey + Hash + Eq + Clone + Send + Sync + 'static,
    {
        let tx = self.inner.tx.clone();
        let _ = breakers
            .clone()
            .on_transition(move |key: &K, t: &Transition| {
                if t.to == State::Open
                    && t.reason != Reason::HeldOpen
                    && let Some(open_for) = t.open_for
                {
                    let mut text = String::new();
                    key.write_signal_key(&mut text);
                    let _ = tx.try_send((Arc::from(text), open_for));
                }
            });
        lock(&self.inner.keyed).push(Arc::new(breakers.clone()));
    }

    /// How long `key` stays open according to Redis (the remaining TTL of
    /// its signal), whoever published it; `None` when it is not open.
    pub async fn open_for(&self, key: &str) -> Result<Option<Duration>, redis::RedisError> {
        let mut con = self.inner.con.clone();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(self.redis_key(key))
            .query_async(&mut con)
            .await?;
        Ok((ttl > 0).then(|| Duration::from_millis(ttl as u64)))
    }

    /// Publishes "`key` is open for `d`" as a bound breaker's trip would.
    pub async fn publish(&self, key: &str, d: Duration) -> Result<(), redis::RedisError> {
        self.inner.publish(key, d).await
    }

    /// The Redis key of `key`'s signal.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    /// This instance's id, as written in the signals it publishes.
    pub fn instance_id(&self) -> &str {
        &self.inner.id
    }
}

/// The breakers following one key, and the last signal applied to them.
#[derive(Default)]
struct Bound {
    breakers: Vec<CircuitBreaker>,
    applied: Option<String>,
}

/// What this instance published for one key.
#[derive(Default)]
struct Published {
    /// Publishes under way: until they answer, a score in the index may be
    /// this instance's own without it knowing yet.
    pending: u32,
    /// The index score the last one set.
    score: Option<i64>,
}

/// A registry followed by key, with its key type erased.
trait Follower: Send + Sync {
    /// Holds the breaker of the key written `text` open for `d`.
    fn hold(&self, text: &str, d: Duration);
}

impl<K> Follower for KeyedBreakers<K>
where
    K: SignalKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    fn hold(&self, text: &str, d: Duration) {
        if let Some(key) = K::from_signal_key(text) {
            self.get(key).hold_open_for(d);
        }
    }
}

impl SignalInner {
    async fn publish(&self, key: &str, d: Duration) -> Result<(), redis::RedisError> {
        let ms = d.as_millis().clamp(1, i64::MAX as u128) as i64;
        let mut con = self.con.clone();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let signal_key = format!("{}{key}", self.prefix);
        let mut cmd = crate::conn::evalsha(&self.script, &[&signal_key, &self.index]);
        cmd.arg(format!("{}:{seq}", self.id)).arg(ms).arg(key);
        lock(&self.published)
            .entry(key.to_owned())
            .or_default()
            .pending += 1;
        let call = crate::conn::eval::<(i64, i64)>(&mut con, &self.script, PUBLISH_LUA, &cmd);
        let reply = match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(timeout_error()),
        };
        let mut published = lock(&self.published);
        if let Some(p) = published.get_mut(key) {
            p.pending -= 1;
            if let Ok((set, _)) = reply
                && set > 0
            {
                p.score = Some(set);
            }
        }
        if let Ok((_, now)) = reply {
            published.retain(|_, p| p.pending > 0 || p.score.is_some_and(|s| s > now));
        }
        reply.map(drop)
    }

    /// One look at the index for the registries of `follow_keyed`.
    async fn poll_keyed(&self) -> Result<(), redis::RedisError> {
        let followers: Vec<Arc<dyn Follower>> = lock(&self.keyed).clone();
        if followers.is_empty() {
            return Ok(());
        }
        // Members scored at or below Redis' time of the last look had
        // expired by then: only the keys open now come back. (A Redis whose
        // clock jumps back can only hide signals, never invent holds.)
        let since = self.index_seen.load(Ordering::Relaxed);
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("ZRANGEBYSCORE")
            .arg(&self.index)
            .arg(format!("({since}"))
            .arg("+inf")
            .arg("WITHSCORES");
        let mut con = self.con.clone();
        let ((secs, micros), open) = tokio::time::timeout(
            self.timeout,
            pipe.query_async::<((i64, i64), Vec<(String, f64)>)>(&mut con),
        )
        .await
        .map_err(|_| timeout_error())??;
        let now = secs * 1000 + micros / 1000;
        self.index_seen.store(now, Ordering::Relaxed);

        let mut holds = Vec::new();
        {
            let published = lock(&self.published);
            let mut applied = lock(&self.applied);
            applied.retain(|_, score| *score > now);
            for (key, score) in open {
                let score = score as i64;
                if score <= now || applied.get(&key) == Some(&score) {
                    continue;
                }
                if let Some(p) = published.get(&key)
                    && (p.pending > 0 || p.score == Some(score))
                {
                    // Ours, or perhaps ours: a publish has not answered yet
                    // (if it was not, the next look applies it).
                    continue;
                }
                // Each score holds once, for at most `max_hold`.
                let hold = Duration::from_millis((score - now) as u64).min(self.max_hold);
                applied.insert(key.clone(), score);
                holds.push((key, hold));
            }
        }
        // Outside the locks: a hold makes a transition, which calls hooks.
        for (key, hold) in &holds {
            for f in &followers {
                f.hold(key, *hold);
            }
        }
        Ok(())
    }

    /// One look at Redis for every followed key.
    async fn poll(&self) -> Result<(), redis::RedisError> {
        let keys: Vec<String> = lock(&self.bound).keys().cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            let rk = format!("{}{k}", self.prefix);
            pipe.cmd("GET").arg(&rk).cmd("PTTL").arg(rk);
        }
        let mut con = self.con.clone();
        let reply = tokio::time::timeout(
            self.timeout,
            pipe.query_async::<Vec<(Option<String>, i64)>>(&mut con),
        )
        .await
        .map_err(|_| timeout_error())??;
        let mut bound = lock(&self.bound);
        for (key, (signal, ttl)) in keys.iter().zip(reply) {
            let Some(b) = bound.get_mut(key) else {
                continue;
            };
            let Some(signal) = signal else {
                b.applied = None;
                continue;
            };
            let ours = signal
                .strip_prefix(&*self.id)
                .is_some_and(|rest| rest.starts_with(':'));
            // Each signal holds once, for at most `max_hold`: a signal that
            // lingers (or a Redis that keeps answering with it) cannot keep
            // a breaker open beyond that.
            if ttl <= 0 || ours || b.applied.as_deref() == Some(signal.as_str()) {
                continue;
            }
            let hold = Duration::from_millis(ttl as u64).min(self.max_hold);
            for breaker in &b.breakers {
                breaker.hold_open_for(hold);
            }
            b.applied = Some(signal);
        }
        Ok(())
    }

    fn warn(&self, what: &str, err: &redis::RedisError) {
        if let Some(suppressed) = self.warn.check(self.clock.now()) {
            tracing::warn!(
                prefix = %self.prefix,
                error = %err,
                suppressed,
                "shared breaker signal: {what} failed; breakers go on deciding locally"
            );
        }
    }
}

/// Whether every key starting with `prefix` falls in one slot (the prefix
/// has a non-empty hash tag).
fn pins_a_slot(prefix: &str) -> bool {
    let a = format!("{prefix}a");
    let b = format!("{prefix}b");
    let c = format!("{prefix}~open");
    slot(a.as_bytes()) == slot(b.as_bytes()) && slot(a.as_bytes()) == slot(c.as_bytes())
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis did not answer in time",
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map holds handles only; a panic elsewhere leaves it consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn instance_id() -> Arc<str> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    Arc::from(format!("{}-{nanos:x}-{n}", std::process::id()))
}

/// Configures a [`SharedBreakerSignal`]; made by
/// [`SharedBreakerSignal::builder`].
#[derive(Debug, Clone)]
pub struct SharedBreakerSignalBuilder {
    prefix: String,
    poll_every: Duration,
    timeout: Duration,
    max_hold: Duration,
    clock: Clock,
}

impl SharedBreakerSignalBuilder {
    /// The prefix of the signal keys (default [`DEFAULT_SIGNAL_PREFIX`]).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How often to look for other instances' signals (default
    /// [`DEFAULT_POLL_EVERY`]): the bound on how late an instance learns of
    /// a trip, plus one round trip. Each look is one pipelined round trip
    /// for all bound keys, and one more for the index when registries are
    /// followed ([`SharedBreakerSignal::follow_keyed`]).
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    /// How long one publish or poll may wait for Redis (default 100 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest hold one signal can impose (default
    /// [`DEFAULT_MAX_HOLD`]), whatever TTL Redis reports.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = max_hold;
        self
    }

    /// The clock that paces the warnings.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Connects to `url` and starts the background tasks (on the current
    /// tokio runtime).
    pub async fn connect(self, url: &str) -> Result<SharedBreakerSignal, BuildError> {
        self.validate()?;
        let client = redis::Client::open(url)?;
        let con = ConnectionManager::new_with_config(client, connection_manager_config()).await?;
        Ok(self.build(con)?)
    }

    /// Starts the signal on an existing connection (on the current tokio
    /// runtime). Needs no answer from Redis to start.
    pub fn build(self, con: ConnectionManager) -> Result<SharedBreakerSignal, InvalidConfig> {
        self.build_on(Conn::Single(con))
    }

    /// Connects to the Redis Cluster that the seed nodes `seeds` belong
    /// to (with [`cluster_client`](crate::cluster_client)'s settings) and
    /// starts the background tasks (on the current tokio runtime).
    pub async fn connect_cluster<S: AsRef<str>>(
        self,
        seeds: &[S],
    ) -> Result<SharedBreakerSignal, BuildError> {
        self.validate()?;
        let con = cluster_client(seeds)?.get_async_connection().await?;
        Ok(self.build_cluster(con)?)
    }

    /// Starts the signal on a cluster connection (on the current tokio
    /// runtime). Needs no answer from Redis to start.
    ///
    /// Every key of the signal (the keys and the index) lives in one slot,
    /// so the publish script and each poll touch one master: a prefix
    /// without a hash tag is made one (`apiguard:cb:` becomes
    /// `{apiguard:cb:}`); a prefix with its own tag (`{apiguard:cb}:`) is
    /// kept. [`redis_key`](SharedBreakerSignal::redis_key) gives the keys
    /// as written.
    ///
    /// The signal polls rather than subscribes: sharded pub/sub
    /// (`SSUBSCRIBE`) loses the messages published while a shard fails
    /// over, and a missed "open" would never be heard again, while a poll
    /// reads the state itself, so an instance learns of a trip within
    /// `poll_every` plus a round trip once the slot's master answers
    /// again. If that master is lost, holds already applied end on their
    /// own (each is bounded by the published open time and by
    /// [`max_hold`](Self::max_hold)), and nothing new holds a breaker open
    /// until the promoted replica answers.
    pub fn build_cluster(
        self,
        con: ClusterConnection,
    ) -> Result<SharedBreakerSignal, InvalidConfig> {
        self.build_on(Conn::Cluster(con))
    }

    fn build_on(mut self, con: Conn) -> Result<SharedBreakerSignal, InvalidConfig> {
        self.validate()?;
        if con.is_cluster() && !pins_a_slot(&self.prefix) {
            self.prefix = format!("{{{}}}", self.prefix);
        }
        let (tx, mut rx) = mpsc::channel::<(Arc<str>, Duration)>(QUEUE);
        let inner = Arc::new(SignalInner {
            con,
            script: Script::new(PUBLISH_LUA),
            index: format!("{}{SIGNAL_INDEX_SUFFIX}", self.prefix),
            prefix: self.prefix,
            id: instance_id(),
            timeout: self.timeout,
            max_hold: self.max_hold,
            clock: self.clock,
            bound: Mutex::new(HashMap::new()),
            keyed: Mutex::new(Vec::new()),
            published: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            index_seen: AtomicI64::new(0),
            seq: AtomicU64::new(0),
            tx,
            warn: WarnGate::default(),
        });

        let weak: Weak<SignalInner> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some((key, open_for)) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                if let Err(err) = inner.publish(&key, open_for).await {
                    inner.warn("publishing a trip", &err);
                }
            }
        });

        let weak: Weak<SignalInner> = Arc::downgrade(&inner);
        let every = self.poll_every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if let Err(err) = inner.poll().await {
                    inner.warn("polling", &err);
                }
                if let Err(err) = inner.poll_keyed().await {
                    inner.warn("polling the index", &err);
                }
            }
        });

        Ok(SharedBreakerSignal { inner })
    }

    fn validate(&self) -> Result<(), InvalidConfig> {
        if self.poll_every.is_zero() {
            return Err(InvalidConfig::new("poll_every", "must be more than zero"));
        }
        if self.timeout.is_zero() {
            return Err(InvalidConfig::new("timeout", "must be more than zero"));
        }
        if self.max_hold.is_zero() {
            return Err(InvalidConfig::new("max_hold", "must be more than zero"));
        }
        Ok(())
    }
}
