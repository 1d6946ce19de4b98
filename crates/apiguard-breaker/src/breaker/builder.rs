//! [`CircuitBreakerBuilder`] and the settings it checks.

use super::*;

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

    /// Every setting checked, in the form the breaker uses.
    fn validate(&self) -> Result<Config, InvalidConfig> {
        self.check_thresholds()?;
        let (failure_rate_ppm, slow) = self.rate_trips()?;
        let (window, minimum_calls) =
            self.window_and_minimum(failure_rate_ppm.is_some() || slow.is_some())?;
        let max_open = self.open_bounds()?;
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

    /// The counts and periods of the closed → open → half-open cycle.
    fn check_thresholds(&self) -> Result<(), InvalidConfig> {
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
        Ok(())
    }

    /// The failure-rate trip (parts per million) and the slow-call trip
    /// (threshold in nanos, rate in parts per million), when set.
    #[allow(clippy::type_complexity)]
    fn rate_trips(&self) -> Result<(Option<u64>, Option<(Nanos, u64)>), InvalidConfig> {
        fn rate(field: &'static str, r: f64) -> Result<u64, InvalidConfig> {
            if r.is_nan() || r <= 0.0 || r > 1.0 {
                return Err(InvalidConfig::new(field, "must be in (0, 1]"));
            }
            Ok((r * 1_000_000.0).round().max(1.0) as u64)
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
        Ok((failure_rate_ppm, slow))
    }

    /// The sliding window the rate trips count in (none without a rate
    /// trip), and the calls it needs before they judge.
    fn window_and_minimum(
        &self,
        has_rate_trip: bool,
    ) -> Result<(Option<SlidingWindow>, u64), InvalidConfig> {
        let window = match (self.window, has_rate_trip) {
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
        Ok((window, minimum_calls))
    }

    /// How the open period grows (multiplier, jitter) and its ceiling.
    fn open_bounds(&self) -> Result<Duration, InvalidConfig> {
        if self.backoff_multiplier.is_nan() || self.backoff_multiplier < 1.0 {
            return Err(InvalidConfig::new(
                "backoff_multiplier",
                "must be at least 1",
            ));
        }
        if self.jitter.is_nan() || !(0.0..=1.0).contains(&self.jitter) {
            return Err(InvalidConfig::new("jitter", "must be in [0, 1]"));
        }
        match self.max_recovery_timeout {
            Some(m) if m < self.recovery_timeout => Err(InvalidConfig::new(
                "max_recovery_timeout",
                "must not be below recovery_timeout",
            )),
            Some(m) => Ok(m),
            None => Ok(self.recovery_timeout.saturating_mul(10)),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) failure_threshold: u32,
    pub(crate) recovery_timeout: Duration,
    pub(crate) success_threshold: u32,
    pub(crate) half_open_probes: u32,
    pub(crate) half_open_timeout: Nanos,
    pub(crate) failure_rate_ppm: Option<u64>,
    /// (threshold in nanos, rate in parts per million)
    pub(crate) slow: Option<(Nanos, u64)>,
    pub(crate) window: Option<SlidingWindow>,
    pub(crate) minimum_calls: u64,
    pub(crate) backoff_multiplier: f64,
    pub(crate) max_open: Duration,
    pub(crate) jitter: f64,
    pub(crate) slow_start: Nanos,
}
