//! Over real sockets: an axum upstream that fails on command, a hyper client
//! through `CircuitBreakerLayer`, and an axum server answering refusals with
//! `503` + `Retry-After`.
#![cfg(not(loom))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, CircuitBreakerLayer, State};
use apiguard_core::{BoxError, CircuitOpen, RejectionResponseLayer};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Default)]
struct Upstream {
    failing: AtomicBool,
    requests: AtomicUsize,
}

async fn spawn_upstream() -> (SocketAddr, Arc<Upstream>) {
    let state = Arc::new(Upstream::default());
    let s = state.clone();
    let app = Router::new().route(
        "/",
        get(move || {
            let s = s.clone();
            async move {
                s.requests.fetch_add(1, Ordering::SeqCst);
                if s.failing.load(Ordering::SeqCst) {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state)
}

fn get_req(addr: SocketAddr) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn client_breaker_opens_refuses_locally_probes_and_closes() {
    const RECOVERY: Duration = Duration::from_millis(300);
    let (addr, upstream) = spawn_upstream().await;
    let breaker = CircuitBreaker::builder()
        .failure_threshold(3)
        .recovery_timeout(RECOVERY)
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .service(client);

    upstream.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get_req(addr))
            .await
            .unwrap();
        assert_eq!(res.status(), 500);
    }
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 3);

    for _ in 0..20 {
        let err: BoxError = svc
            .ready()
            .await
            .unwrap()
            .call(get_req(addr))
            .await
            .unwrap_err();
        let open = err
            .downcast_ref::<CircuitOpen>()
            .expect("refused by the breaker");
        assert!(open.retry_after().unwrap() <= RECOVERY);
    }
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        3,
        "refusals never reach the upstream"
    );

    // Still failing when the probe goes out: one probe, and open again.
    tokio::time::sleep(RECOVERY + Duration::from_millis(50)).await;
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get_req(addr))
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 4);

    // Recovered: the next probe closes it.
    upstream.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(RECOVERY + Duration::from_millis(50)).await;
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get_req(addr))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(breaker.state(), State::Closed);
    for _ in 0..5 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get_req(addr))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn server_answers_refusals_with_503_and_retry_after() {
    let breaker = CircuitBreaker::builder()
        .failure_threshold(2)
        .recovery_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                c.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::BAD_GATEWAY }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionResponseLayer::new().other_errors_as_500())
                .layer(CircuitBreakerLayer::new(breaker.clone())),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for _ in 0..2 {
        let res = client.request(get_req(addr)).await.unwrap();
        assert_eq!(res.status(), 502);
    }
    let res = client.request(get_req(addr)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "30");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
