//! [`GuardedClient`]: a `hyper_util` HTTP client behind the whole stack.
//!
//! The client's parts, from the bottom: its errors ([`ClientError`], what a
//! caller matches on), its counts ([`ClientStats`]), the transport
//! (hyper_util's client, counting attempts), and the builder that puts
//! [`GuardLayer`] over it.

use std::fmt;
use std::sync::Arc;

use apiguard_core::clock::Clock;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::stack::{Guard, GuardLayer};

mod builder;
mod error;
mod stats;
mod transport;

pub use builder::GuardedClientBuilder;
#[cfg(feature = "metrics")]
pub(crate) use error::kind_of;
pub use error::{ClientError, ErrorKind, StatusError};
pub use stats::ClientStats;

use error::{fails_request, is_error_status};
use stats::Counters;
use transport::{AttemptState, Attempted, Transport, check_scheme};

/// An HTTP client with rate limiting, per-host circuit breakers and retries:
/// APIGuard's `AsyncRateLimitedClient` (see [the crate docs](crate)), on
/// `hyper_util`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use apiguard::{GuardedClient, Quota};
///
/// let client = GuardedClient::builder()
///     .base_url("http://127.0.0.1:8080")
///     .rate_limit(Quota::from_rate(10, 5.0)) // waits for a token instead of failing
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

    /// One host's breaker state, tokens and pace, by its name
    /// (`"api.example.com"`, `"127.0.0.1:8080"`, or a URL): see
    /// [`GuardLayer::host`].
    pub fn host(&self, host: &str) -> Result<crate::HostState, crate::NotAHost> {
        self.layer.host(host)
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
            let on_network = attempted.nanos.load(std::sync::atomic::Ordering::Relaxed);
            crate::metrics::record_wait(elapsed.saturating_sub(on_network));
        }
        self.stats.record(elapsed, &result, failed_status);
        result
    }
}
