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
}

/// Per-request bookkeeping the retry layer copies into every attempt.
#[derive(Debug, Clone)]
pub(super) struct Attempted(pub(super) Arc<AttemptState>);

#[derive(Debug, Default)]
pub(super) struct AttemptState {
    seen: AtomicBool,
    pub(super) nanos: AtomicU64,
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
    pub(crate) struct CountedFuture<F> {
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
