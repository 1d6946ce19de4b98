//! The transport under the stack: `hyper_util`'s client (HTTPS with the
//! `https` feature), wrapped in [`Counted`] to count the attempts that go
//! out on the network.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use apiguard_core::clock::{Clock, Nanos};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::stats::Counters;

#[cfg(not(feature = "https"))]
pub(super) type Connector = HttpConnector;
#[cfg(feature = "https")]
pub(super) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

pub(super) type Transport = Counted<Client<Connector, Full<Bytes>>>;

/// Refuses, before anything is sent, a scheme this build cannot speak.
pub(super) fn check_scheme(uri: &Uri) -> Result<(), String> {
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
pub(super) fn connector() -> Connector {
    HttpConnector::new()
}

#[cfg(feature = "https")]
pub(super) fn connector() -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build()
}

/// The transport with attempt counting.
#[derive(Clone, Debug)]
pub(crate) struct Counted<S> {
    pub(super) inner: S,
    pub(super) stats: Arc<Counters>,
    /// The `server.address` labels of `http.client.request.duration`.
    #[cfg(feature = "metrics")]
    pub(super) hosts: Arc<crate::metrics::HostLabels>,
}

/// Per-request bookkeeping the retry layer copies into every attempt.
#[derive(Debug, Clone)]
pub(super) struct Attempted(pub(super) Arc<AttemptState>);

#[derive(Debug, Default)]
pub(super) struct AttemptState {
    seen: AtomicBool,
    pub(super) nanos: AtomicU64,
}

impl<S, B, RB> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>, Response = http::Response<RB>>,
    S::Error: std::error::Error + 'static,
{
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
        #[cfg(feature = "metrics")]
        let labels = Some(crate::metrics::AttemptLabels::of(&req, &self.hosts));
        #[cfg(not(feature = "metrics"))]
        let labels = ();
        CountedFuture {
            inner: self.inner.call(req),
            stats: self.stats.clone(),
            request,
            started: Clock::system().now(),
            labels,
        }
    }
}

pin_project! {
    /// Response future of [`Counted`].
    #[derive(Debug)]
    pub(crate) struct CountedFuture<F> {
        #[pin]
        inner: F,
        stats: Arc<Counters>,
        request: Option<Arc<AttemptState>>,
        started: Nanos,
        labels: Labels,
    }
}

/// What the attempt's metric sample needs (nothing without `metrics`).
#[cfg(feature = "metrics")]
type Labels = Option<crate::metrics::AttemptLabels>;
#[cfg(not(feature = "metrics"))]
type Labels = ();

impl<F, RB, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    E: std::error::Error + 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let spent = Clock::system().now().saturating_sub(*this.started);
        this.stats.attempt_nanos.fetch_add(spent, Ordering::Relaxed);
        if let Some(request) = this.request {
            request.nanos.fetch_add(spent, Ordering::Relaxed);
        }
        #[cfg(feature = "metrics")]
        if let Some(labels) = this.labels.take() {
            let (status, err) = match &out {
                Ok(res) => (Some(res.status()), None),
                Err(e) => (None, Some(e as &(dyn std::error::Error + 'static))),
            };
            labels.record(spent as f64 / 1e9, status, err);
        }
        Poll::Ready(out)
    }
}
