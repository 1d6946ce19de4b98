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
//! | `apiguard_breaker_transitions_total` | counter | `host`, `from`, `to`, `reason` | transitions of the breakers a [`GuardLayer`](crate::GuardLayer) (and so `GuardedClient`) makes, one per host |
//! | `apiguard_breaker_state` | gauge | `host` | the state each host's breaker last entered: 0 closed, 1 half-open, 2 open, 3 forced open, 4 disabled |
//! | `apiguard_host_pace` | gauge | `host` | a paced host's current pace, requests per second (see [`pace`](crate::pace)) |
//! | `http.client.request.duration` | histogram (s) | `http.request.method`, `server.address`, `server.port`, `http.response.status_code`, `error.type` | each attempt `GuardedClient` sends on the network, named and labelled as OpenTelemetry's HTTP client conventions name it (a Prometheus exporter shows `http_client_request_duration`) |
//!
//! # Host labels
//!
//! The first [`MAX_LABELLED_HOSTS`] hosts
//! a stack labels get their own `host` label (`api.example.com:443` as
//! requests name it, `*` when hosts share one breaker); later ones share
//! `other`, so a client calling many hosts keeps a bounded number of
//! series. The `other` state gauge holds the last transition of any of
//! them, and of the overflow breaker that hosts past `max_hosts` share
//! while the registry is full of breakers in use.
//!
//! # OpenTelemetry names
//!
//! Where a metric has an equivalent in OpenTelemetry's semantic
//! conventions for HTTP clients, it takes that name and those attributes:
//! `http.client.request.duration` is one sample per attempt, as the
//! conventions count a retry as a request of its own. `error.type` is the
//! status code of a `4xx`/`5xx` answer, `connect` or `timeout` for an
//! attempt that got none, else `_OTHER`; a method outside the standard
//! ones is `_OTHER`. The `apiguard_*` metrics have no equivalent there
//! (a request's whole time in the stack, waits, breakers, pace) and keep
//! their names. `server.address` follows the host cap below.
//!
//! A breaker you build yourself records through [`record_transition`]
//! (no `host` label) when you hook it in.
//!
//! [`describe`] registers each metric's description and unit with the
//! installed recorder; building a `GuardLayer` calls it, so call it again
//! only if the recorder is installed later.
//!
//! Recording costs a few atomic operations per request once a recorder is
//! installed, and almost nothing without one.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use apiguard_breaker::{Reason, State, Transition};
use apiguard_core::BoxError;
use apiguard_core::clock::{Clock, Nanos};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::client::ErrorKind;
use crate::pace::MAX_LABELLED_HOSTS;
use crate::stack::HostScope;

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

fn reason_label(r: Reason) -> &'static str {
    match r {
        Reason::ConsecutiveFailures => "consecutive_failures",
        Reason::FailureRate => "failure_rate",
        Reason::SlowCallRate => "slow_call_rate",
        Reason::RecoveryTimeout => "recovery_timeout",
        Reason::ProbeFailed => "probe_failed",
        Reason::ProbeTimeout => "probe_timeout",
        Reason::ProbesSucceeded => "probes_succeeded",
        Reason::HeldOpen => "held_open",
        Reason::Forced => "forced",
        Reason::Disabled => "disabled",
        Reason::Reset => "reset",
        _ => "other",
    }
}

/// The `host` labels of one stack: the first [`MAX_LABELLED_HOSTS`] hosts
/// by name, the rest `other`.
#[derive(Default)]
pub(crate) struct HostLabels {
    names: Mutex<HashMap<HostScope, Arc<Named>>>,
}

/// A labelled host's label values, made once.
#[derive(Debug)]
pub(crate) struct Named {
    /// `host:port` as requests name it (`*` when hosts share one breaker).
    label: Arc<str>,
    /// The host alone (IPv6 without brackets), for `server.address`.
    address: Arc<str>,
    /// The explicit port, for `server.port`.
    port: Option<Arc<str>>,
}

impl fmt::Debug for HostLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLabels").finish_non_exhaustive()
    }
}

const OTHER: &str = "other";

impl HostLabels {
    fn label(&self, host: &HostScope) -> Arc<str> {
        self.named(host)
            .map_or_else(|| Arc::from(OTHER), |n| n.label.clone())
    }

    /// `host`'s labels, or `None` past the cap.
    fn named(&self, host: &HostScope) -> Option<Arc<Named>> {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(named) = names.get(host) {
            return Some(named.clone());
        }
        if names.len() >= MAX_LABELLED_HOSTS {
            return None;
        }
        let named = Arc::new(match host {
            Some(a) => Named {
                label: Arc::from(a.as_str()),
                address: Arc::from(a.host().trim_start_matches('[').trim_end_matches(']')),
                port: a.port_u16().map(|p| Arc::from(p.to_string())),
            },
            None => Named {
                label: Arc::from("*"),
                address: Arc::from(""),
                port: None,
            },
        });
        names.insert(host.clone(), named.clone());
        Some(named)
    }
}

/// What one attempt's `http.client.request.duration` sample needs from its
/// request, taken before the request is handed on: the host's labels are
/// made once per host, so an attempt only clones them.
#[derive(Debug)]
pub(crate) struct AttemptLabels {
    method: &'static str,
    server: Server,
    default_port: &'static str,
}

/// The server an attempt went to, as its labels name it.
#[derive(Debug)]
enum Server {
    /// A host within the cap, with labels of its own.
    Named(Arc<Named>),
    /// A host past the cap: `other`.
    Other,
    /// A request without a host: empty labels.
    Unknown,
}

impl AttemptLabels {
    pub(crate) fn of<B>(req: &http::Request<B>, hosts: &HostLabels) -> Self {
        let uri = req.uri();
        let server = match uri.authority() {
            Some(a) => hosts
                .named(&Some(a.clone()))
                .map_or(Server::Other, Server::Named),
            None => Server::Unknown,
        };
        Self {
            method: method_label(req.method()),
            server,
            default_port: match uri.scheme_str() {
                Some("https") => "443",
                Some("http") => "80",
                _ => "",
            },
        }
    }

    /// Records the attempt: `status` if it got an answer, else the error.
    pub(crate) fn record(
        self,
        seconds: f64,
        status: Option<http::StatusCode>,
        err: Option<&(dyn std::error::Error + 'static)>,
    ) {
        let (address, port): (metrics::SharedString, metrics::SharedString) = match self.server {
            Server::Named(n) => (
                n.address.clone().into(),
                n.port.clone().map_or(self.default_port.into(), Into::into),
            ),
            Server::Other => (OTHER.into(), OTHER.into()),
            Server::Unknown => ("".into(), "".into()),
        };
        let code = status.map(|s| s.as_u16());
        let error = match (code, err) {
            (Some(c), _) if c >= 400 => c.to_string(),
            (Some(_), _) => String::new(),
            (None, Some(e)) if is_connect(e) => "connect".to_owned(),
            (None, Some(e)) if is_timeout(e) => "timeout".to_owned(),
            (None, _) => "_OTHER".to_owned(),
        };
        metrics::histogram!(
            "http.client.request.duration",
            "http.request.method" => self.method,
            "server.address" => address,
            "server.port" => port,
            "http.response.status_code" => code.map_or_else(String::new, |c| c.to_string()),
            "error.type" => error
        )
        .record(seconds);
    }
}

fn is_connect(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(|e| e.is_connect())
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The method as OpenTelemetry names it: the standard ones, else `_OTHER`.
fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::CONNECT => "CONNECT",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::TRACE => "TRACE",
        http::Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

/// The hooks a [`GuardLayer`](crate::GuardLayer) puts on its per-host
/// breakers and on the overflow breaker hosts share when its registry is
/// full: transitions and state labelled by host, `other` for the overflow
/// breaker as for hosts past the label cap (transitions are rare, so a
/// lock here costs nothing that matters).
pub(crate) fn host_transition_hooks() -> (
    impl Fn(&HostScope, &Transition) + Send + Sync + 'static,
    impl Fn(&Transition) + Send + Sync + 'static,
) {
    let labels = HostLabels::default();
    let hosts =
        move |host: &HostScope, t: &Transition| record_host_transition(&labels.label(host), t);
    let overflow = |t: &Transition| record_host_transition(OTHER, t);
    (hosts, overflow)
}

fn record_host_transition(host: &str, t: &Transition) {
    metrics::counter!(
        "apiguard_breaker_transitions_total",
        "host" => host.to_owned(),
        "from" => state_label(t.from),
        "to" => state_label(t.to),
        "reason" => reason_label(t.reason)
    )
    .increment(1);
    metrics::gauge!("apiguard_breaker_state", "host" => host.to_owned()).set(state_level(t.to));
}

/// Registers the description and unit of every metric above with the
/// installed recorder (an exporter shows them as `# HELP` and units).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "apiguard_requests_total",
        Unit::Count,
        "Requests through the stack, by how they ended (outcome)."
    );
    describe_histogram!(
        "apiguard_request_seconds",
        Unit::Seconds,
        "Time each request spent in the stack, waits and retries included."
    );
    describe_counter!(
        "apiguard_attempts_total",
        Unit::Count,
        "Attempts sent on the network."
    );
    describe_counter!(
        "apiguard_retries_total",
        Unit::Count,
        "Attempts that were retries."
    );
    describe_histogram!(
        "apiguard_wait_seconds",
        Unit::Seconds,
        "Time a request waited for a token, a backoff or an open circuit."
    );
    describe_counter!(
        "apiguard_breaker_transitions_total",
        Unit::Count,
        "Circuit breaker transitions, by host, from, to and reason."
    );
    describe_gauge!(
        "apiguard_breaker_state",
        "State each host's breaker last entered: 0 closed, 1 half-open, 2 open, 3 forced open, 4 disabled."
    );
    describe_gauge!(
        "apiguard_host_pace",
        "Pace learned from a host's pushback, requests per second."
    );
    describe_histogram!(
        "http.client.request.duration",
        Unit::Seconds,
        "Duration of each HTTP attempt sent on the network (OpenTelemetry's HTTP client conventions)."
    );
}

/// Records a breaker transition: call it from your own
/// [`on_transition`](apiguard_breaker::CircuitBreakerBuilder::on_transition)
/// hook. Not needed on a [`GuardLayer`](crate::GuardLayer)'s breakers:
/// the layer records theirs, labelled by host.
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

#[cfg(test)]
mod tests {
    use super::{HostLabels, MAX_LABELLED_HOSTS};

    #[test]
    fn the_first_hosts_keep_their_names_and_the_rest_share_other() {
        let labels = HostLabels::default();
        let host = |i: usize| Some(format!("h{i}.example:80").parse().unwrap());
        for i in 0..MAX_LABELLED_HOSTS {
            assert_eq!(&*labels.label(&host(i)), format!("h{i}.example:80"));
        }
        assert_eq!(&*labels.label(&host(MAX_LABELLED_HOSTS)), "other");
        assert_eq!(
            &*labels.label(&host(0)),
            "h0.example:80",
            "a named host stays named"
        );
        assert_eq!(&*labels.label(&None), "other");
    }
}
