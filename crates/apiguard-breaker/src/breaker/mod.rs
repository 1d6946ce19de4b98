//! The circuit breaker itself: [`CircuitBreaker`], its shared state
//! ([`Inner`]) and the slow paths of its transitions.
//!
//! One concern per file: `state` (what a breaker reports), `builder`
//! (its settings), `word` (the state word), `permit` (the right to make
//! one call), and here the breaker and its transitions.

mod builder;
mod permit;
mod state;
mod word;

pub(crate) use builder::Config;
pub use builder::{CircuitBreakerBuilder, SlidingWindow};
pub(crate) use permit::Kind;
pub use permit::{OwnedPermit, Permit};
// See `try_acquire_ticket`: for the facade, hidden.
#[doc(hidden)]
pub use permit::Ticket;
pub(crate) use state::{Hook, JitterSource};
pub use state::{Reason, State, Stats, Transition};
use word::*;

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
    // Hidden: the facade's per-request future keeps a ticket beside its own
    // handle on the breaker; users have `Permit` (borrowed, as cheap) and
    // `OwnedPermit`. Not covered by semver.
    #[doc(hidden)]
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
    #[doc(hidden)]
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

    /// The common cases inline — a success with no failure streak to
    /// reset, and either no window (two loads) or a count window and no
    /// slow-call rule (one more load, and the ring's cursor) — and the
    /// rest out of line.
    #[inline]
    fn record_closed(&self, word: u64, outcome: Outcome, started: Nanos) {
        if outcome == Outcome::Success && self.consecutive.load(Ordering::Relaxed) == 0 {
            match &*self.window {
                // Nothing to reset and nothing to count: whichever closed
                // period this call belonged to, there is nothing to record.
                None => return,
                // What `record_closed_slow` does for this case: a success
                // raises no rate, so there is nothing to trip.
                Some(Window::Count(w)) if self.config.slow.is_none() => {
                    if self.state.load(Ordering::Acquire) == word {
                        w.record(encode(false, false));
                    }
                    return;
                }
                Some(_) => {}
            }
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
