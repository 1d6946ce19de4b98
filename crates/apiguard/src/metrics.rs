//! Counters and gauges through the [`metrics`] facade (feature `metrics`).
//!
//! Install any `metrics` recorder (Prometheus exporter, StatsD, …) and put
//! [`MetricsLayer`] outermost on a stack; [`GuardedClient`](crate::GuardedClient)
//! records these on its own.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `apiguard_requests_total` | counter | `outcome` | requests through the stack, by how they ended: `ok`, `rate_limited`, `circuit_open`, `retries_exhausted`, `budget_exhausted`, `timeout`, `error`, and for `GuardedClient` `error_status` (a final `429` or `5xx`) |
//! | `apiguard_request_seconds` | histogram | | time each request spent in the stack |
//! | `apiguard_attempts_total` | counter | | attempts sent on the network (client) |
//! | `apiguard_retries_total` | counter | | of which retries (client) |
//! | `apiguard_wait_seconds` | histogram | | time a request waited (tokens, backoff, open circuit) rather than spent on the network (client) |
//! | `apiguard_breaker_transitions_total` | counter | `from`, `to` | breaker transitions (see [`record_transition`]) |
//! | `apiguard_breaker_state` | gauge | | last state entered: 0 closed, 1 half-open, 2 open, 3 forced open, 4 disabled |
//! | `apiguard_host_pace` | gauge | `host` | a paced host's current pace, requests per second (see [`pace`](crate::pace): at most 32 host labels, then `other`) |
//!
//! Recording costs a few atomic operations per request once a recorder is
//! installed, and almost nothing without one.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use apiguard_breaker::{State, Transition};
use apiguard_core::BoxError;
use apiguard_core::clock::{Clock, Nanos};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::client::ErrorKind;

/// Records `apiguard_requests_total` and `apiguard_request_seconds` for the
/// service it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer {
    _priv: (),
}

impl MetricsLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics { inner }
    }
}

/// Service made by [`MetricsLayer`].
#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
}

impl<S: fmt::Debug> fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S> Metrics<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Takes the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for Metrics<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        MetricsFuture {
            inner: self.inner.call(req),
            started: Clock::system().now(),
        }
    }
}

pin_project! {
    /// Response future of [`Metrics`].
    #[derive(Debug)]
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        started: Nanos,
    }
}

impl<F, T, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx)).map_err(Into::into);
        let spent = Clock::system().now().saturating_sub(*this.started);
        let outcome = match &out {
            Ok(_) => "ok",
            Err(e) => error_label(&**e),
        };
        record_request(outcome, spent);
        Poll::Ready(out)
    }
}

/// The `outcome` of a final `429` or `5xx` response (client only).
pub(crate) const ERROR_STATUS: &str = "error_status";

/// The `outcome` label of a request that ended in `err`.
pub(crate) fn error_label(err: &(dyn std::error::Error + 'static)) -> &'static str {
    if err.is::<apiguard_core::RetriesExhausted>() {
        return "retries_exhausted";
    }
    match crate::client::kind_of(err) {
        ErrorKind::RateLimited => "rate_limited",
        ErrorKind::CircuitOpen => "circuit_open",
        ErrorKind::BudgetExhausted => "budget_exhausted",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Status => ERROR_STATUS,
        _ => "error",
    }
}

pub(crate) fn record_request(outcome: &'static str, spent: Nanos) {
    metrics::counter!("apiguard_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("apiguard_request_seconds").record(spent as f64 / 1e9);
}

pub(crate) fn record_attempt(retry: bool) {
    metrics::counter!("apiguard_attempts_total").increment(1);
    if retry {
        metrics::counter!("apiguard_retries_total").increment(1);
    }
}

pub(crate) fn record_wait(waited: Nanos) {
    metrics::histogram!("apiguard_wait_seconds").record(waited as f64 / 1e9);
}

fn state_label(s: State) -> &'static str {
    match s {
        State::Closed => "closed",
        State::HalfOpen => "half_open",
        State::Open => "open",
        State::ForcedOpen => "forced_open",
        State::Disabled => "disabled",
    }
}

fn state_level(s: State) -> f64 {
    match s {
        State::Closed => 0.0,
        State::HalfOpen => 1.0,
        State::Open => 2.0,
        State::ForcedOpen => 3.0,
        State::Disabled => 4.0,
    }
}

/// Records a breaker transition: call it from your own
/// [`on_transition`](apiguard_breaker::CircuitBreakerBuilder::on_transition)
/// hook. `GuardedClient` installs it on the breakers it builds from its own
/// knobs.
pub fn record_transition(t: &Transition) {
    metrics::counter!(
        "apiguard_breaker_transitions_total",
        "from" => state_label(t.from),
        "to" => state_label(t.to)
    )
    .increment(1);
    metrics::gauge!("apiguard_breaker_state").set(state_level(t.to));
}

/// Sets a paced host's gauge.
pub(crate) fn record_pace(host: &str, rate: f64) {
    metrics::gauge!("apiguard_host_pace", "host" => host.to_owned()).set(rate);
}
