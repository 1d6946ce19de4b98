//! [`GuardedClient`]: a `hyper_util` HTTP client behind the whole stack.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_breaker::CircuitBreakerBuilder;
use apiguard_core::clock::{Clock, Nanos, nanos_to_duration};
use apiguard_core::{
    BoxError, BudgetExhausted, CircuitOpen, InvalidConfig, RateLimited, RetriesExhausted,
};
use apiguard_retry::RetryPolicy;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pin_project_lite::pin_project;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::stack::{Guard, GuardLayer, GuardLayerBuilder};

#[cfg(not(feature = "https"))]
type Connector = HttpConnector;
#[cfg(feature = "https")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

type Transport = Counted<Client<Connector, Full<Bytes>>>;

/// Refuses, before anything is sent, a scheme this build cannot speak.
fn check_scheme(uri: &Uri) -> Result<(), String> {
    match uri.scheme_str() {
        Some("http") | None => Ok(()),
        Some("https") if cfg!(feature = "https") => Ok(()),
        Some("https") => Err(format!(
            "`{uri}` is HTTPS: enable apiguard's `https` feature"
        )),
        Some(other) => Err(format!("`{uri}`: unsupported scheme `{other}`")),
    }
}

#[cfg(not(feature = "https"))]
fn connector() -> Connector {
    HttpConnector::new()
}

#[cfg(feature = "https")]
fn connector() -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build()
}

const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`GuardedClient`]; see [`GuardedClient::builder`].
#[derive(Debug, Clone)]
pub struct GuardedClientBuilder {
    base_url: Option<String>,
    headers: HeaderMap,
    limit: Option<(u32, f64)>,
    max_wait: Duration,
    max_retries: u32,
    base_delay: Duration,
    retry: Option<RetryPolicy>,
    failure_threshold: u32,
    recovery_timeout: Duration,
    success_threshold: u32,
    breaker: Option<CircuitBreakerBuilder>,
    attempt_timeout: Option<Duration>,
    total_timeout: Duration,
    per_host: bool,
    max_hosts: usize,
    error_for_status: bool,
    adaptive: bool,
}

impl Default for GuardedClientBuilder {
    fn default() -> Self {
        Self {
            base_url: None,
            headers: HeaderMap::new(),
            limit: None,
            max_wait: Duration::from_secs(30),
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            retry: None,
            failure_threshold: 5,
            recovery_timeout: Duration::from_secs(30),
            success_threshold: 1,
            breaker: None,
            attempt_timeout: None,
            total_timeout: Duration::from_secs(60),
            per_host: true,
            max_hosts: 1024,
            error_for_status: false,
            adaptive: true,
        }
    }
}

impl GuardedClientBuilder {
    /// Paths given to [`GuardedClient::get`] and friends are joined to this
    /// URL (absolute URLs are used as they are).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// A header sent with every request (unless the request sets it).
    pub fn default_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Token bucket per host: `capacity` at once, `refill_per_sec` after.
    /// Requests wait for their token (up to `max_wait`). Off by default.
    pub fn rate_limit(mut self, capacity: u32, refill_per_sec: f64) -> Self {
        self.limit = Some((capacity, refill_per_sec));
        self
    }

    /// The longest a request waits for a token, or for its host's open
    /// circuit to let it through (default 30 s; the total timeout bounds
    /// both too). A circuit whose next probe comes later refuses at once
    /// with `CircuitOpen`. Waiting spends no retry attempt and no budget.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Retries after the first attempt (default 3; 0 turns retry off).
    ///
    /// Retries back off exponentially from `base_delay` with jitter, honour
    /// `Retry-After` and an open circuit's wait when it is at most 10 s (and
    /// fits the total timeout), and are bounded by a retry budget (20% of
    /// recent requests plus 10 a second).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// First backoff delay (default 100 ms), doubled on each retry.
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base_delay = d;
        self
    }

    /// A full retry policy, replacing `max_retries` and `base_delay`.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Consecutive failures that open a host's circuit (default 5).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// Time a circuit stays open before it probes (default 30 s).
    pub fn recovery_timeout(mut self, d: Duration) -> Self {
        self.recovery_timeout = d;
        self
    }

    /// Probe successes that close it again (default 1).
    pub fn success_threshold(mut self, n: u32) -> Self {
        self.success_threshold = n;
        self
    }

    /// A full breaker template, replacing the three knobs above.
    pub fn circuit_breaker(mut self, template: CircuitBreakerBuilder) -> Self {
        self.breaker = Some(template);
        self
    }

    /// Bound on each attempt's network call (default 10 s, or the total
    /// timeout when that is shorter). Longer than the total timeout is
    /// refused.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// Bound on a whole request, waits and retries included (default 60 s).
    pub fn total_timeout(mut self, d: Duration) -> Self {
        self.total_timeout = d;
        self
    }

    /// One breaker and bucket per host (default) or one for all.
    pub fn per_host(mut self, yes: bool) -> Self {
        self.per_host = yes;
        self
    }

    /// Turns a final response with a `4xx` or `5xx` status (after any
    /// retries) into a [`ClientError`] of kind [`ErrorKind::Status`], as
    /// reqwest's `error_for_status` does. Off by default: such a response is
    /// returned as `Ok`, for the caller to read. Either way a final `429` or
    /// `5xx` counts as failed in [`ClientStats`].
    pub fn error_for_status(mut self, yes: bool) -> Self {
        self.error_for_status = yes;
        self
    }

    /// Learns each host's pace from its `429`s, `503`s with `Retry-After`
    /// and quota fields (default on): a throttled host is paused for every
    /// request, then paced below what it let through, speeding back up as
    /// requests succeed and never above [`rate_limit`](Self::rate_limit).
    /// Works without a rate limit too. Pauses last at most the retry
    /// policy's `Retry-After` cap (10 s, or the total timeout when
    /// shorter). See [`pace`](crate::pace).
    pub fn adaptive(mut self, yes: bool) -> Self {
        self.adaptive = yes;
        self
    }

    /// Builds the client. Must be called within a tokio runtime's reach
    /// when requests are sent (the transport spawns its connections).
    pub fn build(self) -> Result<GuardedClient, InvalidConfig> {
        let base = match &self.base_url {
            Some(url) => {
                let uri: Uri = url
                    .parse()
                    .map_err(|_| InvalidConfig::new("base_url", format!("`{url}` is not a URL")))?;
                if uri.scheme().is_none() || uri.authority().is_none() {
                    return Err(InvalidConfig::new(
                        "base_url",
                        format!("`{url}` needs a scheme and a host"),
                    ));
                }
                if let Err(why) = check_scheme(&uri) {
                    return Err(InvalidConfig::new("base_url", why));
                }
                Some(url.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        let mut stack: GuardLayerBuilder = GuardLayer::builder()
            .total_timeout(self.total_timeout)
            .attempt_timeout(
                self.attempt_timeout
                    .unwrap_or(DEFAULT_ATTEMPT_TIMEOUT.min(self.total_timeout)),
            )
            .per_host(self.per_host)
            .max_hosts(self.max_hosts)
            .max_wait(self.max_wait)
            .adaptive(self.adaptive)
            .max_pause(Duration::from_secs(10).min(self.total_timeout));
        let policy = match self.retry {
            Some(p) => Some(p),
            None if self.max_retries == 0 => None,
            None => Some(
                RetryPolicy::builder()
                    .max_retries(self.max_retries)
                    .base_delay(self.base_delay)
                    .deadline(self.total_timeout)
                    // Wait out a server's or an open circuit's hint only
                    // when it is short; a longer one comes back at once.
                    .max_retry_after(Duration::from_secs(10).min(self.total_timeout))
                    .build()?,
            ),
        };
        if let Some(p) = policy {
            stack = stack.retry(p);
        }
        let breaker = self.breaker.unwrap_or_else(|| {
            let b = CircuitBreakerBuilder::default()
                .failure_threshold(self.failure_threshold)
                .recovery_timeout(self.recovery_timeout)
                .success_threshold(self.success_threshold);
            #[cfg(feature = "metrics")]
            let b = b.on_transition(crate::metrics::record_transition);
            b
        });
        stack = stack.circuit_breaker(breaker);
        if let Some((capacity, rate)) = self.limit {
            stack = stack.rate_limit(capacity, rate);
        }
        let layer = stack.build()?;
        let stats = Arc::new(Counters::default());
        let transport = Counted {
            inner: Client::builder(TokioExecutor::new()).build(connector()),
            stats: stats.clone(),
        };
        let mut service = layer.layer(transport);
        if let Some(base) = &base {
            // Every request clones the service, and with it the handles on
            // the base host's breaker and bucket: no registry lookup for the
            // host most requests go to.
            let mut probe = Request::new(());
            *probe.uri_mut() = base.parse().unwrap_or_default();
            service.prime(&probe);
        }
        Ok(GuardedClient {
            base,
            headers: self.headers,
            service,
            layer,
            stats,
            error_for_status: self.error_for_status,
        })
    }
}

/// An HTTP client with rate limiting, per-host circuit breakers and retries:
/// APIGuard's `AsyncRateLimitedClient` (see [the crate docs](crate)), on
/// `hyper_util`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use apiguard::GuardedClient;
///
/// let client = GuardedClient::builder()
///     .base_url("http://127.0.0.1:8080")
///     .rate_limit(10, 5.0)           // waits for a token instead of failing
///     .max_retries(3)                // backoff with jitter, honours Retry-After
///     .failure_threshold(5)          // per-host circuit breaker
///     .recovery_timeout(Duration::from_secs(10))
///     .build()?;
/// let res = client.get("/health").await?;
/// println!("{}", res.status());
/// # Ok(()) }
/// ```
///
/// Cloning is cheap; clones share the limits, breakers and retry budget.
///
/// The timeouts and retries cover each request up to its response head; the
/// body then streams to the caller, who bounds the reading of it (a body that
/// drips is handed over, not cut off).
#[derive(Clone)]
pub struct GuardedClient {
    base: Option<String>,
    headers: HeaderMap,
    service: Guard<Transport>,
    layer: GuardLayer,
    stats: Arc<Counters>,
    error_for_status: bool,
}

impl fmt::Debug for GuardedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedClient")
            .field("base", &self.base)
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl GuardedClient {
    /// Starts a builder.
    pub fn builder() -> GuardedClientBuilder {
        GuardedClientBuilder::default()
    }

    /// The stack, to inspect breakers and buckets.
    pub fn layer(&self) -> &GuardLayer {
        &self.layer
    }

    /// What this client (and its clones) did so far.
    pub fn stats(&self) -> ClientStats {
        self.stats.snapshot()
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Response<Incoming>, ClientError> {
        self.send(Method::GET, path, Bytes::new()).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Response<Incoming>, ClientError> {
        self.send(Method::DELETE, path, Bytes::new()).await
    }

    /// `POST path` with `body`. Not retried unless the policy allows
    /// non-idempotent retries or a default `Idempotency-Key` is set.
    pub async fn post(
        &self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        self.send(Method::POST, path, body.into()).await
    }

    /// `PUT path` with `body`.
    pub async fn put(
        &self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        self.send(Method::PUT, path, body.into()).await
    }

    /// `PATCH path` with `body`.
    pub async fn patch(
        &self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        self.send(Method::PATCH, path, body.into()).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>, ClientError> {
        let uri = self.resolve(path)?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        self.request(req).await
    }

    fn resolve(&self, path: &str) -> Result<Uri, ClientError> {
        let full;
        let target = if path.starts_with("http://") || path.starts_with("https://") {
            path
        } else {
            let Some(base) = &self.base else {
                return Err(ClientError::invalid(format!(
                    "`{path}` is relative and no base_url is set"
                )));
            };
            full = if path.starts_with('/') {
                format!("{base}{path}")
            } else {
                format!("{base}/{path}")
            };
            &full
        };
        let uri: Uri = target
            .parse()
            .map_err(|_| ClientError::invalid(format!("`{target}` is not a valid URL")))?;
        check_scheme(&uri).map_err(ClientError::invalid)?;
        Ok(uri)
    }

    /// Sends a request through the stack. A relative URI is joined to the
    /// base URL; default headers are added where the request has none.
    pub async fn request(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ClientError> {
        if req.uri().scheme().is_none() {
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            *req.uri_mut() = self.resolve(&path)?;
        }
        for (name, value) in &self.headers {
            if !req.headers().contains_key(name) {
                req.headers_mut().insert(name, value.clone());
            }
        }
        // Lets the transport tell a request's first attempt from its retries
        // (the retry layer copies extensions into each attempt).
        let attempted = Arc::new(AttemptState::default());
        req.extensions_mut().insert(Attempted(attempted.clone()));
        let started = Clock::system().now();
        let result = self.service.clone().oneshot(req).await;
        let elapsed = Clock::system().now().saturating_sub(started);
        let result = match result {
            Ok(res) if self.error_for_status && is_error_status(res.status()) => {
                Err(ClientError::from_status(&res))
            }
            Ok(res) => Ok(res),
            Err(e) => Err(ClientError::from_box(e)),
        };
        // A final 429 or 5xx is a failure whether or not it is returned as
        // an error: the caller did not get what it asked for.
        let failed_status = match &result {
            Ok(res) => fails_request(res.status()),
            Err(_) => false,
        };
        #[cfg(feature = "metrics")]
        {
            let label = match &result {
                Ok(_) if failed_status => crate::metrics::ERROR_STATUS,
                Ok(_) => "ok",
                Err(e) => crate::metrics::error_label(&*e.source),
            };
            crate::metrics::record_request(label, elapsed);
            let on_network = attempted.nanos.load(Ordering::Relaxed);
            crate::metrics::record_wait(elapsed.saturating_sub(on_network));
        }
        let s = &self.stats;
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.request_nanos.fetch_add(elapsed, Ordering::Relaxed);
        if failed_status {
            s.failed.fetch_add(1, Ordering::Relaxed);
            s.by_kind[ErrorKind::Status as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Err(err) = &result {
            s.failed.fetch_add(1, Ordering::Relaxed);
            s.by_kind[err.kind as usize].fetch_add(1, Ordering::Relaxed);
            if err.retries_exhausted() {
                s.retries_exhausted.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

/// A status [`error_for_status`](GuardedClientBuilder::error_for_status)
/// turns into an error.
fn is_error_status(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// A final status the stats count as a failed request.
fn fails_request(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// What went wrong, in the terms a caller acts on.
///
/// When retries ran out, the kind is that of the last attempt's error (an
/// open circuit, a timeout, a transport error…);
/// [`ClientError::retries_exhausted`] says that retries ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No token came within `max_wait`; see [`ClientError::retry_after`].
    RateLimited,
    /// The host's circuit is open; see [`ClientError::retry_after`].
    CircuitOpen,
    /// The retry budget refused to retry a failure.
    BudgetExhausted,
    /// The attempt or total timeout elapsed.
    Timeout,
    /// The connection failed (refused, reset, closed early...).
    Transport,
    /// The request could not be built (a bad URL).
    InvalidRequest,
    /// The final response had a `4xx` or `5xx` status, and the client was
    /// built with [`error_for_status`](GuardedClientBuilder::error_for_status);
    /// see [`ClientError::status`].
    Status,
}

const KINDS: usize = ErrorKind::Status as usize + 1;

/// The error of a [`GuardedClient`] request.
///
/// The questions a caller asks — [`kind`](Self::kind),
/// [`is_circuit_open`](Self::is_circuit_open),
/// [`is_rate_limited`](Self::is_rate_limited),
/// [`retry_after`](Self::retry_after) — are answered from the cause: when
/// retries ran out, from the last attempt's error. `Display` reads
/// `retries exhausted after 3 attempts: circuit open; next probe in 4s`,
/// and [`source`](std::error::Error::source) walks down the same chain.
pub struct ClientError {
    kind: ErrorKind,
    source: BoxError,
}

impl ClientError {
    fn invalid(msg: String) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            source: msg.into(),
        }
    }

    fn from_box(source: BoxError) -> Self {
        Self {
            kind: kind_of(&*source),
            source,
        }
    }

    fn from_status<B>(res: &Response<B>) -> Self {
        let retry_after = res.headers().get(http::header::RETRY_AFTER).and_then(|v| {
            apiguard_core::headers::parse_retry_after(v, std::time::SystemTime::now())
        });
        Self {
            kind: ErrorKind::Status,
            source: Box::new(StatusError {
                status: res.status(),
                retry_after,
            }),
        }
    }

    /// What kind of failure this is (of the last attempt, when retries ran
    /// out).
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The error of the last attempt when retries ran out, otherwise the
    /// error itself.
    pub fn cause(&self) -> &(dyn std::error::Error + 'static) {
        cause_of(&*self.source)
    }

    /// The wait the limiter, the breaker or the server asked for, if any:
    /// the last one the server sent when retries ran out, else the last
    /// refusal's.
    pub fn retry_after(&self) -> Option<Duration> {
        let hint = self
            .source
            .downcast_ref::<RetriesExhausted>()
            .and_then(RetriesExhausted::retry_after);
        if hint.is_some() {
            return hint;
        }
        let cause = self.cause();
        if let Some(s) = cause.downcast_ref::<StatusError>() {
            return s.retry_after();
        }
        apiguard_core::error::refusal_retry_after(cause)
    }

    /// Attempts made, when retries ran out.
    pub fn attempts(&self) -> Option<u32> {
        self.source
            .downcast_ref::<RetriesExhausted>()
            .map(RetriesExhausted::attempts)
    }

    /// Whether the request was retried until the retries (or the deadline)
    /// ran out; [`kind`](Self::kind) is then the last attempt's.
    pub fn retries_exhausted(&self) -> bool {
        self.source.is::<RetriesExhausted>()
    }

    /// The status of the final response, for an error of kind
    /// [`ErrorKind::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        self.source.downcast_ref::<StatusError>().map(|s| s.status)
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }

    /// Whether the request was refused for rate limiting (the last attempt
    /// was, when retries ran out).
    pub fn is_rate_limited(&self) -> bool {
        self.kind == ErrorKind::RateLimited
    }

    /// Whether the request was refused by an open circuit (the last attempt
    /// was, when retries ran out).
    pub fn is_circuit_open(&self) -> bool {
        self.kind == ErrorKind::CircuitOpen
    }

    /// Whether a timeout elapsed.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }
}

/// The last attempt's error inside a [`RetriesExhausted`], or `e` itself.
fn cause_of<'a>(e: &'a (dyn std::error::Error + 'static)) -> &'a (dyn std::error::Error + 'static) {
    match e.downcast_ref::<RetriesExhausted>() {
        Some(r) => &**r.last_error(),
        None => e,
    }
}

/// The kind of `e`, read from its cause.
pub(crate) fn kind_of(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let e = cause_of(e);
    if e.is::<RateLimited>() {
        ErrorKind::RateLimited
    } else if e.is::<CircuitOpen>() {
        ErrorKind::CircuitOpen
    } else if e.is::<BudgetExhausted>() {
        ErrorKind::BudgetExhausted
    } else if e.is::<tower::timeout::error::Elapsed>() {
        ErrorKind::Timeout
    } else if e.is::<StatusError>() {
        ErrorKind::Status
    } else {
        ErrorKind::Transport
    }
}

impl fmt::Debug for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A final response whose status is an error, as
/// [`error_for_status`](GuardedClientBuilder::error_for_status) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusError {
    status: StatusCode,
    retry_after: Option<Duration>,
}

impl StatusError {
    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's `Retry-After`, if it had one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server answered {}", self.status)
    }
}

impl std::error::Error for StatusError {}

/// Counts of what a [`GuardedClient`] did: [`GuardedClient::stats`].
///
/// `failed` is the sum of `rate_limited`, `circuit_open`,
/// `budget_exhausted`, `timeouts`, `transport` and `error_status`;
/// `retries_exhausted` counts the failed requests whose retries ran out,
/// whatever the last attempt's error was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests that finished (either way).
    pub requests: u64,
    /// Requests that failed: an error, or a final `429` or `5xx` response
    /// (returned as `Ok` unless the client was built with
    /// [`error_for_status`](GuardedClientBuilder::error_for_status)).
    pub failed: u64,
    /// ... of which refused for rate limiting (the last attempt, when
    /// retries ran out).
    pub rate_limited: u64,
    /// ... of which refused by an open circuit (likewise).
    pub circuit_open: u64,
    /// ... of which the retry budget refused to retry.
    pub budget_exhausted: u64,
    /// ... of which timed out.
    pub timeouts: u64,
    /// ... of which failed in the transport.
    pub transport: u64,
    /// ... of which ended in a final `429` or `5xx` response, or, with
    /// `error_for_status`, any `4xx`/`5xx`.
    pub error_status: u64,
    /// Failed requests that were retried until the retries (or the
    /// deadline) ran out.
    pub retries_exhausted: u64,
    /// Attempts that went out on the network (first tries and retries).
    pub attempts: u64,
    /// ... of which were retries.
    pub retries: u64,
    /// Time requests spent in total.
    pub request_time: Duration,
    /// Time attempts spent on the network.
    pub attempt_time: Duration,
}

impl ClientStats {
    /// Time requests spent waiting (for tokens, for backoff, for the circuit)
    /// rather than on the network.
    pub fn waiting(&self) -> Duration {
        self.request_time.saturating_sub(self.attempt_time)
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
    by_kind: [AtomicU64; KINDS],
    retries_exhausted: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    request_nanos: AtomicU64,
    attempt_nanos: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ClientStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            requests: l(&self.requests),
            failed: l(&self.failed),
            rate_limited: l(&self.by_kind[ErrorKind::RateLimited as usize]),
            circuit_open: l(&self.by_kind[ErrorKind::CircuitOpen as usize]),
            budget_exhausted: l(&self.by_kind[ErrorKind::BudgetExhausted as usize]),
            timeouts: l(&self.by_kind[ErrorKind::Timeout as usize]),
            transport: l(&self.by_kind[ErrorKind::Transport as usize]),
            error_status: l(&self.by_kind[ErrorKind::Status as usize]),
            retries_exhausted: l(&self.retries_exhausted),
            attempts: l(&self.attempts),
            retries: l(&self.retries),
            request_time: nanos_to_duration(l(&self.request_nanos)),
            attempt_time: nanos_to_duration(l(&self.attempt_nanos)),
        }
    }
}

/// The transport with attempt counting.
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    stats: Arc<Counters>,
}

/// Per-request bookkeeping the retry layer copies into every attempt.
#[derive(Debug, Clone)]
struct Attempted(Arc<AttemptState>);

#[derive(Debug, Default)]
struct AttemptState {
    seen: AtomicBool,
    nanos: AtomicU64,
}

impl<S: Service<Request<B>>, B> Service<Request<B>> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.stats.attempts.fetch_add(1, Ordering::Relaxed);
        let retry = matches!(
            req.extensions().get::<Attempted>(),
            Some(Attempted(state)) if state.seen.swap(true, Ordering::Relaxed)
        );
        if retry {
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(feature = "metrics")]
        crate::metrics::record_attempt(retry);
        let request = req.extensions().get::<Attempted>().map(|a| a.0.clone());
        CountedFuture {
            inner: self.inner.call(req),
            stats: self.stats.clone(),
            request,
            started: Clock::system().now(),
        }
    }
}

pin_project! {
    /// Response future of [`Counted`].
    #[derive(Debug)]
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        stats: Arc<Counters>,
        request: Option<Arc<AttemptState>>,
        started: Nanos,
    }
}

impl<F: Future> Future for CountedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let spent = Clock::system().now().saturating_sub(*this.started);
        this.stats.attempt_nanos.fetch_add(spent, Ordering::Relaxed);
        if let Some(request) = this.request {
            request.nanos.fetch_add(spent, Ordering::Relaxed);
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exhausted(last: BoxError) -> ClientError {
        let e = RetriesExhausted::new(4, last).with_retry_after(None);
        ClientError::from_box(Box::new(e))
    }

    #[test]
    fn the_last_cause_inside_retries_exhausted_answers() {
        let err = exhausted(Box::new(RateLimited::new(Duration::from_millis(1500))));
        assert_eq!(err.kind(), ErrorKind::RateLimited);
        assert!(err.is_rate_limited() && !err.is_circuit_open());
        assert!(err.retries_exhausted());
        assert_eq!(err.attempts(), Some(4));
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));

        let err = exhausted(Box::new(tower::timeout::error::Elapsed::new()));
        assert!(err.is_timeout());
        assert_eq!(err.retry_after(), None);

        let err = exhausted("connection reset".into());
        assert_eq!(err.kind(), ErrorKind::Transport);
        assert_eq!(
            err.to_string(),
            "retries exhausted after 4 attempts: connection reset"
        );
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.source().unwrap().to_string(), "connection reset");
    }

    #[test]
    fn a_server_hint_kept_by_retry_wins_over_the_last_refusal() {
        let e = RetriesExhausted::new(
            2,
            Box::new(CircuitOpen::new(Some(Duration::from_secs(9)))) as BoxError,
        )
        .with_retry_after(Some(Duration::from_secs(3)));
        let err = ClientError::from_box(Box::new(e));
        assert!(err.is_circuit_open());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn error_status_reads_retry_after_and_says_the_status() {
        let res = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header(http::header::RETRY_AFTER, "12")
            .body(())
            .unwrap();
        let err = ClientError::from_status(&res);
        assert_eq!(err.kind(), ErrorKind::Status);
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(err.retry_after(), Some(Duration::from_secs(12)));
        assert_eq!(
            err.to_string(),
            "the server answered 503 Service Unavailable"
        );
        assert!(fails_request(StatusCode::TOO_MANY_REQUESTS));
        assert!(fails_request(StatusCode::BAD_GATEWAY));
        assert!(!fails_request(StatusCode::NOT_FOUND));
        assert!(is_error_status(StatusCode::NOT_FOUND));
    }
}
