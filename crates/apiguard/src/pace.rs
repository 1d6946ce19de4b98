//! [`HostPaces`]: each host's adaptive pace, learned from its `429`s and
//! quota fields (see [`apiguard_ratelimit::pace`] for the control law).
//!
//! A host gets a [`Pacer`] the first time it pushes back — a `429`, a `503`
//! with `Retry-After`, or quota fields saying nothing is left — and from
//! then on every request to it waits for the pacer's slot (and out its
//! pauses) instead of the configured bucket's; the pace never exceeds the
//! configured rate limit. A host that never pushed back has no pacer:
//! its requests pay one atomic load to learn that, and each response a
//! status comparison and a look for the quota fields.
//!
//! # Observability
//!
//! Every change of a host's pace emits a `tracing` event under the target
//! `apiguard::pace` — `INFO` for a throttle, a published quota or an
//! exhausted one, `DEBUG` for growth — with the fields `host`, `old_rate`,
//! `new_rate` (requests per second), `pause_ms` and `reason`. With the
//! `metrics` feature the gauge `apiguard_host_pace{host}` holds each
//! host's pace; the first [`MAX_LABELLED_HOSTS`] hosts paced are labelled
//! by name, later ones share the label `other`, so the number of series
//! stays bounded.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use apiguard_core::grpc::{Code, Pushback};
use apiguard_core::headers::{
    RATELIMIT, X_RATELIMIT_REMAINING, X_RATELIMIT_RESET, parse_retry_after,
};
use apiguard_core::{BoxError, Clock, Nanos};
use apiguard_ratelimit::{PaceChange, PaceConfig, PaceHint, PaceReason, Pacer};
use dashmap::DashMap;
use http::{HeaderMap, Response, StatusCode};

use crate::stack::HostScope;

type Hasher = foldhash::fast::RandomState;

/// Hosts beyond this many share the metrics label `other`.
pub const MAX_LABELLED_HOSTS: usize = 32;

/// The pacers of a [`GuardLayer`](crate::GuardLayer), one per host that
/// pushed back (see the [module docs](self)).
///
/// At most `max_hosts` are kept; when a new host finds no room, pacers no
/// service holds and whose host is not paused are let go. A host that
/// still finds no room is not paced (its requests go at the configured
/// limit, if any) until room is made.
///
/// Clones share the pacers.
#[derive(Clone)]
pub struct HostPaces {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<HostScope, Paced, Hasher>,
    /// Bumped whenever a host gets a pacer: a service's cached view of a
    /// host without one is stale when this moved.
    epoch: AtomicU64,
    config: PaceConfig,
    max_hosts: usize,
    labelled: AtomicUsize,
    clock: Clock,
}

/// A host's pacer and its metrics label.
#[derive(Clone)]
pub(crate) struct Paced {
    pacer: Pacer,
    label: Arc<str>,
}

impl fmt::Debug for HostPaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostPaces")
            .field("config", &self.inner.config)
            .field("max_hosts", &self.inner.max_hosts)
            .field("paced", &self.len())
            .finish()
    }
}

impl HostPaces {
    pub(crate) fn new(config: PaceConfig, max_hosts: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher(Hasher::default()),
                epoch: AtomicU64::new(0),
                config,
                max_hosts,
                labelled: AtomicUsize::new(0),
                clock: Clock::system(),
            }),
        }
    }

    /// The pacer of `host`, if it has one.
    pub fn pacer(&self, host: &HostScope) -> Option<Pacer> {
        self.inner.map.get(host).map(|p| p.pacer.clone())
    }

    /// The current pace of `host` (requests per second), if it is paced.
    pub fn rate(&self, host: &HostScope) -> Option<f64> {
        self.inner.map.get(host).map(|p| p.pacer.rate())
    }

    /// Whether `host` is paused now.
    pub fn is_paused(&self, host: &HostScope) -> bool {
        self.inner
            .map
            .get(host)
            .is_some_and(|p| p.pacer.is_paused_at(self.inner.clock.now()))
    }

    /// How many hosts are paced.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Whether no host is.
    pub fn is_empty(&self) -> bool {
        self.inner.map.is_empty()
    }

    /// The settings every host's pacer starts from.
    pub fn config(&self) -> &PaceConfig {
        &self.inner.config
    }

    fn label(&self, host: &HostScope) -> Arc<str> {
        let n = self.inner.labelled.fetch_add(1, Ordering::Relaxed);
        if n >= MAX_LABELLED_HOSTS {
            return Arc::from("other");
        }
        match host {
            Some(a) => Arc::from(a.as_str()),
            None => Arc::from("*"),
        }
    }

    /// The pacer of `host`, made if need be (and if there is room).
    #[cold]
    fn get_or_create(&self, host: &HostScope) -> Option<Paced> {
        let inner = &*self.inner;
        if let Some(p) = inner.map.get(host) {
            return Some(p.clone());
        }
        if inner.map.len() >= inner.max_hosts && !self.sweep() {
            return None;
        }
        let paced = inner
            .map
            .entry(host.clone())
            .or_insert_with(|| Paced {
                pacer: Pacer::new(inner.config, inner.clock.clone()),
                label: self.label(host),
            })
            .clone();
        inner.epoch.fetch_add(1, Ordering::Release);
        Some(paced)
    }

    /// Lets go of pacers no one holds whose host is not paused; says
    /// whether room was made.
    fn sweep(&self) -> bool {
        let inner = &*self.inner;
        let now = inner.clock.now();
        inner
            .map
            .retain(|_, p| p.pacer.handles() > 1 || p.pacer.is_paused_at(now));
        inner.map.len() < inner.max_hosts
    }
}

/// A service's view of one host's pacer: found once, then read with one
/// atomic load per request.
pub(crate) struct PaceSlot {
    paces: HostPaces,
    paced: OnceLock<Paced>,
    /// The registry's epoch when this slot last found no pacer.
    epoch: AtomicU64,
}

impl PaceSlot {
    pub(crate) fn new(paces: &HostPaces, host: &HostScope) -> Self {
        // The epoch is read before the map: a pacer made in between is
        // found on the next request.
        let epoch = paces.inner.epoch.load(Ordering::Acquire);
        let paced = OnceLock::new();
        if let Some(p) = paces.inner.map.get(host) {
            let _ = paced.set(p.clone());
        }
        Self {
            paces: paces.clone(),
            paced,
            epoch: AtomicU64::new(epoch),
        }
    }

    /// The host's pacer, if it has one.
    #[inline]
    fn paced(&self, host: &HostScope) -> Option<&Paced> {
        if let Some(p) = self.paced.get() {
            return Some(p);
        }
        let now = self.paces.inner.epoch.load(Ordering::Acquire);
        if now == self.epoch.load(Ordering::Relaxed) {
            return None;
        }
        self.refresh(host, now)
    }

    #[cold]
    fn refresh(&self, host: &HostScope, epoch: u64) -> Option<&Paced> {
        match self.paces.inner.map.get(host) {
            Some(p) => {
                let _ = self.paced.set(p.clone());
                self.paced.get()
            }
            None => {
                self.epoch.store(epoch, Ordering::Relaxed);
                None
            }
        }
    }

    /// The host's pacer, if it has one.
    #[inline]
    pub(crate) fn pacer(&self, host: &HostScope) -> Option<&Pacer> {
        self.paced(host).map(|p| &p.pacer)
    }

    /// Whether the host is paused now.
    pub(crate) fn is_paused(&self, host: &HostScope) -> bool {
        self.paced(host)
            .is_some_and(|p| p.pacer.is_paused_at(self.paces.inner.clock.now()))
    }

    /// Learns from the response to a request to `host` admitted at
    /// `admitted` (the pacer's clock then; zero when the host had no
    /// pacer).
    #[inline]
    pub(crate) fn observe<R>(
        &self,
        host: &HostScope,
        admitted: Nanos,
        result: &Result<Response<R>, BoxError>,
    ) {
        let Ok(res) = result else {
            return;
        };
        let throttled = is_throttle(res);
        let paced = self.paced(host);
        if paced.is_none() && !throttled && !may_be_exhausted(res.headers()) {
            return;
        }
        self.learn(host, paced.cloned(), throttled, admitted, res.headers());
    }

    #[cold]
    fn learn(
        &self,
        host: &HostScope,
        paced: Option<Paced>,
        throttled: bool,
        admitted: Nanos,
        headers: &HeaderMap,
    ) {
        let inner = &*self.paces.inner;
        let wall = SystemTime::now();
        let hint = PaceHint::from_headers(headers, wall, &inner.config);
        let paced = match paced {
            Some(p) => p,
            None if throttled || hint.pause.is_some() => {
                let Some(p) = self.paces.get_or_create(host) else {
                    return;
                };
                let _ = self.paced.set(p.clone());
                p
            }
            None => return,
        };
        let now = inner.clock.now();
        if throttled {
            let retry_after = headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, wall));
            let wait = retry_after.max(hint.pause);
            report(&paced, paced.pacer.throttled(wait, admitted, now));
            let quota = PaceHint {
                pause: None,
                rate: hint.rate,
            };
            report(&paced, paced.pacer.published(&quota, now));
        } else {
            report(&paced, paced.pacer.published(&hint, now));
            report(&paced, paced.pacer.delivered(now));
        }
    }
}

impl PaceSlot {
    /// As [`observe`](Self::observe), for a gRPC call: a trailers-only
    /// `RESOURCE_EXHAUSTED` is the throttle, its `grpc-retry-pushback-ms`
    /// the pause; other answers of a paced host let it speed up.
    #[inline]
    pub(crate) fn observe_grpc<R>(
        &self,
        host: &HostScope,
        admitted: Nanos,
        result: &Result<Response<R>, BoxError>,
    ) {
        let Ok(res) = result else {
            return;
        };
        let throttled = Code::from_headers(res.headers()) == Some(Code::ResourceExhausted);
        let paced = self.paced(host);
        if paced.is_none() && !throttled {
            return;
        }
        let pushback = if throttled {
            Pushback::from_headers(res.headers()).and_then(Pushback::wait)
        } else {
            None
        };
        self.learn_grpc(host, paced.cloned(), throttled, admitted, pushback);
    }

    #[cold]
    fn learn_grpc(
        &self,
        host: &HostScope,
        paced: Option<Paced>,
        throttled: bool,
        admitted: Nanos,
        pushback: Option<Duration>,
    ) {
        let paced = match paced {
            Some(p) => p,
            None => {
                let Some(p) = self.paces.get_or_create(host) else {
                    return;
                };
                let _ = self.paced.set(p.clone());
                p
            }
        };
        let now = self.paces.inner.clock.now();
        if throttled {
            let wait = pushback;
            report(&paced, paced.pacer.throttled(wait, admitted, now));
        } else {
            report(&paced, paced.pacer.delivered(now));
        }
    }
}

/// `429`, or `503` with a `Retry-After` that parses (one that does not is
/// as if absent: a plain outage, the breaker's business).
#[inline]
fn is_throttle<R>(res: &Response<R>) -> bool {
    let s = res.status();
    s == StatusCode::TOO_MANY_REQUESTS
        || (s == StatusCode::SERVICE_UNAVAILABLE
            && res
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now()))
                .is_some())
}

/// Whether a response may say its quota is used up (a host without a
/// pacer looks no further unless it does).
#[inline]
fn may_be_exhausted(headers: &HeaderMap) -> bool {
    !headers.is_empty()
        && (headers.contains_key(RATELIMIT)
            || (headers.contains_key(X_RATELIMIT_REMAINING)
                && headers.contains_key(X_RATELIMIT_RESET)))
}

fn report(paced: &Paced, change: Option<PaceChange>) {
    let Some(c) = change else {
        return;
    };
    let pause_ms = u64::try_from(c.pause.as_millis()).unwrap_or(u64::MAX);
    if c.reason == PaceReason::Recovering {
        tracing::debug!(
            target: "apiguard::pace",
            host = %paced.label,
            old_rate = c.old_rate,
            new_rate = c.new_rate,
            pause_ms,
            reason = c.reason.as_str(),
            "host pace changed"
        );
    } else {
        tracing::info!(
            target: "apiguard::pace",
            host = %paced.label,
            old_rate = c.old_rate,
            new_rate = c.new_rate,
            pause_ms,
            reason = c.reason.as_str(),
            "host pace changed"
        );
    }
    #[cfg(feature = "metrics")]
    crate::metrics::record_pace(&paced.label, c.new_rate);
}

/// The default longest pause.
pub(crate) const DEFAULT_MAX_PAUSE: Duration = apiguard_ratelimit::pace::DEFAULT_MAX_PAUSE;

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use tokio::time::Instant;
    use tower::{Service, ServiceExt, service_fn};
    use tower_layer::Layer;

    use crate::GuardLayer;

    fn get(host: &str) -> Request<Full<Bytes>> {
        Request::get(format!("http://{host}/"))
            .body(Full::default())
            .unwrap()
    }

    /// An upstream whose first call answers `429` (with `Retry-After:
    /// retry_after` seconds) after `delay`; later calls `200` at once.
    #[allow(clippy::type_complexity)]
    fn refusing_once(
        retry_after: Option<u64>,
        delay: Duration,
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
                let mut res = Response::new(Full::default());
                if n == 0 {
                    tokio::time::sleep(delay).await;
                    *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    if let Some(s) = retry_after {
                        res.headers_mut()
                            .insert(http::header::RETRY_AFTER, s.to_string().parse().unwrap());
                    }
                }
                Ok::<_, Infallible>(res)
            }
        });
        (svc, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_new_request_to_its_host_until_retry_after() {
        let layer = GuardLayer::builder().build().unwrap();
        let (up, _) = refusing_once(Some(2), Duration::ZERO);
        let svc = layer.layer(up);
        let start = Instant::now();
        let res = svc.clone().oneshot(get("a.example")).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let res = svc.clone().oneshot(get("a.example")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Another host is not held.
        let before = Instant::now();
        svc.oneshot(get("b.example")).await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO);
        let paces = layer.paces().unwrap();
        assert!(paces.rate(&Some("a.example".parse().unwrap())).is_some());
        assert!(paces.rate(&Some("b.example".parse().unwrap())).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_its_token_is_held_by_a_pause_that_begins_meanwhile() {
        let layer = GuardLayer::builder()
            .rate_limit(apiguard_core::Quota::from_rate(1, 1.0))
            .build()
            .unwrap();
        // The first call is refused 100 ms in, with `Retry-After: 5`.
        let (up, calls) = refusing_once(Some(5), Duration::from_millis(100));
        let svc = layer.layer(up);
        let start = Instant::now();
        let first = tokio::spawn(svc.clone().oneshot(get("a.example")));
        tokio::task::yield_now().await;
        // The bucket is empty: this one waits a second for its token, and
        // the pause begins while it waits.
        let second = svc.clone().oneshot(get("a.example")).await.unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        assert!(
            start.elapsed() >= Duration::from_millis(5100),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            first.await.unwrap().unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn with_one_scope_for_all_hosts_a_429_pauses_them_all() {
        let layer = GuardLayer::builder().per_host(false).build().unwrap();
        let (up, _) = refusing_once(Some(3), Duration::ZERO);
        let svc = layer.layer(up);
        svc.clone().oneshot(get("a.example")).await.unwrap();
        let start = Instant::now();
        svc.oneshot(get("b.example")).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn without_adaptive_a_429_holds_nothing() {
        let layer = GuardLayer::builder().adaptive(false).build().unwrap();
        let (up, _) = refusing_once(Some(3), Duration::ZERO);
        let svc = layer.layer(up);
        svc.clone().oneshot(get("a.example")).await.unwrap();
        let start = Instant::now();
        svc.oneshot(get("a.example")).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(layer.paces().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_cut_to_max_pause_and_waits_within_the_total_timeout() {
        let layer = GuardLayer::builder()
            .max_pause(Duration::from_secs(4))
            .total_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let (up, _) = refusing_once(Some(86_400), Duration::ZERO);
        let svc = layer.layer(up);
        svc.clone().oneshot(get("a.example")).await.unwrap();
        let start = Instant::now();
        let res = svc.oneshot(get("a.example")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_published_exhausted_quota_pauses_the_host_until_its_reset() {
        let layer = GuardLayer::builder().build().unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let up = service_fn(move |_req: Request<Full<Bytes>>| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res = Response::new(Full::<Bytes>::default());
                if n == 0 {
                    let h = res.headers_mut();
                    h.insert("x-ratelimit-remaining", "0".parse().unwrap());
                    h.insert("x-ratelimit-reset", "7".parse().unwrap());
                }
                Ok::<_, Infallible>(res)
            }
        });
        let svc = layer.layer(up);
        let res = svc.clone().oneshot(get("a.example")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let start = Instant::now();
        svc.oneshot(get("a.example")).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }
}
