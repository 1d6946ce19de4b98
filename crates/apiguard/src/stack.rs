//! [`GuardLayer`]: the three patterns composed in the order a client needs.
//!
//! Outermost first:
//!
//! ```text
//! total timeout → retry → circuit breaker → rate limit → attempt timeout → transport
//! ```
//!
//! - **Retry outside the breaker**: every attempt is seen by the breaker. A
//!   request the open breaker refuses (or a probe in flight) is not an
//!   attempt: it waits for the breaker's next change, woken by the breaker,
//!   within its total timeout and `max_wait`, spending no retry and no
//!   budget; a next probe past both is refused at once.
//! - **Rate limit inside retry**: every request that leaves the process,
//!   retries included, spends a token — the remote's quota counts them all.
//! - **Breaker before the limiter**: a call the breaker refuses spends no
//!   token.
//! - **Attempt timeout innermost**: it covers the network call only, not the
//!   wait for a token.
//! - **Total timeout outermost**: it bounds everything, waits and retries
//!   included.
//!
//! Each part is optional. Breakers and buckets are per host by default (the
//! URI's authority, or the `Host` header): one failing host does not open
//! the circuit for another, and each host's quota is its own.
//!
//! Adaptive pacing is on by default ([`GuardLayerBuilder::adaptive`]): a
//! host that answers `429` (or `503` with `Retry-After`, or quota fields
//! saying nothing is left) is paused for every request and then paced at
//! what it lets through, in place of its bucket; see [`pace`](crate::pace).
//!
//! # How it runs
//!
//! The parts are not stacked as separate tower layers: [`Guard`] runs them
//! in one service with one future per request. Stacked, each layer would
//! wrap the next one's future in its own (a future of a kilobyte, moved up
//! through every layer) and tower's `Retry` would clone the whole service
//! below it into every request (a dozen reference counts written per call,
//! each a cache line that every core's calls fight over). Here:
//!
//! - the success path touches the host's breaker and bucket once each, and
//!   keeps its state inline; waiting for a token, a backoff or a ready
//!   service moves that state to the heap only then;
//! - each service keeps handles on the breaker and bucket of the host it
//!   called last, so a client calling one host again and again does no
//!   registry lookup (a breaker the registry has since let go of is
//!   noticed, and the registry asked again);
//! - only a request that may be retried keeps the layer's shared state;
//! - one timer serves both timeouts, registered only when the request
//!   first has to wait.
//!
//! The composed behaviour is the order above; `benches/stack.rs` measures
//! what it costs next to tower's and tower-resilience's stacks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use apiguard_breaker::{
    CircuitBreaker, CircuitBreakerBuilder, HoldOpen, KeyedBreakers, RetryAfterHold, SlidingWindow,
    Ticket,
};
use apiguard_core::{
    BoxError, CircuitOpen, Classify, Clock, HttpClassifier, InvalidConfig, Nanos, Outcome,
};
use apiguard_ratelimit::{Reservation, TokenBucket};

use crate::hosts::HostLimits;
use crate::pace::{HostPaces, PaceSlot};
use crate::recovery::BreakerWait;
use apiguard_retry::future::Wait;
use apiguard_retry::{RetryPolicy, RetryState, TryCloneBody};
use http::Request;
use http::uri::Authority;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

/// The key breakers and buckets are found under: the request's host, or
/// `None` when they are shared by all hosts.
pub type HostScope = Option<Authority>;

/// Picks the [`HostScope`] of a request.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    per_host: bool,
}

impl Scope {
    /// One breaker and one bucket per host (`true`) or for all (`false`).
    pub const fn new(per_host: bool) -> Self {
        Self { per_host }
    }

    /// The scope of `req`.
    #[inline]
    pub fn of<B>(&self, req: &Request<B>) -> HostScope {
        if !self.per_host {
            return None;
        }
        apiguard_breaker::KeyExtractor::extract(&apiguard_breaker::HostKey, req)
    }
}

impl<B> apiguard_breaker::KeyExtractor<Request<B>> for Scope {
    type Key = HostScope;
    #[inline]
    fn extract(&self, req: &Request<B>) -> HostScope {
        self.of(req)
    }
}

impl<B> apiguard_ratelimit::extract::KeyExtractor<B> for Scope {
    type Key = HostScope;
    #[inline]
    fn extract(&self, req: &Request<B>) -> Option<HostScope> {
        Some(self.of(req))
    }
}

/// Builds a [`GuardLayer`]; see [`GuardLayer::builder`].
#[derive(Debug, Clone)]
pub struct GuardLayerBuilder {
    total_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    breaker: Option<CircuitBreakerBuilder>,
    limit: Option<(u32, f64)>,
    max_wait: Duration,
    attempt_timeout: Option<Duration>,
    per_host: bool,
    max_hosts: usize,
    adaptive: bool,
    max_pause: Duration,
}

impl Default for GuardLayerBuilder {
    fn default() -> Self {
        Self {
            total_timeout: None,
            retry: None,
            breaker: None,
            limit: None,
            max_wait: Duration::from_secs(30),
            attempt_timeout: None,
            per_host: true,
            max_hosts: 1024,
            adaptive: true,
            max_pause: crate::pace::DEFAULT_MAX_PAUSE,
        }
    }
}

impl GuardLayerBuilder {
    /// Bounds each request, waits and retries included.
    pub fn total_timeout(mut self, d: Duration) -> Self {
        self.total_timeout = Some(d);
        self
    }

    /// Retries by `policy`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Puts a circuit breaker built from `template` in front of each host.
    pub fn circuit_breaker(mut self, template: CircuitBreakerBuilder) -> Self {
        self.breaker = Some(template);
        self
    }

    /// Limits each host to `capacity` requests at once and `refill_per_sec`
    /// a second after that.
    pub fn rate_limit(mut self, capacity: u32, refill_per_sec: f64) -> Self {
        self.limit = Some((capacity, refill_per_sec));
        self
    }

    /// How long a request may wait for a token before it is refused with
    /// `RateLimited`, and for its host's open breaker to let it through
    /// before it is refused with `CircuitOpen` (default 30 s; the total
    /// timeout bounds both too). A breaker whose next probe comes later is
    /// not waited for. Such waits spend no retry attempt and no budget.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Bounds each attempt's network call (not the wait for a token).
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// One breaker and one bucket per host (default) or one for all hosts.
    pub fn per_host(mut self, yes: bool) -> Self {
        self.per_host = yes;
        self
    }

    /// At most this many hosts are tracked at once (default 1024).
    pub fn max_hosts(mut self, n: usize) -> Self {
        self.max_hosts = n;
        self
    }

    /// Learns each host's pace from its pushback (default on): a `429`,
    /// a `503` with `Retry-After`, or quota fields saying nothing is left
    /// pause every request to that host and slow it down; requests that go
    /// through speed it back up, never above [`rate_limit`](Self::rate_limit).
    /// Works with no rate limit set. See [`pace`](crate::pace).
    ///
    /// On by default, here as in `GuardedClient`: this stack sits in
    /// front of an upstream, and a `429` from it is that upstream's limit
    /// whoever wrote the stack; off, the stack keeps sending at the rate it
    /// was told while the upstream refuses. A host that never pushes back
    /// costs one atomic load per request and a status check per response.
    pub fn adaptive(mut self, yes: bool) -> Self {
        self.adaptive = yes;
        self
    }

    /// The longest a host is paused, whatever it asks (default 60 s).
    pub fn max_pause(mut self, d: Duration) -> Self {
        self.max_pause = d;
        self
    }

    /// Checks the combination and builds the layer.
    ///
    /// Refused: an attempt timeout longer than the total timeout (no attempt
    /// could use it); a breaker whose time window is shorter than twice the
    /// attempt timeout (one slow attempt would fill the window alone); and
    /// every invalid setting of the parts.
    pub fn build(self) -> Result<GuardLayer, InvalidConfig> {
        if let (Some(attempt), Some(total)) = (self.attempt_timeout, self.total_timeout)
            && attempt > total
        {
            return Err(InvalidConfig::new(
                "attempt_timeout",
                format!(
                    "the attempt timeout ({attempt:?}) is longer than the total timeout ({total:?}), so no attempt could use it"
                ),
            ));
        }
        for (field, d) in [
            ("attempt_timeout", self.attempt_timeout),
            ("total_timeout", self.total_timeout),
        ] {
            if d == Some(Duration::ZERO) {
                return Err(InvalidConfig::new(field, "must be longer than zero"));
            }
        }
        if self.max_hosts == 0 {
            return Err(InvalidConfig::new("max_hosts", "must be at least 1"));
        }
        let breakers = match self.breaker {
            Some(template) => {
                if let (Some(SlidingWindow::Time { span, .. }), Some(attempt)) =
                    (template.window_config(), self.attempt_timeout)
                    && span < attempt * 2
                {
                    return Err(InvalidConfig::new(
                        "circuit_breaker",
                        format!(
                            "the breaker's time window ({span:?}) is shorter than twice the attempt timeout ({attempt:?}): one slow attempt would fill it"
                        ),
                    ));
                }
                Some(KeyedBreakers::new(template, self.max_hosts)?)
            }
            None => None,
        };
        let limiter = match self.limit {
            Some((capacity, rate)) => Some(HostLimits::new(capacity, rate, self.max_hosts)?),
            None => None,
        };
        let paces = if self.adaptive {
            let (capacity, ceiling) = match self.limit {
                Some((c, r)) => (c, Some(r)),
                None => (1, None),
            };
            let config =
                apiguard_ratelimit::PaceConfig::new(capacity, ceiling)?.max_pause(self.max_pause);
            Some(HostPaces::new(config, self.max_hosts))
        } else {
            None
        };
        let needs_key = per_host_needs_key(self.per_host, &breakers, &limiter)
            || (self.per_host && paces.is_some());
        // The policy and the buckets read the same clock unless a test gave
        // the policy its own: then one reading per request serves both.
        let one_clock =
            limiter.is_some() && self.retry.as_ref().is_some_and(|p| !p.clock().is_manual());
        Ok(GuardLayer {
            shared: Arc::new(Shared {
                one_clock,
                total_timeout: self.total_timeout,
                attempt_timeout: self.attempt_timeout,
                retry: self.retry,
                breakers,
                limiter,
                paces,
                max_wait: self.max_wait,
                scope: Scope::new(needs_key),
            }),
        })
    }
}

/// Keys are only worth extracting when something is kept per host.
fn per_host_needs_key(
    per_host: bool,
    breakers: &Option<KeyedBreakers<HostScope>>,
    limiter: &Option<HostLimits>,
) -> bool {
    per_host && (breakers.is_some() || limiter.is_some())
}

/// What the layer, its services and their futures share.
struct Shared {
    /// Retry and the buckets share one clock reading per request.
    one_clock: bool,
    total_timeout: Option<Duration>,
    attempt_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    breakers: Option<KeyedBreakers<HostScope>>,
    limiter: Option<HostLimits>,
    paces: Option<HostPaces>,
    max_wait: Duration,
    scope: Scope,
}

/// The composed client stack (see the [module docs](self)).
///
/// Cloning the layer, and every service it makes, shares the breakers, the
/// buckets and the retry budget.
#[derive(Clone)]
pub struct GuardLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.shared;
        f.debug_struct("GuardLayer")
            .field("total_timeout", &s.total_timeout)
            .field("retry", &s.retry)
            .field("breakers", &s.breakers)
            .field("limiter", &s.limiter)
            .field("paces", &s.paces)
            .field("max_wait", &s.max_wait)
            .field("attempt_timeout", &s.attempt_timeout)
            .field("scope", &s.scope)
            .finish()
    }
}

impl GuardLayer {
    /// Starts a builder with every part off.
    pub fn builder() -> GuardLayerBuilder {
        GuardLayerBuilder::default()
    }

    /// The per-host breakers, for inspection.
    pub fn breakers(&self) -> Option<&KeyedBreakers<HostScope>> {
        self.shared.breakers.as_ref()
    }

    /// The per-host buckets, for inspection.
    pub fn limiter(&self) -> Option<&HostLimits> {
        self.shared.limiter.as_ref()
    }

    /// The per-host pacers, for inspection (`None` when not adaptive).
    pub fn paces(&self) -> Option<&HostPaces> {
        self.shared.paces.as_ref()
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.shared.retry.as_ref()
    }
}

type Attempt<S> = BoxErr<S>;

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            shared: self.shared.clone(),
            attempt: BoxErr { inner },
            last_host: None,
        }
    }
}

/// The service [`GuardLayer`] makes: timeouts, retry, breaker and rate
/// limit in one service and one future.
///
/// Stacked as separate tower layers, each part would wrap the next one's
/// future in its own and clone the service below it into every request
/// (tower's `Retry` does): a kilobyte-sized future moved up through each
/// layer, and a dozen reference counts written per call. Here each request
/// carries one future whose waits live on the heap only when it waits, and
/// one timer serves both timeouts.
#[derive(Clone)]
pub struct Guard<S> {
    shared: Arc<Shared>,
    attempt: Attempt<S>,
    /// The breaker and bucket of the host this service called last: most
    /// clients call one host again and again, and this spares them the
    /// registry lookups. Its reference count is this service's (and its
    /// requests'), not shared by every caller of the host like the
    /// breaker's own: a request takes a count on this one instead.
    last_host: Option<Arc<HostCache>>,
}

/// A host's breaker and bucket, held by a service between calls.
struct HostCache {
    key: HostScope,
    breaker: Option<CircuitBreaker>,
    bucket: Option<TokenBucket>,
    pace: Option<PaceSlot>,
}

/// The host part of `req`, as [`HostKey`](apiguard_breaker::HostKey) finds
/// it, unparsed.
#[inline]
fn host_str<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok()),
    }
}

impl Shared {
    /// The breaker and bucket of `req`'s host: those in `last` if they are
    /// that host's (and the breaker is still the registry's), else the
    /// registries' (which then go in `last`). A host that differs only in
    /// case misses here and is found in the registries, whose keys ignore
    /// case.
    #[inline]
    fn host_of<'a, B>(
        &self,
        last: &'a mut Option<Arc<HostCache>>,
        req: &Request<B>,
    ) -> &'a Arc<HostCache> {
        let hit = match last {
            Some(c) => {
                (!self.scope.per_host || c.key.as_ref().map(Authority::as_str) == host_str(req))
                    && !c.breaker.as_ref().is_some_and(CircuitBreaker::is_evicted)
            }
            None => false,
        };
        if !hit {
            *last = Some(Arc::new(self.lookup(req)));
        }
        match last {
            Some(c) => c,
            None => unreachable!("just filled"),
        }
    }
}

impl Shared {
    /// The breaker and bucket of `req`'s host, from the registries.
    fn lookup<B>(&self, req: &Request<B>) -> HostCache {
        let key = self.scope.of(req);
        HostCache {
            breaker: self.breakers.as_ref().map(|b| b.get(key.clone())),
            bucket: self.limiter.as_ref().map(|l| l.bucket(&key)),
            pace: self.paces.as_ref().map(|p| PaceSlot::new(p, &key)),
            key,
        }
    }
}

/// An admitted call's standing with its host's breaker: the breaker's
/// [`Ticket`], kept with the host's handles. Dropped unrecorded, the call
/// counts as cancelled (a probe slot is freed).
struct Call {
    host: Arc<HostCache>,
    ticket: Option<Ticket>,
    /// When a paced host admitted it (see `PaceSlot::stamp`).
    admitted: Nanos,
}

impl Call {
    fn breaker(&self) -> &CircuitBreaker {
        self.host
            .breaker
            .as_ref()
            .unwrap_or_else(|| unreachable!("a call is made only under a breaker"))
    }

    /// Tells the breaker how the attempt ended; a `503` with `Retry-After`
    /// holds it open as asked.
    #[inline]
    fn record<R>(mut self, result: &Result<http::Response<R>, BoxError>) {
        if let Some(pace) = &self.host.pace {
            pace.observe(&self.host.key, self.admitted, result);
        }
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let outcome = HttpClassifier::new().classify(result);
        self.breaker().record_ticket(ticket, outcome);
        if let Some(d) = result
            .as_ref()
            .ok()
            .and_then(|r| RetryAfterHold::default().hold_for(r))
        {
            self.breaker().hold_open_for(d);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker().record_ticket(ticket, Outcome::Ignored);
        }
    }
}

impl<S> fmt::Debug for Guard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

impl<S> Guard<S> {
    /// Keeps handles on the breaker and bucket of `req`'s host, as if the
    /// service had just called it.
    pub(crate) fn prime<B>(&mut self, req: &Request<B>) {
        if self.shared.breakers.is_some()
            || self.shared.limiter.is_some()
            || self.shared.paces.is_some()
        {
            self.shared.host_of(&mut self.last_host, req);
        }
    }
}

/// What the breaker and the bucket say to an attempt.
enum Admission {
    Go,
    Wait(Duration, Hold),
    /// The host's breaker refused: the request may wait for it
    /// ([`BreakerWait`]).
    Open(CircuitOpen, CircuitBreaker),
    Refused(BoxError),
}

impl Shared {
    /// Asks the host's breaker, then its bucket (a call the breaker refuses
    /// spends no token). The breaker's ticket of an admitted call is left
    /// in `permit`.
    #[inline]
    fn admit(
        &self,
        host: &Arc<HostCache>,
        now: Option<Nanos>,
        permit: &mut Option<Call>,
    ) -> Admission {
        if let Some(breaker) = &host.breaker {
            match breaker.try_acquire_ticket() {
                Ok(ticket) => {
                    *permit = Some(Call {
                        host: host.clone(),
                        ticket: Some(ticket),
                        admitted: 0,
                    })
                }
                Err(open) => {
                    tracing::debug!(target: "apiguard::breaker", retry_after = ?open.retry_after(), "call refused: circuit open");
                    return Admission::Open(open, breaker.clone());
                }
            }
        }
        // A host that pushed back is paced instead of bucketed (its pace
        // never exceeds the bucket's rate); its responses are recorded.
        let pacer = host.pace.as_ref().and_then(|p| p.pacer(&host.key));
        if host.pace.is_some() {
            // When a paced host admitted it; zero (before any cut) for a
            // host without a pacer, which spares those a clock reading.
            let admitted = pacer.map_or(0, |p| now.unwrap_or_else(|| p.clock().now()));
            match permit {
                Some(call) => call.admitted = admitted,
                None => {
                    *permit = Some(Call {
                        host: host.clone(),
                        ticket: None,
                        admitted,
                    })
                }
            }
        }
        if pacer.is_some() || host.bucket.is_some() {
            let (mut at, mut cuts) = (0, 0);
            let reserved = match (pacer, &host.bucket, now) {
                // Waiting for the pace is bounded by the total timeout,
                // not by `max_wait`: it is the price of not being refused.
                (Some(p), _, now) => {
                    cuts = p.cuts();
                    at = now.unwrap_or_else(|| p.clock().now());
                    p.reserve_at(1, self.total_timeout.unwrap_or(self.max_wait), at)
                }
                (None, Some(bucket), Some(now)) => bucket.reserve_at(1, self.max_wait, now),
                (None, Some(bucket), None) => bucket.reserve(1, self.max_wait),
                (None, None, _) => unreachable!("checked above"),
            };
            match reserved {
                Ok(r) => {
                    let wait = r.grant().wait;
                    if !wait.is_zero() {
                        let due = at.saturating_add(apiguard_core::clock::duration_to_nanos(wait));
                        return Admission::Wait(wait, Hold::new(host, pacer, r, due, cuts));
                    }
                }
                Err(limited) => {
                    // Released unrecorded: the call was never made.
                    *permit = None;
                    return Admission::Refused(Box::new(limited));
                }
            }
        }
        Admission::Go
    }

    /// The same for a later attempt of `req`, from the registries.
    fn admit_again<B>(&self, req: &Request<B>, permit: &mut Option<Call>) -> Admission {
        let host = Arc::new(self.lookup(req));
        self.admit(&host, None, permit)
    }
}

impl<S, B, R> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = http::Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = GuardFuture<Attempt<S>, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.attempt.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = &*self.shared;
        let now = shared.one_clock.then(|| Clock::system().now());
        let retry = match (&shared.retry, now) {
            (Some(policy), Some(now)) => policy.start_at(now),
            (Some(policy), None) => policy.start(),
            (None, _) => RetryState::default(),
        };
        let mut permit = None;
        let admission =
            if shared.breakers.is_none() && shared.limiter.is_none() && shared.paces.is_none() {
                Admission::Go
            } else {
                let host = shared.host_of(&mut self.last_host, &req);
                shared.admit(host, now, &mut permit)
            };
        // Only a request that may be retried needs the shared state later.
        let stored = copy_for_retry(shared, &req);
        let later = stored.as_ref().map(|_| self.shared.clone());
        match admission {
            // The success path, built in place.
            Admission::Go => {
                let timer = Timer::start(shared, true);
                GuardFuture {
                    timer,
                    // Later attempts go through a clone, made ready then.
                    svc: stored.as_ref().map(|_| self.attempt.clone()),
                    stored,
                    step: Step::Called {
                        fut: self.attempt.call(req),
                    },
                    shared: later,
                    retry,
                    permit,
                    slow: None,
                }
            }
            Admission::Wait(wait, hold) => {
                // This service was made ready for this call: the request
                // takes it along, and leaves a clone.
                let clone = self.attempt.clone();
                let svc = std::mem::replace(&mut self.attempt, clone);
                let timer = Timer::start(shared, false);
                GuardFuture {
                    timer,
                    step: Step::Token,
                    shared: later.or_else(|| Some(self.shared.clone())),
                    svc: Some(svc),
                    retry,
                    stored,
                    permit,
                    slow: Some(Box::new(Slow {
                        next: Some(req),
                        hold: Some(hold),
                        token: Some(Box::pin(tokio::time::sleep(wait))),
                        backoff: None,
                        breaker: None,
                        queued_at: None,
                        relaid: false,
                    })),
                }
            }
            Admission::Open(open, breaker) => {
                let timer = Timer::start(shared, false);
                let mut queued_at = None;
                let Some(wait) = BreakerWait::start(
                    &breaker,
                    open,
                    &mut queued_at,
                    shared.max_wait,
                    timer.total_end,
                ) else {
                    let svc = stored.as_ref().map(|_| self.attempt.clone());
                    return refused(timer, later, svc, retry, stored, permit, Box::new(open));
                };
                let clone = self.attempt.clone();
                let svc = std::mem::replace(&mut self.attempt, clone);
                GuardFuture {
                    timer,
                    step: Step::Recovering,
                    shared: later.or_else(|| Some(self.shared.clone())),
                    svc: Some(svc),
                    retry,
                    stored,
                    permit,
                    slow: Some(Box::new(Slow {
                        next: Some(req),
                        hold: None,
                        token: None,
                        backoff: None,
                        breaker: Some(wait),
                        queued_at,
                        relaid: false,
                    })),
                }
            }
            Admission::Refused(err) => {
                let timer = Timer::start(shared, false);
                let svc = stored.as_ref().map(|_| self.attempt.clone());
                refused(timer, later, svc, retry, stored, permit, err)
            }
        }
    }
}

/// The future of a request refused before its first attempt: retried if
/// the policy says so, else failed with `err`.
fn refused<S, B, R>(
    timer: Timer,
    shared: Option<Arc<Shared>>,
    svc: Option<S>,
    retry: RetryState,
    stored: Option<Request<B>>,
    permit: Option<Call>,
    err: BoxError,
) -> GuardFuture<S, B>
where
    S: Service<Request<B>, Response = http::Response<R>>,
    B: TryCloneBody,
{
    let mut fut = GuardFuture {
        timer,
        step: Step::Done,
        shared,
        svc,
        retry,
        stored,
        permit,
        slow: None,
    };
    if let Some(Err(err)) = fut.after_attempt::<R>(Err(err)) {
        fut.step = Step::Failed { err: Some(err) };
    }
    fut
}

/// Which deadline the timer is armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    Off,
    Attempt,
    Total,
}

/// The timer of a request's two timeouts. The tokio timer itself is made
/// (on the heap) only when the request first has to wait: a request that
/// completes at once never registers one.
struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Armed,
    deadline: Option<Instant>,
    /// The request's total deadline.
    total_end: Option<Instant>,
    /// No attempt timeout: the total deadline is what ends a hung attempt.
    attempt_unbounded: bool,
}

impl Timer {
    /// The timer of a new request, armed for its first attempt if that
    /// starts now (`attempting`), else for the total deadline.
    #[inline]
    fn start(shared: &Shared, attempting: bool) -> Self {
        let mut timer = Timer {
            sleep: None,
            armed: Armed::Off,
            deadline: None,
            total_end: None,
            attempt_unbounded: false,
        };
        if shared.total_timeout.is_none() && shared.attempt_timeout.is_none() {
            return timer;
        }
        let now = Instant::now();
        timer.total_end = shared.total_timeout.map(|d| now + d);
        timer.attempt_unbounded = shared.attempt_timeout.is_none();
        if attempting {
            timer.attempt_started(shared.attempt_timeout, now);
        } else {
            timer.between_attempts();
        }
        timer
    }

    fn arm(&mut self, deadline: Instant, armed: Armed) {
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(deadline);
        }
        self.deadline = Some(deadline);
        self.armed = armed;
    }

    /// An attempt starts at `now`: the earlier of its deadline and the
    /// total one.
    fn attempt_started(&mut self, attempt_timeout: Option<Duration>, now: Instant) {
        match (attempt_timeout.map(|d| now + d), self.total_end) {
            (Some(a), Some(t)) if a < t => self.arm(a, Armed::Attempt),
            (Some(a), None) => self.arm(a, Armed::Attempt),
            (_, Some(t)) => self.arm(t, Armed::Total),
            (None, None) => self.armed = Armed::Off,
        }
    }

    /// Between attempts only the total deadline runs.
    fn between_attempts(&mut self) {
        match self.total_end {
            Some(t) if self.armed != Armed::Total => self.arm(t, Armed::Total),
            Some(_) => {}
            None => self.armed = Armed::Off,
        }
    }

    /// Which deadline passed, if one did. Called when the request would
    /// wait: registers the timer.
    #[inline]
    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Option<Armed> {
        if self.armed == Armed::Off {
            return None;
        }
        let deadline = self.deadline?;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Some(std::mem::replace(&mut self.armed, Armed::Off)),
            Poll::Pending => None,
        }
    }
}

fn elapsed() -> BoxError {
    Box::new(tower::timeout::error::Elapsed::new())
}

/// A token (or a paced slot) reserved for an attempt that waits for it:
/// given back if the request is dropped before the wait ends.
struct Hold {
    host: Arc<HostCache>,
    pacer: Option<apiguard_ratelimit::Pacer>,
    reservation: Reservation,
    /// When a paced slot is due, and the pacer's cut count before it was
    /// reserved.
    due: Nanos,
    cuts: u64,
    spent: bool,
}

impl Hold {
    fn new(
        host: &Arc<HostCache>,
        pacer: Option<&apiguard_ratelimit::Pacer>,
        reservation: Reservation,
        due: Nanos,
        cuts: u64,
    ) -> Self {
        Self {
            host: host.clone(),
            pacer: pacer.cloned(),
            reservation,
            due,
            cuts,
            spent: false,
        }
    }

    /// Whether the attempt must be admitted again: its host was paused
    /// while it waited, its paced slot was voided by a cut, or (when
    /// `late_counts`) it woke too late for that slot.
    fn stale(&self, late_counts: bool) -> bool {
        if let Some(p) = &self.pacer
            && (p.cuts() != self.cuts || (late_counts && p.missed(self.due, p.clock().now())))
        {
            return true;
        }
        self.host
            .pace
            .as_ref()
            .is_some_and(|p| p.is_paused(&self.host.key))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        match (&self.pacer, &self.host.bucket) {
            (Some(p), _) => {
                p.cancel(&self.reservation);
            }
            (None, Some(b)) => {
                b.cancel(&self.reservation);
            }
            (None, None) => {}
        }
    }
}

/// The parts of a request's state that only a wait or a retry needs; kept on
/// the heap so the success path moves a small future.
struct Slow<B> {
    /// The request of the attempt being admitted or waited for.
    next: Option<Request<B>>,
    hold: Option<Hold>,
    token: Option<Pin<Box<Sleep>>>,
    backoff: Option<Pin<Box<Wait>>>,
    /// Waiting for the host's breaker to let the attempt through.
    breaker: Option<BreakerWait>,
    /// When the request first waited for a breaker: its place in the
    /// breaker's backlog.
    queued_at: Option<Nanos>,
    /// The attempt already took a new slot once for waking late: it keeps
    /// the next one however late it wakes, so a starved runtime cannot
    /// starve the request.
    relaid: bool,
}

pin_project! {
    #[project = StepProj]
    enum Step<F> {
        // An attempt is in flight.
        Called { #[pin] fut: F },
        // Waiting for the token of the attempt in `slow.next`.
        Token,
        // Waiting out the backoff before the next attempt.
        Backoff,
        // Waiting for the host's breaker to change (`slow.breaker`).
        Recovering,
        // Admitting `slow.next` (after a backoff).
        Admit,
        // Waiting for the service to be ready for `slow.next`.
        Calling,
        // Refused before any attempt, for good.
        Failed { err: Option<BoxError> },
        Done,
    }
}

pin_project! {
    /// Response future of [`Guard`]: one request through retry, breaker and
    /// rate limit.
    ///
    /// Dropping it gives back a token it was waiting for, releases its
    /// breaker permit unrecorded, and refunds a retry it had drawn from the
    /// budget but not yet made.
    pub struct GuardFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        step: Step<S::Future>,
        // Kept only by a request that may be retried.
        shared: Option<Arc<Shared>>,
        // The service for attempts after the first.
        svc: Option<S>,
        retry: RetryState,
        // The copy kept for retries.
        stored: Option<Request<B>>,
        permit: Option<Call>,
        slow: Option<Box<Slow<B>>>,
        // The one timer of both timeouts, armed for the earlier deadline.
        timer: Timer,
    }
}

impl<S, B> fmt::Debug for GuardFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardFuture")
            .field("attempts", &self.retry.attempts())
            .finish_non_exhaustive()
    }
}

impl<S, B> GuardFuture<S, B>
where
    S: Service<Request<B>>,
    B: TryCloneBody,
{
    /// An attempt ended in `result` (refused before it was made, or
    /// answered): `Some(result)` to return it, `None` when a retry is
    /// scheduled (the step is then `Backoff`).
    fn after_attempt<R>(
        &mut self,
        result: Result<http::Response<R>, BoxError>,
    ) -> Option<Result<http::Response<R>, BoxError>> {
        let mut result = result;
        let scheduled = schedule(
            self.shared.as_deref(),
            &mut self.retry,
            self.stored.as_ref(),
            &mut self.slow,
            &mut result,
        );
        if scheduled {
            self.step = Step::Backoff;
            None
        } else {
            Some(result)
        }
    }
}

/// The copy of `req` kept for retries, if the policy may retry it.
#[inline]
fn copy_for_retry<B: TryCloneBody>(shared: &Shared, req: &Request<B>) -> Option<Request<B>> {
    shared.retry.as_ref().and_then(|p| p.copy_request(req))
}

/// The shared state of a request past its first attempt (which only a
/// request that may be retried, or one that waited, reaches).
fn later(shared: &Option<Arc<Shared>>) -> &Shared {
    shared
        .as_deref()
        .unwrap_or_else(|| unreachable!("a later attempt keeps the shared state"))
}

/// The request of the attempt being admitted.
fn next_of<B>(slow: &Option<Box<Slow<B>>>) -> &Request<B> {
    slow.as_ref()
        .and_then(|s| s.next.as_ref())
        .unwrap_or_else(|| unreachable!("an attempt being admitted has its request"))
}

fn slow_of<B>(slow: &mut Option<Box<Slow<B>>>) -> &mut Slow<B> {
    slow.get_or_insert_with(|| {
        Box::new(Slow {
            next: None,
            hold: None,
            token: None,
            backoff: None,
            breaker: None,
            queued_at: None,
            relaid: false,
        })
    })
}

/// Asks the retry policy about `result`; on a retry, puts the backoff and a
/// fresh copy of the request in `slow` and says `true`.
fn schedule<B: TryCloneBody, R>(
    shared: Option<&Shared>,
    state: &mut RetryState,
    stored: Option<&Request<B>>,
    slow: &mut Option<Box<Slow<B>>>,
    result: &mut Result<http::Response<R>, BoxError>,
) -> bool {
    let (Some(policy), Some(stored)) = (shared.and_then(|s| s.retry.as_ref()), stored) else {
        return false;
    };
    let Some(wait) = policy.on_result(state, stored, result) else {
        return false;
    };
    // A copy made before has been copied again, so this one works too.
    let Some(next) = policy.copy_request(stored) else {
        return false;
    };
    let slow = slow_of(slow);
    slow.next = Some(next);
    slow.backoff = Some(Box::pin(wait));
    true
}

const POLLED_AFTER_DONE: &str = "GuardFuture polled after it completed";

impl<S, B, R> Future for GuardFuture<S, B>
where
    S: Service<Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Output = Result<http::Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // While waiting (for a token, a backoff, a ready service), only the
        // total deadline can pass: it ends the request.
        macro_rules! wait {
            ($poll:expr) => {
                match $poll {
                    Poll::Ready(v) => v,
                    Poll::Pending => {
                        if this.timer.poll_elapsed(cx).is_some() {
                            this.step.set(Step::Done);
                            *this.permit = None;
                            *this.slow = None;
                            return Poll::Ready(Err(elapsed()));
                        }
                        return Poll::Pending;
                    }
                }
            };
        }
        loop {
            let result = match this.step.as_mut().project() {
                StepProj::Called { fut } => match fut.poll(cx) {
                    Poll::Ready(result) => {
                        let result = result.map_err(Into::into);
                        if let Some(call) = this.permit.take() {
                            call.record(&result);
                        }
                        result
                    }
                    Poll::Pending => match this.timer.poll_elapsed(cx) {
                        None => return Poll::Pending,
                        Some(Armed::Attempt) => {
                            // This attempt timed out; the request goes on.
                            this.step.set(Step::Done);
                            let result = Err(elapsed());
                            if let Some(call) = this.permit.take() {
                                call.record(&result);
                            }
                            result
                        }
                        Some(_) => {
                            this.step.set(Step::Done);
                            if let Some(call) = this.permit.take()
                                && this.timer.attempt_unbounded
                            {
                                // With no attempt timeout, this is how a hang
                                // ends: the breaker counts it as a failure.
                                call.record(&Err::<http::Response<R>, _>(elapsed()));
                            }
                            *this.slow = None;
                            return Poll::Ready(Err(elapsed()));
                        }
                    },
                },
                StepProj::Token => {
                    let slow = slow_of(this.slow);
                    if let Some(sleep) = slow.token.as_mut() {
                        wait!(sleep.as_mut().poll(cx));
                    }
                    let slow = slow_of(this.slow);
                    slow.token = None;
                    if let Some(mut hold) = slow.hold.take() {
                        if hold.stale(!slow.relaid) {
                            slow.relaid = true;
                            // Held by a pause that began while it waited,
                            // or late for its slot: admitted again (the
                            // slot goes back, the breaker's ticket
                            // unrecorded).
                            drop(hold);
                            *this.permit = None;
                            this.step.set(Step::Admit);
                            continue;
                        }
                        hold.spent = true;
                    }
                    this.step.set(Step::Calling);
                    continue;
                }
                StepProj::Backoff => {
                    let slow = slow_of(this.slow);
                    if let Some(wait) = slow.backoff.as_mut() {
                        wait!(wait.as_mut().poll(cx));
                    }
                    slow_of(this.slow).backoff = None;
                    this.step.set(Step::Admit);
                    continue;
                }
                StepProj::Recovering => {
                    let slow = slow_of(this.slow);
                    let waited = match slow.breaker.as_mut() {
                        Some(wait) => wait!(wait.poll(cx)),
                        None => Ok(()),
                    };
                    let slow = slow_of(this.slow);
                    slow.breaker = None;
                    if let Err(open) = waited {
                        // `max_wait` ran out: the request ends here, as one
                        // that waited too long for a token does.
                        slow.next = None;
                        this.step.set(Step::Done);
                        return Poll::Ready(Err(Box::new(open)));
                    }
                    this.step.set(Step::Admit);
                    continue;
                }
                StepProj::Admit => {
                    match later(this.shared).admit_again(next_of(this.slow), this.permit) {
                        Admission::Go => {
                            this.step.set(Step::Calling);
                            continue;
                        }
                        Admission::Open(open, breaker) => {
                            let shared = later(this.shared);
                            let slow = slow_of(this.slow);
                            match BreakerWait::start(
                                &breaker,
                                open,
                                &mut slow.queued_at,
                                shared.max_wait,
                                this.timer.total_end,
                            ) {
                                Some(wait) => {
                                    slow.breaker = Some(wait);
                                    this.step.set(Step::Recovering);
                                    continue;
                                }
                                None => {
                                    slow.next = None;
                                    Err(Box::new(open) as BoxError)
                                }
                            }
                        }
                        Admission::Wait(wait, hold) => {
                            let slow = slow_of(this.slow);
                            slow.hold = Some(hold);
                            slow.token = Some(Box::pin(tokio::time::sleep(wait)));
                            this.step.set(Step::Token);
                            continue;
                        }
                        Admission::Refused(err) => {
                            slow_of(this.slow).next = None;
                            Err(err)
                        }
                    }
                }
                StepProj::Calling => {
                    let svc = this
                        .svc
                        .as_mut()
                        .unwrap_or_else(|| unreachable!("a later attempt has its service"));
                    match wait!(svc.poll_ready(cx)) {
                        Ok(()) => {
                            let req = slow_of(this.slow).next.take().unwrap_or_else(|| {
                                unreachable!("an admitted attempt has its request")
                            });
                            let fut = svc.call(req);
                            this.step.set(Step::Called { fut });
                            let attempt_timeout = later(this.shared).attempt_timeout;
                            if attempt_timeout.is_some() {
                                this.timer.attempt_started(attempt_timeout, Instant::now());
                            }
                            continue;
                        }
                        Err(e) => {
                            this.permit.take();
                            slow_of(this.slow).next = None;
                            Err(e.into())
                        }
                    }
                }
                StepProj::Failed { err } => {
                    let err = err.take().expect(POLLED_AFTER_DONE);
                    this.step.set(Step::Done);
                    return Poll::Ready(Err(err));
                }
                StepProj::Done => panic!("{POLLED_AFTER_DONE}"),
            };
            let mut result = result;
            if schedule(
                this.shared.as_deref(),
                this.retry,
                this.stored.as_ref(),
                this.slow,
                &mut result,
            ) {
                this.timer.between_attempts();
                this.step.set(Step::Backoff);
                continue;
            }
            this.step.set(Step::Done);
            return Poll::Ready(result);
        }
    }
}

/// Boxes the transport's error, so every part of the stack speaks
/// [`BoxError`].
#[derive(Debug, Clone)]
pub struct BoxErr<S> {
    inner: S,
}

impl<S, Req> Service<Req> for BoxErr<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxErrFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        BoxErrFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`BoxErr`].
    #[derive(Debug)]
    pub struct BoxErrFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> Future for BoxErrFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use apiguard_breaker::{CircuitBreaker, State};
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use tower::{ServiceExt, service_fn};
    use tower_layer::Layer;

    use super::*;

    fn get(host: &str) -> Request<Full<Bytes>> {
        Request::get(format!("http://{host}/"))
            .body(Full::default())
            .unwrap()
    }

    fn key(host: &str) -> HostScope {
        Some(host.parse().unwrap())
    }

    fn no_delay() -> RetryPolicy {
        RetryPolicy::builder()
            .base_delay(Duration::from_millis(1))
            .max_delay(Duration::from_millis(1))
            .no_budget()
            .build()
            .unwrap()
    }

    /// An upstream whose first `hangs` calls never answer; later ones
    /// answer 200. Counts the calls.
    #[allow(clippy::type_complexity)]
    fn hanging_then_ok(
        hangs: u32,
    ) -> (
        impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone,
        Arc<AtomicU32>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let svc = service_fn(move |_req: Request<Full<Bytes>>| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < hangs {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(Response::new(Full::default()))
            }
        });
        (svc, calls)
    }

    /// One request to `host` through `svc`, once it is ready.
    async fn send<S>(svc: &mut S, host: &str) -> Result<S::Response, BoxError>
    where
        S: Service<Request<Full<Bytes>>, Error = BoxError>,
    {
        svc.ready().await?.call(get(host)).await
    }

    /// Retry without delay, under both timeouts (milliseconds).
    fn with_timeouts(attempt: u64, total: u64) -> GuardLayer {
        GuardLayer::builder()
            .retry(no_delay())
            .attempt_timeout(Duration::from_millis(attempt))
            .total_timeout(Duration::from_millis(total))
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_attempt_times_out_and_the_retry_answers() {
        let (up, calls) = hanging_then_ok(1);
        let svc = with_timeouts(100, 1000).layer(up);
        let started = Instant::now();
        let res = svc.oneshot(get("a.example")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_millis(200), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_timeout_ends_a_request_whose_attempts_all_hang() {
        let (up, calls) = hanging_then_ok(u32::MAX);
        let svc = with_timeouts(300, 500).layer(up);
        let started = Instant::now();
        let err = svc.oneshot(get("a.example")).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        // One attempt timed out at 300 ms, the second was cut at 500 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_attempt_timeout_the_total_timeout_counts_a_hang_as_a_failure() {
        let layer = GuardLayer::builder()
            .circuit_breaker(
                CircuitBreaker::builder()
                    .failure_threshold(2)
                    .recovery_timeout(Duration::from_secs(60)),
            )
            .total_timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let (up, calls) = hanging_then_ok(u32::MAX);
        let mut svc = layer.layer(up);
        for _ in 0..2 {
            let err = send(&mut svc, "a.example").await.unwrap_err();
            assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        }
        let breakers = layer.breakers().unwrap();
        assert_eq!(breakers.state(&key("a.example")), State::Open);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_while_it_waits_for_a_token_gives_it_back() {
        let layer = GuardLayer::builder()
            .rate_limit(1, 1.0)
            .max_wait(Duration::from_secs(5))
            .build()
            .unwrap();
        let (up, calls) = hanging_then_ok(0);
        let mut svc = layer.layer(up);
        send(&mut svc, "a.example").await.unwrap();
        // The bucket is empty: the next request reserves the token due in a
        // second, and is dropped while it waits.
        let waiting = svc.ready().await.unwrap().call(get("a.example"));
        drop(waiting);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A second later that token is there at once; had the dropped
        // request kept it, this one would wait another second (the paused
        // clock would jump ahead).
        tokio::time::advance(Duration::from_secs(1)).await;
        let before = Instant::now();
        send(&mut svc, "a.example").await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_in_flight_frees_its_slot() {
        let layer = GuardLayer::builder()
            .circuit_breaker(
                CircuitBreaker::builder()
                    .failure_threshold(1)
                    .recovery_timeout(Duration::from_secs(1)),
            )
            .build()
            .unwrap();
        let breakers = layer.breakers().unwrap().clone();
        // The first call fails, then the upstream hangs until told not to.
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let up = service_fn(move |_req: Request<Full<Bytes>>| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => {}
                    1 => std::future::pending::<()>().await,
                    _ => {}
                }
                let status = if n == 0 { 500 } else { 200 };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            }
        });
        let mut svc = layer.layer(up);
        send(&mut svc, "a.example").await.unwrap();
        assert_eq!(breakers.state(&key("a.example")), State::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe hangs; its caller gives up on it.
        let probe = svc.ready().await.unwrap().call(get("a.example"));
        let gave_up = tokio::time::timeout(Duration::from_millis(10), probe).await;
        assert!(gave_up.is_err());
        // Its slot is free at once: the next call is the new probe, and
        // its success closes the circuit.
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get("a.example"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(breakers.state(&key("a.example")), State::Closed);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_service_follows_the_registry_when_its_hosts_breaker_is_evicted() {
        let layer = GuardLayer::builder()
            .circuit_breaker(CircuitBreaker::builder().failure_threshold(1))
            .max_hosts(1)
            .build()
            .unwrap();
        let failing = service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        });
        let mut svc = layer.layer(failing);
        let breakers = layer.breakers().unwrap();
        // `svc` keeps a.example's breaker; b.example takes its place in the
        // one-host registry.
        send(&mut svc, "a.example").await.unwrap();
        let a = breakers.peek(&key("a.example")).unwrap();
        breakers.get(key("b.example"));
        breakers.get(key("c.example"));
        assert!(a.is_evicted());
        assert!(breakers.peek(&key("a.example")).is_none());
        // The next call to a.example lands on the registry's new breaker,
        // which its failure opens.
        send(&mut svc, "a.example").await.unwrap();
        assert_eq!(breakers.state(&key("a.example")), State::Open);
    }
}
