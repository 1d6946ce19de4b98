//! Where a breaker stands and what it reports: [`State`], [`Reason`],
//! [`Transition`], [`Stats`].

use super::*;

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
pub(crate) type JitterSource = Arc<dyn Fn() -> f64 + Send + Sync + 'static>;
