//! Breakers that share their open signal through Redis.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiguard_breaker::{CircuitBreaker, CircuitBreakerBuilder, Reason, State, Transition};
use apiguard_core::{Clock, InvalidConfig};
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

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

/// Publishing waits in a queue of this many signals; past it, signals are
/// dropped (a breaker that trips that often is already being heard).
const QUEUE: usize = 256;

/// Sets the key's value to the publisher's id with a TTL of the open
/// period, unless it is already held longer. Redis keeps the time (the TTL),
/// so clocks of the instances never meet.
const PUBLISH_LUA: &str = r#"
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"#;

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
/// # When Redis misbehaves
///
/// Redis only ever *adds* holds, each bounded: by the key's TTL (Redis
/// deletes it when the open period ends) and by
/// [`max_hold`](SharedBreakerSignalBuilder::max_hold), and each signal is
/// applied once. A partitioned or flapping Redis therefore cannot keep a
/// breaker open beyond the signals other instances really published, and
/// never stops a breaker from tripping,
/// probing or closing on its own: publishing and polling failures are only
/// logged (a `tracing` warning at most every ten seconds).
///
/// # Clone
///
/// Clones share the connection, the background tasks and the bound
/// breakers. The tasks end when the last clone is dropped.
#[derive(Clone)]
pub struct SharedBreakerSignal {
    inner: Arc<SignalInner>,
}

struct SignalInner {
    con: ConnectionManager,
    script: Script,
    prefix: String,
    id: Arc<str>,
    timeout: Duration,
    max_hold: Duration,
    clock: Clock,
    bound: Mutex<HashMap<String, Bound>>,
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

impl SignalInner {
    async fn publish(&self, key: &str, d: Duration) -> Result<(), redis::RedisError> {
        let ms = d.as_millis().clamp(1, i64::MAX as u128) as i64;
        let mut con = self.con.clone();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut inv = self.script.key(format!("{}{key}", self.prefix));
        inv.arg(format!("{}:{seq}", self.id)).arg(ms);
        let call = inv.invoke_async::<i64>(&mut con);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(timeout_error()),
        }
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
    /// for all bound keys.
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
        self.validate()?;
        let (tx, mut rx) = mpsc::channel::<(Arc<str>, Duration)>(QUEUE);
        let inner = Arc::new(SignalInner {
            con,
            script: Script::new(PUBLISH_LUA),
            prefix: self.prefix,
            id: instance_id(),
            timeout: self.timeout,
            max_hold: self.max_hold,
            clock: self.clock,
            bound: Mutex::new(HashMap::new()),
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
