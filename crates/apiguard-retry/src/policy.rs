//! The retry policy: when to retry, and how long to wait first.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apiguard_core::clock::{Clock, Nanos, duration_to_nanos, nanos_to_duration};
use apiguard_core::{
    BoxError, BudgetExhausted, Classify, InvalidConfig, Outcome, RetriesExhausted,
};
use http::{Request, Response, StatusCode};

use crate::backoff::{Backoff, Jitter, Random, SeededRandom, SharedRandom, ThreadRandom};
use crate::body::{DEFAULT_MAX_REPLAY_BYTES, TryCloneBody};
use crate::budget::{RetryBudget, Withdrawal};
use crate::classify::{ErrorClass, classify_error, is_repeatable, response_hint};
use crate::future::Wait;
use crate::grpc::{DEFAULT_GRPC_RETRYABLE_CODES, GrpcRules, GrpcVerdict};
use apiguard_core::grpc::Code;

/// Decides whether and when to retry; drives [`RetryLayer`](crate::RetryLayer)
/// and plain async closures ([`run`](Self::run)).
///
/// Built with [`RetryPolicy::builder`]. Cloning is cheap: clones share the
/// settings and the [`RetryBudget`], and the settings are interned (see
/// [`RetryPolicyBuilder::build`]), so a clone of a policy without a budget
/// touches no reference count. The state of one request (attempts made,
/// when it started) lives in the clone kept for that request.
///
/// ```
/// use std::time::Duration;
/// use apiguard_retry::{Jitter, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .max_retries(3)
///     .base_delay(Duration::from_millis(100))
///     .max_delay(Duration::from_secs(2))
///     .jitter(Jitter::Full)
///     .deadline(Duration::from_secs(10))
///     .build()?;
/// # let _ = policy;
/// # Ok::<(), apiguard_core::InvalidConfig>(())
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    cfg: Settings,
    budget: Option<RetryBudget>,
    /// The request this clone serves ([`Retry`](crate::Retry) keeps one
    /// clone per request, as tower's `Retry` does).
    state: RetryState,
}

/// Where one request stands under a [`RetryPolicy`]: for a service that
/// drives the policy itself instead of through tower's `Retry` (apiguard's
/// composed stack does, to keep one future per request).
///
/// Made by [`RetryPolicy::start`], advanced by [`RetryPolicy::on_result`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryState {
    /// Retries made so far.
    retries: u32,
    /// When the first attempt started.
    start: Nanos,
    /// The previous delay, for decorrelated jitter.
    prev_delay: Nanos,
    /// Time spent waiting out inner refusals, which spend no retry.
    waited: Nanos,
}

impl RetryState {
    /// Retries made so far (0 during the first attempt).
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Attempts made so far, the one in flight included.
    pub fn attempts(&self) -> u32 {
        self.retries + 1
    }
}

/// The settings (all but the budget, which is state).
#[derive(Clone)]
struct Config {
    max_retries: u32,
    backoff: Backoff,
    statuses: StatusSet,
    max_retry_after: Duration,
    max_local_wait: Duration,
    deadline: Option<Duration>,
    retry_non_idempotent: bool,
    max_replay_bytes: usize,
    clock: Clock,
    /// `None`: [`ThreadRandom`].
    random: Option<SharedRandom>,
    /// gRPC's rules, for gRPC requests.
    grpc: Option<GrpcRules>,
}

impl Config {
    fn random_unit(&self) -> f64 {
        match &self.random {
            Some(random) => random.unit(),
            None => ThreadRandom.unit(),
        }
    }

    /// Settings that can be interned: plain values, no clock or random
    /// source of the user's (those have an identity of their own).
    fn is_plain(&self) -> bool {
        !self.clock.is_manual() && self.random.is_none()
    }

    /// The same plain settings.
    fn same_plain(&self, other: &Config) -> bool {
        self.is_plain()
            && other.is_plain()
            && self.max_retries == other.max_retries
            && self.backoff == other.backoff
            && self.statuses == other.statuses
            && self.max_retry_after == other.max_retry_after
            && self.max_local_wait == other.max_local_wait
            && self.deadline == other.deadline
            && self.retry_non_idempotent == other.retry_non_idempotent
            && self.max_replay_bytes == other.max_replay_bytes
            && self.grpc == other.grpc
    }
}

/// A policy's settings.
///
/// tower's `Retry` keeps a clone of its policy in each request's future,
/// and so does ours: with the settings behind an `Arc`, every request would
/// write a reference count and drop it again: two locked instructions, a
/// few nanoseconds on a request that succeeds, which tower's retry with a
/// plain policy struct does not pay. Settings made only of plain values
/// are therefore interned:
/// one copy per distinct settings, kept for the life of the process and
/// shared as a `&'static` reference, at most [`MAX_INTERNED`] of them so
/// that memory stays bounded whatever a program builds. Past that bound,
/// and for settings with a clock or random source of the user's, a policy
/// holds its own `Arc`.
#[derive(Clone)]
enum Settings {
    Interned(&'static Config),
    Counted(Arc<Config>),
}

/// The most distinct plain settings interned in one process.
const MAX_INTERNED: usize = 64;

/// The interned settings of the process.
static INTERNED: Interner = Interner::new(MAX_INTERNED);

/// A table of interned settings, bounded.
struct Interner {
    table: Mutex<Vec<&'static Config>>,
    max: usize,
}

impl Interner {
    const fn new(max: usize) -> Self {
        Self {
            table: Mutex::new(Vec::new()),
            max,
        }
    }

    fn settings(&self, cfg: Config) -> Settings {
        if !cfg.is_plain() {
            return Settings::Counted(Arc::new(cfg));
        }
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&same) = table.iter().find(|c| c.same_plain(&cfg)) {
            return Settings::Interned(same);
        }
        if table.len() >= self.max {
            return Settings::Counted(Arc::new(cfg));
        }
        let cfg: &'static Config = Box::leak(Box::new(cfg));
        table.push(cfg);
        Settings::Interned(cfg)
    }
}

impl Settings {
    fn new(cfg: Config) -> Settings {
        INTERNED.settings(cfg)
    }

    /// Whether these settings are interned (no reference count).
    #[cfg(test)]
    fn is_interned(&self) -> bool {
        matches!(self, Settings::Interned(_))
    }
}

impl std::ops::Deref for Settings {
    type Target = Config;

    #[inline]
    fn deref(&self) -> &Config {
        match self {
            Settings::Interned(cfg) => cfg,
            Settings::Counted(cfg) => cfg,
        }
    }
}

/// Builds a [`RetryPolicy`]; see each setting for its default.
///
/// # Clone
///
/// A clone is a copy of the settings; a [`budget`](Self::budget) in them
/// stays one budget, shared by every policy built from either copy.
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    max_retries: u32,
    base_delay: Duration,
    max_delay: Duration,
    jitter: Jitter,
    statuses: Vec<u16>,
    max_retry_after: Duration,
    max_local_wait: Duration,
    deadline: Option<Duration>,
    budget: Option<RetryBudget>,
    retry_non_idempotent: bool,
    max_replay_bytes: usize,
    clock: Clock,
    /// `None`: [`ThreadRandom`].
    random: Option<SharedRandom>,
    grpc: Option<(Vec<Code>, Vec<String>)>,
}

/// The status codes retried by default.
pub const DEFAULT_RETRYABLE_STATUS_CODES: [u16; 6] = [408, 429, 500, 502, 503, 504];

impl Default for RetryPolicyBuilder {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            jitter: Jitter::Full,
            statuses: DEFAULT_RETRYABLE_STATUS_CODES.to_vec(),
            max_retry_after: Duration::from_secs(60),
            max_local_wait: Duration::from_secs(60),
            deadline: None,
            budget: Some(RetryBudget::default()),
            retry_non_idempotent: false,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
            clock: Clock::system(),
            random: None,
            grpc: None,
        }
    }
}

impl RetryPolicyBuilder {
    /// The defaults, with gRPC's retry rules (gRFC A6) for gRPC requests
    /// (content type `application/grpc…`):
    ///
    /// - a response is retried by its gRPC status, read from a
    ///   trailers-only response's headers (or mapped from a non-`200` HTTP
    ///   status): by default `UNAVAILABLE` alone
    ///   ([`grpc_retryable_codes`](Self::grpc_retryable_codes)). A status
    ///   that comes in the trailers is never retried: the response has
    ///   started, the call is committed;
    /// - `grpc-retry-pushback-ms` replaces the backoff (bounded by
    ///   [`max_retry_after`](Self::max_retry_after) and the deadline); a
    ///   negative or malformed pushback means "do not retry";
    /// - every gRPC call is an HTTP `POST`, so idempotency is the method's:
    ///   only the methods named in
    ///   [`grpc_idempotent_methods`](Self::grpc_idempotent_methods) are
    ///   retried once the request may have reached the server (after a
    ///   status, a reset, a timeout). A failure before the request was sent
    ///   (connection refused) is retried for every method.
    ///   [`retry_non_idempotent(true)`](Self::retry_non_idempotent) treats
    ///   every method as idempotent.
    ///
    /// Requests that are not gRPC keep the HTTP rules.
    ///
    /// ```
    /// use apiguard_core::grpc::Code;
    /// use apiguard_retry::RetryPolicyBuilder;
    ///
    /// let policy = RetryPolicyBuilder::grpc()
    ///     .grpc_retryable_codes([Code::Unavailable, Code::ResourceExhausted])
    ///     .grpc_idempotent_methods(["grpc.health.v1.Health/Check"])
    ///     .build()?;
    /// assert!(policy.is_grpc());
    /// # Ok::<(), apiguard_core::InvalidConfig>(())
    /// ```
    pub fn grpc() -> Self {
        Self {
            grpc: Some((DEFAULT_GRPC_RETRYABLE_CODES.to_vec(), Vec::new())),
            ..Self::default()
        }
    }

    /// The gRPC status codes retried (default `UNAVAILABLE` alone; `OK` is
    /// refused by `build`). Turns gRPC's rules on, as
    /// [`grpc`](Self::grpc) does.
    pub fn grpc_retryable_codes(mut self, codes: impl IntoIterator<Item = Code>) -> Self {
        let methods = self.grpc.take().map(|(_, m)| m).unwrap_or_default();
        self.grpc = Some((codes.into_iter().collect(), methods));
        self
    }

    /// The gRPC methods that may be sent twice: full names
    /// (`pkg.Service/Method`, with or without the leading `/`) or whole
    /// services (`pkg.Service/`). Default none. Turns gRPC's rules on, as
    /// [`grpc`](Self::grpc) does.
    pub fn grpc_idempotent_methods<M: Into<String>>(
        mut self,
        methods: impl IntoIterator<Item = M>,
    ) -> Self {
        let codes = self
            .grpc
            .take()
            .map_or_else(|| DEFAULT_GRPC_RETRYABLE_CODES.to_vec(), |(c, _)| c);
        self.grpc = Some((codes, methods.into_iter().map(Into::into).collect()));
        self
    }

    /// Retries after the first attempt (default 3; 0 turns retrying off).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Delay before the first retry, before jitter (default 100 ms).
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base_delay = d;
        self
    }

    /// Cap on any backoff delay (default 10 s; must not be below
    /// `base_delay`).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// How delays are spread (default [`Jitter::Full`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The response status codes that are retried (default 408, 429, 500,
    /// 502, 503, 504). Codes outside 100–599 are refused by `build`.
    pub fn retryable_status_codes(mut self, codes: impl IntoIterator<Item = u16>) -> Self {
        self.statuses = codes.into_iter().collect();
        self
    }

    /// The longest server-requested wait (`Retry-After`, `RateLimit` `t`,
    /// an inner refusal's `retry_after`) worth waiting for (default 60 s).
    /// A longer one ends retrying at once and returns what came back.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }

    /// The most time one request spends, in all, waiting out refusals of
    /// inner apiguard layers (an open breaker, an empty bucket) before it
    /// gives up (default 60 s); the [`deadline`](Self::deadline) bounds it
    /// too.
    ///
    /// Such a refusal means the request never left, so waiting it out and
    /// trying again spends neither one of [`max_retries`](Self::max_retries)
    /// nor the retry budget: only attempts that reach the upstream do. This
    /// is what bounds those waits instead.
    pub fn max_local_wait(mut self, d: Duration) -> Self {
        self.max_local_wait = d;
        self
    }

    /// The bound [`max_local_wait`](Self::max_local_wait) set (60 s unless
    /// set), for a stack that must keep it within a wait bound of its own.
    pub fn local_wait_limit(&self) -> Duration {
        self.max_local_wait
    }

    /// A total time bound over all attempts and waits of one request
    /// (default none). A retry whose wait would end past it is not made.
    /// An attempt in flight is not cut short: put a timeout layer outside
    /// the retry layer for that.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// The budget retries are drawn from (default: a budget of its own,
    /// [`RetryBudget::default`], shared by every clone of the policy). Pass
    /// a clone of one budget to several policies to share it.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// No budget: only `max_retries` and the deadline bound retries.
    pub fn no_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Also retry requests that are not idempotent (POST, PATCH without an
    /// `Idempotency-Key`) after failures where they may have reached the
    /// server (default: no).
    pub fn retry_non_idempotent(mut self, yes: bool) -> Self {
        self.retry_non_idempotent = yes;
        self
    }

    /// The most bytes of a streaming body kept for replay
    /// ([`RetryLayer::replay_bodies`](crate::RetryLayer::replay_bodies));
    /// default 64 KiB.
    pub fn max_replay_bytes(mut self, n: usize) -> Self {
        self.max_replay_bytes = n;
        self
    }

    /// The clock deadlines are measured with (default [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The random source of jitter (default: a thread-local generator).
    pub fn random(mut self, random: impl Random) -> Self {
        self.random = Some(Arc::new(random));
        self
    }

    /// A reproducible random source, seeded ([`SeededRandom`]).
    pub fn seed(self, seed: u64) -> Self {
        self.random(SeededRandom::new(seed))
    }

    /// Checks the settings and builds the policy.
    ///
    /// Settings made of plain values (no [`clock`](Self::clock) or
    /// [`random`](Self::random) source of your own) are interned: policies
    /// built with the same settings share one copy, kept for the life of
    /// the process, so that the clone each request keeps needs no reference
    /// count. At most 64 distinct settings are kept that way; policies built
    /// past that bound, or with a clock or random source of their own, hold
    /// their settings behind an `Arc` instead. Either way the policy behaves
    /// the same; the [`budget`](Self::budget) is never interned.
    pub fn build(self) -> Result<RetryPolicy, InvalidConfig> {
        let backoff = Backoff::new(self.base_delay, self.max_delay, self.jitter)?;
        let mut statuses = StatusSet::default();
        for code in self.statuses {
            if !(100..=599).contains(&code) {
                return Err(InvalidConfig::new(
                    "retryable_status_codes",
                    format!("{code} is not an HTTP status code"),
                ));
            }
            statuses.insert(code);
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(InvalidConfig::new("deadline", "must be more than zero"));
        }
        let grpc = match self.grpc {
            Some((codes, methods)) => Some(GrpcRules::new(codes, methods)?),
            None => None,
        };
        Ok(RetryPolicy {
            cfg: Settings::new(Config {
                max_retries: self.max_retries,
                backoff,
                statuses,
                max_retry_after: self.max_retry_after,
                max_local_wait: self.max_local_wait,
                deadline: self.deadline,
                retry_non_idempotent: self.retry_non_idempotent,
                max_replay_bytes: self.max_replay_bytes,
                clock: self.clock,
                random: self.random,
                grpc,
            }),
            budget: self.budget,
            state: RetryState::default(),
        })
    }
}

/// A bit set of status codes 0..640.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct StatusSet([u64; 10]);

impl StatusSet {
    fn insert(&mut self, code: u16) {
        let i = usize::from(code);
        self.0[i / 64] |= 1 << (i % 64);
    }

    #[inline]
    fn contains(&self, status: StatusCode) -> bool {
        let i = usize::from(status.as_u16());
        i < 640 && self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

/// What the last attempt said.
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// A retryable status, with the server's hint.
    Status(StatusCode, Option<Duration>),
    /// A retryable gRPC status, with the server's pushback.
    Grpc(Code, Option<Duration>),
    Error(ErrorClass),
    /// A failure as classified by `run`'s classifier.
    Failed,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::Status(s, _) => write!(f, "status {}", s.as_u16()),
            Signal::Grpc(code, _) => write!(f, "grpc-status {code}"),
            Signal::Error(ErrorClass::Refused(_)) => f.write_str("refused by an inner layer"),
            Signal::Error(ErrorClass::NeverSent) => f.write_str("connection failed"),
            Signal::Error(ErrorClass::Transient) => f.write_str("transient error"),
            Signal::Error(ErrorClass::Other) => f.write_str("error"),
            Signal::Failed => f.write_str("failure"),
        }
    }
}

enum Decision {
    Retry(Duration, Withdrawal),
    Stop(Stop),
}

/// Why retrying stopped; decides what an error result becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Not a retryable outcome, or the request may not be repeated, or the
    /// wait asked for does not fit: the result is returned as it is.
    AsIs,
    /// Retryable, but out of retries or out of time.
    Exhausted,
    /// Retryable, but the budget is spent.
    Budget,
}

impl RetryPolicy {
    /// A builder with the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder::default()
    }

    /// Retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.cfg.max_retries
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> &Backoff {
        &self.cfg.backoff
    }

    /// The budget retries are drawn from, if any.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// The cap on bytes kept for replaying a streaming body.
    pub fn max_replay_bytes(&self) -> usize {
        self.cfg.max_replay_bytes
    }

    /// Whether `status` is retried.
    pub fn is_retryable_status(&self, status: StatusCode) -> bool {
        self.cfg.statuses.contains(status)
    }

    /// Whether gRPC's rules apply to gRPC requests
    /// ([`RetryPolicyBuilder::grpc`]).
    pub fn is_grpc(&self) -> bool {
        self.cfg.grpc.is_some()
    }

    /// This policy with gRPC's rules, the defaults of
    /// [`RetryPolicyBuilder::grpc`], if it has none yet; the same policy
    /// otherwise. A copy with rules of its own keeps sharing the budget.
    pub fn with_grpc(&self) -> RetryPolicy {
        if self.is_grpc() {
            return self.clone();
        }
        let mut cfg = (*self.cfg).clone();
        cfg.grpc = Some(GrpcRules::default());
        RetryPolicy {
            cfg: Settings::new(cfg),
            budget: self.budget.clone(),
            state: self.state,
        }
    }

    /// [`start`](Self::start) at `now`, read from this policy's
    /// [`clock`](Self::clock) by the caller (who may share one reading
    /// with other parts of a stack).
    #[inline]
    pub fn start_at(&self, now: Nanos) -> RetryState {
        if let Some(budget) = &self.budget {
            budget.deposit_at(now);
        }
        RetryState {
            retries: 0,
            start: now,
            prev_delay: 0,
            waited: 0,
        }
    }

    /// Starts one request: its deposit in the budget, and its clock for the
    /// deadline. Reads the clock only when a deadline or a budget needs it.
    #[inline]
    pub fn start(&self) -> RetryState {
        // Time is only needed for a deadline or a budget; skipping the read
        // keeps the success path cheap without them.
        let now = if self.cfg.deadline.is_some() || self.budget.is_some() {
            self.cfg.clock.now()
        } else {
            0
        };
        self.start_at(now)
    }

    /// The clock the policy reads (deadline, budget).
    pub fn clock(&self) -> &Clock {
        &self.cfg.clock
    }

    /// A copy of `req` for a later attempt: `None` when the policy makes no
    /// retries, or when the body cannot be copied.
    #[inline]
    pub fn copy_request<B: TryCloneBody>(&self, req: &Request<B>) -> Option<Request<B>> {
        if self.cfg.max_retries == 0 {
            return None;
        }
        B::try_clone_request(req)
    }

    /// Decides what follows an attempt of `req` (the copy kept for the next
    /// attempt) that ended in `result`: `Some(wait)` to retry once `wait`
    /// completes, `None` to return `result` — whose error may have been
    /// replaced, as [`Retry`](crate::Retry) documents (`RetriesExhausted`,
    /// `BudgetExhausted`).
    pub fn on_result<B: TryCloneBody, R>(
        &self,
        state: &mut RetryState,
        req: &Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Wait> {
        if self.ends_plainly(result) {
            return None;
        }
        let grpc = match &self.cfg.grpc {
            Some(rules) if apiguard_core::grpc::is_grpc(req.headers()) => Some(rules),
            _ => None,
        };
        let signal = match (&*result, grpc) {
            (Ok(res), Some(rules)) => match rules.verdict(res) {
                GrpcVerdict::Final => return None,
                GrpcVerdict::Retry(code, pushback) => Signal::Grpc(code, pushback),
            },
            (Ok(res), None) if !self.cfg.statuses.contains(res.status()) => return None,
            (Ok(res), None) => Signal::Status(res.status(), response_hint(res.headers())),
            (Err(e), _) => Signal::Error(classify_error(&**e)),
        };
        let repeatable = self.cfg.retry_non_idempotent
            || match grpc {
                // Every gRPC call is a POST: the method decides.
                Some(rules) => rules.is_idempotent(req.uri().path()),
                None => is_repeatable(req.method(), req.headers()),
            };
        let decision = if req.body().can_replay() {
            self.decide(state, signal, repeatable, self.cfg.clock.now())
        } else {
            Decision::Stop(Stop::AsIs)
        };
        match decision {
            Decision::Retry(wait, withdrawal) => Some(Wait::new(wait, withdrawal)),
            Decision::Stop(stop) => {
                if let Err(e) = result {
                    let attempts = state.retries + 1;
                    match stop {
                        Stop::AsIs => {}
                        Stop::Exhausted => {
                            let last = std::mem::replace(e, Box::new(BudgetExhausted::new()));
                            *e = Box::new(RetriesExhausted::new(attempts, last));
                        }
                        Stop::Budget => {
                            tracing::debug!(target: "apiguard::retry", attempts, error = %e, "retry budget spent; last error dropped");
                            *e = Box::new(BudgetExhausted::new());
                        }
                    }
                }
                None
            }
        }
    }

    /// A response that ends retrying whatever the request: no gRPC rules
    /// to consult, and a status that is not retried. The first rule of
    /// [`on_result`](Self::on_result), which tower's `retry` also checks in
    /// line before calling out to the rest.
    #[inline]
    fn ends_plainly<R>(&self, result: &Result<Response<R>, BoxError>) -> bool {
        matches!(result, Ok(res) if self.cfg.grpc.is_none() && !self.cfg.statuses.contains(res.status()))
    }

    /// The one decision, for both the layer and `run`.
    fn decide(
        &self,
        st: &mut RetryState,
        signal: Signal,
        repeatable: bool,
        now: Nanos,
    ) -> Decision {
        let (hint, needs_repeatable) = match signal {
            Signal::Status(_, hint) | Signal::Grpc(_, hint) => (hint, true),
            Signal::Error(ErrorClass::Refused(None)) | Signal::Error(ErrorClass::Other) => {
                return Decision::Stop(Stop::AsIs);
            }
            // An inner refusal or a refused connection: nothing was sent.
            Signal::Error(ErrorClass::Refused(Some(wait))) => (Some(wait), false),
            Signal::Error(ErrorClass::NeverSent) => (None, false),
            Signal::Error(ErrorClass::Transient) | Signal::Failed => (None, true),
        };
        if needs_repeatable && !repeatable {
            return Decision::Stop(Stop::AsIs);
        }
        let refused = matches!(signal, Signal::Error(ErrorClass::Refused(_)));
        // An inner refusal sent nothing: waiting it out spends no retry
        // (only attempts that reach the upstream do). The deadline and
        // `max_local_wait` bound such waits instead.
        if !refused && st.retries >= self.cfg.max_retries {
            return Decision::Stop(Stop::Exhausted);
        }
        let wait = match hint {
            Some(hint) if hint > self.cfg.max_retry_after => return Decision::Stop(Stop::AsIs),
            Some(hint) => hint,
            None => {
                let u = match self.cfg.backoff.jitter() {
                    Jitter::None => 0.0,
                    _ => self.cfg.random_unit(),
                };
                self.cfg
                    .backoff
                    .delay(st.retries + 1, nanos_to_duration(st.prev_delay), u)
            }
        };
        if let Some(deadline) = self.cfg.deadline {
            let end = st.start.saturating_add(duration_to_nanos(deadline));
            if now.saturating_add(duration_to_nanos(wait)) > end {
                // A server's wait that does not fit is returned as it came.
                return Decision::Stop(if hint.is_some() || refused {
                    Stop::AsIs
                } else {
                    Stop::Exhausted
                });
            }
        }
        // A refusal naming no wait would be asked again at once, for ever:
        // each look costs at least a millisecond of the local-wait bound.
        let wait = if refused {
            let wait = wait.max(Duration::from_millis(1));
            let waited = st.waited.saturating_add(duration_to_nanos(wait));
            if waited > duration_to_nanos(self.cfg.max_local_wait) {
                return Decision::Stop(Stop::AsIs);
            }
            st.waited = waited;
            wait
        } else {
            wait
        };
        let withdrawal = match &self.budget {
            // The budget caps the extra load retries put on the other side.
            // Waiting out an inner refusal (an open breaker, an empty
            // bucket) sent nothing, and the next attempt passes the same
            // guard again, so it spends nothing.
            _ if refused => Withdrawal::none(),
            Some(budget) if budget.try_withdraw_at(now) => Withdrawal::taken(budget.clone()),
            Some(_) => {
                tracing::debug!(target: "apiguard::retry", attempts = st.retries + 1, reason = %signal, "retry budget exhausted");
                return Decision::Stop(Stop::Budget);
            }
            None => Withdrawal::none(),
        };
        if !refused {
            st.retries += 1;
        }
        if hint.is_none() {
            st.prev_delay = duration_to_nanos(wait);
        }
        tracing::debug!(
            target: "apiguard::retry",
            attempt = st.retries + 1,
            reason = %signal,
            wait_ms = wait.as_millis() as u64,
            refused,
            "retrying"
        );
        Decision::Retry(wait, withdrawal)
    }

    /// Runs `f` under this policy, outside tower: a plain retry loop.
    ///
    /// `f` gets the attempt number (1 for the first attempt). `Ok` results
    /// are returned at once; every error is retried, with the backoff, the
    /// deadline and the budget, except apiguard refusals from inside `f`
    /// (`RateLimited`, `CircuitOpen`, as the error itself or inside a
    /// [`BoxError`]): their `retry_after` is waited for if it fits, and
    /// otherwise they end the loop at once. Errors come out as
    /// [`RetriesExhausted`], with the number of attempts made and the last
    /// error.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use apiguard_retry::RetryPolicy;
    ///
    /// let policy = RetryPolicy::builder().base_delay(Duration::from_millis(1)).build().unwrap();
    /// let out = policy
    ///     .run(|attempt| async move { if attempt < 3 { Err("flaky") } else { Ok(attempt) } })
    ///     .await;
    /// assert_eq!(out.unwrap(), 3);
    /// # }
    /// ```
    pub async fn run<F, Fut, T, E>(&self, f: F) -> Result<T, RetriesExhausted<E>>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: 'static,
    {
        self.run_classified(
            |r: &Result<T, E>| match r {
                Ok(_) => Outcome::Success,
                Err(_) => Outcome::Failure,
            },
            f,
        )
        .await
    }

    /// As [`run`](Self::run), but `classify` decides which results are
    /// failures worth retrying ([`Outcome::Failure`]); this is how an `Ok`
    /// value can be retried too. The last result is returned either way.
    pub async fn run_classified<C, F, Fut, T, E>(
        &self,
        classify: C,
        mut f: F,
    ) -> Result<T, RetriesExhausted<E>>
    where
        C: Classify<T, E>,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: 'static,
    {
        let mut state = self.start_at(self.cfg.clock.now());
        let mut attempt = 1;
        loop {
            let result = f(attempt).await;
            let refusal = result.as_ref().err().and_then(refusal_of);
            let signal = match refusal {
                Some(class) => Signal::Error(class),
                None if classify.classify(&result) == Outcome::Failure => Signal::Failed,
                None => Signal::Error(ErrorClass::Other),
            };
            match self.decide(&mut state, signal, true, self.cfg.clock.now()) {
                Decision::Retry(wait, mut withdrawal) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    withdrawal.commit();
                    attempt += 1;
                }
                Decision::Stop(_) => {
                    let hint = match refusal {
                        Some(ErrorClass::Refused(hint)) => hint,
                        _ => None,
                    };
                    return result
                        .map_err(|e| RetriesExhausted::new(attempt, e).with_retry_after(hint));
                }
            }
        }
    }
}

/// An apiguard refusal, whether the error is one or boxes one.
fn refusal_of<E: 'static>(err: &E) -> Option<ErrorClass> {
    let any: &dyn Any = err;
    let class = if let Some(boxed) = any.downcast_ref::<BoxError>() {
        classify_error(&**boxed)
    } else if let Some(e) = any.downcast_ref::<apiguard_core::RateLimited>() {
        classify_error(e)
    } else if let Some(e) = any.downcast_ref::<apiguard_core::CircuitOpen>() {
        classify_error(e)
    } else if let Some(e) = any.downcast_ref::<BudgetExhausted>() {
        classify_error(e)
    } else {
        return None;
    };
    matches!(class, ErrorClass::Refused(_)).then_some(class)
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cfg;
        f.debug_struct("RetryPolicy")
            .field("max_retries", &c.max_retries)
            .field("backoff", &c.backoff)
            .field("max_retry_after", &c.max_retry_after)
            .field("max_local_wait", &c.max_local_wait)
            .field("deadline", &c.deadline)
            .field("budget", &self.budget)
            .field("retry_non_idempotent", &c.retry_non_idempotent)
            .field("max_replay_bytes", &c.max_replay_bytes)
            .field("grpc", &c.grpc)
            .field("retries", &self.state.retries)
            .finish_non_exhaustive()
    }
}

/// tower's retry machinery, driven by this policy.
///
/// The error type is [`BoxError`] (what every apiguard and tower layer
/// returns); [`Retry`](crate::Retry) boxes other error types first. When
/// retrying stops on an error, the error becomes:
///
/// - the error itself when it is not retried at all (see the crate docs),
///   when the request may not be repeated, or when it is an inner refusal
///   whose wait does not fit;
/// - [`RetriesExhausted`] (attempts made, last error) when the retries or
///   the deadline ran out;
/// - [`BudgetExhausted`] when the retry budget refused the retry.
///
/// Responses are always returned as they came.
impl<B, R> tower::retry::Policy<Request<B>, Response<R>, BoxError> for RetryPolicy
where
    B: TryCloneBody,
{
    type Future = Wait;

    #[inline]
    fn retry(
        &mut self,
        req: &mut Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Wait> {
        // Most responses end it; decided here, in line, and the rest (what
        // `on_result` decides) out of line.
        self.after(req, result)
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        // tower calls this on the service's policy for each new request
        // (where no retry has happened yet) and on the request's own clone
        // before each retry.
        if self.state.retries == 0 {
            self.state = self.start();
        }
        self.copy_request(req)
    }
}

impl RetryPolicy {
    /// This policy's copy for one new request of [`Retry`](crate::Retry),
    /// started (see [`start`](Self::start)).
    #[inline]
    pub(crate) fn for_request(&self) -> RetryPolicy {
        RetryPolicy {
            cfg: self.cfg.clone(),
            budget: self.budget.clone(),
            state: self.start(),
        }
    }

    /// What follows an attempt of [`Retry`](crate::Retry) whose kept copy is
    /// `req`: [`Policy::retry`](tower::retry::Policy::retry) with this
    /// request's state.
    #[inline]
    pub(crate) fn after<B: TryCloneBody, R>(
        &mut self,
        req: &Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Wait> {
        if self.ends_plainly(result) {
            return None;
        }
        self.retry_slow(req, result)
    }

    /// [`Policy::retry`](tower::retry::Policy::retry) past its fast path.
    #[inline(never)]
    fn retry_slow<B: TryCloneBody, R>(
        &mut self,
        req: &Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Wait> {
        let mut state = self.state;
        let wait = self.on_result(&mut state, req, result);
        self.state = state;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_refused() {
        let e = RetryPolicy::builder()
            .base_delay(Duration::from_secs(2))
            .max_delay(Duration::from_secs(1))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "max_delay");
        let e = RetryPolicy::builder()
            .jitter(Jitter::Proportional(1.5))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "jitter");
        let e = RetryPolicy::builder()
            .retryable_status_codes([503, 99])
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "retryable_status_codes");
        let e = RetryPolicy::builder()
            .deadline(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "deadline");
    }

    /// The settings `build` would make for `b`, interned in `interner`.
    fn settings_in(interner: &Interner, b: RetryPolicyBuilder) -> Settings {
        let p = b.build().unwrap();
        interner.settings((*p.cfg).clone())
    }

    #[test]
    fn the_same_plain_settings_share_one_interned_copy() {
        let interner = Interner::new(4);
        let build = || RetryPolicy::builder().deadline(Duration::from_secs(7));
        let (a, b) = (
            settings_in(&interner, build()),
            settings_in(&interner, build()),
        );
        assert!(a.is_interned() && b.is_interned());
        assert!(std::ptr::eq(&*a, &*b));
        let c = settings_in(&interner, build().max_retries(5));
        assert!(c.is_interned() && !std::ptr::eq(&*a, &*c));
        // A policy's budget is state: two builds never share one.
        let (p, q) = (build().build().unwrap(), build().build().unwrap());
        assert!(
            !p.budget
                .as_ref()
                .unwrap()
                .same_as(q.budget.as_ref().unwrap())
        );
    }

    #[test]
    fn settings_with_a_clock_or_random_source_of_their_own_are_counted() {
        let interner = Interner::new(4);
        let clock = apiguard_core::ManualClock::new().clock();
        assert!(!settings_in(&interner, RetryPolicy::builder().clock(clock)).is_interned());
        assert!(!settings_in(&interner, RetryPolicy::builder().seed(1)).is_interned());
        assert!(interner.table.lock().unwrap().is_empty());
    }

    #[test]
    fn interning_stops_at_its_bound() {
        let interner = Interner::new(3);
        let settings: Vec<_> = (1..=5)
            .map(|n| settings_in(&interner, RetryPolicy::builder().max_retries(n)))
            .collect();
        assert_eq!(interner.table.lock().unwrap().len(), 3);
        let interned: Vec<_> = settings.iter().map(Settings::is_interned).collect();
        assert_eq!(interned, [true, true, true, false, false]);
        // Counted settings are the same settings.
        assert_eq!(settings[4].max_retries, 5);
        // Settings already interned are still found once the table is full.
        assert!(settings_in(&interner, RetryPolicy::builder().max_retries(2)).is_interned());
    }

    #[test]
    fn default_statuses() {
        let p = RetryPolicy::builder().build().unwrap();
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(p.is_retryable_status(StatusCode::from_u16(code).unwrap()));
        }
        for code in [200, 400, 404, 501, 599] {
            assert!(!p.is_retryable_status(StatusCode::from_u16(code).unwrap()));
        }
    }

    fn grpc_call(method: &str) -> Request<()> {
        Request::post(format!("http://svc{method}"))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    }

    fn grpc_answer(status: &str) -> Result<Response<()>, BoxError> {
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", status)
            .body(())
            .unwrap())
    }

    #[tokio::test]
    async fn grpc_unavailable_is_retried_only_for_idempotent_methods() {
        let p = RetryPolicyBuilder::grpc()
            .grpc_idempotent_methods(["pkg.S/Get"])
            .no_budget()
            .build()
            .unwrap();
        let mut st = p.start();
        let get = grpc_call("/pkg.S/Get");
        assert!(p.on_result(&mut st, &get, &mut grpc_answer("14")).is_some());
        assert!(p.on_result(&mut st, &get, &mut grpc_answer("8")).is_none());
        assert!(p.on_result(&mut st, &get, &mut grpc_answer("0")).is_none());
        let mut st = p.start();
        let put = grpc_call("/pkg.S/Put");
        assert!(p.on_result(&mut st, &put, &mut grpc_answer("14")).is_none());
        // A refused connection sent nothing: retried whatever the method.
        let mut refused: Result<Response<()>, BoxError> = Err(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(p.on_result(&mut st, &put, &mut refused).is_some());
        let mut reset: Result<Response<()>, BoxError> = Err(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(p.on_result(&mut st, &put, &mut reset).is_none());
    }

    #[tokio::test]
    async fn a_policy_without_grpc_rules_keeps_http_rules_for_grpc_calls() {
        let p = RetryPolicy::builder().no_budget().build().unwrap();
        assert!(!p.is_grpc());
        let mut st = p.start();
        let get = grpc_call("/pkg.S/Get");
        assert!(p.on_result(&mut st, &get, &mut grpc_answer("14")).is_none());
        let g = p.with_grpc();
        assert!(g.is_grpc());
        let g = g.clone();
        let _ = g.with_grpc();
    }
}
