//! gRPC end to end: a real tonic server (tonic-health's `Health` service)
//! and a real tonic client over loopback, with `GuardLayer` in gRPC mode
//! in front of the client's `Channel`, and apiguard's server refusals in
//! front of the server.
//!
//! The server's answers are real `grpc-status` codes on the wire: a tower
//! layer in front of the tonic server answers planned calls trailers-only
//! (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, with or without
//! `grpc-retry-pushback-ms`), or lets the health service answer and
//! rewrites the status in its trailers, after the message. tonic-health
//! answers `NOT_FOUND` on its own for a service it does not know.
//!
//! These tests run on the real clock (h2 and tonic keep their own timers):
//! they assert lower bounds of waits the server asked for, never speed.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard::breaker::{CircuitBreaker, CircuitBreakerLayer, State};
use apiguard::core::RejectionResponseLayer;
use apiguard::grpc::{Code, GrpcBody, GrpcClassifier, GrpcTrailersLayer};
use apiguard::retry::{ReplayBody, RetryPolicyBuilder};
use apiguard::{BoxError, GuardLayer, RateLimitLayer, TokenBucket};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder};

const CHECK: &str = "grpc.health.v1.Health/Check";

/// What the server does with one planned call.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Answers at once, trailers-only, with this code and pushback value.
    TrailersOnly(Code, Option<&'static str>),
    /// Lets the health service answer, then puts this code in the trailers.
    InTrailers(Code),
}

/// The server's plan (one fault per call, in order; then real answers)
/// and the calls that reached it.
#[derive(Clone, Default)]
struct Plan {
    faults: Arc<Mutex<VecDeque<Fault>>>,
    calls: Arc<AtomicU32>,
}

impl Plan {
    fn with(faults: impl IntoIterator<Item = Fault>) -> Self {
        let plan = Plan::default();
        plan.faults.lock().unwrap().extend(faults);
        plan
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// The tower layer in front of the tonic server that carries out the plan.
#[derive(Clone)]
struct Faulty<S> {
    inner: S,
    plan: Plan,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S> Service<Request<Body>> for Faulty<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFut<Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.plan.calls.fetch_add(1, Ordering::SeqCst);
        let fault = self.plan.faults.lock().unwrap().pop_front();
        match fault {
            None => {
                let fut = self.inner.call(req);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Some(Fault::TrailersOnly(code, pushback)) => {
                let mut res = Response::new(Body::empty());
                let h = res.headers_mut();
                h.insert("content-type", HeaderValue::from_static("application/grpc"));
                h.insert("grpc-status", code.to_header_value());
                h.insert("grpc-message", HeaderValue::from_static("planned fault"));
                if let Some(p) = pushback {
                    h.insert("grpc-retry-pushback-ms", HeaderValue::from_static(p));
                }
                Box::pin(async move { Ok(res) })
            }
            Some(Fault::InTrailers(code)) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let res = fut.await.map_err(Into::into)?;
                    Ok(res.map(|body| {
                        Body::new(body.map_frame(move |frame| match frame.into_trailers() {
                            Ok(mut trailers) => {
                                trailers.insert("grpc-status", code.to_header_value());
                                hyper::body::Frame::trailers(trailers)
                            }
                            Err(frame) => frame,
                        }))
                    }))
                })
            }
        }
    }
}

/// A tonic server of the health service behind the plan, on loopback.
async fn serve(plan: &Plan) -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let plan = plan.clone();
    let faulty = tower::layer::layer_fn(move |inner| Faulty {
        inner,
        plan: plan.clone(),
    });
    tokio::spawn(
        Server::builder()
            .layer(faulty)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

type GuardedSvc = BoxCloneService<Request<Body>, Response<GrpcBody<Body>>, BoxError>;

/// A tonic health client whose channel is behind `guard`: the request body
/// recorded for replay above the guard, a tonic body again below it.
fn guarded(addr: SocketAddr, guard: GuardLayer) -> HealthClient<GuardedSvc> {
    let origin: http::Uri = format!("http://{addr}").parse().unwrap();
    let channel = Endpoint::from(origin.clone()).connect_lazy();
    let svc = ServiceBuilder::new()
        .layer(GrpcTrailersLayer::new())
        .map_request(|r: Request<Body>| r.map(|b| ReplayBody::new(b, 64 * 1024)))
        .layer(guard)
        .map_request(|r: Request<ReplayBody<Body>>| r.map(Body::new))
        .service(channel);
    HealthClient::with_origin(BoxCloneService::new(svc), origin)
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

/// A retry policy with gRPC's rules and no jitter, quick to back off.
fn grpc_retry() -> RetryPolicyBuilder {
    RetryPolicyBuilder::grpc()
        .max_retries(3)
        .base_delay(Duration::from_millis(10))
        .jitter(apiguard::Jitter::None)
        .no_budget()
}

fn breaker_guard(threshold: u32) -> GuardLayer {
    GuardLayer::builder()
        .grpc(true)
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(threshold)
                .recovery_timeout(Duration::from_secs(60)),
        )
        .max_wait(Duration::ZERO)
        .build()
        .unwrap()
}

/// Whether the breaker of the host at `addr` is open.
fn is_open(guard: &GuardLayer, addr: SocketAddr) -> bool {
    let host = Some(addr.to_string().parse().unwrap());
    guard.breakers().unwrap().state(&host) == State::Open
}

#[tokio::test]
async fn repeated_unavailable_opens_the_breaker_and_later_calls_stay_local() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, None); 3]);
    let addr = serve(&plan).await;
    let guard = breaker_guard(3);
    let mut client = guarded(addr, guard.clone());
    for _ in 0..3 {
        let status = client.check(check("")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    assert!(is_open(&guard, addr));
    // Refused here: the server sees no fourth call.
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(plan.calls(), 3);
    assert!(
        status.message().contains("circuit"),
        "{:?}",
        status.message()
    );
}

#[tokio::test]
async fn unavailable_in_the_trailers_after_a_message_is_classified() {
    let plan = Plan::with([Fault::InTrailers(Code::Unavailable); 2]);
    let addr = serve(&plan).await;
    let guard = breaker_guard(2);
    let mut client = guarded(addr, guard.clone());
    for _ in 0..2 {
        let status = client.check(check("")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    assert!(is_open(&guard, addr));
    client.check(check("")).await.unwrap_err();
    assert_eq!(plan.calls(), 2);
}

#[tokio::test]
async fn ok_in_the_trailers_counts_as_a_success_for_the_breaker() {
    // Two consecutive failures open it; an OK between them resets the count.
    let plan = Plan::with([
        Fault::TrailersOnly(Code::Unavailable, None),
        Fault::InTrailers(Code::Ok),
        Fault::TrailersOnly(Code::Unavailable, None),
    ]);
    let addr = serve(&plan).await;
    let guard = breaker_guard(2);
    let mut client = guarded(addr, guard.clone());
    client.check(check("")).await.unwrap_err();
    let ok = client.check(check("")).await.unwrap();
    assert_eq!(ok.into_inner().status, 1); // SERVING
    client.check(check("")).await.unwrap_err();
    assert!(!is_open(&guard, addr));
    client.check(check("")).await.unwrap();
    assert_eq!(plan.calls(), 4);
}

#[tokio::test]
async fn client_errors_such_as_not_found_leave_the_breaker_closed() {
    // tonic-health answers NOT_FOUND for a service it does not know.
    let plan = Plan::default();
    let addr = serve(&plan).await;
    let guard = breaker_guard(2);
    let mut client = guarded(addr, guard.clone());
    for _ in 0..5 {
        let status = client.check(check("no.such.Service")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    assert!(!is_open(&guard, addr));
    assert_eq!(plan.calls(), 5);
}

#[tokio::test]
async fn unavailable_with_pushback_holds_the_breaker_open() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, Some("60000"))]);
    let addr = serve(&plan).await;
    let guard = breaker_guard(100);
    let mut client = guarded(addr, guard.clone());
    client.check(check("")).await.unwrap_err();
    assert!(is_open(&guard, addr));
    client.check(check("")).await.unwrap_err();
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn resource_exhausted_with_pushback_delays_the_retry_by_at_least_the_pushback() {
    let plan = Plan::with([Fault::TrailersOnly(Code::ResourceExhausted, Some("300"))]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .adaptive(false)
        .retry(
            grpc_retry()
                .grpc_retryable_codes([Code::Unavailable, Code::ResourceExhausted])
                .grpc_idempotent_methods([CHECK]),
        )
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    let start = Instant::now();
    client.check(check("")).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(plan.calls(), 2);
}

#[tokio::test]
async fn resource_exhausted_is_not_retried_unless_listed() {
    let plan = Plan::with([Fault::TrailersOnly(Code::ResourceExhausted, Some("10"))]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .adaptive(false)
        .retry(grpc_retry().grpc_idempotent_methods([CHECK]))
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn a_negative_pushback_means_do_not_retry() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, Some("-1"))]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(grpc_retry().grpc_idempotent_methods([CHECK]))
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn an_idempotent_method_is_retried_after_unavailable() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, None); 2]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(grpc_retry().grpc_idempotent_methods([CHECK]))
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    client.check(check("")).await.unwrap();
    assert_eq!(plan.calls(), 3);
}

#[tokio::test]
async fn a_non_idempotent_method_is_not_retried_once_it_reached_the_server() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, None)]);
    let addr = serve(&plan).await;
    // No method named idempotent: Check may not be sent twice.
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(grpc_retry())
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn a_whole_service_can_be_named_idempotent() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, None)]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(grpc_retry().grpc_idempotent_methods(["grpc.health.v1.Health/"]))
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    client.check(check("")).await.unwrap();
    assert_eq!(plan.calls(), 2);
}

#[tokio::test]
async fn a_status_in_the_trailers_is_never_retried_the_call_is_committed() {
    let plan = Plan::with([Fault::InTrailers(Code::Unavailable)]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(grpc_retry().grpc_idempotent_methods([CHECK]))
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn grpc_mode_gives_a_plain_retry_policy_grpc_rules() {
    // An HTTP policy: with `grpc(true)` it learns A6's defaults
    // (UNAVAILABLE, and no method idempotent), so nothing is retried here.
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, None)]);
    let addr = serve(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(apiguard::RetryPolicy::builder())
        .build()
        .unwrap();
    assert!(guard.retry_policy().unwrap().is_grpc());
    let mut client = guarded(addr, guard);
    client.check(check("")).await.unwrap_err();
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retried_for_any_method() {
    // Nothing listens at first; the server comes up while the client backs
    // off. Check is not named idempotent, but it was never sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let guard = GuardLayer::builder()
        .grpc(true)
        .retry(
            RetryPolicyBuilder::grpc()
                .max_retries(8)
                .base_delay(Duration::from_millis(100))
                .max_delay(Duration::from_millis(200))
                .jitter(apiguard::Jitter::None)
                .no_budget(),
        )
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = TcpListener::bind(addr).await.unwrap();
        Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
    });
    let res = client.check(check("")).await;
    assert!(res.is_ok(), "{res:?}");
    server.abort();
}

#[tokio::test]
async fn resource_exhausted_pushback_paces_the_host_for_later_calls() {
    let plan = Plan::with([Fault::TrailersOnly(Code::ResourceExhausted, Some("300"))]);
    let addr = serve(&plan).await;
    // Adaptive pacing is on by default; no retry.
    let guard = GuardLayer::builder().grpc(true).build().unwrap();
    let mut client = guarded(addr, guard);
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let start = Instant::now();
    client.check(check("")).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn the_pattern_breaker_layer_takes_the_grpc_classifier() {
    let plan = Plan::with([Fault::TrailersOnly(Code::Unavailable, None); 2]);
    let addr = serve(&plan).await;
    let breaker = CircuitBreaker::builder()
        .failure_threshold(2)
        .recovery_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let origin: http::Uri = format!("http://{addr}").parse().unwrap();
    let channel = Endpoint::from(origin.clone()).connect_lazy();
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()).classifier(GrpcClassifier::new()))
        .service(channel);
    let mut client = HealthClient::with_origin(svc, origin);
    for _ in 0..2 {
        client.check(check("")).await.unwrap_err();
    }
    assert_eq!(breaker.state(), State::Open);
    client.check(check("")).await.unwrap_err();
    assert_eq!(plan.calls(), 2);
}

/// A tonic server behind apiguard's server refusals: a rate limit of one
/// call (then one every 10 s) answered by `RejectionResponseLayer`. It
/// also speaks HTTP/1, to show an HTTP request still gets `429`.
async fn serve_limited(plan: &Plan) -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bucket = TokenBucket::from_rate(1, 0.1).unwrap();
    let plan = plan.clone();
    let stack = ServiceBuilder::new()
        .layer(RejectionResponseLayer::new())
        .layer(RateLimitLayer::new(bucket).max_wait(Duration::ZERO))
        .layer(tower::layer::layer_fn(move |inner| Faulty {
            inner,
            plan: plan.clone(),
        }))
        .into_inner();
    tokio::spawn(
        Server::builder()
            .accept_http1(true)
            .layer(stack)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

#[tokio::test]
async fn the_server_refuses_a_grpc_client_with_resource_exhausted_and_pushback() {
    let plan = Plan::default();
    let addr = serve_limited(&plan).await;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    client.check(check("")).await.unwrap();
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 9_000 && pushback <= 10_000, "{pushback}");
    // Refused before the service.
    assert_eq!(plan.calls(), 1);
}

#[tokio::test]
async fn the_server_refuses_an_http_request_with_429_and_retry_after() {
    let plan = Plan::default();
    let addr = serve_limited(&plan).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
    // The first call takes the token (an HTTP/1 GET tonic does not route).
    client.get(uri.clone()).await.unwrap();
    let res = client.get(uri).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "10");
    assert!(res.headers().get("grpc-status").is_none());
}

#[tokio::test]
async fn the_server_answers_an_open_breaker_with_unavailable() {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let breaker = CircuitBreaker::builder()
        .recovery_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    breaker.force_open();
    let stack = ServiceBuilder::new()
        .layer(RejectionResponseLayer::new())
        .layer(CircuitBreakerLayer::new(breaker).classifier(GrpcClassifier::new()))
        .into_inner();
    tokio::spawn(
        Server::builder()
            .layer(stack)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let status = HealthClient::new(channel)
        .check(check(""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn a_guarded_client_waits_out_the_servers_pushback_and_gets_through() {
    let plan = Plan::default();
    let addr = serve_limited(&plan).await;
    let guard = GuardLayer::builder()
        .grpc(true)
        .adaptive(false)
        .retry(
            grpc_retry()
                .grpc_retryable_codes([Code::ResourceExhausted])
                .grpc_idempotent_methods([CHECK])
                .max_retry_after(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    let mut client = guarded(addr, guard);
    client.check(check("")).await.unwrap();
    // The server asks for ~10 s, more than the client's 1 s cap: it gives
    // up at once with the server's answer rather than sleeping on it.
    let start = Instant::now();
    let status = client.check(check("")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    // (It did not sleep the ~10 s the server asked for.)
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(plan.calls(), 1);
}
