//! The circuit breaker itself.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apiguard_core::clock::{duration_to_nanos, nanos_to_duration};
use apiguard_core::{CircuitOpen, Clock, InvalidConfig, Nanos, Outcome};

use crate::error::CallError;
use crate::recovered::Recovered;
use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering};
use crate::waiters::Waiters;
use crate::window::{CountWindow, Counts, MAX_COUNT_WINDOW, TimeWindow, Window, encode};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls pass; outcomes are counted.
    Closed,
    /// Calls are refused until the recovery timeout has passed. The move to
    /// [`HalfOpen`](State::HalfOpen) happens on the first call after it.
    Open,
    /// A bounded number of probe calls pass; their outcomes decide.
    HalfOpen,
    /// Held open by [`CircuitBreaker::force_open`] until [`reset`](CircuitBreaker::reset).
    ForcedOpen,
    /// Everything passes and nothing is counted ([`CircuitBreaker::disable`]).
    Disabled,
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// `failure_threshold` consecutive failures.
    ConsecutiveFailures,
    /// The failure rate over the window reached its threshold.
    FailureRate,
    /// The slow-call rate over the window reached its threshold.
    SlowCallRate,
    /// The recovery timeout passed; probing starts.
    RecoveryTimeout,
    /// A probe failed.
    ProbeFailed,
    /// Every probe slot stayed taken for the half-open timeout.
    ProbeTimeout,
    /// `success_threshold` probes succeeded.
    ProbesSucceeded,
    /// [`CircuitBreaker::hold_open_for`] (a server's `Retry-After`, or a
    /// signal shared by other instances).
    HeldOpen,
    /// [`CircuitBreaker::force_open`].
    Forced,
    /// [`CircuitBreaker::disable`].
    Disabled,
    /// [`CircuitBreaker::reset`].
    Reset,
}

/// One state change, as passed to the
/// [`on_transition`](CircuitBreakerBuilder::on_transition) hook.
///
/// `from` equals `to` (both [`State::Open`]) when
/// [`hold_open_for`](CircuitBreaker::hold_open_for) extends an open period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// When `to` is [`State::Open`]: how long it stays open before probing.
    pub open_for: Option<Duration>,
    /// What caused it.
    pub reason: Reason,
}

/// A snapshot of a breaker's counters, for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The state.
    pub state: State,
    /// Consecutive failures counted in the closed state.
    pub consecutive_failures: u32,
    /// Calls in the sliding window (0 without a window).
    pub window_calls: u64,
    /// Failures in the sliding window.
    pub window_failures: u64,
    /// Slow calls in the sliding window.
    pub window_slow_calls: u64,
    /// Half-open probes in flight.
    pub probes_in_flight: u32,
    /// Probe successes so far in this half-open period.
    pub probe_successes: u32,
    /// Trips since the breaker last closed (drives the backoff).
    pub trips: u32,
    /// Time until the next probe, when open.
    pub retry_after: Option<Duration>,
    /// Calls waiting for the breaker to let them through
    /// ([`CircuitBreaker::recovered`]).
    pub waiters: usize,
}

pub(crate) type Hook = Arc<dyn Fn(&Transition) + Send + Sync + 'static>;
type JitterSource = Arc<dyn Fn() -> f64 + Send + Sync + 'static>;

/// The shape of the sliding window behind the rate trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// The last `n` calls.
    Count(u32),
    /// The last `span` of time, counted in `buckets` buckets.
    Time {
        /// The window's length.
        span: Duration,
        /// How many buckets it is cut into (its resolution).
        buckets: u32,
    },
}

/// Builds a [`CircuitBreaker`]; see [`CircuitBreaker::builder`].
#[derive(Clone)]
pub struct CircuitBreakerBuilder {
    failure_threshold: u32,
    recovery_timeout: Duration,
    success_threshold: u32,
    half_open_probes: u32,
    half_open_timeout: Duration,
    failure_rate: Option<f64>,
    slow_call: Option<(Duration, f64)>,
    window: Option<SlidingWindow>,
    minimum_calls: Option<u32>,
    backoff_multiplier: f64,
    max_recovery_timeout: Option<Duration>,
    jitter: f64,
    jitter_source: Option<JitterSource>,
    slow_start: Duration,
    clock: Clock,
    on_transition: Option<Hook>,
    name: Option<Arc<str>>,
}

impl fmt::Debug for CircuitBreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("failure_threshold", &self.failure_threshold)
            .field("recovery_timeout", &self.recovery_timeout)
            .field("success_threshold", &self.success_threshold)
            .field("half_open_probes", &self.half_open_probes)
            .field("half_open_timeout", &self.half_open_timeout)
            .field("failure_rate", &self.failure_rate)
            .field("slow_call", &self.slow_call)
            .field("window", &self.window)
            .field("minimum_calls", &self.minimum_calls)
            .field("backoff_multiplier", &self.backoff_multiplier)
            .field("max_recovery_timeout", &self.max_recovery_timeout)
            .field("jitter", &self.jitter)
            .field("slow_start", &self.slow_start)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(30),
            success_threshold: 1,
            half_open_probes: 1,
            half_open_timeout: Duration::from_secs(60),
            failure_rate: None,
            slow_call: None,
            window: None,
            minimum_calls: None,
            backoff_multiplier: 1.0,
            max_recovery_timeout: None,
            jitter: 0.0,
            jitter_source: None,
            slow_start: CircuitBreakerBuilder::DEFAULT_SLOW_START,
            clock: Clock::system(),
            on_transition: None,
            name: None,
        }
    }
}

impl CircuitBreakerBuilder {
    /// The default cap of [`slow_start`](Self::slow_start).
    pub const DEFAULT_SLOW_START: Duration = Duration::from_secs(10);

    /// The longest the release of a backlog may take after the circuit
    /// closes (default [`DEFAULT_SLOW_START`](Self::DEFAULT_SLOW_START)).
    ///
    /// Calls that waited for the breaker ([`CircuitBreaker::recovered`])
    /// are not let go all at once when it closes, which would hit the
    /// recovering dependency with the whole queue in one instant. They go
    /// oldest first, spread over the time the queue took to gather — at the
    /// rate they arrived, so with new calls arriving meanwhile the
    /// dependency sees about twice its usual rate — and over at most this
    /// window. The first goes at once. `Duration::ZERO` lets the whole
    /// backlog go at once.
    ///
    /// Each waiter then waits about as long as the oldest (the time the
    /// circuit was open): the oldest has to anyway, so when callers share
    /// one deadline, letting the backlog go faster would save no request.
    ///
    /// Keep it well below the callers' deadlines: a waiter whose turn comes
    /// after its deadline is lost.
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.slow_start = window;
        self
    }

    /// How long a half-open period may last with every probe slot taken
    /// before the probes are given up on: the next refused caller reopens
    /// the breaker, as if a probe had failed. A probe that hangs (no
    /// timeout below the breaker) or a leaked permit therefore cannot keep
    /// the breaker half-open for ever. Default 60 s.
    pub fn half_open_timeout(mut self, d: Duration) -> Self {
        self.half_open_timeout = d;
        self
    }

    /// Consecutive failures (in the closed state) that open the circuit.
    /// Default 5. `u32::MAX` in effect turns this trip off, for breakers
    /// that trip on rates only.
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// Time spent open before the first probe. Default 30 s.
    pub fn recovery_timeout(mut self, d: Duration) -> Self {
        self.recovery_timeout = d;
        self
    }

    /// Probe successes, in one half-open period, that close the circuit.
    /// Any probe failure reopens it. Default 1.
    pub fn success_threshold(mut self, n: u32) -> Self {
        self.success_threshold = n;
        self
    }

    /// Probes allowed in flight at once while half-open; other calls are
    /// refused. Default 1.
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n;
        self
    }

    /// Opens the circuit when the share of failures in the sliding window
    /// reaches `rate` (in `(0, 1]`), once the window holds
    /// [`minimum_calls`](Self::minimum_calls). Without an explicit
    /// [`sliding_window`](Self::sliding_window), the last 100 calls.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Calls that take at least `threshold` are slow; opens the circuit when
    /// the share of slow calls in the window reaches `rate` (in `(0, 1]`).
    pub fn slow_call(mut self, threshold: Duration, rate: f64) -> Self {
        self.slow_call = Some((threshold, rate));
        self
    }

    /// The window the rates are computed over. Default: the last 100 calls.
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.window = Some(window);
        self
    }

    /// Calls the window must hold before a rate can open the circuit.
    /// Default: the window's size for a count window (at most 100), 100 for
    /// a time window.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.minimum_calls = Some(n);
        self
    }

    /// Each trip that follows another without a close in between multiplies
    /// the open time by `multiplier` (≥ 1; default 1, no backoff), up to
    /// [`max_recovery_timeout`](Self::max_recovery_timeout). A close resets
    /// it.
    pub fn backoff_multiplier(mut self, multiplier: f64) -> Self {
        self.backoff_multiplier = multiplier;
        self
    }

    /// The cap of the backed-off open time. Default: ten times the recovery
    /// timeout.
    pub fn max_recovery_timeout(mut self, d: Duration) -> Self {
        self.max_recovery_timeout = Some(d);
        self
    }

    /// Spreads each open time uniformly over `±jitter` of itself (in
    /// `[0, 1]`; default 0), so that many clients do not probe together.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Where the jitter draws from: a function returning values in `[0, 1)`.
    /// Default: `fastrand`. Tests pin it.
    pub fn jitter_source(mut self, f: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        self.jitter_source = Some(Arc::new(f));
        self
    }

    /// The clock decisions read. Default: [`Clock::system`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Called on every transition, on the thread that made it, after the
    /// new state is in place. Keep it short: it runs inside a call. A
    /// breaker of a [`KeyedBreakers`](crate::KeyedBreakers) registry calls
    /// the registry's key-aware hooks after this one.
    pub fn on_transition(mut self, f: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.on_transition = Some(Arc::new(f));
        self
    }

    /// A name for the `tracing` events.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The sliding window the breaker will count over: the one set with
    /// [`sliding_window`](Self::sliding_window), the last 100 calls when a
    /// rate trip is set without one, `None` when no rate trip needs a
    /// window. For layers that check it against their own settings.
    pub fn window_config(&self) -> Option<SlidingWindow> {
        match (
            self.window,
            self.failure_rate.is_some() || self.slow_call.is_some(),
        ) {
            (_, false) => None,
            (Some(w), true) => Some(w),
            (None, true) => Some(SlidingWindow::Count(100)),
        }
    }

    /// Checks the settings and builds the breaker. Clone the builder first
    /// to build several breakers from one configuration.
    pub fn build(self) -> Result<CircuitBreaker, InvalidConfig> {
        self.build_shared()
    }

    /// [`build`](Self::build) without giving up the builder: the keyed
    /// registry builds every key's breaker from its one template.
    pub(crate) fn build_shared(&self) -> Result<CircuitBreaker, InvalidConfig> {
        self.build_named(self.name.clone())
    }

    /// `name` under this template's name (`template/name`), or alone.
    pub(crate) fn sub_name(&self, name: &str) -> Arc<str> {
        match &self.name {
            Some(template) => Arc::from(format!("{template}/{name}")),
            None => Arc::from(name),
        }
    }

    /// The same, logging as `name` rather than the template's name.
    pub(crate) fn build_named(
        &self,
        name: Option<Arc<str>>,
    ) -> Result<CircuitBreaker, InvalidConfig> {
        let config = self.validate()?;
        let window = config.window.map(|w| match w {
            SlidingWindow::Count(n) => Window::Count(CountWindow::new(n)),
            SlidingWindow::Time { span, buckets } => {
                Window::Time(TimeWindow::new(duration_to_nanos(span), buckets))
            }
        });
        Ok(CircuitBreaker {
            inner: Arc::new(Inner {
                state: CachePadded(AtomicU64::new(closed(0))),
                consecutive: CachePadded(AtomicU32::new(0)),
                window: CachePadded(window),
                half_open_since: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                trips: AtomicU32::new(0),
                clock: self.clock.clone(),
                on_transition: self.on_transition.clone(),
                registry_hook: OnceLock::new(),
                jitter_source: self.jitter_source.clone(),
                waiters: Waiters::default(),
                name,
                config,
            }),
        })
    }

    fn validate(&self) -> Result<Config, InvalidConfig> {
        fn rate(field: &'static str, r: f64) -> Result<u64, InvalidConfig> {
            if r.is_nan() || r <= 0.0 || r > 1.0 {
                return Err(InvalidConfig::new(field, "must be in (0, 1]"));
            }
            Ok((r * 1_000_000.0).round().max(1.0) as u64)
        }
        if self.failure_threshold == 0 {
            return Err(InvalidConfig::new(
                "failure_threshold",
                "must be at least 1",
            ));
        }
        if self.recovery_timeout.is_zero() {
            return Err(InvalidConfig::new("recovery_timeout", "must be positive"));
        }
        if self.success_threshold == 0 || self.success_threshold > u32::from(u16::MAX) {
            return Err(InvalidConfig::new(
                "success_threshold",
                "must be between 1 and 65535",
            ));
        }
        if self.half_open_probes == 0 || self.half_open_probes > u32::from(u16::MAX) {
            return Err(InvalidConfig::new(
                "half_open_probes",
                "must be between 1 and 65535",
            ));
        }
        if self.half_open_timeout.is_zero() {
            return Err(InvalidConfig::new("half_open_timeout", "must be positive"));
        }
        let failure_rate_ppm = self
            .failure_rate
            .map(|r| rate("failure_rate", r))
            .transpose()?;
        let slow = match self.slow_call {
            Some((t, r)) => {
                if t.is_zero() {
                    return Err(InvalidConfig::new(
                        "slow_call",
                        "threshold must be positive",
                    ));
                }
                Some((duration_to_nanos(t), rate("slow_call", r)?))
            }
            None => None,
        };
        let window = match (self.window, failure_rate_ppm.is_some() || slow.is_some()) {
            (Some(SlidingWindow::Count(n)), _) if n == 0 || n > MAX_COUNT_WINDOW => {
                return Err(InvalidConfig::new(
                    "sliding_window",
                    "a count window holds between 1 and 1048575 calls",
                ));
            }
            (Some(SlidingWindow::Time { span, buckets }), _)
                if span.is_zero()
                    || buckets == 0
                    || buckets > 4096
                    || duration_to_nanos(span) < u64::from(buckets) =>
            {
                return Err(InvalidConfig::new(
                    "sliding_window",
                    "a time window needs a positive span and 1 to 4096 buckets",
                ));
            }
            (Some(w), true) => Some(w),
            (None, true) => Some(SlidingWindow::Count(100)),
            (_, false) => None,
        };
        let minimum_calls = match (self.minimum_calls, window) {
            (Some(0), _) => {
                return Err(InvalidConfig::new("minimum_calls", "must be at least 1"));
            }
            (Some(n), _) => u64::from(n),
            (None, Some(SlidingWindow::Count(n))) => u64::from(n.min(100)),
            (None, _) => 100,
        };
        if self.backoff_multiplier.is_nan() || self.backoff_multiplier < 1.0 {
            return Err(InvalidConfig::new(
                "backoff_multiplier",
                "must be at least 1",
            ));
        }
        if self.jitter.is_nan() || !(0.0..=1.0).contains(&self.jitter) {
            return Err(InvalidConfig::new("jitter", "must be in [0, 1]"));
        }
        let max_open = match self.max_recovery_timeout {
            Some(m) if m < self.recovery_timeout => {
                return Err(InvalidConfig::new(
                    "max_recovery_timeout",
                    "must not be below recovery_timeout",
                ));
            }
            Some(m) => m,
            None => self.recovery_timeout.saturating_mul(10),
        };
        Ok(Config {
            failure_threshold: self.failure_threshold,
            recovery_timeout: self.recovery_timeout,
            success_threshold: self.success_threshold,
            half_open_probes: self.half_open_probes,
            half_open_timeout: duration_to_nanos(self.half_open_timeout),
            failure_rate_ppm,
            slow,
            window,
            minimum_calls,
            backoff_multiplier: self.backoff_multiplier,
            max_open,
            jitter: self.jitter,
            slow_start: duration_to_nanos(self.slow_start),
        })
    }
}

#[derive(Debug)]
struct Config {
    failure_threshold: u32,
    recovery_timeout: Duration,
    success_threshold: u32,
    half_open_probes: u32,
    half_open_timeout: Nanos,
    failure_rate_ppm: Option<u64>,
    /// (threshold in nanos, rate in parts per million)
    slow: Option<(Nanos, u64)>,
    window: Option<SlidingWindow>,
    minimum_calls: u64,
    backoff_multiplier: f64,
    max_open: Duration,
    jitter: f64,
    slow_start: Nanos,
}

// The state word. Bits 0..3 are the mode; the rest depends on it:
// - Closed, ForcedOpen, Disabled: an epoch, unique to this period;
// - Open: the instant (in clock nanos, 61 bits = 73 years) probing may start;
// - HalfOpen: probes in flight (bits 3..19), probe successes (19..35), and
//   the epoch (35..64) that the probe permits carry.
// Every transition is one compare-and-swap of this word, so exactly one
// thread makes it, and a permit from an earlier period finds a different
// word and records nothing.
const MODE_MASK: u64 = 0b111;
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const DISABLED: u64 = 4;
const PAYLOAD_MAX: u64 = u64::MAX >> 3;
const INFLIGHT_SHIFT: u32 = 3;
const SUCCESS_SHIFT: u32 = 19;
const EPOCH_SHIFT: u32 = 35;
const U16: u64 = 0xffff;
/// The shortest wait named to a call refused while a probe is in flight.
const MIN_PROBE_HINT: Nanos = 10_000_000;

const fn closed(epoch: u64) -> u64 {
    (epoch & PAYLOAD_MAX) << 3 | CLOSED
}
const fn open(until: Nanos) -> u64 {
    let until = if until > PAYLOAD_MAX {
        PAYLOAD_MAX
    } else {
        until
    };
    until << 3 | OPEN
}
const fn half_open(epoch: u64, in_flight: u64, successes: u64) -> u64 {
    (epoch << EPOCH_SHIFT)
        | (successes << SUCCESS_SHIFT)
        | (in_flight << INFLIGHT_SHIFT)
        | HALF_OPEN
}
const fn mode(w: u64) -> u64 {
    w & MODE_MASK
}
const fn payload(w: u64) -> u64 {
    w >> 3
}
const fn in_flight(w: u64) -> u64 {
    (w >> INFLIGHT_SHIFT) & U16
}
const fn successes(w: u64) -> u64 {
    (w >> SUCCESS_SHIFT) & U16
}
const fn ho_epoch(w: u64) -> u64 {
    w >> EPOCH_SHIFT
}

fn state_of(w: u64) -> State {
    match mode(w) {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        FORCED_OPEN => State::ForcedOpen,
        _ => State::Disabled,
    }
}

pub(crate) struct Inner {
    state: CachePadded<AtomicU64>,
    consecutive: CachePadded<AtomicU32>,
    window: CachePadded<Option<Window>>,
    /// When the current (or last) half-open period began. Only ever moves
    /// forward (`fetch_max`), so a late write from a thread that lost the
    /// race into half-open cannot make a newer period look old.
    half_open_since: AtomicU64,
    epoch: AtomicU64,
    trips: AtomicU32,
    pub(crate) clock: Clock,
    on_transition: Option<Hook>,
    /// The key-aware hook of the [`KeyedBreakers`](crate::KeyedBreakers)
    /// registry that holds this breaker, set at most once, after the
    /// breaker is built (the registry may get its hook later).
    registry_hook: OnceLock<Hook>,
    jitter_source: Option<JitterSource>,
    /// Calls waiting for this breaker to let them through; touched only
    /// by transitions and by the waiters themselves.
    pub(crate) waiters: Waiters,
    name: Option<Arc<str>>,
    config: Config,
}

/// When a refused call is worth asking again, as far as the state says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Now: the breaker admits, or the next call moves it on.
    Now,
    /// At this instant of the breaker's clock (the end of an open period,
    /// or the giving up on stuck probes), unless it changes before.
    At(Nanos),
    /// Only after a change (forced open).
    Never,
}

/// A circuit breaker: refuses calls to a dependency that keeps failing, so
/// it gets time to recover and callers fail fast.
///
/// Cloning is cheap and every clone is a handle to the same breaker.
///
/// ```
/// use std::time::Duration;
/// use apiguard_breaker::{CircuitBreaker, State};
///
/// let breaker = CircuitBreaker::builder()
///     .failure_threshold(2)
///     .recovery_timeout(Duration::from_secs(10))
///     .build()?;
///
/// for _ in 0..2 {
///     breaker.try_acquire().expect("closed").failure();
/// }
/// assert_eq!(breaker.state(), State::Open);
/// let refused = breaker.try_acquire().unwrap_err();
/// assert!(refused.retry_after().unwrap() <= Duration::from_secs(10));
/// # Ok::<(), apiguard_core::InvalidConfig>(())
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.name)
            .field("stats", &self.stats())
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What a [`Permit`] is for.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Admitted while closed; carries the closed state word it saw.
    Closed(u64),
    /// A half-open probe of the given epoch.
    Probe(u64),
    /// Admitted while disabled: records nothing.
    Pass,
    /// Already recorded or released.
    Done,
}

/// The right to make one call, from [`CircuitBreaker::try_acquire`]:
/// borrows its breaker, so taking and returning one touches no reference
/// count. [`OwnedPermit`] is the same right for a call that outlives the
/// borrow (a spawned task, a response future).
///
/// Record how the call ended with [`success`](Self::success),
/// [`failure`](Self::failure) or [`record`](Self::record). Dropping the
/// permit unrecorded means the call was cancelled: it counts as neither, and
/// a half-open probe slot is given back.
#[must_use = "a permit records nothing unless told how the call ended"]
pub struct Permit<'a> {
    breaker: &'a Inner,
    kind: Kind,
    started: Nanos,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("kind", &self.kind)
            .field("started", &self.started)
            .finish()
    }
}

impl Permit<'_> {
    /// The call succeeded.
    #[inline]
    pub fn success(mut self) {
        self.breaker
            .finish(&mut self.kind, self.started, Outcome::Success);
    }

    /// The call failed.
    #[inline]
    pub fn failure(mut self) {
        self.breaker
            .finish(&mut self.kind, self.started, Outcome::Failure);
    }

    /// The call ended with `outcome` ([`Outcome::Ignored`] counts as
    /// neither, like a dropped permit).
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.breaker.finish(&mut self.kind, self.started, outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if !matches!(self.kind, Kind::Done) {
            self.breaker
                .finish(&mut self.kind, self.started, Outcome::Ignored);
        }
    }
}

/// The right to make one call, like a [`Permit`], but holding a handle on
/// its breaker rather than a borrow: from
/// [`CircuitBreaker::try_acquire_owned`], for a call that outlives the
/// borrow. The handle is a reference count, which taking and dropping one
/// writes.
///
/// Dropping it unrecorded means the call was cancelled: it counts as
/// neither, and a half-open probe slot is given back.
#[must_use = "a permit records nothing unless told how the call ended"]
pub struct OwnedPermit {
    breaker: Arc<Inner>,
    kind: Kind,
    started: Nanos,
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("kind", &self.kind)
            .field("started", &self.started)
            .finish()
    }
}

impl OwnedPermit {
    /// The call succeeded.
    #[inline]
    pub fn success(mut self) {
        self.record_in_place(Outcome::Success);
    }

    /// The call failed.
    #[inline]
    pub fn failure(mut self) {
        self.record_in_place(Outcome::Failure);
    }

    /// The call ended with `outcome` ([`Outcome::Ignored`] counts as
    /// neither, like a dropped permit).
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        self.record_in_place(outcome);
    }

    /// Whether this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }

    /// Records `outcome`; the permit is spent and its drop records nothing.
    #[inline]
    pub(crate) fn record_in_place(&mut self, outcome: Outcome) {
        self.breaker.finish(&mut self.kind, self.started, outcome);
    }

    /// The breaker this permit belongs to.
    pub(crate) fn breaker(&self) -> CircuitBreaker {
        CircuitBreaker {
            inner: self.breaker.clone(),
        }
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        if !matches!(self.kind, Kind::Done) {
            self.record_in_place(Outcome::Ignored);
        }
    }
}

/// The right to make one call, like a [`Permit`], but without a handle on
/// its breaker: from [`CircuitBreaker::try_acquire_ticket`], for a service
/// that keeps the breaker at hand itself. Taking and returning one writes
/// nothing to memory other callers share while the breaker is closed and
/// has nothing to count (a permit's handle is a reference count that every
/// call writes).
///
/// Hand it back to the breaker it came from with
/// [`CircuitBreaker::record_ticket`]; [`Outcome::Ignored`] if the call was
/// cancelled. A ticket dropped instead is a cancelled call whose half-open
/// probe slot, if it held one, stays taken until the half-open timeout
/// gives up on the probes.
#[must_use = "a ticket records nothing unless handed back to its breaker"]
#[derive(Debug)]
pub struct Ticket {
    kind: Kind,
    started: Nanos,
}

impl Ticket {
    /// Whether this ticket is for a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, Kind::Probe(_))
    }
}

impl CircuitBreaker {
    /// A builder with the defaults: 5 consecutive failures open the
    /// circuit for 30 s, one probe at a time, one success closes it.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }

    /// Asks to make a call. Refused with [`CircuitOpen`] when open (its
    /// `retry_after` is the time until the next probe; `None` when forced
    /// open). While every half-open probe slot is taken, when a slot frees
    /// up depends on the probes: the refusal names as long again as the
    /// probe has run so far (at least 10 ms, at most until the probes are
    /// given up on), so a caller that sleeps on it looks again at doubling
    /// intervals. A caller that can wait does better with
    /// [`recovered`](Self::recovered), which the breaker wakes itself.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, CircuitOpen> {
        let Ticket { kind, started } = self.try_acquire_ticket()?;
        Ok(Permit {
            breaker: &self.inner,
            kind,
            started,
        })
    }

    /// [`try_acquire`](Self::try_acquire), for a call that outlives this
    /// borrow of the breaker: see [`OwnedPermit`].
    #[inline]
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, CircuitOpen> {
        let Ticket { kind, started } = self.try_acquire_ticket()?;
        Ok(OwnedPermit {
            breaker: self.inner.clone(),
            kind,
            started,
        })
    }

    /// [`try_acquire`](Self::try_acquire), for a caller that keeps this
    /// breaker at hand: see [`Ticket`].
    #[inline]
    pub fn try_acquire_ticket(&self) -> Result<Ticket, CircuitOpen> {
        let inner = &*self.inner;
        let w = inner.state.load(Ordering::Acquire);
        if mode(w) == CLOSED {
            return Ok(Ticket {
                kind: Kind::Closed(w),
                started: if inner.config.slow.is_some() {
                    inner.clock.now()
                } else {
                    0
                },
            });
        }
        inner.acquire_slow(w)
    }

    /// Records how the call of `ticket` (taken from this breaker) ended;
    /// [`Outcome::Ignored`] for a cancelled call, which frees its probe
    /// slot. A ticket of another breaker is recorded there as nothing
    /// sensible: keep each ticket with its breaker.
    #[inline]
    pub fn record_ticket(&self, ticket: Ticket, outcome: Outcome) {
        let Ticket { mut kind, started } = ticket;
        self.inner.finish(&mut kind, started, outcome);
    }

    /// Runs `fut` under the breaker: refused at once when open; an `Ok`
    /// counts as a success, an `Err` as a failure, and a dropped future as
    /// neither.
    pub async fn call<F, T, E>(&self, fut: F) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire().map_err(CallError::Open)?;
        match fut.await {
            Ok(v) => {
                permit.success();
                Ok(v)
            }
            Err(e) => {
                permit.failure();
                Err(CallError::Inner(e))
            }
        }
    }

    /// The current state. An open breaker whose recovery timeout has passed
    /// still reads [`State::Open`] until the next call moves it to half-open.
    pub fn state(&self) -> State {
        state_of(self.inner.state.load(Ordering::Acquire))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        let w = inner.state.load(Ordering::Acquire);
        let now = inner.clock.now();
        let counts = inner
            .window
            .as_ref()
            .map(|win| win.counts(now))
            .unwrap_or_default();
        let ho = mode(w) == HALF_OPEN;
        Stats {
            state: state_of(w),
            consecutive_failures: inner.consecutive.load(Ordering::Acquire),
            window_calls: counts.calls,
            window_failures: counts.failures,
            window_slow_calls: counts.slow,
            probes_in_flight: if ho { in_flight(w) as u32 } else { 0 },
            probe_successes: if ho { successes(w) as u32 } else { 0 },
            trips: inner.trips.load(Ordering::Acquire),
            retry_after: (mode(w) == OPEN)
                .then(|| nanos_to_duration(payload(w).saturating_sub(now))),
            waiters: inner.waiters.len(),
        }
    }

    /// A future that completes when this breaker, which has refused a call,
    /// is worth asking again: woken by the breaker's own transitions, not
    /// by a fixed sleep. See [`Recovered`] for what ends it, and
    /// [`slow_start`](CircuitBreakerBuilder::slow_start) for the pace at
    /// which waiters are let go after a close.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), apiguard_core::InvalidConfig> {
    /// use std::time::Duration;
    /// use apiguard_breaker::CircuitBreaker;
    ///
    /// let breaker = CircuitBreaker::builder()
    ///     .failure_threshold(1)
    ///     .recovery_timeout(Duration::from_secs(1))
    ///     .build()?;
    /// breaker.try_acquire().unwrap().failure();
    /// let permit = loop {
    ///     match breaker.try_acquire() {
    ///         Ok(permit) => break permit,
    ///         // Bound this by a deadline in real code.
    ///         Err(_open) => breaker.recovered().await,
    ///     }
    /// };
    /// assert!(permit.is_probe());
    /// # permit.success();
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`Recovered`]: crate::future::Recovered
    pub fn recovered(&self) -> Recovered {
        Recovered::new(self.inner.clone())
    }

    /// The breaker's clock, for [`Recovered::queued_since`].
    ///
    /// [`Recovered::queued_since`]: crate::future::Recovered::queued_since
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Opens the breaker now (unless it is disabled or forced open) and
    /// keeps it open, refusing with [`CircuitOpen`], for at least `d`. An
    /// open breaker that would reopen sooner is held longer; one held longer
    /// already is left alone. After `d` it probes as after any trip. Does not
    /// count as a trip for the backoff.
    ///
    /// This serves a server's `Retry-After` on a `503` and an open signal
    /// shared by other instances.
    pub fn hold_open_for(&self, d: Duration) {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let until = now.saturating_add(duration_to_nanos(d));
        let mut w = inner.state.load(Ordering::Acquire);
        loop {
            match mode(w) {
                DISABLED | FORCED_OPEN => return,
                OPEN if payload(w) >= until.min(PAYLOAD_MAX) => return,
                _ => {}
            }
            match inner.cas(w, open(until)) {
                Ok(()) => {
                    inner.emit(state_of(w), State::Open, Some(d), Reason::HeldOpen);
                    return;
                }
                Err(seen) => w = seen,
            }
        }
    }

    /// Holds the breaker open until [`reset`](Self::reset): every call is
    /// refused with a `CircuitOpen` that names no wait.
    pub fn force_open(&self) {
        self.inner.set_mode(FORCED_OPEN, Reason::Forced);
    }

    /// Lets every call through and counts nothing, until
    /// [`reset`](Self::reset).
    pub fn disable(&self) {
        self.inner.set_mode(DISABLED, Reason::Disabled);
    }

    /// Closes the breaker and forgets its history (counters, backoff).
    pub fn reset(&self) {
        let inner = &*self.inner;
        inner.clear_counts();
        inner.trips.store(0, Ordering::Release);
        inner.set_mode(CLOSED, Reason::Reset);
    }

    /// Gives this breaker its registry's hook, made by `make`, unless it
    /// has one already.
    pub(crate) fn attach_registry_hook(&self, make: impl FnOnce() -> Hook) {
        let slot = &self.inner.registry_hook;
        if slot.get().is_none() {
            let _ = slot.set(make());
        }
    }

    /// Whether this breaker holds nothing a fresh one would not: closed, no
    /// failure counted, no trip to back off from, and no handle or permit
    /// other than this one. The keyed registry reclaims such breakers.
    pub(crate) fn is_idle(&self) -> bool {
        let inner = &*self.inner;
        if Arc::strong_count(&self.inner) > 1
            || mode(inner.state.load(Ordering::Acquire)) != CLOSED
            || inner.consecutive.load(Ordering::Acquire) != 0
            || inner.trips.load(Ordering::Acquire) != 0
        {
            return false;
        }
        match &*inner.window {
            None => true,
            Some(w) => {
                let c = w.counts(inner.clock.now());
                c.failures == 0 && c.slow == 0
            }
        }
    }
}

impl Inner {
    /// Records `outcome` for a call admitted as `kind` at `started`, and
    /// marks `kind` spent so nothing records it twice.
    #[inline]
    fn finish(&self, kind: &mut Kind, started: Nanos, outcome: Outcome) {
        match std::mem::replace(kind, Kind::Done) {
            Kind::Closed(word) => self.record_closed(word, outcome, started),
            Kind::Probe(epoch) => self.record_probe(epoch, outcome),
            Kind::Pass | Kind::Done => {}
        }
    }

    fn cas(&self, current: u64, new: u64) -> Result<(), u64> {
        self.state
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }

    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    #[cold]
    fn acquire_slow(&self, mut w: u64) -> Result<Ticket, CircuitOpen> {
        let permit = |kind| Ticket {
            kind,
            started: if self.config.slow.is_some() {
                self.clock.now()
            } else {
                0
            },
        };
        let mut now = None;
        loop {
            match mode(w) {
                CLOSED => return Ok(permit(Kind::Closed(w))),
                DISABLED => return Ok(permit(Kind::Pass)),
                FORCED_OPEN => return Err(CircuitOpen::new(None)),
                OPEN => {
                    let t = *now.get_or_insert_with(|| self.clock.now());
                    let until = payload(w);
                    if t < until {
                        return Err(CircuitOpen::new(Some(nanos_to_duration(until - t))));
                    }
                    // Epochs only need to differ between periods, so one
                    // wasted by a lost race does no harm.
                    let epoch = self.next_epoch();
                    self.half_open_since.fetch_max(t, Ordering::AcqRel);
                    match self.cas(w, half_open(epoch, 1, 0)) {
                        Ok(()) => {
                            self.emit(State::Open, State::HalfOpen, None, Reason::RecoveryTimeout);
                            return Ok(permit(Kind::Probe(epoch & (u64::MAX >> EPOCH_SHIFT))));
                        }
                        Err(seen) => w = seen,
                    }
                }
                _ => {
                    // Half-open: take a probe slot if one is free.
                    if in_flight(w) >= u64::from(self.config.half_open_probes) {
                        let t = *now.get_or_insert_with(|| self.clock.now());
                        let since = self.half_open_since.load(Ordering::Acquire);
                        let probing = t.saturating_sub(since);
                        if probing < self.config.half_open_timeout {
                            // The probe's outcome decides when the next call
                            // may pass, and nobody knows when it comes. A
                            // caller that sleeps on the hint (rather than
                            // waiting on `recovered()`) is told to look again
                            // once the probe has run twice as long as it has
                            // so far: its looks double in spacing, so it is
                            // at most about the probe's time late and asks
                            // a handful of times. Never past the giving up on
                            // the probe.
                            let hint = probing
                                .max(MIN_PROBE_HINT)
                                .min(self.config.half_open_timeout - probing);
                            return Err(CircuitOpen::new(Some(nanos_to_duration(hint))));
                        }
                        // The probes are stuck: give up on them. Their
                        // permits belong to this period and will find a
                        // different word when they finish.
                        let trips = self.trips.load(Ordering::Acquire).saturating_add(1);
                        let open_for = self.open_time(trips);
                        let until = t.saturating_add(duration_to_nanos(open_for));
                        match self.cas(w, open(until)) {
                            Ok(()) => {
                                self.trips.store(trips, Ordering::Release);
                                self.emit(
                                    State::HalfOpen,
                                    State::Open,
                                    Some(open_for),
                                    Reason::ProbeTimeout,
                                );
                                return Err(CircuitOpen::new(Some(open_for)));
                            }
                            Err(seen) => {
                                w = seen;
                                continue;
                            }
                        }
                    }
                    match self.cas(w, w + (1 << INFLIGHT_SHIFT)) {
                        Ok(()) => return Ok(permit(Kind::Probe(ho_epoch(w)))),
                        Err(seen) => w = seen,
                    }
                }
            }
        }
    }

    /// The common case inline — a success, no window: two loads — and the
    /// rest out of line.
    #[inline]
    fn record_closed(&self, word: u64, outcome: Outcome, started: Nanos) {
        if outcome == Outcome::Success
            && self.window.is_none()
            && self.consecutive.load(Ordering::Relaxed) == 0
        {
            // Nothing to reset and nothing to count: whichever closed
            // period this call belonged to, there is nothing to record.
            return;
        }
        self.record_closed_slow(word, outcome, started);
    }

    #[inline(never)]
    fn record_closed_slow(&self, word: u64, outcome: Outcome, started: Nanos) {
        if outcome == Outcome::Ignored {
            return;
        }
        let failed = outcome == Outcome::Failure;
        // A call admitted in an earlier closed period (the breaker has
        // tripped since) says nothing about this one.
        if self.state.load(Ordering::Acquire) != word {
            return;
        }
        if failed {
            let n = self
                .consecutive
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            if n >= self.config.failure_threshold {
                self.trip(word, Reason::ConsecutiveFailures);
                return;
            }
        } else if self.consecutive.load(Ordering::Relaxed) != 0 {
            // Loading first keeps the success path free of writes, so
            // threads reporting successes do not fight over the cache line.
            self.consecutive.store(0, Ordering::Release);
        }
        if let Some(window) = &*self.window {
            let (now, slow) = match self.config.slow {
                Some((threshold, _)) => {
                    let now = self.clock.now();
                    (now, now.saturating_sub(started) >= threshold)
                }
                None if matches!(window, Window::Time(_)) => (self.clock.now(), false),
                None => (0, false),
            };
            let counts = window.record(encode(failed, slow), now);
            if (failed || slow)
                && let Some(counts) = counts
                && let Some(reason) = self.rate_trip(counts, failed, slow)
            {
                self.trip(word, reason);
            }
        }
    }

    fn rate_trip(&self, c: Counts, failed: bool, slow: bool) -> Option<Reason> {
        if c.calls < self.config.minimum_calls || c.calls == 0 {
            return None;
        }
        let reached =
            |n: u64, ppm: u64| u128::from(n) * 1_000_000 >= u128::from(ppm) * u128::from(c.calls);
        if failed
            && let Some(ppm) = self.config.failure_rate_ppm
            && reached(c.failures, ppm)
        {
            return Some(Reason::FailureRate);
        }
        if slow
            && let Some((_, ppm)) = self.config.slow
            && reached(c.slow, ppm)
        {
            return Some(Reason::SlowCallRate);
        }
        None
    }

    /// Closed → Open. Only the thread whose CAS lands emits.
    fn trip(&self, word: u64, reason: Reason) {
        let now = self.clock.now();
        let trips = self.trips.load(Ordering::Acquire).saturating_add(1);
        let open_for = self.open_time(trips);
        if self
            .cas(word, open(now.saturating_add(duration_to_nanos(open_for))))
            .is_ok()
        {
            self.trips.store(trips, Ordering::Release);
            self.emit(State::Closed, State::Open, Some(open_for), reason);
        }
    }

    fn record_probe(&self, epoch: u64, outcome: Outcome) {
        let mut w = self.state.load(Ordering::Acquire);
        loop {
            if mode(w) != HALF_OPEN || ho_epoch(w) != epoch || in_flight(w) == 0 {
                // The period this probe belonged to is over.
                return;
            }
            match outcome {
                Outcome::Ignored => match self.cas(w, w - (1 << INFLIGHT_SHIFT)) {
                    Ok(()) => return,
                    Err(seen) => w = seen,
                },
                Outcome::Success => {
                    let done = successes(w) + 1;
                    if done >= u64::from(self.config.success_threshold) {
                        // Forget the closed-state history before closing, so
                        // no call of the new period is lost to the reset.
                        self.clear_counts();
                        match self.cas(w, closed(self.next_epoch())) {
                            Ok(()) => {
                                self.trips.store(0, Ordering::Release);
                                self.emit(
                                    State::HalfOpen,
                                    State::Closed,
                                    None,
                                    Reason::ProbesSucceeded,
                                );
                                return;
                            }
                            Err(seen) => w = seen,
                        }
                    } else {
                        let next = half_open(epoch, in_flight(w) - 1, done);
                        match self.cas(w, next) {
                            Ok(()) => return,
                            Err(seen) => w = seen,
                        }
                    }
                }
                Outcome::Failure => {
                    let trips = self.trips.load(Ordering::Acquire).saturating_add(1);
                    let open_for = self.open_time(trips);
                    let until = self.clock.now().saturating_add(duration_to_nanos(open_for));
                    match self.cas(w, open(until)) {
                        Ok(()) => {
                            self.trips.store(trips, Ordering::Release);
                            self.emit(
                                State::HalfOpen,
                                State::Open,
                                Some(open_for),
                                Reason::ProbeFailed,
                            );
                            return;
                        }
                        Err(seen) => w = seen,
                    }
                }
            }
        }
    }

    /// The open time of the `trips`-th trip in a row.
    fn open_time(&self, trips: u32) -> Duration {
        let c = &self.config;
        let base = c.recovery_timeout.as_secs_f64();
        let max = c.max_open.as_secs_f64();
        let mut secs = if c.backoff_multiplier > 1.0 {
            let exp = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX);
            (base * c.backoff_multiplier.powi(exp)).min(max)
        } else {
            base
        };
        if c.jitter > 0.0 {
            let r = match &self.jitter_source {
                Some(f) => f(),
                None => fastrand::f64(),
            };
            secs *= 1.0 + c.jitter * (2.0 * r.clamp(0.0, 1.0) - 1.0);
            secs = secs.min(max);
        }
        Duration::try_from_secs_f64(secs).unwrap_or(c.max_open)
    }

    fn clear_counts(&self) {
        self.consecutive.store(0, Ordering::Release);
        if let Some(w) = &*self.window {
            w.clear();
        }
    }

    fn set_mode(&self, m: u64, reason: Reason) {
        let mut w = self.state.load(Ordering::Acquire);
        loop {
            if mode(w) == m && m != CLOSED {
                return;
            }
            let new = (self.next_epoch() & PAYLOAD_MAX) << 3 | m;
            match self.cas(w, new) {
                Ok(()) => {
                    if state_of(w) != state_of(new) {
                        self.emit(state_of(w), state_of(new), None, reason);
                    }
                    return;
                }
                Err(seen) => w = seen,
            }
        }
    }

    fn emit(&self, from: State, to: State, open_for: Option<Duration>, reason: Reason) {
        let name = self.name.as_deref().unwrap_or("");
        tracing::info!(
            target: "apiguard::breaker",
            breaker = name,
            ?from,
            ?to,
            open_for_ms = open_for.map(|d| d.as_millis() as u64),
            ?reason,
            "circuit breaker transition"
        );
        let t = Transition {
            from,
            to,
            open_for,
            reason,
        };
        if let Some(hook) = &self.on_transition {
            hook(&t);
        }
        if let Some(hook) = self.registry_hook.get() {
            hook(&t);
        }
        match to {
            State::Closed | State::Disabled => self
                .waiters
                .release(self.clock.now(), self.config.slow_start),
            // The caller that moved it to half-open holds the only slot:
            // nobody else could go.
            State::HalfOpen if self.config.half_open_probes == 1 => {}
            _ => self.waiters.wake_all(),
        }
    }

    /// When a call refused now would be worth asking again.
    pub(crate) fn readiness(&self, now: Nanos) -> Readiness {
        let w = self.state.load(Ordering::Acquire);
        let at = match mode(w) {
            CLOSED | DISABLED => return Readiness::Now,
            FORCED_OPEN => return Readiness::Never,
            OPEN => payload(w),
            _ if in_flight(w) < u64::from(self.config.half_open_probes) => {
                return Readiness::Now;
            }
            _ => self
                .half_open_since
                .load(Ordering::Acquire)
                .saturating_add(self.config.half_open_timeout),
        };
        if at <= now {
            Readiness::Now
        } else {
            Readiness::At(at)
        }
    }
}
